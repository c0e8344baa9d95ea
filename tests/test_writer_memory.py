"""How many epochs the recorder holds in memory at once. Epochs go to a writer thread; at most
MAX_PENDING_WRITES wait there, and an epoch whose running sums reach LARGE_EPOCH_BYTES waits at
end_epoch for the writer to finish the epochs before it, before its host copy is made, so a wide
model holds one epoch's statistics at a time. Checked by the order of events."""

from __future__ import annotations

import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, load_trace
from nn_staining import recorder as recorder_module
from nn_staining import stats as stats_module
from nn_staining.stats import Moments, PhaseStats
from nn_staining.writer import EpochWriter


def run(
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    gate: threading.Event | None = None,
    labelled: bool = True,
    drop_batches: bool = True,
) -> list[tuple[str, int]]:
    """Record three one-batch epochs with a writer that, given ``gate``, starts no write before the
    gate opens (at most 10 s) and opens it when epoch 1 is copied to the host. Returns the events
    in order: ("finish", e) when epoch e's statistics are brought to the host (followed by
    ("in place", e) when they are finished in its running sums instead), ("written", e) when its
    write is done."""
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    real_write, real_finish = EpochWriter._write_epoch, PhaseStats.finish
    current = {"epoch": -1}

    def gated_write(self, record) -> None:
        if gate is not None:
            gate.wait(timeout=10)
        real_write(self, record)
        with lock:
            events.append(("written", record.epoch))

    def finish(self, in_place: bool = False):
        with lock:
            events.append(("finish", current["epoch"]))
            if in_place:
                events.append(("in place", current["epoch"]))
        if gate is not None and current["epoch"] == 1:
            gate.set()
        return real_finish(self, in_place)

    monkeypatch.setattr(EpochWriter, "_write_epoch", gated_write)
    monkeypatch.setattr(PhaseStats, "finish", finish)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with NetworkTrace(model, store, num_classes=3, drop_batches=drop_batches) as trace:
        for epoch in range(3):
            current["epoch"] = epoch
            trace.start_epoch(epoch)
            if labelled:
                trace.set_targets(torch.tensor([0, 1, 2, 0]))
            model(torch.randn(4, 4)).sum().backward()
            trace.end_epoch()
    return events


@pytest.mark.parametrize(
    "labelled, drop_batches",
    [(True, True), (False, True), (True, False)],
    ids=["labelled", "unlabelled: rows in the chunk", "per-batch rows"],
)
def test_a_large_epoch_waits_for_the_epochs_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, labelled: bool, drop_batches: bool
) -> None:
    """Every epoch counts as large; its rows may still be buffered when end_epoch measures it."""
    monkeypatch.setattr(recorder_module, "LARGE_EPOCH_BYTES", 1)
    events = run(tmp_path / "t", monkeypatch, labelled=labelled, drop_batches=drop_batches)
    for epoch in (1, 2):
        assert events.index(("written", epoch - 1)) < events.index(("finish", epoch))
    assert all(("in place", epoch) in events for epoch in (0, 1, 2)), "no host copy of a large epoch"
    assert load_trace(tmp_path / "t").epochs == [0, 1, 2]


def test_small_epochs_do_not_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer writes nothing until epoch 1 is copied to the host: if end_epoch waited for
    it, epoch 1 would reach the host only after the gate's timeout, behind epoch 0's write."""
    events = run(tmp_path / "t", monkeypatch, gate=threading.Event())
    assert events.index(("finish", 1)) < events.index(("written", 0))
    assert not any(name == "in place" for name, _ in events), "small epochs: one copy of every layer"
    assert load_trace(tmp_path / "t").epochs == [0, 1, 2]


def test_the_size_of_the_running_sums() -> None:
    """nbytes is what the accumulators hold: float64 sums, squares, active and non-finite counts,
    class counts and class sums, float32 minimum and maximum."""
    m = Moments(7, 3, torch.device("cpu"))
    held = [m.sum, m.sum_sq, m.active, m.nonfinite, m.class_count, m.class_sum, m.minimum, m.maximum]
    assert m.nbytes() == sum(t.numel() * t.element_size() for t in held)
    stats = PhaseStats(3)
    stats.add_layer("a", 7, torch.device("cpu"))
    stats.add_layer("a", 5, torch.device("cpu"), inputs=True)
    assert stats.nbytes() == m.nbytes() + Moments(5, 3, torch.device("cpu"), class_only=True).nbytes()


def test_per_batch_rows_count_towards_the_size() -> None:
    stats = PhaseStats(3, keep_batches=True)
    for _ in range(2):
        stats.start_batch(torch.tensor([0, 1, 2, 0]))
        stats.add("a", torch.randn(4, 7))
    stats.reduce_pending()
    moments = stats.layer_moments()["a"]
    rows = sum(t.numel() for _, t in moments.batches)
    assert rows == 5 * 2 * 7  # count, mean, std, min, max per batch and neuron
    assert stats.nbytes() == Moments(7, 3, torch.device("cpu")).nbytes() + 8 * rows


@pytest.mark.parametrize("drop_batches", [True, False], ids=["labelled and unlabelled", "per-batch rows"])
def test_large_epochs_finished_in_place_write_the_same_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, drop_batches: bool
) -> None:
    """The same training recorded with every epoch large (statistics finished in the running sums)
    and with none (one host copy of every layer) gives identical tables, value for value. Chunks
    of two batches: per-batch rows come from two chunks per epoch."""
    monkeypatch.setattr(stats_module, "MAX_BATCHES_PER_CHUNK", 2)
    frames = {}
    for large in (False, True):
        monkeypatch.setattr(recorder_module, "LARGE_EPOCH_BYTES", 1 if large else 2**62)
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 4))
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        store = tmp_path / f"large-{large}"
        with NetworkTrace(model, store, num_classes=4, drop_batches=drop_batches) as trace:
            for epoch in range(3):
                trace.start_epoch(epoch)
                for step in range(4):
                    x = torch.randn(6, 5) * (1e3 if step == 2 else 1.0)
                    if step == 1:
                        x[0, 0] = float("nan")
                    if step != 3 or not drop_batches:  # an unlabelled batch goes through the chunk
                        trace.set_targets(torch.randint(0, 4, (6,)))
                    loss = model(x).nan_to_num().square().mean()
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                trace.end_epoch()
        t = load_trace(store)
        frames[large] = {"neurons": t.to_dataframe(), "classes": t.classes(), "inputs": t.inputs()}
        if not drop_batches:
            frames[large]["batches"] = t.batches()
    for name, frame in frames[False].items():
        assert len(frame) > 0, name
        pd.testing.assert_frame_equal(frames[True][name], frame, check_exact=True, obj=name)
