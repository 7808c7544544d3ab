"""ValueHead, HeadCard and the loaders: formats, round trips, the hub path and every refusal."""

from __future__ import annotations

import json
import os
import re

import huggingface_hub.hub_mixin
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import save_file
from torch import nn

import vsteer_hf.head as head_mod
from vsteer_hf.head import HeadCard, ValueHead, check_head_matches, load_value_head

H = 16
KEYS = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]

# The sidecar exactly as the value-steer plugin writes it (train_probe.save_probe_checkpoint, then
# scripts/decode_extract.py --phase calibrate folding the ĉ(α) curve into meta.calibration).
PUBLISHED_SIDECAR = {
    "feature_spec": {"layer": "final", "norm": "post", "pooling": "none", "dtype": "fp32"},
    "threshold": 0.8012,
    "meta": {
        "domain": "safety_canonical",
        "model": "mistralai/Mistral-7B-Instruct-v0.3",
        "loss": "focal",
        "coh_weight": 0.1,
        "use_td": True,
        "epochs": 10,
        "n_train": 61232,
        "recipe": "focal+td+coh0.1",
        "calibration": {
            "method": "decode-matched conformal posterior_threshold",
            "alphas": [0.05, 0.25, 0.45, 0.65, 0.85],
            "thresholds": [0.75, 0.52, 0.36, 0.25, 0.15],
            "n": 2000,
            "n_safe": 1100,
            "guarantee": "P(intervene | safe) <= alpha",
        },
    },
}


class _MissingOnHub(EntryNotFoundError):
    """What hf_hub_download raises for a file the repo does not have (no HTTP response needed)."""

    def __init__(self, message: str):
        Exception.__init__(self, message)


class _NotATensor:
    """Stands in for any pickled object that is not a tensor."""


