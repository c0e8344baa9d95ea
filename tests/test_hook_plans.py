"""A layer's steady calls take a short path from its hook (nn_staining.tap.HookTap._record_planned)
once the general path has folded one like them. The trace must not depend on it: an epoch that
mixes calls the plan matches with calls it does not (unlabelled, masked, one sample, a second call
of a module, a module called on its own, a pass in eval mode, a sequence output) is recorded with
plans and without, and every table must be identical, value for value."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, kernels, load_trace
from nn_staining.tap import HookTap

CLASSES = 3


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if kernels.backend().ops is None:
        pytest.skip(f"plans fold with the C++ kernel: {kernels.backend().why}")


class Net(nn.Module):
    """An MLP whose ``again`` passes call its second Linear twice (a second call is a layer of its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 6)
        self.head = nn.Linear(6, CLASSES)
        self.again = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc2(self.act(self.fc1(x)))
        if self.again:
            h = self.fc2(h)
        return self.head(h)


def passes() -> list[dict]:
    """An epoch's passes, each named by its ``kind``."""
    g = torch.Generator().manual_seed(3)

    def labelled(kind: str, n: int = 8, **extra) -> dict:
        x, y = torch.randn(n, 5, generator=g), torch.randint(0, CLASSES, (n,), generator=g)
        return {"kind": kind, "x": x, "y": y, **extra}

    return [
        *(labelled("plain") for _ in range(3)),
        labelled("unlabelled", y=None),
        labelled("masked", mask=torch.tensor([True, False] * 4)),
        labelled("one sample", 1),  # its batch dimension is not learnt from it
        labelled("fc2 twice", again=True),  # the second call is a layer of its own
        labelled("eval", eval=True),  # not recorded
        labelled("fc1 alone", direct=True),  # called on its own, outside a pass of the model
        labelled("sequence", sequence=True),  # (batch, 4, features) outputs: four rows per sample
        *(labelled("plain") for _ in range(2)),
        {**labelled("ignored labels"), "y": torch.tensor([0, 1, 2, -1, -1, 0, 1, 2])},
    ]


def record(store: Path, planned: bool, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str, int]]:
    """Two recorded epochs of :func:`passes`; returns (epoch, kind, calls folded by the short path)
    for each pass."""
    taken = {"planned": 0}
    counts = []
    real = HookTap._record_planned

    def counted(self, *args) -> bool:
        done = real(self, *args)
        taken["planned"] += done
        return done

    with monkeypatch.context() as m:
        m.setattr(HookTap, "_record_planned", counted)
        if not planned:
            m.setattr(HookTap, "_plan", lambda self, *args: None)
        torch.manual_seed(0)
        model = Net()
        with NetworkTrace(model, store, num_classes=CLASSES, overwrite=True) as trace:
            for epoch in range(2):
                trace.start_epoch(epoch)
                for p in passes():
                    model.again = p.get("again", False)
                    model.train(not p.get("eval", False))
                    x = p["x"].unsqueeze(1).expand(-1, 4, -1) if p.get("sequence") else p["x"]
                    if p["y"] is not None:
                        trace.set_targets(p["y"], mask=p.get("mask"))
                    before = taken["planned"]
                    with torch.no_grad():
                        (model.fc1 if p.get("direct") else model)(x)
                    counts.append((epoch, p["kind"], taken["planned"] - before))
                trace.end_epoch()
    return counts


def tables(store: Path) -> dict[str, pd.DataFrame]:
    t = load_trace(store)
    return {
        "neurons": t.to_dataframe(),
        "classes": t.classes(),
        "inputs": t.inputs(),
    }


def test_plans_change_no_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with_plans = record(tmp_path / "planned", True, monkeypatch)
    without = record(tmp_path / "general", False, monkeypatch)
    assert sum(n for _, _, n in without) == 0
    assert sum(n for _, _, n in with_plans) > 0
    planned, general = tables(tmp_path / "planned"), tables(tmp_path / "general")
    for name, frame in general.items():
        assert len(frame) > 0, name
        pd.testing.assert_frame_equal(planned[name], frame, check_exact=True, obj=name)


def test_the_short_path_takes_only_calls_like_the_planned_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plans are made afresh each epoch (by its first plain pass, once the passes that learn the
    layer graph are over). From then on every labelled, unmasked pass of batch-first outputs folds
    all four layers on the short path (a second call of fc2 takes the general one); unlabelled,
    masked and one-sample passes, a module called on its own and an eval pass never do."""
    counts = record(tmp_path / "t", True, monkeypatch)
    epoch_1 = {kind: n for epoch, kind, n in counts if epoch == 1 and kind != "plain"}
    assert epoch_1 == {
        "unlabelled": 0,
        "masked": 0,
        "one sample": 0,
        "fc2 twice": 4,
        "eval": 0,
        "fc1 alone": 0,
        "sequence": 4,
        "ignored labels": 4,
    }
    plain_1 = [n for epoch, kind, n in counts if epoch == 1 and kind == "plain"]
    assert plain_1 == [0, 4, 4, 4, 4]  # the first plans the layers
    assert all(n == 0 for epoch, kind, n in counts if epoch == 0 and kind in ("unlabelled", "masked", "eval"))
