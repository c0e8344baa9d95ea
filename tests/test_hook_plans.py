"""A layer's steady calls take a short path from its hook (nn_staining.tap.HookTap._record_planned)
once the general path has folded one like them in the same phase. The trace must not depend on it:
an epoch that mixes calls a plan matches with calls it must not take (unlabelled, masked, no rows,
a second call of a module, a module called on its own, a keyword call of a Linear, a bfloat16
input, bfloat16 outputs, an output narrower than the layer, a time-major pass whose first
dimension also has the batch's size, a convolution with as many channels as columns) is recorded
with plans and without, and every table must be identical, value for value, in the train and eval
phases."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, kernels, load_trace
from nn_staining import stats as stats_module
from nn_staining.tap import HookTap

CLASSES = 3
BATCH = 8


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if kernels.backend().ops is None:
        pytest.skip(f"plans fold with the C++ kernel: {kernels.backend().why}")


class Widening(nn.Linear):
    """A Linear that takes any float input (it computes in float32): its input may be bfloat16
    while its output is float32."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 (nn.Linear's name for it)
        return super().forward(input.float())


class Net(nn.Module):
    """An MLP whose passes vary as ``mode`` says."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = Widening(5, 6), nn.ReLU(), nn.Linear(6, 6)
        self.head = nn.Linear(6, CLASSES)
        # (batch, 4, 1, 4): as many channels as columns; more input channels than output ones, so
        # its spatial means are taken from its output (not from its input's window sums)
        self.conv = nn.Conv2d(8, 4, kernel_size=1)
        self.mode = ""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0]:  # channel-first: its neurons are channels, never last-dim rows
            self.conv(x[:, :4].float().repeat(1, 8).reshape(x.shape[0], 8, 1, 4))
        h = self.fc1(input=x) if self.mode.endswith("keyword call") else self.fc1(x)
        if self.mode == "narrow act":  # act's one call gives (batch, 5): not rows of its six neurons
            self.act(h[:, :5])
            h = self.fc2(h)
        else:
            h = self.fc2(self.act(h))
        if self.mode == "fc2 twice":  # the second call is a layer of its own
            h = self.fc2(h)
        return self.head(h)


def passes() -> list[dict]:
    """An epoch's passes: (kind, input, labels, mask); the input's shape is (BATCH, 5) unless said."""
    g = torch.Generator().manual_seed(3)

    def labelled(kind: str, shape: tuple[int, ...] = (BATCH, 5), **extra) -> dict:
        x, y = torch.randn(shape, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)
        return {"kind": kind, "x": x, "y": y, **extra}

    return [
        labelled("first keyword call"),  # epoch 1's first pass: fc1's input not seen yet, fc1 not planned
        labelled("first sequence", (BATCH, 4, 5)),  # epoch 1's plan of fc1 is made from (batch, 4, …) outputs
        *(labelled("plain") for _ in range(3)),
        labelled("unlabelled", y=None),
        labelled("masked", mask=torch.tensor([True, False] * (BATCH // 2))),
        {**labelled("one sample", (1, 5)), "y": torch.tensor([1])},
        labelled("fc2 twice"),
        labelled("eval", eval=True),
        labelled("fc1 alone", direct=True),  # called on its own, outside a pass of the model
        labelled("sequence", (BATCH, 4, 5)),  # four rows per sample
        labelled("no rows", (BATCH, 0, 5)),
        labelled("keyword call"),  # fc1(input=x): the hook sees no positional input
        labelled("bfloat16 input", x_dtype=torch.bfloat16),
        labelled("bfloat16 outputs", autocast=True),  # every Linear and ReLU output in bfloat16
        labelled("narrow act"),
        labelled("time-major", (3, BATCH, 5)),  # the layers learn batch dimension 1
        labelled("time-major square", (BATCH, BATCH, 5)),  # dimension 0 has the batch's size too
        labelled("plain"),
        labelled("inference mode", inference=True),
        labelled("plain"),
        {**labelled("ignored labels"), "y": torch.tensor([0, 1, 2, -1, -1, 0, 1, 2])},
    ]


def record(
    store: Path, planned: bool, monkeypatch: pytest.MonkeyPatch, record_eval: bool = False
) -> list[tuple[int, str, int]]:
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
        m.setattr(
            stats_module, "MAX_BATCHES_PER_CHUNK", 2
        )  # chunks reduced often: the conv's sums exist early
        if not planned:
            m.setattr(HookTap, "_plan", lambda self, *args: None)
        torch.manual_seed(0)
        model = Net()
        with NetworkTrace(
            model, store, num_classes=CLASSES, overwrite=True, record_eval=record_eval
        ) as trace:
            for epoch in range(2):
                trace.start_epoch(epoch)
                for p in passes():
                    model.mode = p["kind"]
                    model.train(not p.get("eval", False))
                    x = p["x"].to(p.get("x_dtype", torch.float32))
                    if p["kind"].startswith("time-major"):
                        trace.set_targets(p["y"])
                    elif p["y"] is not None:
                        trace.set_targets(p["y"], mask=p.get("mask"))
                    before = taken["planned"]
                    mode = torch.inference_mode() if p.get("inference") else torch.no_grad()
                    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=p.get("autocast", False))
                    with mode, cast:
                        (model.fc1 if p.get("direct") else model)(x)
                    counts.append((epoch, p["kind"], taken["planned"] - before))
                trace.end_epoch()
                assert not trace._tap._plans  # dropped with the epoch: they hold its statistics
    return counts


def tables(store: Path, phase: str) -> dict[str, pd.DataFrame]:
    t = load_trace(store, phase=phase)
    return {"neurons": t.to_dataframe(), "classes": t.classes(), "inputs": t.inputs()}


@pytest.mark.parametrize("record_eval", [False, True])
def test_plans_change_no_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record_eval: bool) -> None:
    with_plans = record(tmp_path / "planned", True, monkeypatch, record_eval)
    without = record(tmp_path / "general", False, monkeypatch, record_eval)
    assert sum(n for _, _, n in without) == 0
    assert sum(n for _, _, n in with_plans) > 0
    for phase in ("train", "eval") if record_eval else ("train",):
        planned, general = tables(tmp_path / "planned", phase), tables(tmp_path / "general", phase)
        for name, frame in general.items():
            assert len(frame) > 0, (phase, name)
            pd.testing.assert_frame_equal(planned[name], frame, check_exact=True, obj=f"{phase} {name}")


def test_the_short_path_takes_only_calls_like_the_planned_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Plans are made afresh each epoch (in epoch 1 by its first passes: fc1's only once a pass
    gave its input positionally; in epoch 0 once the passes that learn the layer graph are over)
    and kept for the epoch. A labelled,
    unmasked pass of batch-first float32 outputs then folds the four Linear and ReLU layers on the
    short path (a one-sample pass and inference mode included; a second call of fc2 takes the
    general one), never the convolution. fc1 falls back when its input comes by keyword or in
    bfloat16; every layer falls back in unlabelled, masked and empty passes, for a module called on
    its own, and while the layers' batch dimension is 1 (time-major)."""
    counts = record(tmp_path / "t", True, monkeypatch)
    epoch_1 = {kind: n for epoch, kind, n in counts if epoch == 1 and kind != "plain"}
    assert epoch_1 == {
        "first keyword call": 0,
        "first sequence": 3,
        "unlabelled": 0,
        "masked": 0,
        "one sample": 4,
        "fc2 twice": 4,
        "eval": 0,  # not recorded
        "fc1 alone": 0,
        "sequence": 4,
        "no rows": 0,
        "keyword call": 3,
        "bfloat16 input": 3,
        "bfloat16 outputs": 0,
        "narrow act": 3,
        "time-major": 0,
        "time-major square": 0,
        "inference mode": 4,
        "ignored labels": 4,
    }
    plain_1 = [n for epoch, kind, n in counts if epoch == 1 and kind == "plain"]
    assert plain_1 == [4, 4, 4, 0, 4]  # the one after the time-major passes re-plans the layers
    plain_0 = [n for epoch, kind, n in counts if epoch == 0 and kind == "plain"]
    assert plain_0 == [0, 4, 4, 0, 4]  # the first two passes learn the layer graph, the next plans
