"""Redraw compare.png from the two runs of this folder (same 133 test prompts, seeds and settings):
base, VFD (with its threshold curve) and abstention from vfd/compare.json; ProFS at the setting
chosen on validation from compare.json.

    PYTHONPATH=. python results/compare/make_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

from vsteer_hf.eval.plots import tradeoff_plot

here = Path(__file__).parent
profs_run = json.loads((here / "compare.json").read_text())
vfd_run = json.loads((here / "vfd" / "compare.json").read_text())
rows = [r for r in vfd_run["rows"] if r["name"] in ("base", "vfd", "abstain")]
profs_rows = [r for r in profs_run["rows"] if r["name"] == "profs"]
rows += profs_rows
base = vfd_run["equal_fluency"]["base"]
curves = {"VFD threshold": [base, *vfd_run["equal_fluency"]["methods"]["VFD"]]}
if profs_rows and not profs_rows[0].get("error"):
    curves["ProFS setting"] = [base, profs_rows[0], *profs_run.get("curves", {}).get("profs", [])]
tradeoff_plot(rows, here / "compare.png", curves=curves)
print(f"wrote {here / 'compare.png'}")
