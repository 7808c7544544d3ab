"""Execute the notebooks in place, so that the outputs stored in them come from the code in them.

    python notebooks/execute.py                          # every notebook here, at the CI size
    python notebooks/execute.py notebooks/02_train_value_head.ipynb --size full

Each notebook runs top to bottom in a fresh kernel of this interpreter (``sys.executable``, whatever
kernelspecs are installed elsewhere), in a temporary working folder, with ``VSTEER_NOTEBOOK_SIZE`` set,
the Hugging Face hub offline (``--online`` to allow downloads) and its progress bars off. A notebook that
fails is left as it was. ``tests/test_notebooks.py`` runs the notebooks through `execute` too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).resolve().parent
SIZE_ENV = "VSTEER_NOTEBOOK_SIZE"
SIZES = ("ci", "full")
CELL_TIMEOUT = 600  # seconds per cell
KERNEL_NAME = "python3"  # the name Colab and Jupyter know; here it always means sys.executable
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": KERNEL_NAME}


def notebook_paths() -> list[Path]:
    """Every notebook in this folder, in name order."""
    return sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def execute(
    nb: nbformat.NotebookNode,
    workdir: str | Path,
    size: str = "ci",
    timeout: int = CELL_TIMEOUT,
    offline: bool = True,
) -> nbformat.NotebookNode:
    """Run every cell of `nb` (in place) in a new kernel of this interpreter, with `workdir` as its
    working folder; raises `nbclient.exceptions.CellExecutionError`, naming the cell, on the first error."""
    if size not in SIZES:
        raise ValueError(f"size={size!r}: use one of {SIZES}")
    env = {SIZE_ENV: size, "HF_HUB_DISABLE_PROGRESS_BARS": "1", **({"HF_HUB_OFFLINE": "1"} if offline else {})}
    with tempfile.TemporaryDirectory(prefix="vsteer-kernels-") as kernels:
        spec_dir = Path(kernels) / KERNEL_NAME
        spec_dir.mkdir()
        argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
        spec = {"argv": argv, "display_name": KERNELSPEC["display_name"], "language": "python", "env": env}
        (spec_dir / "kernel.json").write_text(json.dumps(spec))
        manager = KernelManager(
            kernel_name=KERNEL_NAME,
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernels]),
            transport="ipc",  # local sockets in the temporary folder, not TCP ports
            ip=str(Path(kernels) / "ipc"),
        )
        client = NotebookClient(
            nb, km=manager, timeout=timeout, record_timing=False, resources={"metadata": {"path": str(workdir)}}
        )
        client.execute(cleanup_kc=True)  # shut the kernel down, though we made its manager
    return nb


def tidy(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Keep the metadata that matters on GitHub and Colab (kernel, language), drop the rest, and join
    consecutive pieces of one stream (a streamer prints token by token) as Jupyter shows them."""
    nb.metadata = nbformat.from_dict({"kernelspec": KERNELSPEC, "language_info": {"name": "python"}})
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
        if cell.cell_type != "code":
            continue
        outputs = []
        for output in cell.outputs:
            last = outputs[-1] if outputs else None
            if output.output_type == "stream" and last is not None and last.get("name") == output.name:
                last.text += output.text
            else:
                outputs.append(output)
        cell.outputs = [o for o in outputs if o.output_type != "stream" or o.text.strip()]
    return nb


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebook in notebooks/")
    parser.add_argument("--size", choices=SIZES, default="ci", help=f"sets {SIZE_ENV} (default: ci)")
    parser.add_argument("--online", action="store_true", help="let the notebooks reach the Hugging Face hub")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT, help="seconds per cell")
    args = parser.parse_args(argv)
    failed = []
    for path in args.notebooks or notebook_paths():
        nb = nbformat.read(path, as_version=4)
        began = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="vsteer-notebook-") as workdir:
                execute(nb, workdir, size=args.size, timeout=args.timeout, offline=not args.online)
        except Exception as err:
            print(f"{path.name}: FAILED after {time.perf_counter() - began:.0f} s, left unchanged\n{err}", flush=True)
            failed.append(path.name)
            continue
        nbformat.write(tidy(nb), path)
        print(f"{path.name}: executed at size {args.size} in {time.perf_counter() - began:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
