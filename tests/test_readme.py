"""The README quickstart runs verbatim, pointed at a tiny model and head in local folders."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tiny_models import make_head

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_runs(model_dir, tmp_path, capsys):
    head_dir = tmp_path / "head-repo"
    make_head(32, scale=4.0).export_plugin_checkpoint(head_dir / "value_head.bin")
    code = _quickstart()
    code, n_model = re.subn(r'model_id = ".*?"', f'model_id = "{model_dir}"', code)
    code, n_head = re.subn(r'head_id = ".*?"', f'head_id = "{head_dir}"', code)
    assert n_model == n_head == 1, "the quickstart must name model_id and head_id once each"
    exec(compile(code, "README.md quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "risk per token:" in out and "interventions:" in out


def _embedded_snippet() -> str:
    section = README.read_text().split("## Steer the embedded model", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_readme_embedded_model_snippet_runs_verbatim(capsys, monkeypatch):
    """The embedded SmolLM2 (converted in the shared cache) steered by the shipped head, both by name."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VSTEER_NO_INSTALL", "1")
    exec(compile(_embedded_snippet(), "README.md embedded-model snippet", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("interventions: ") and out[-1].endswith(" tokens")
    assert len(out[-2].strip()) > 0  # the steered continuation
