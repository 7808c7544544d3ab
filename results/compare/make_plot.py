"""Redraw compare.png from the two runs of this folder (same prompts, seeds and base rows): the rows
of both, VFD's threshold curve from vfd/compare.json and ProFS's settings from compare.json.

    python results/compare/make_plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

from vsteer_hf.eval.plots import tradeoff_plot

here = Path(__file__).parent
profs_run = json.loads((here / "compare.json").read_text())
vfd_run = json.loads((here / "vfd" / "compare.json").read_text())
base = next(r for r in profs_run["rows"] if r["name"] == "base")
assert base["toxic_rate"] == next(r for r in vfd_run["rows"] if r["name"] == "base")["toxic_rate"], "not the same base"
rows = [base, *(r for r in vfd_run["rows"] if r["name"] in ("vfd", "abstain"))]
rows += [r for r in profs_run["rows"] if r["name"] == "profs"]
curves = {
    "VFD threshold": [vfd_run["equal_fluency"]["base"], *vfd_run["equal_fluency"]["methods"]["VFD"]],
    "ProFS setting": [profs_run["equal_fluency"]["base"], *profs_run["equal_fluency"]["methods"]["ProFS"]],
}
tradeoff_plot(rows, here / "compare.png", curves=curves)
print(f"wrote {here / 'compare.png'}")
