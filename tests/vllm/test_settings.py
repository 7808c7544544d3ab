"""`additional_config` parsing and the errors that name the fix (no engine needed)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vsteer_hf.vllm.settings import steering_from_additional_config


@pytest.fixture
def head_path(head_folder):
    return str(head_folder(bias=0.0, scale=1.0, seed=1))


def test_published_usage_parses_into_the_shared_config(head_path):
    cfg = {"vfd": {"value_head_path": head_path, "threshold": 0.3, "num_candidates": 8, "strict": True}}
    steering = steering_from_additional_config(cfg, "vfd")
    assert steering.config.num_candidates == 8 and steering.default_threshold() == pytest.approx(0.3)
    assert steering_from_additional_config(cfg, "abstain") is None
    assert steering.request_threshold({"vfd_threshold": 0.6}, 0.3) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"vfd": {"threshold": 0.3}}, "value_head_path"),
        ({"vfd": {"value_head_path": "HEAD", "threshold": 0.3, "num_candidate": 8}}, "unknown keys"),
        ({"vfd": {"value_head_path": "HEAD", "threshold": 1.3}}, r"\[0, 1\]"),
        ({"vfd": {"value_head_path": "HEAD"}}, "'threshold' or 'alpha'"),
        ({"vfd": {"value_head_path": "HEAD", "alpha": 0.1}}, "no conformal"),
        ({"vfd": {"value_head_path": "HEAD", "threshold": 0.3}, "abstain": {"value_head_path": "HEAD"}}, "both"),
        ({"vfd": "HEAD"}, "must be a dict"),
        ({"vfd": {"value_head_path": "HEAD", "threshold": 0.3, "candidate_forward": "tree"}}, "no engine counterpart"),
        ({"vfd": {"value_head_path": "HEAD", "threshold": 0.3, "rule": "args", "candidate_forward": "lazy"}},
         "needs rule='first_safe'"),
    ],
)
def test_bad_config_names_the_fix(head_path, config, message):
    config = {k: ({kk: (head_path if vv == "HEAD" else vv) for kk, vv in v.items()} if isinstance(v, dict) else v)
              for k, v in config.items()}
    with pytest.raises(ValueError, match=message):
        steering = steering_from_additional_config(config, "vfd")
        steering.default_threshold()


@pytest.mark.parametrize(
    ("section", "lazy"),
    [({}, True), ({"candidate_forward": "lazy"}, True), ({"candidate_forward": "expand"}, False),
     ({"rule": "args"}, False), ({"num_candidates": 1}, False)],
)
def test_the_engine_is_lazy_exactly_where_first_safe_allows_it(head_path, section, lazy):
    vfd = {"value_head_path": head_path, "threshold": 0.3, "num_candidates": 4, **section}
    assert steering_from_additional_config({"vfd": vfd}, "vfd").forwards_lazily() is lazy


def test_abstention_refuses_speculative_decoding(head_path):
    from vsteer_hf.vllm import ValueAbstentionLogitsProcessor

    fake = SimpleNamespace(
        additional_config={"abstain": {"value_head_path": head_path, "threshold": 0.5}},
        speculative_config=object(),
    )
    with pytest.raises(ValueError, match="speculative"):
        ValueAbstentionLogitsProcessor(fake, device=None, is_pin_memory=False)


def test_importing_the_package_does_not_import_vllm():
    import subprocess
    import sys

    code = "import sys, vsteer_hf, vsteer_hf.vllm; sys.exit('vllm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
