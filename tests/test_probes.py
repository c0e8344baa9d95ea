"""Tests for nn_staining.probes: probe validation, what run_probe records (against the test's own hooks and
numpy), the byte budget, training left bit-identical, saliency, the Parquet part and its readers."""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from conftest import Capture, make_data, make_mlp
from torch import nn

from nn_staining import NetworkTrace, load_trace, probes
from nn_staining.layers import select_layers

N_PROBE = 30


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """Small numpy linear algebra: one BLAS thread avoids spin-waiting on a busy 2-core machine."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        yield


# -- recording helper shared with test_representations -------------------------------------------
def record_with_probe(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    probe: probes.ProbeSet | tuple,
    store: Path,
    *,
    epochs: int = 3,
    batch_size: int = 16,
    lr: float = 0.05,
    classes: int | None = None,
    seed: int = 0,
) -> None:
    """Train ``model`` (SGD, seeded batch order) recording it with ``NetworkTrace(..., probe=probe)``."""
    probe = probes.ProbeSet.from_arg(probe)
    classes = classes or int(max(y.max(), probe.y.max())) + 1
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    with NetworkTrace(model, store, num_classes=classes, probe=probe) as trace:
        for epoch in range(epochs):
            trace.start_epoch(epoch)
            model.train()
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), batch_size):
                idx = order[start : start + batch_size]
                trace.set_targets(y[idx])
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            trace.end_epoch()


def run_epochs(model: nn.Module, x, y, epochs: int, probe: probes.ProbeSet | None, seed: int = 0) -> None:
    """Plain training (Adam, dropout and batch norm in the model), optionally running the probe after
    every epoch as the recorder does."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    modules = select_layers(model)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 16):
            idx = order[start : start + 16]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if probe is not None:
            probes.run_probe(model, modules, probe)


def dropout_bn_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(6, 16),
            bn=nn.BatchNorm1d(16),
            relu=nn.ReLU(),
            drop=nn.Dropout(0.5),
            fc2=nn.Linear(16, 3),
        )
    )


# -- validation -------------------------------------------------------------------------------------
def test_from_arg_accepts_tensors_arrays_and_integral_floats():
    x, y = make_data(n=10)
    a = probes.ProbeSet.from_arg((x, y))
    b = probes.ProbeSet.from_arg((x.numpy(), y.numpy().astype(np.float32)[:, None]), batch_size=3)
    assert a.n == b.n == 10 and b.batch_size == 3
    np.testing.assert_array_equal(a.y, b.y)
    assert a.y.dtype == np.int64 and torch.equal(a.x, b.x)
    assert probes.ProbeSet.from_arg(a) is a
    meta = probes.probe_meta(a)
    assert json.loads(json.dumps(meta)) == meta
    assert meta["n"] == 10 and meta["labels"] == y.tolist() and meta["input_shape"] == [6]
    assert meta["budget_bytes"] == probes.DEFAULT_PROBE_BUDGET


