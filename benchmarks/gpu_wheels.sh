#!/usr/bin/env bash
# Gather the wheels gpu_check.sh installs on the device machine into .whl/ (ignored by git, carried by the tool).
#
#   bash benchmarks/gpu_wheels.sh          then carry ".whl" in the device run
#
# The device image has torch 2.11 and transformers 5.17, below the supported range; everything else the
# project imports there (accelerate, safetensors, huggingface_hub >= 1.31, tokenizers 0.23, numpy, pyyaml,
# tqdm, pytest, hypothesis) is already in it, so only transformers (pinned inside pyproject's range) and
# regex travel, with the project's own wheel. Prints what travels in all (tracked + untracked files + .whl) against the tool's 64 MiB limit.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
# transformers inside pyproject.toml's >=5.19,<5.24; regex because transformers 5.23 wants >= 2025.10.22 and the
# image's version is unread (a newer one does no harm)
wheels=(transformers==5.23.0 regex==2026.11.19)
cd "$root"
rm -rf .whl
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${wheels[@]}"
# the project itself, for its distribution metadata (bench_decode records metadata.version("vsteer-hf")); the
# code that runs is the carried tree, first on PYTHONPATH
"$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$root" >/dev/null 2>&1 ||
  { echo "error: building the project's wheel failed: $py -m pip wheel --no-deps -w .whl $root" >&2; exit 1; }
tree_bytes=$(git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
wheel_bytes=$(du -cb .whl/*.whl | tail -1 | cut -f1)
total=$((tree_bytes + wheel_bytes))
printf 'tree %.1f MiB + wheels %.1f MiB = %.1f MiB of the 64 MiB the device tool carries\n' \
  "$(echo "$tree_bytes / 1048576" | bc -l)" "$(echo "$wheel_bytes / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "error: over 64 MiB: carry fewer wheels or ignore large files" >&2; exit 1; }
