"""`ValueHead.placed` from several threads and devices: a copy per device, never a move (issue 17).

Decoding places the head where the backbone's final norm runs; two threads steering on different
devices with one head must each get their own copy while the caller's module stays where it is.
On a CPU-only machine the second device is "meta"; with CUDA the same checks run on real devices.
"""

from __future__ import annotations

import threading

import pytest
import torch

from vsteer_hf.head import ValueHead

H = 16


def _where(head: ValueHead) -> list[tuple[torch.device, int]]:
    return [(p.device, p.data_ptr()) for p in head.parameters()]


def _place_from_threads(head: ValueHead, devices: list[str], rounds: int = 4) -> dict[str, list[ValueHead]]:
    """Every thread asks for its device at once (a barrier), `rounds` times; returns what each device got."""
    got: dict[str, list[ValueHead]] = {d: [] for d in devices}
    barrier = threading.Barrier(len(devices) * 2)
    errors: list[BaseException] = []

    def worker(device: str) -> None:
        try:
            for _ in range(rounds):
                barrier.wait()
                got[device].append(head.placed(device))
        except BaseException as err:  # surfaced in the main thread below
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(d,)) for d in devices for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return got


def test_threads_on_two_devices_get_one_copy_each_and_the_head_never_moves():
    head = ValueHead(H)
    before = _where(head)
    got = _place_from_threads(head, ["cpu", "meta"])
    assert all(h is head for h in got["cpu"]), "the head's own device must get the head itself"
    copies = {id(h) for h in got["meta"]}
    assert len(copies) == 1, "concurrent placement on one device made more than one copy"
    meta = got["meta"][0]
    assert meta is not head and all(p.device.type == "meta" for p in meta.parameters())
    assert _where(head) == before, "the caller's head was moved or its storage replaced"
    assert not any(p.requires_grad for p in meta.parameters()), "a placement copy must be frozen"


def test_the_device_object_and_its_name_share_one_copy():
    head = ValueHead(H)
    assert head.placed(torch.device("meta")) is head.placed("meta")
    assert head.placed(torch.device("cpu")) is head


CUDA_DEVICES = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(CUDA_DEVICES < 1, reason="needs a CUDA device (run by benchmarks/gpu_check.sh on a GPU)")
def test_cuda_and_cpu_threads_each_get_their_own_head():
    head = ValueHead(H)  # lives on the CPU
    before = _where(head)
    devices = ["cpu"] + [f"cuda:{i}" for i in range(min(CUDA_DEVICES, 2))]
    got = _place_from_threads(head, devices)
    assert all(h is head for h in got["cpu"])
    placed = {d: got[d][0] for d in devices[1:]}
    for device, copy in placed.items():
        assert {id(h) for h in got[device]} == {id(copy)}
        assert all(p.device == torch.device(device) for p in copy.parameters())
        x = torch.randn(3, H)
        torch.testing.assert_close(copy.p(x.to(device)).cpu(), head.p(x), rtol=1e-5, atol=1e-6)
    assert len({id(c) for c in placed.values()}) == len(placed), "two devices shared one copy"
    assert _where(head) == before, "the caller's head was moved"
    # and a head that lives on a GPU is copied, not moved, to the CPU
    on_gpu = ValueHead(H).to("cuda:0")
    gpu_before = _where(on_gpu)
    assert on_gpu.placed("cpu") is not on_gpu and _where(on_gpu) == gpu_before