def reference_mlp(hidden: int = H, seed: int = 0) -> nn.Sequential:
    """The plugin's head body, built independently of vsteer_hf."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1)
    )


def write_plugin_checkpoint(folder, name="value_head.bin", sidecar=PUBLISHED_SIDECAR, seed=0):
    """torch.save of the bare Sequential state dict + `<name>.meta.json`, as the plugin does."""
    path = os.path.join(folder, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mlp = reference_mlp(seed=seed)
    torch.save(mlp.state_dict(), path)
    if sidecar is not None:
        with open(path + ".meta.json", "w") as f:
            json.dump(sidecar, f)
    return path, mlp


@pytest.fixture
def x():
    return torch.randn(2, 5, H)  # (B, T, H)


# --------------------------------------------------------------------------- architecture
def test_architecture_keys_and_dtype(x):
    head = ValueHead(H)
    assert list(head.state_dict()) == KEYS
    assert [type(m) for m in head] == [nn.Linear, nn.Tanh, nn.Linear, nn.ReLU, nn.Linear]
    assert all(p.dtype == torch.float32 for p in head.parameters())
    assert head.hidden_size == H and head.card.hidden_size == H
    out = head(x.to(torch.bfloat16))
    assert out.dtype == torch.float32 and out.shape == (2, 5)
    torch.testing.assert_close(head.p(x), torch.sigmoid(head.logit(x)), rtol=0, atol=0)
    torch.testing.assert_close(head(x), head.logit(x), rtol=0, atol=0)


def test_wrong_input_width_and_card_size_are_refused():
    head = ValueHead(H)
    with pytest.raises(ValueError, match=r"expects hidden size 16 but got a hidden state of shape \(3, 8\)"):
        head.p(torch.randn(3, 8))
    with pytest.raises(ValueError, match="card says hidden size 8"):
        ValueHead(H, HeadCard(hidden_size=8))


# --------------------------------------------------------------------------- formats
def test_plugin_bin_with_published_sidecar_scores_like_the_reference(tmp_path, x):
    path, mlp = write_plugin_checkpoint(str(tmp_path))
    head = load_value_head(path, hidden_size=H)
    with torch.no_grad():
        expected = torch.sigmoid(mlp(x.float()).squeeze(-1))
    torch.testing.assert_close(head.p(x), expected, rtol=0, atol=0)
    card = head.card
    assert card.threshold == 0.8012
    assert card.backbone == "mistralai/Mistral-7B-Instruct-v0.3"
    assert card.hidden_size == H and card.risk_direction == "above"
    assert card.curve == {0.05: 0.75, 0.25: 0.52, 0.45: 0.36, 0.65: 0.25, 0.85: 0.15}
    assert card.training["recipe"] == "focal+td+coh0.1" and "model" not in card.training
    assert card.calibration["n_safe"] == 1100
    assert card.feature_spec.norm == "post" and card.feature_spec.layer == "final"
    assert not head.training and not any(p.requires_grad for p in head.parameters())


def test_safetensors_file_and_folder_score_like_bin(tmp_path, x):
    path, mlp = write_plugin_checkpoint(str(tmp_path / "bin"))
    st = tmp_path / "st"
    st.mkdir()
    save_file(mlp.state_dict(), str(st / "model.safetensors"))
    from_bin = load_value_head(path)
    for source in (st, st / "model.safetensors"):
        head = load_value_head(source)
        torch.testing.assert_close(head.logit(x), from_bin.logit(x), rtol=0, atol=0)
        assert head.card.threshold is None and head.card.hidden_size == H  # no sidecar: default card


def test_folder_prefers_safetensors_then_filename(tmp_path, x):
    _, mlp_bin = write_plugin_checkpoint(str(tmp_path), "value_head.bin", seed=1)
    mlp_st = reference_mlp(seed=2)
    save_file(mlp_st.state_dict(), str(tmp_path / "value_head.safetensors"))
    with torch.no_grad():
        want_st, want_bin = mlp_st(x).squeeze(-1), mlp_bin(x).squeeze(-1)
    torch.testing.assert_close(load_value_head(tmp_path).logit(x), want_st, rtol=0, atol=0)
    head = load_value_head(tmp_path, filename="value_head.bin")
    torch.testing.assert_close(head.logit(x), want_bin, rtol=0, atol=0)
    assert head.card.threshold == 0.8012


def test_save_pretrained_from_pretrained_round_trip(tmp_path, x):
    head = ValueHead(H, HeadCard(threshold=0.3, curve={0.05: 0.7, 0.5: 0.3}, backbone="tiny", training={"a": 1}))
    head.save_pretrained(tmp_path)
    names = set(os.listdir(tmp_path))
    assert {"value_head.safetensors", "value_head.safetensors.meta.json", "config.json"} <= names
    back = ValueHead.from_pretrained(tmp_path)
    assert isinstance(back, ValueHead) and back.card == head.card
    for k, v in head.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    torch.testing.assert_close(back.p(x), head.p(x), rtol=0, atol=0)
    assert not back.training and not any(p.requires_grad for p in back.parameters())


def test_export_plugin_checkpoint_loads_like_the_plugin(tmp_path, x):
    head = ValueHead(H, HeadCard(threshold=0.3, curve={0.05: 0.7}, backbone="tiny"))
    w, sidecar = head.export_plugin_checkpoint(tmp_path / "sub" / "value_head.bin")
    assert sidecar == w + ".meta.json"
    plugin_body = nn.Sequential(nn.Linear(H, H), nn.Tanh(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, 1))
    plugin_body.load_state_dict(torch.load(w, map_location="cpu"))  # strict, default weights_only
    with torch.no_grad():
        torch.testing.assert_close(plugin_body(x).squeeze(-1), head.logit(x), rtol=0, atol=0)
    with open(sidecar) as f:
        meta = json.load(f)  # the keys the plugin reads
    assert meta["threshold"] == 0.3 and meta["feature_spec"]["norm"] == "post"
    assert meta["meta"]["model"] == "tiny" and meta["meta"]["calibration"]["alphas"] == [0.05]
    back = load_value_head(w)
    assert back.card == head.card
    torch.testing.assert_close(back.logit(x), head.logit(x), rtol=0, atol=0)


def test_published_sidecar_round_trips_and_keeps_unknown_keys():
    data = json.loads(json.dumps(PUBLISHED_SIDECAR))
    data["future_top"] = {"x": 1}
    data["feature_spec"]["position"] = "last"
    data["meta"]["calibration"]["new_stat"] = 3
    card = HeadCard.from_dict(data)
    out = card.to_dict()
    for key, value in data.items():
        assert out[key] == value, key
    assert HeadCard.from_dict(out) == card


# --------------------------------------------------------------------------- hub
@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """hf_hub_download served from local folders: {repo_id: folder}; calls recorded."""
    repos: dict[str, str] = {}
    calls: list[tuple[str, str, str | None]] = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        path = os.path.join(repos[repo_id], filename)
        if not os.path.isfile(path):
            raise _MissingOnHub(f"{filename} not in {repo_id}")
        return path

    monkeypatch.setattr(head_mod, "hf_hub_download", fake_download)
    monkeypatch.setattr(huggingface_hub.hub_mixin, "hf_hub_download", fake_download)
    return repos, calls


def test_hub_sub_path_filename_and_revision(tmp_path, fake_hub, x):
    repos, calls = fake_hub
    repos["HenDav/value-steer-safety-head"] = str(tmp_path / "repo")
    _, mlp = write_plugin_checkpoint(str(tmp_path / "repo"), "mistral/hh-rlhf.bin")
    head = load_value_head(
        "HenDav/value-steer-safety-head", hidden_size=H, filename="mistral/hh-rlhf.bin", revision="abc123"
    )
    assert calls == [
        ("HenDav/value-steer-safety-head", "mistral/hh-rlhf.bin", "abc123"),
        ("HenDav/value-steer-safety-head", "mistral/hh-rlhf.bin.meta.json", "abc123"),
    ]
    with torch.no_grad():
        torch.testing.assert_close(head.logit(x), mlp(x).squeeze(-1), rtol=0, atol=0)
    assert head.card.curve[0.45] == 0.36


def test_hub_default_order_and_missing_sidecar(tmp_path, fake_hub):
    repos, calls = fake_hub
    repos["me/bare"] = str(tmp_path)
    write_plugin_checkpoint(str(tmp_path), "value_head.bin", sidecar=None)
    head = load_value_head("me/bare")
    assert [c[1] for c in calls] == [
        "value_head.safetensors",
        "model.safetensors",
        "value_head.bin",
        "value_head.bin.meta.json",
    ]
    assert head.card == HeadCard(hidden_size=H)


def test_hub_from_pretrained(tmp_path, fake_hub, x):
    repos, calls = fake_hub
    repos["me/head"] = str(tmp_path)
    head = ValueHead(H, HeadCard(threshold=0.4))
    head.save_pretrained(tmp_path)
    back = ValueHead.from_pretrained("me/head", revision="v1")
    assert back.card == head.card and {c[2] for c in calls} == {"v1"}
    torch.testing.assert_close(back.p(x), head.p(x), rtol=0, atol=0)


def test_hub_repo_without_weights(tmp_path, fake_hub):
    repos, _ = fake_hub
    repos["me/empty"] = str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"has none of .*pass filename="):
        load_value_head("me/empty")


def test_hub_offline_is_not_reported_as_missing(monkeypatch):
    def offline(repo_id, filename, revision=None, **kwargs):
        raise LocalEntryNotFoundError("cannot reach the hub and nothing is cached")

    monkeypatch.setattr(head_mod, "hf_hub_download", offline)
    with pytest.raises(FileNotFoundError, match="is in the local cache and the hub is unreachable"):
        load_value_head("me/head")


# --------------------------------------------------------------------------- refusals
def test_wrong_hidden_size_names_both_sizes(tmp_path):
    path, _ = write_plugin_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match="value head expects hidden size 16 but the backbone has 576"):
        load_value_head(path, hidden_size=576)
    head = load_value_head(path)
    with pytest.raises(ValueError, match=r"decode: value head expects hidden size 16 but the backbone has 8\b"):
        check_head_matches(head, 8, "decode")
    check_head_matches(head, H, "decode")


def test_missing_and_unexpected_keys_are_listed_sorted(tmp_path):
    state = reference_mlp().state_dict()
    del state["2.bias"], state["0.bias"]
    state["zz.extra"] = torch.zeros(1)
    state["aa.extra"] = torch.zeros(1)
    path = str(tmp_path / "bad.safetensors")
    save_file(state, path)
    with pytest.raises(ValueError) as err:
        load_value_head(path)
    msg = str(err.value)
    assert path in msg
    assert "missing keys ['0.bias', '2.bias']" in msg
    assert "unexpected keys ['aa.extra', 'zz.extra']" in msg


def test_prefixed_keys_get_a_hint(tmp_path):
    state = {f"net.{k}": v for k, v in reference_mlp().state_dict().items()}
    torch.save(state, tmp_path / "whole.bin")
    with pytest.raises(ValueError, match=r"prefixed with 'net\.'"):
        load_value_head(tmp_path / "whole.bin")


def test_wrong_shapes_are_listed(tmp_path):
    state = reference_mlp().state_dict()
    state["2.weight"] = torch.zeros(H, H + 1)
    state["4.bias"] = torch.zeros(2)
    torch.save(state, tmp_path / "shapes.bin")
    with pytest.raises(ValueError) as err:
        load_value_head(tmp_path / "shapes.bin")
    msg = str(err.value)
    assert "2.weight: (16, 17) != expected (16, 16)" in msg and "4.bias: (2,) != expected (1,)" in msg


@pytest.mark.parametrize("payload", [_NotATensor(), os.system], ids=["instance", "function"])
def test_pickle_with_non_tensor_objects_is_refused(tmp_path, payload):
    state = dict(reference_mlp().state_dict())
    state["0.bias"] = payload
    path = tmp_path / "evil.bin"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"evil\.bin: refused: the file contains non-tensor pickle objects"):
        load_value_head(path)


def test_garbage_bin_is_refused(tmp_path):
    (tmp_path / "value_head.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="refused: not a tensor-only torch checkpoint"):
        load_value_head(tmp_path)


def test_corrupt_sidecar_json(tmp_path):
    path, _ = write_plugin_checkpoint(str(tmp_path))
    with open(path + ".meta.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match=re.escape(path + ".meta.json") + ": value-head sidecar is not valid JSON"):
        load_value_head(path)


@pytest.mark.parametrize(
    ("patch", "expected"),
    [
        ({"threshold": "0.3"}, "'threshold' must be a number in \\[0, 1\\] or null, got '0.3'"),
        ({"meta": []}, "'meta' must be an object"),
        ({"feature_spec": {"layer": 3}}, "'feature_spec' must be an object of strings"),
        ({"hidden_size": 8}, "sidecar says hidden size 8 but the weights have 16"),
        ({"risk_direction": "up"}, "'risk_direction' must be one of"),
        (
            {"meta": {"calibration": {"alphas": [0.1, 0.2], "thresholds": [0.5]}}},
            "'meta.calibration.alphas' and '.thresholds' must be lists of equal length",
        ),
    ],
)
def test_sidecar_with_wrong_types(tmp_path, patch, expected):
    path, _ = write_plugin_checkpoint(str(tmp_path), sidecar={**PUBLISHED_SIDECAR, **patch})
    with pytest.raises(ValueError, match=re.escape(path + ".meta.json") + ": .*" + expected):
        load_value_head(path)


def test_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such value-head file"):
        load_value_head(str(tmp_path / "nope.bin"))


# --------------------------------------------------------------------------- ĉ(α)
def test_threshold_for_alpha():
    card = HeadCard.from_dict(PUBLISHED_SIDECAR)
    assert card.threshold_for_alpha(0.45) == 0.36
    assert card.threshold_for_alpha(0.35) == pytest.approx((0.52 + 0.36) / 2)
    assert card.threshold_for_alpha(0.10) == pytest.approx(0.75 + (0.52 - 0.75) * 0.25)
    with pytest.raises(ValueError, match=r"alpha=0.01 is outside the calibrated range \[0.05, 0.85\].*threshold="):
        card.threshold_for_alpha(0.01)
    with pytest.raises(ValueError, match="outside the calibrated range"):
        card.threshold_for_alpha(0.9)
    with pytest.raises(ValueError, match="no conformal ĉ\\(α\\) curve; pass threshold= explicitly or calibrate"):
        HeadCard().threshold_for_alpha(0.1)


# --------------------------------------------------------------------------- hostile and damaged checkpoints
class _Exploit:
    """Unpickling this would run `open(path, 'w')`, creating a file: the classic pickle attack."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("where", ["state value", "top level"])
