"""Recording under torch.distributed: 2 gloo processes on 127.0.0.1 (tests/workers/ddp_worker.py).

The merged trace is compared with numpy statistics of both ranks' captured activations together;
only rank 0 writes; ranks that disagree get a clear error on every rank instead of a hang.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nn_staining import load_trace

WORKER = Path(__file__).parent / "workers" / "ddp_worker.py"
ROOT = Path(__file__).resolve().parents[1]
ROWS_PER_EPOCH = 26  # 51 samples padded to 52 by DistributedSampler, 26 per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(store: Path, out: Path, mode: str) -> list[subprocess.CompletedProcess]:
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(port), str(store), str(out), mode],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank hung")
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout))
    return results


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, np.ndarray]]]:
    base = tmp_path_factory.mktemp("ddp")
    results = run_ranks(base / "trace", base, "ok")
    for r in results:
        assert r.returncode == 0, r.stdout
    return base / "trace", [dict(np.load(base / f"rank{rank}.npz")) for rank in range(2)]


def whole(ranks: list[dict[str, np.ndarray]], key: str, epoch: int) -> np.ndarray:
    """Both ranks' rows of ``key`` for ``epoch``, together."""
    part = slice(epoch * ROWS_PER_EPOCH, (epoch + 1) * ROWS_PER_EPOCH)
    return np.concatenate([r[key][part] for r in ranks]).astype(np.float64)


@pytest.mark.parametrize("layer", ["0", "1", "2"])
def test_merged_statistics_equal_numpy_on_all_ranks_data(ddp_run, layer: str) -> None:
    store, ranks = ddp_run
    t = load_trace(store)
    assert t.epochs == [0, 1]
    assert t.layers == ["L_0", "L_1", "L_2"]  # DDP's "module." prefix is not part of the names
    for epoch in (0, 1):
        rows, labels = whole(ranks, f"act_{layer}", epoch), whole(ranks, "labels", epoch).astype(int)
        got = t.query(f"E_{epoch}/L_{layer}")
        np.testing.assert_array_equal(got["act_count"], 2 * ROWS_PER_EPOCH)
        np.testing.assert_allclose(got["act_mean"], rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["act_std"], rows.std(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(got["act_min"], rows.min(0).astype(np.float32))
        np.testing.assert_array_equal(got["act_max"], rows.max(0).astype(np.float32))
        np.testing.assert_allclose(got["act_active_frac"], (rows > 0).mean(0), rtol=1e-6)
        classes = t.classes(f"E_{epoch}/L_{layer}")
        for c in range(3):
            sel = labels == c
            np.testing.assert_array_equal(classes.xs(c, level="class")["act_count"], sel.sum())
            np.testing.assert_allclose(
                classes.xs(c, level="class")["act_mean"], rows[sel].mean(0), rtol=1e-5, atol=1e-6
            )


def test_input_class_means_and_weights_are_whole_data(ddp_run) -> None:
    store, ranks = ddp_run
    t = load_trace(store)
    x, labels = whole(ranks, "inputs", 1), whole(ranks, "labels", 1).astype(int)
    inputs = t.inputs("E_1/L_0")
    for c in range(3):
        np.testing.assert_allclose(
            inputs.xs(c, level="class")["mean"], x[labels == c].mean(0), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_array_equal(t.weights(1, "L_2"), ranks[0]["weight"])


def test_only_rank_zero_writes(ddp_run) -> None:
    store, _ = ddp_run
    files = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    assert not [f for f in files if ".tmp" in f or Path(f).name.startswith(".")]
    parts = [f for f in files if f.endswith(".parquet")]
    assert len(parts) == 2 * 3  # neurons, classes, inputs for each of the 2 epochs, written once


@pytest.mark.parametrize(("mode", "message"), [("classes", "num_classes"), ("epoch", "the epoch ended")])
def test_ranks_that_disagree_get_an_error_on_every_rank(tmp_path: Path, mode: str, message: str) -> None:
    results = run_ranks(tmp_path / "trace", tmp_path, mode)
    for rank, r in enumerate(results):
        assert r.returncode == 3, r.stdout
        assert f"rank {rank} error: the ranks disagree on {message}" in r.stdout
    assert load_trace(tmp_path / "trace").epochs == []  # nothing written for the epoch in dispute


def test_the_readme_torchrun_example_records_the_whole_data_set(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + [str(ROOT / "examples" / "ddp_digits.py"), "--store", str(tmp_path / "t"), "--epochs", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    t = load_trace(tmp_path / "t")
    assert t.epochs == [0, 1]
    # 1,797 digits; DistributedSampler pads one repeated sample so both ranks get 899
    assert (t.query("E_*/L_*")["act_count"] == 1798).all()
    assert (t.classes("E_1/L_4").groupby(level="neuron")["act_count"].sum() == 1798).all()


FSDP_SCRIPT = """
import os, sys, numpy as np, torch, torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from nn_staining import NetworkTrace, load_trace
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
dist.init_process_group("gloo", rank=0, world_size=1)
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
fully_shard(model)
try:
    NetworkTrace(model, sys.argv[1] + "/refused")
    print("not refused")
except ValueError as exc:
    print("refused:", exc)
x = torch.randn(16, 4)
seen = []
model[0].register_forward_hook(lambda m, a, o: seen.append(o.detach().numpy().copy()))
with NetworkTrace(model, sys.argv[1] + "/t", record_weights=False) as trace, trace.epoch(0):
    model(x)
got = load_trace(sys.argv[1] + "/t").query("E_0/L_0")
print("means match:", bool(np.allclose(got["act_mean"], seen[0].mean(0), atol=1e-6)))
print("weights null:", bool(got["weight_norm"].isna().all() and got["bias"].isna().all()))
dist.destroy_process_group()
"""


def test_fsdp_weights_are_refused_and_activations_recorded(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run(
        [sys.executable, "-c", FSDP_SCRIPT, str(tmp_path), str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "refused: the model is sharded by FSDP" in run.stdout
    assert "means match: True" in run.stdout
    assert "weights null: True" in run.stdout
