"""The recorder's per-batch path never moves a tensor to the host (no .item(), .cpu(), bool(t) …).

On a GPU each of these would stall the device; here every such call made from nn_staining's code
between start_epoch and end_epoch fails the test, wherever the tensors live.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

import nn_staining
from nn_staining import NetworkTrace, kernels, load_trace

HOST_TRANSFERS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


PACKAGE = str(Path(nn_staining.__file__).resolve().parent)


def _called_from_nn_staining() -> bool:
    """Whether any caller up the stack is a module of the nn_staining package."""
    frame = sys._getframe(2)
    while frame is not None:
        if str(Path(frame.f_code.co_filename).resolve()).startswith(PACKAGE):
            return True
        frame = frame.f_back
    return False


@contextmanager
def host_transfers_forbidden(calls: list[str]) -> Iterator[None]:
    """Record every host transfer that nn_staining's code makes while the block runs."""
    originals = {name: getattr(torch.Tensor, name) for name in HOST_TRANSFERS}

    def guard(name, original):
        def wrapper(self, *args, **kwargs):
            if _called_from_nn_staining():
                calls.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, guard(name, original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("chunk_bytes", [None, 1])
def test_batches_make_no_host_transfer(tmp_path: Path, monkeypatch, chunk_bytes: int | None) -> None:
    if chunk_bytes is not None:
        # a chunk per batch: the chunk reductions run inside the batch loop too
        from nn_staining import stats

        monkeypatch.setattr(stats, "DEFAULT_CHUNK_BYTES", chunk_bytes)
        monkeypatch.setattr(stats.ChunkPool.__init__, "__defaults__", (chunk_bytes,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    calls: list[str] = []
    with NetworkTrace(model, tmp_path / "t", num_classes=3, drop_batches=False) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            with host_transfers_forbidden(calls):
                for i in range(0, 40, 8):
                    trace.set_targets(y[i : i + 8])
                    loss = nn.functional.cross_entropy(model(x[i : i + 8]), y[i : i + 8])
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
            trace.end_epoch()
    if chunk_bytes is None or kernels.backend().name == "cpp":
        assert calls == []  # the fused C++ reduction (nn_staining/kernels) asks the host nothing
    else:
        # on the CPU only, a chunk reduction asks once whether a NaN/Inf was seen (bool of a
        # 1-element tensor); on CUDA that branch is skipped (see Moments.update)
        assert calls and set(calls) == {"__bool__"}
    assert load_trace(tmp_path / "t").epochs == [0, 1]


def test_the_guard_catches_a_host_transfer() -> None:
    calls: list[str] = []
    with host_transfers_forbidden(calls):
        from nn_staining import stats

        stats.Moments(2, 0, torch.device("cpu")).result()
    assert "cpu" in calls