def test_pickle_that_runs_code_is_refused_and_runs_nothing(tmp_path, where):
    marker = tmp_path / "pwned"
    state = dict(reference_mlp().state_dict())
    if where == "state value":
        state["0.bias"] = _Exploit(str(marker))
        payload = state
    else:
        payload = _Exploit(str(marker))
    path = tmp_path / "value_head.bin"
    torch.save(payload, path)
    assert not marker.exists()
    exploit = r"refused: the file contains non-tensor pickle objects \((io|builtins)\.open\)"
    with pytest.raises(ValueError, match=exploit):
        load_value_head(tmp_path)
    assert not marker.exists(), "loading the checkpoint executed code"
    # the control: a plain unpickle would have created the file, so the test can fail
    torch.load(path, weights_only=False)
    assert marker.exists()


def _checkpoint(tmp_path, fmt="safetensors", **overrides):
    """The reference head's weights with `overrides` replacing entries, saved as value_head.<fmt>."""
    state = {k: v.contiguous() for k, v in reference_mlp().state_dict().items()}
    state.update(overrides)
    path = tmp_path / f"value_head.{fmt}"
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def test_truncated_safetensors_is_refused_before_reading(tmp_path):
    path = _checkpoint(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"truncated safetensors file: the header places tensor data up to byte \d+"):
        load_value_head(path)
    path.write_bytes(data[:5])
    with pytest.raises(ValueError, match=r"truncated safetensors file .* 8-byte header length is missing"):
        load_value_head(path)
    path.write_bytes(data[:40])  # the header itself is cut
    with pytest.raises(ValueError, match=r"the header claims .* the file is truncated or not safetensors"):
        load_value_head(path)