@pytest.mark.parametrize(
    ("probe", "kwargs", "message"),
    [
        (torch.zeros(4, 2), {}, "pair"),
        ((torch.zeros(4, 2),), {}, "pair"),
        (
            (torch.zeros(4, 2), torch.zeros(3, dtype=torch.long)),
            {},
            r"one integer label per sample of x \(4\)",
        ),
        ((torch.zeros(4, 2), torch.tensor([0, 1, 0.5, 1])), {}, "0.5"),
        ((torch.zeros(4, 2), torch.tensor([0, 1, -1, 1])), {}, "-1"),
        ((torch.zeros(4, 2), np.array(["a", "b", "c", "d"])), {}, "dtype <U1"),
        ((torch.zeros(1, 2), torch.zeros(1, dtype=torch.long)), {}, "at least 2 samples"),
        ((torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), {"batch_size": 0}, "batch_size=0"),
        ((torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)), {"budget_bytes": -1}, "budget_bytes=-1"),
        ((torch.zeros(4, 2, dtype=torch.bool), torch.zeros(4, dtype=torch.long)), {}, "torch.bool"),
    ],
)
def test_from_arg_errors_name_the_bad_value(probe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        probes.ProbeSet.from_arg(probe, **kwargs)


def test_allocate_water_fills_from_the_smallest_item():
    # 100 bytes per column, 10 columns of budget: a (2) fits its share; b (30, divisible) takes its share
    # of 4, c (50, indivisible) none; the 4 columns c left go to b
    kept = probes.allocate({"a": (2, False), "b": (30, True), "c": (50, False)}, 1000, 100)
    assert kept == {"a": 2, "b": 8, "c": 0}
    # x (7, whole) is over its share (6) at its turn, and y (50, whole) does not fit: x takes y's leftover
    sizes = {"z1": (1, True), "z2": (1, True), "x": (7, False), "y": (50, False)}
    assert probes.allocate(sizes, 14, 1) == {"z1": 1, "z2": 1, "x": 7, "y": 0}
    assert probes.allocate({"a": (3, True), "b": (3, True)}, 10**6, 4) == {"a": 3, "b": 3}
    assert probes.allocate({"a": (3, True)}, 0, 4) == {"a": 0}
    for sizes in ({"a": (7, True), "b": (9, False), "c": (100, True)}, {"a": (1, False), "b": (40, True)}):
        for budget in (0, 5, 17, 50, 1000):
            kept = probes.allocate(sizes, budget, 1)
            assert sum(kept.values()) <= budget
            assert all(k in (0, sizes[n][0]) for n, k in kept.items() if not sizes[n][1])
    np.testing.assert_array_equal(probes.kept_neurons(10, 3), [0, 3, 6])
    np.testing.assert_array_equal(probes.kept_neurons(5, 5), np.arange(5))


# -- what run_probe records -------------------------------------------------------------------------
def _numpy_reps(capture: Capture) -> dict[str, np.ndarray]:
    return {k: np.concatenate(v) for k, v in capture.outputs[0].items()}


def test_run_probe_matches_own_hooks_and_numpy_gram():
    model = make_mlp()
    x, y = make_data(n=N_PROBE)
    probe = probes.ProbeSet.from_arg((x, y), batch_size=7)
    capture = Capture(model)
    model.eval()
    with torch.no_grad():
        logits = model(x)
    capture.remove()
    model.train()
    record = probes.run_probe(model, select_layers(model), probe)
    reps = _numpy_reps(capture)
    assert list(record.layers) == list(reps)
    for key, rep in reps.items():
        layer = record.layers[key]
        assert layer.width == rep.shape[1]
        np.testing.assert_allclose(layer.activations, rep, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(layer.gram, rep @ rep.T, rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_array_equal(layer.gram, layer.gram.T)
        assert layer.gram.dtype == np.float64
    np.testing.assert_allclose(record.layers["L_hidden_1"].inputs, reps["L_relu_1"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(record.layers["L_input"].inputs, x.numpy())
    assert record.layers["L_relu_1"].inputs is None  # only nn.Linear layers keep their inputs
    np.testing.assert_allclose(record.output, logits.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(record.input, x.numpy())
    assert model.training and all(m.training for m in model.modules())


def test_conv_and_sequence_first_representations():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3))
    x = torch.randn(10, 1, 6, 6)
    y = torch.arange(10) % 3
    capture = Capture(conv)
    conv.eval()
    with torch.no_grad():
        conv(x)
    capture.remove()
    layers = select_layers(conv, ["0", "1", "2", "3"])  # the Flatten too (left out by default)
    record = probes.run_probe(conv, layers, probes.ProbeSet.from_arg((x, y), batch_size=4))
    reps = {k: np.concatenate(v) for k, v in capture.outputs[0].items()}
    np.testing.assert_allclose(
        record.layers["L_0"].activations, reps["L_0"].mean((2, 3)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        record.layers["L_1"].activations, reps["L_1"].mean((2, 3)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(record.layers["L_2"].activations, reps["L_2"], rtol=1e-5, atol=1e-6)
    assert record.layers["L_0"].width == 4 and record.layers["L_2"].width == 144

    class SeqFirst(nn.Module):  # (steps, batch, features) LSTM, then a Linear on every step
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(3, 5)  # batch_first=False
            self.head = nn.Linear(5, 2)

        def forward(self, x):
            out = self.head(self.lstm(x.transpose(0, 1))[0])  # (steps, batch, 2)
            return out.mean(0)

    torch.manual_seed(0)
    seq = SeqFirst()
    xs = torch.randn(6, 4, 3)  # (batch, steps, features) for the probe
    ys = torch.arange(6) % 2
    capture = Capture(seq)
    seq.eval()
    with torch.no_grad():
        seq(xs)
    capture.remove()
    record = probes.run_probe(seq, select_layers(seq), probes.ProbeSet.from_arg((xs, ys), batch_size=4))
    lstm = np.concatenate([o.transpose(1, 0, 2) for o in capture.outputs[0]["L_lstm"]])  # (batch, steps, 5)
    np.testing.assert_allclose(record.layers["L_lstm"].activations, lstm.mean(1), rtol=1e-5, atol=1e-6)
    head = np.concatenate([o.transpose(1, 0, 2) for o in capture.outputs[0]["L_head"]])
    np.testing.assert_allclose(record.layers["L_head"].activations, head.mean(1), rtol=1e-5, atol=1e-6)


def test_training_is_bit_identical_with_and_without_probe():
    x, y = make_data(n=64)
    probe = probes.ProbeSet.from_arg(make_data(n=20, seed=5), batch_size=8)
    plain, probed = dropout_bn_mlp(), dropout_bn_mlp()
    torch.manual_seed(123)
    run_epochs(plain, x, y, 3, None)
    after_plain = torch.rand(3)
    torch.manual_seed(123)
    run_epochs(probed, x, y, 3, probe)
    after_probed = torch.rand(3)
    for (name, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items()):
        assert torch.equal(a, b), name  # parameters and BatchNorm running statistics
    assert torch.equal(after_plain, after_probed)  # the RNG stream goes on as without the probe


def test_modes_restored_and_parameter_grads_untouched():
    model = dropout_bn_mlp()
    model.train()
    model.bn.eval()  # a frozen submodule stays frozen
    x, y = make_data(n=12)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    record = probes.run_probe(model, select_layers(model), probes.ProbeSet.from_arg((x, y)))
    assert record.saliency is not None
    assert model.training and model.fc1.training and not model.bn.training
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, grads[name]), name


def test_saliency_is_gradient_times_input_of_the_true_class():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = make_data(n=9, features=5)
    record = probes.run_probe(model, select_layers(model), probes.ProbeSet.from_arg((x, y), batch_size=4))
    weights = model.weight.detach().numpy()
    np.testing.assert_allclose(record.saliency, weights[y.numpy()] * x.numpy(), rtol=1e-6, atol=1e-7)
    images = torch.randn(6, 1, 4, 4)
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Flatten(), nn.Linear(32, 2))
    rec = probes.run_probe(cnn, select_layers(cnn), probes.ProbeSet.from_arg((images, torch.arange(6) % 2)))
    assert rec.saliency.shape == (6, 16) and rec.input.shape == (6, 16)
    # integer inputs (token ids) have no saliency; the rest is recorded
    emb = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    tokens = torch.randint(0, 10, (6, 3))
    rec = probes.run_probe(emb, select_layers(emb), probes.ProbeSet.from_arg((tokens, torch.arange(6) % 2)))
    assert rec.saliency is None and rec.layers["L_0"].width == 4


def test_budget_subsamples_wide_layers_and_keeps_the_gram(tmp_path, monkeypatch):
    torch.manual_seed(0)
    wide = 20_000
    model = nn.Sequential(nn.Linear(4, wide), nn.ReLU(), nn.Linear(wide, 2))
    x, y = make_data(n=16, features=4, classes=2)
    budget = 64 * 1024
    probe = probes.ProbeSet.from_arg((x, y), batch_size=16, budget_bytes=budget)
    record = probes.run_probe(model, select_layers(model), probe)
    with torch.no_grad():
        hidden = model[0](x).double().numpy()
    first = record.layers["L_0"]
    kept = first.activations.shape[1]
    assert 0 < kept < wide
    np.testing.assert_array_equal(first.neurons, probes.kept_neurons(wide, kept))
    np.testing.assert_allclose(first.activations, hidden[:, first.neurons], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.gram, hidden @ hidden.T, rtol=1e-5)
    assert record.layers["L_2"].inputs is None  # 16 × 20,000 inputs do not fit: all or nothing
    values = sum(
        a.nbytes for lp in record.layers.values() for a in (lp.activations, lp.inputs) if a is not None
    )
    values += sum(a.nbytes for a in (record.input, record.output, record.saliency) if a is not None)
    assert values <= budget
    # through the recorder: the part stays within the budget plus the one stored Gram
    store = tmp_path / "trace"
    record_with_probe(model, x, y, probe, store, epochs=1)
    with torch.no_grad():
        hidden = model[0](x).double().numpy()  # the weights the probe saw at the epoch's end
    t = load_trace(store)
    part = probes.probe_part(store, 0).stat().st_size
    assert part < budget + 16 * 17 // 2 * 8 + 16 * 1024
    np.testing.assert_allclose(t.probe_gram(0, "L_0"), hidden @ hidden.T, rtol=1e-5)  # stored
    ids = probes.read_probe_neurons(store, t.meta, 0, "L_0")
    np.testing.assert_array_equal(ids, probes.kept_neurons(wide, len(ids)))
    np.testing.assert_allclose(t.probe(0, "L_0"), hidden[:, ids], rtol=1e-5, atol=1e-6)
    assert 0 < len(ids) < wide
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, wide), nn.ReLU(), nn.Linear(wide, 2))

    # a layer wider than the device memory allowance is done in blocks of samples: the same Gram
    monkeypatch.setattr(probes, "PROBE_MEMORY", 4 * 5 * wide)
    blocked = probes.run_probe(model, select_layers(model), probe)
    for key, layer in record.layers.items():
        np.testing.assert_allclose(blocked.layers[key].gram, layer.gram, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(blocked.layers[key].activations, layer.activations, rtol=1e-5, atol=1e-6)

    zero = probes.run_probe(model, select_layers(model), probes.ProbeSet.from_arg((x, y), budget_bytes=0))
    assert all(lp.activations is None and lp.inputs is None for lp in zero.layers.values())
    assert zero.input is None and zero.saliency is None and zero.output is None
    np.testing.assert_allclose(zero.layers["L_0"].gram, first.gram, rtol=1e-6)


# -- the part on disk and the readers ---------------------------------------------------------------
@pytest.fixture(scope="module")
def probed(tmp_path_factory) -> tuple[Path, probes.ProbeSet, nn.Module]:
    store = tmp_path_factory.mktemp("probed") / "trace"
    x, y = make_data(n=48)
    probe = probes.ProbeSet.from_arg(make_data(n=N_PROBE, seed=3), batch_size=8)
    model = make_mlp()
    record_with_probe(model, x, y, probe, store, epochs=2)
    return store, probe, model


def test_part_round_trip_and_readers(probed):
    store, probe, model = probed
    t = load_trace(store)
    assert t.epochs == [0, 1]
    np.testing.assert_array_equal(t.probe_labels, probe.y)
    model.eval()
    capture = Capture(model)
    with torch.no_grad():
        logits = model(probe.x)
    capture.remove()
    reps = _numpy_reps(capture)
    for key, rep in reps.items():
        np.testing.assert_allclose(t.probe(1, key), rep, rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(t.probe_gram(1, key), rep @ rep.T, rtol=1e-5, atol=1e-5, err_msg=key)
        np.testing.assert_array_equal(
            probes.read_probe_neurons(store, t.meta, 1, key), np.arange(rep.shape[1])
        )
    np.testing.assert_allclose(
        probes.read_probe_output(store, t.meta, 1), logits.numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(probes.read_probe_input(store, t.meta, 0), probe.x.numpy())
    np.testing.assert_allclose(
        probes.read_probe_inputs(store, t.meta, 1, "L_output"), reps["L_relu_2"], rtol=1e-6
    )
    assert probes.read_saliency(store, t.meta, 0).shape == (N_PROBE, 6)
    contents = probes.probe_contents(store, t.meta, 0)
    kinds = {(c["kind"], c["layer"]) for c in contents}
    assert kinds >= {("activations", "L_input"), ("saliency", "x"), ("output", "model")}
    assert not any(kind == "gram" for kind, _ in kinds)  # complete activations: the reader computes R Rᵀ
    assert not list(store.rglob(".*"))  # no temporary file left behind


def test_part_is_readable_by_other_engines(probed):
    store = probed[0]
    frame = pd.read_parquet(store / "probes")
    assert sorted(frame["epoch"].astype(int).unique()) == [0, 1]
    assert set(frame["kind"]) == {"activations", "linear_input", "input", "output", "saliency"}
    duckdb = pytest.importorskip("duckdb")
    count = duckdb.sql(
        f"SELECT count(*) FROM read_parquet('{store}/probes/*/*.parquet', hive_partitioning=true) "
        "WHERE kind = 'activations' AND layer = 'L_input' AND epoch = 1"
    ).fetchall()[0][0]
    assert count == N_PROBE
    polars = pytest.importorskip("polars")
    lazy = polars.scan_parquet(f"{store}/probes/*/*.parquet", hive_partitioning=True)
    assert lazy.collect_schema().names().count("epoch") == 1
    # one row group per (kind, layer), so a reader touches only the block it asks for
    md = pq.ParquetFile(probes.probe_part(store, 0)).metadata
    assert md.num_row_groups == len(probes.probe_contents(store, load_trace(store).meta, 0))


def test_reader_errors(probed, tmp_path):
    store = probed[0]
    meta = load_trace(store).meta
    with pytest.raises(KeyError, match="recorded epochs"):
        probes.read_probe_gram(store, meta, 7, "L_input")
    with pytest.raises(KeyError, match="layers: L_input, L_relu_1"):
        probes.read_probe(store, meta, 0, "L_nope")
    with pytest.raises(KeyError, match=r"probe=\(x, y\)"):
        probes.read_probe(store, {k: v for k, v in meta.items() if k != "probe"}, 0, "L_input")
    with pytest.raises(KeyError, match="not an nn.Linear"):
        probes.read_probe_inputs(store, meta, 0, "L_relu_1")
    # activations dropped by the budget: the error says so and points at the Gram
    x, y = make_data(n=8)
    small = tmp_path / "small"
    record_with_probe(make_mlp(), x, y, probes.ProbeSet.from_arg((x, y), budget_bytes=0), small, epochs=1)
    t = load_trace(small)
    with pytest.raises(KeyError, match="were not kept.*probe_gram"):
        t.probe(0, "L_input")
    assert t.probe_gram(0, "L_input").shape == (8, 8)
    with pytest.raises(KeyError, match="no saliency"):
        probes.read_saliency(small, t.meta, 0)
    probes.probe_part(small, 0).unlink()
    with pytest.raises(FileNotFoundError, match="probe part of epoch 0 is missing"):
        t.probe_gram(0, "L_input")


def test_failed_write_leaves_no_part(tmp_path, monkeypatch):
    x, y = make_data(n=8)
    record = probes.run_probe(make_mlp(), select_layers(make_mlp()), probes.ProbeSet.from_arg((x, y)))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", broken)
    with pytest.raises(OSError, match="disk full"):
        probes.write_probe(tmp_path, 0, record, list(record.layers))
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
