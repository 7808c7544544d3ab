"""`vsteer generate` end to end on a tiny model and head saved to local folders."""

from __future__ import annotations

import json

from tiny_models import make_head

from vsteer_hf.cli import main


def test_generate_compare_prints_both_texts_and_per_token_risk(model_dir, tmp_path, capsys):
    head_dir = tmp_path / "head"
    make_head(32, scale=4.0).save_pretrained(head_dir)
    code = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--head",
            str(head_dir),
            "--prompt",
            "w10 w11 w12",
            "--prompt",
            "w20",
            "--threshold",
            "0.5",
            "-k",
            "4",
            "--max-new-tokens",
            "5",
            "--compare",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert out.count("steered:") == 2 and out.count("base:") == 2
    assert "step  steered token" in out and "risk" in out


def test_generate_json_chat_and_alpha_error(model_dir, tmp_path, capsys):
    head_dir = tmp_path / "head"
    make_head(32, scale=4.0).save_pretrained(head_dir)
    code = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--head",
            str(head_dir),
            "--prompt",
            "w10 w11",
            "--chat",
            "--threshold",
            "0.5",
            "--max-new-tokens",
            "4",
            "--json",
            "--greedy",
        ]
    )
    assert code == 0
    record = json.loads(capsys.readouterr().out.strip())
    assert len(record["risk"]) == len(record["tokens"]) == len(record["intervened"]) <= 4
    # the head has no calibrated curve: alpha must fail with a message that names the fix
    code = main(
        [
            "generate",
            "--model",
            str(model_dir),
            "--head",
            str(head_dir),
            "--prompt",
            "w10",
            "--alpha",
            "0.1",
            "--max-new-tokens",
            "2",
        ]
    )
    assert code == 2
    assert "threshold" in capsys.readouterr().err