def test_oversized_safetensors_is_refused(tmp_path):
    path = _checkpoint(tmp_path)
    with open(path, "ab") as f:
        f.write(b"\0" * 4096)
    with pytest.raises(ValueError, match="oversized safetensors file: 4096 bytes follow the last tensor"):
        load_value_head(path)


def test_safetensors_header_announcing_a_huge_tensor_is_refused_without_allocating(tmp_path):
    """A forged header that declares a 10^12-element weight: refused from the header alone."""
    path = _checkpoint(tmp_path)
    data = path.read_bytes()
    (n,) = __import__("struct").unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["0.weight"]["shape"] = [1_000_000, 1_000_000]
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + n :])
    with pytest.raises(ValueError, match=r"0\.weight: data_offsets .* do not hold a F32 tensor of shape \[1000000"):
        load_value_head(path)


def test_huge_safetensors_header_is_refused(tmp_path):
    path = tmp_path / "value_head.safetensors"
    path.write_bytes((1 << 40).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="the header claims 1099511627776 bytes"):
        load_value_head(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_wrong_dtype_is_refused(tmp_path, fmt):
    path = _checkpoint(tmp_path, fmt, **{"4.bias": torch.ones(1, dtype=torch.int64)})
    if fmt == "safetensors":
        pattern = r"4\.bias: dtype I64 \(value-head weights must be F16, BF16, F32 or F64\)"
    else:
        pattern = r"must be floating point, got \['4\.bias \(torch\.int64\)'\]"
    with pytest.raises(ValueError, match=pattern):
        load_value_head(path)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_wrong_shape_is_refused_in_both_formats(tmp_path, fmt):
    path = _checkpoint(tmp_path, fmt, **{"2.bias": torch.zeros(H + 1)})
    with pytest.raises(ValueError, match=r"2\.bias: \(17,\) != expected \(16,\)"):
        load_value_head(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_non_finite_weights_are_refused(tmp_path, fmt, bad):
    weight = reference_mlp().state_dict()["2.weight"].clone()
    weight[3, 4] = bad
    path = _checkpoint(tmp_path, fmt, **{"2.weight": weight})
    with pytest.raises(ValueError, match=r"NaN or infinite values in \['2\.weight'\]"):
        load_value_head(path)


def test_half_precision_weights_load_as_fp32_and_score_like_the_cast(tmp_path, x):
    state = {k: v.to(torch.bfloat16) for k, v in reference_mlp().state_dict().items()}
    save_file(state, str(tmp_path / "value_head.safetensors"))
    head = load_value_head(tmp_path)
    assert head[0].weight.dtype == torch.float32
    cast = reference_mlp()
    cast.load_state_dict({k: v.float() for k, v in state.items()})
    with torch.no_grad():
        torch.testing.assert_close(head.logit(x), cast(x).squeeze(-1), rtol=0, atol=0)


def test_config_pins_the_hub_revision(tmp_path, fake_hub, x):
    from vsteer_hf import ValueSteerConfig

    repos, calls = fake_hub
    repos["me/pinned"] = str(tmp_path)
    write_plugin_checkpoint(str(tmp_path))
    commit = "0123456789abcdef0123456789abcdef01234567"
    cfg = ValueSteerConfig(head="me/pinned", head_filename="value_head.bin", head_revision=commit, threshold=0.5)
    cfg.load_head(hidden_size=H)
    assert calls and {c[2] for c in calls} == {commit}


def test_placed_copies_instead_of_moving_and_refreshes_after_in_place_edits(x):
    head = ValueHead(H)
    assert head.placed("cpu") is head
    meta = head.placed("meta")
    assert meta is not head and meta[0].weight.device.type == "meta"
    assert head[0].weight.device.type == "cpu", "the caller's head was moved"
    assert head.placed("meta") is meta, "the per-device copy is cached"
    with torch.no_grad():
        head[4].bias.add_(1.0)
    assert head.placed("meta") is not meta, "a stale copy survived an in-place weight change"
    assert "_device_copies" not in head.__getstate__(), "placement copies would be pickled with the head"


def test_revision_with_a_local_path_is_refused_not_ignored(tmp_path):
    write_plugin_checkpoint(str(tmp_path))
    with pytest.raises(ValueError, match=r"revision='v1' pins a hub repo's commit, but .* is a local path"):
        load_value_head(tmp_path, revision="v1")


# --------------------------------------------------------------------------- shipped heads by name
def test_shipped_head_loads_by_name_and_is_listed():
    from vsteer_hf import shipped_heads
    from vsteer_hf.shipped import DEFAULT_HEAD, shipped_head_dir

    head = load_value_head(DEFAULT_HEAD, hidden_size=576)
    assert head.card.backbone == "smollm2-135m-instruct"
    by_folder = load_value_head(shipped_head_dir())
    assert all(
        torch.equal(a, b) for a, b in zip(head.state_dict().values(), by_folder.state_dict().values(), strict=True)
    )
    (listed,) = [h for h in shipped_heads() if h.name == DEFAULT_HEAD]
    assert listed.backbone == "smollm2-135m-instruct" and listed.threshold == head.card.threshold
    assert listed.results["val_auroc"] == head.card.training["val_auroc"]
    assert listed.results["sweep"]["vfd_threshold"] == pytest.approx(head.card.threshold)


def test_a_mistyped_shipped_name_fails_at_once_with_the_close_match(monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("a name that is not a hub id must not reach the hub")

    monkeypatch.setattr(head_mod, "hf_hub_download", no_hub)
    with pytest.raises(FileNotFoundError, match="did you mean 'smollm2-135m-instruct-rtp-toxicity'"):
        load_value_head("smollm2-135m-instruct-rtp-toxicty")
    with pytest.raises(ValueError, match="is a shipped head; drop it"):
        load_value_head("smollm2-135m-instruct-rtp-toxicity", revision="abc")


def test_no_network_asks_the_hub_for_cached_files_only(monkeypatch):
    calls = []

    def cached_only(repo_id, filename, revision=None, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(head_mod, "hf_hub_download", cached_only)
    monkeypatch.setattr(head_mod, "hub_resolves", lambda: False)
    with pytest.raises(FileNotFoundError, match="hub is unreachable"):
        load_value_head("me/head")
    assert calls == [True] * 4  # every default name looked up in the cache, none retried on the network
