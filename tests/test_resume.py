"""Resume: a run killed (SIGKILL) in the middle of epoch 5 and restarted from its checkpoint with
``NetworkTrace(..., resume=True)`` ends with the trace of an uninterrupted run (tests/workers/resume_worker.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, load_trace

WORKER = Path(__file__).parent / "workers" / "resume_worker.py"
ROOT = Path(__file__).resolve().parents[1]


def run(store: Path, checkpoint: Path, mode: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(WORKER), str(store), str(checkpoint), mode],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("resume")
    full = run(base / "full", base / "full.safetensors", "full")
    assert full.returncode == 0, full.stderr
    crash = run(base / "resumed", base / "resumed.safetensors", "crash")
    assert crash.returncode == -signal.SIGKILL, crash.stderr
    assert load_trace(base / "resumed").epochs == [0, 1, 2, 3, 4]  # epoch 5 died half-way: not written
    resumed = run(base / "resumed", base / "resumed.safetensors", "resume")
    assert resumed.returncode == 0, resumed.stderr
    return base / "full", base / "resumed"


@pytest.mark.parametrize("table", ["neurons", "classes", "inputs"])
def test_resumed_trace_equals_an_uninterrupted_one(runs, table: str) -> None:
    full, resumed = (load_trace(p) for p in runs)
    assert resumed.epochs == full.epochs == list(range(10))
    columns = None if table != "neurons" else [c for c in full.query("E_0").columns] + ["weights"]
    a = full.query("E_*/L_*", table=table, columns=columns)
    b = resumed.query("E_*/L_*", table=table, columns=columns)
    if table == "neurons":
        assert b.loc[5, "weight_delta_norm"].notna().loc[["L_0", "L_2"]].all()  # against the stored epoch 4
        a, b = a.drop(columns="weights"), b.drop(columns="weights")
    pd.testing.assert_frame_equal(a, b)


def test_resumed_trace_keeps_metrics_and_run_facts(runs) -> None:
    full, resumed = (load_trace(p) for p in runs)
    pd.testing.assert_frame_equal(full.metrics, resumed.metrics)
    assert resumed.layers == full.layers


def test_resume_drops_stored_epochs_at_or_after_the_first_new_one(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def record(epochs, **kwargs) -> None:
        with NetworkTrace(model, tmp_path / "t", num_classes=2, record_checkpoints=True, **kwargs) as trace:
            for epoch in epochs:
                trace.start_epoch(epoch)
                trace.set_targets(y)
                model(x)
                trace.end_epoch()
                trace.log_metrics(epoch, marker=epoch + 100 * bool(kwargs))

    record(range(6))
    record([3, 4], resume=True)
    t = load_trace(tmp_path / "t")
    assert t.epochs == [0, 1, 2, 3, 4]
    assert t.metrics["marker"].tolist() == [0, 1, 2, 103, 104]
    assert not (tmp_path / "t" / "neurons" / "epoch=5").exists()
    assert not (tmp_path / "t" / "checkpoints" / "epoch=5").exists()


def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    x = torch.randn(4, 3)
    model = nn.Sequential(nn.Linear(3, 4))
    with NetworkTrace(model, tmp_path / "t") as trace, trace.epoch(0):
        model(x)
    other = nn.Sequential(nn.Linear(3, 5))
    trace = NetworkTrace(other, tmp_path / "t", resume=True)
    with pytest.raises(ValueError, match=r"does not match the stored trace .*'neurons': 5.* stored"), trace:
        trace.start_epoch(1)
        other(x)
        trace.end_epoch()
    assert load_trace(tmp_path / "t").epochs == [0]  # the mismatching epoch is not written
    renamed = nn.Sequential(OrderedDict(fc=nn.Linear(3, 4)))
    with pytest.raises(ValueError, match="has layers this model does not record: L_0; layers now: L_fc"):
        NetworkTrace(renamed, tmp_path / "t", resume=True)


def test_without_resume_an_existing_trace_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    NetworkTrace(model, tmp_path / "t").close()
    with pytest.raises(FileExistsError, match="resume=True to continue it"):
        NetworkTrace(model, tmp_path / "t")
    with pytest.raises(ValueError, match="not both"):
        NetworkTrace(model, tmp_path / "t", overwrite=True, resume=True)


def test_overwrite_clears_what_belonged_to_the_replaced_run(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 4))
    with NetworkTrace(model, tmp_path / "t", record_checkpoints=True) as trace, trace.epoch(0):
        model(torch.randn(2, 3))
    (tmp_path / "t" / "interventions").mkdir()
    (tmp_path / "t" / "interventions" / "effects.parquet").write_bytes(b"stale")
    NetworkTrace(model, tmp_path / "t", overwrite=True).close()
    left = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert left == ["meta.json"]


class TwiceReLU(nn.Module):
    """One ReLU module called twice per pass: layers L_act and L_act:2."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(3, 4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.act(self.fc(x)) - 0.1)


def test_resume_continues_a_trace_with_per_call_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, x = TwiceReLU(), torch.randn(6, 3)
    with NetworkTrace(model, tmp_path / "t") as trace:
        for epoch in range(2):
            with trace.epoch(epoch):
                model(x)
    with NetworkTrace(model, tmp_path / "t", resume=True) as trace, trace.epoch(2):
        model(x)
    t = load_trace(tmp_path / "t")
    assert t.epochs == [0, 1, 2]
    assert t.layers == ["L_fc", "L_act", "L_act:2"]
    with torch.no_grad():
        second = torch.relu(torch.relu(model.fc(x)) - 0.1).numpy().mean(0)
    np.testing.assert_allclose(t.query("E_2/L_act:2")["act_mean"], second, rtol=1e-5, atol=1e-6)
