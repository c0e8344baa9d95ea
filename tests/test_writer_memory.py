"""How many epochs the recorder holds in memory at once. Epochs go to a writer thread; at most
MAX_PENDING_WRITES wait there, and an epoch whose running sums reach LARGE_EPOCH_BYTES waits at
end_epoch for the writer to finish the epochs before it, before its host copy is made, so a wide
model holds one epoch's statistics at a time. Checked by the order of events with a writer that
is slower than training."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, load_trace
from nn_staining import recorder as recorder_module
from nn_staining.stats import Moments, PhaseStats
from nn_staining.writer import EpochWriter


def run(store: Path, monkeypatch: pytest.MonkeyPatch, epochs: int = 3) -> list[tuple[str, int]]:
    """Record ``epochs`` one-batch epochs with a writer that takes 0.15 s per epoch; returns the
    events in order: ("finish", e) when epoch e's statistics are copied to the host, ("written", e)
    when its write is done."""
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    real_write, real_finish = EpochWriter._write_epoch, PhaseStats.finish
    current = {"epoch": -1}

    def slow_write(self, record) -> None:
        time.sleep(0.15)
        real_write(self, record)
        with lock:
            events.append(("written", record.epoch))

    def finish(self):
        with lock:
            events.append(("finish", current["epoch"]))
        return real_finish(self)

    monkeypatch.setattr(EpochWriter, "_write_epoch", slow_write)
    monkeypatch.setattr(PhaseStats, "finish", finish)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    with NetworkTrace(model, store, num_classes=3) as trace:
        for epoch in range(epochs):
            current["epoch"] = epoch
            trace.start_epoch(epoch)
            trace.set_targets(torch.tensor([0, 1, 2, 0]))
            model(torch.randn(4, 4)).sum().backward()
            trace.end_epoch()
    return events


def test_a_large_epoch_waits_for_the_epochs_before_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(recorder_module, "LARGE_EPOCH_BYTES", 1)  # every epoch is large
    events = run(tmp_path / "t", monkeypatch)
    for epoch in (1, 2):
        assert events.index(("written", epoch - 1)) < events.index(("finish", epoch))
    assert load_trace(tmp_path / "t").epochs == [0, 1, 2]


def test_small_epochs_do_not_wait(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events = run(tmp_path / "t", monkeypatch)
    assert events.index(("finish", 1)) < events.index(("written", 0))  # training went on meanwhile
    assert load_trace(tmp_path / "t").epochs == [0, 1, 2]


def test_the_size_of_the_running_sums() -> None:
    """nbytes is what the accumulators hold: float64 sums, squares, active and non-finite counts,
    class counts and class sums, float32 minimum and maximum."""
    m = Moments(7, 3, torch.device("cpu"))
    held = [m.sum, m.sum_sq, m.active, m.nonfinite, m.class_count, m.class_sum, m.minimum, m.maximum]
    assert m.nbytes == sum(t.numel() * t.element_size() for t in held)
    stats = PhaseStats(3)
    stats.add_layer("a", 7, torch.device("cpu"))
    stats.add_layer("a", 5, torch.device("cpu"), inputs=True)
    assert stats.nbytes() == m.nbytes + Moments(5, 3, torch.device("cpu"), class_only=True).nbytes
