#!/usr/bin/env bash
# One prepared GPU check (issue 18): exactness on the device, decode cost, and cost at a planted intervention rate.
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_FOLDER]     (OUT_FOLDER default: $OUT)
#
# On the device machine: gather the wheels here first (bash benchmarks/gpu_wheels.sh), carry `.whl`, and run
#   bash benchmarks/gpu_check.sh            (stages capped at 8 minutes in all; results in $OUT)
# The wheels in .whl/ (transformers inside the supported range) are installed into a private folder
# first; the image's own packages do the rest. --dry-run runs every stage at tiny sizes on the CPU (CI)
# in the Python it is given ($PYTHON, default python3), installing nothing.
# Each stage runs under its own time limit and records its exit status; the script goes on after a
# failed stage and exits non-zero if any failed. At most 8 files are written (the device tool's limit):
#   summary.md  (status of each stage, the environment, every table)   gpu_check.log  (all output)
#   exactness.json  bench_decode.json  planted.json
set -uo pipefail

dry=0
out="${OUT:-}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "error: unknown option $arg; usage: gpu_check.sh [--dry-run] [OUT_FOLDER]" >&2; exit 2 ;;
    *) out="$arg" ;;
  esac
done
if [ -z "$out" ]; then
  echo "error: no output folder: pass one (gpu_check.sh [--dry-run] FOLDER) or set OUT" >&2
  exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
log="$out/gpu_check.log"
: >"$log"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

# ---- wheels carried to the device (benchmarks/gpu_wheels.sh gathers them, for the image's Python 3.12); a dry
# run uses the environment it is given
if [ "$dry" = 0 ] && compgen -G "$root/.whl/*.whl" >/dev/null; then
  site="$scratch/site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$root"/.whl/*.whl >>"$log" 2>&1 || { echo "error: installing .whl/ failed; see $log" >&2; exit 1; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"

# the supported transformers range, read from pyproject.toml (one place)
"$py" - "$root/pyproject.toml" >>"$log" 2>&1 <<'PY' || { echo "error: transformers outside the supported range; see $log" >&2; exit 1; }
import re, sys
from importlib import metadata
from packaging.specifiers import SpecifierSet
spec = re.search(r'"transformers([^"]+)"', open(sys.argv[1]).read()).group(1)
have = metadata.version("transformers")
print(f"transformers {have}, supported {spec}")
sys.exit(0 if have in SpecifierSet(spec) else 1)
PY

# candidate paths: every one the project has (not 'auto'), passed to bench_decode only if its CLI accepts it
paths=""
for p in $("$py" -c "from vsteer_hf.config import CANDIDATE_PATHS as P; print(' '.join(p for p in P if p != 'auto'))"); do
  if "$py" "$root/benchmarks/bench_decode.py" --paths "$p" --help >/dev/null 2>&1; then
    paths="${paths:+$paths,}$p"
  else
    echo "note: bench_decode.py does not accept --paths $p yet; stage bench_decode leaves it out" | tee -a "$log"
  fi
done

if [ "$dry" = 1 ]; then
  exact_args=(--dry-run)
  bench_args=(--model llama-50m --prompts 16 --batch 1 --k 8 --paths "${paths%%,*}" --new-tokens 2 --repeats 1 --threads 1)
  planted_args=(--dry-run)
  limits=(300 120 300 300)  # exactness head_devices bench_decode planted, seconds: a loaded CI machine
else
  exact_args=()
  bench_args=(--model mistral-7b-shape --prompts 512 --batch 1,16 --k 8 --paths "$paths" --new-tokens 64 --repeats 2)
  planted_args=(--model mistral-7b-shape --prompt 512 --batch 1,16 --k 8 --new-tokens 64 --repeats 2 --rate 0.03)
  limits=(90 45 240 120)  # 495 s in all: the 8-minute budget with the install (not yet timed on a GPU)
fi

status="$scratch/status"
: >"$status"
stage() {  # stage NAME SECONDS COMMAND...: run, log, and record "NAME rc seconds"
  local name="$1" seconds="$2"
  shift 2
  echo "== $name: $*" | tee -a "$log"
  local start=$SECONDS
  timeout "$seconds" "$@" >>"$log" 2>&1
  local rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$status"
  echo "== $name: exit $rc in $((SECONDS - start)) s" | tee -a "$log"
}

stage exactness "${limits[0]}" "$py" "$root/benchmarks/gpu_exactness.py" --out "$scratch" "${exact_args[@]}"
stage head_devices "${limits[1]}" "$py" -m pytest -q -p no:cacheprovider "$root/tests/test_head_devices.py"
stage bench_decode "${limits[2]}" "$py" "$root/benchmarks/bench_decode.py" "${bench_args[@]}" --out "$scratch/bench_decode.md"
stage planted "${limits[3]}" "$py" "$root/benchmarks/gpu_planted.py" --out "$scratch" "${planted_args[@]}"

for f in exactness.json bench_decode.json planted.json; do
  [ -f "$scratch/$f" ] && cp "$scratch/$f" "$out/$f"
done
{
  echo "# gpu_check $( [ "$dry" = 1 ] && echo "(dry run) ")$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "device: $("$py" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")' 2>&1)"
  echo "versions: $("$py" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>&1)"
  echo "candidate paths benchmarked: $paths"
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null); cpu pressure: $(head -1 /proc/pressure/cpu 2>/dev/null)"
  echo
  echo "| stage | exit | seconds |"
  echo "|---|---|---|"
  while read -r name rc secs; do echo "| $name | $rc | $secs |"; done <"$status"
  for f in exactness.md bench_decode.md planted.md; do
    if [ -f "$scratch/$f" ]; then echo; echo "## ${f%.md}"; echo; cat "$scratch/$f"; fi
  done
} >"$out/summary.md"
failed=$(awk '$2 != 0' "$status" | wc -l)
echo "gpu_check: $failed stage(s) failed; results in $out (summary.md)"
[ "$failed" = 0 ]
