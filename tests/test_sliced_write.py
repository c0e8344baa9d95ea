"""Parts are streamed to Parquet one slice of rows at a time (``store.TableSource``): the files equal
those of the whole-table write they replace, and writing a wide epoch holds a slice, not a table."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nn_staining import store as store_module
from nn_staining import tables as tables_module
from nn_staining.catalog import Commit
from nn_staining.records import (
    ACTIVATION_COLUMNS,
    BATCH_COLUMNS,
    ActivationStats,
    BatchStats,
    ClassMeans,
    EpochRecord,
    LayerStats,
    LayerWeights,
    PhaseRecord,
)
from nn_staining.store import (
    ROW_GROUP_ROWS,
    SCHEMAS,
    SLICE_ROWS,
    TableSource,
    TraceWriter,
    build_table,
    part_path,
)
from nn_staining.tables import epoch_tables, weight_delta_norms
from nn_staining.writer import EpochWriter

#: The Arrow allocations of the wide write (a module global: buffers it allocated must not outlive it).
PEAK_POOL = pa.proxy_memory_pool(pa.default_memory_pool())
LAYERS = ("L_in", "L_a", "L_skip", "L_b", "L_c")


def activations(rng: np.random.Generator, n: int) -> ActivationStats:
    f32 = lambda: rng.normal(size=n).astype(np.float32)  # noqa: E731
    counts = rng.integers(0, 100, n)
    return ActivationStats(counts, f32(), f32(), f32(), f32(), f32(), rng.integers(0, 3, n))


def phase_record(rng: np.random.Generator, sizes: dict[str, int], classes: int, batches: bool = True):
    """A record of layers ``sizes`` (fan-in 3 each) with per-class means, Linear inputs and per-batch rows."""
    outputs = {}
    for k, n in sizes.items():
        batch = None
        if batches:
            nb = 3
            stats = [rng.normal(size=(nb, n)).astype(np.float32) for _ in BATCH_COLUMNS]
            batch = BatchStats(np.array([0, 2, 5]), *stats)
        means = ClassMeans(rng.integers(0, 9, classes), rng.normal(size=(classes, n)).astype(np.float32))
        outputs[k] = LayerStats(activations(rng, n), means, batch)
    inputs = {
        k: ClassMeans(rng.integers(0, 9, classes), rng.normal(size=(classes, 3)).astype(np.float32))
        for k in list(sizes)[:2]
    }
    return PhaseRecord("train", outputs, inputs)


def layer_weights(rng: np.random.Generator, sizes: dict[str, int]) -> dict[str, LayerWeights]:
    """Weights of every layer but the second (no parameters); the third has no bias."""
    out = {}
    for i, (k, n) in enumerate(sizes.items()):
        if i == 1:
            continue
        out[k] = LayerWeights(
            rng.normal(size=(n, 3)).astype(np.float32),
            None if i == 2 else rng.normal(size=n).astype(np.float32),
            rng.random(n).astype(np.float32),
        )
    return out


def whole_tables(record: PhaseRecord, layers, weights, previous, c: int) -> dict[str, pa.Table]:
    """The tables as the whole-table writer built them (before slicing), written out independently."""
    outputs, code = record.outputs, {k: i for i, k in enumerate(layers)}
    order = [k for k in layers if k in outputs]
    sizes = [outputs[k].activations.neurons for k in order]
    cat, total = np.concatenate, sum(sizes)
    neurons: dict[str, Any] = {
        "phase": record.phase,
        "layer": np.repeat([code[k] for k in order], sizes),
        "neuron": cat([np.arange(n) for n in sizes]),
    }
    for column in ACTIVATION_COLUMNS:
        neurons[column] = cat([getattr(outputs[k].activations, column) for k in order])

    def column(fn):
        values, missing, start = np.full(total, np.nan, np.float32), np.ones(total, bool), 0
        for k, n in zip(order, sizes):
            value = fn(weights[k]) if k in weights else None
            if value is not None:
                values[start : start + n], missing[start : start + n] = value, False
            start += n
        return values, missing

    w64 = lambda w: w.weights.astype(np.float64)  # noqa: E731
    neurons["bias"] = column(lambda w: w.bias)
    neurons["weight_norm"] = column(lambda w: np.linalg.norm(w64(w), axis=1))
    neurons["weight_mean"] = column(lambda w: w.weights.mean(axis=1))
    neurons["grad_norm"] = column(lambda w: w.grad_norm)
    keys = [k for k in order if k in weights]
    neurons["weight_delta_norm"] = column(
        lambda w: (
            np.linalg.norm(w64(w) - previous[[k for k in keys if weights[k] is w][0]], axis=1)
            if previous
            else None
        )
    )
    lengths = cat(
        [np.full(n, weights[k].weights.shape[1] if k in weights else 0) for k, n in zip(order, sizes)]
    )
    neurons["weights"] = (
        cat([[0], np.cumsum(lengths)]),
        cat([weights[k].weights.reshape(-1) for k in keys]),
        cat([np.full(n, k not in weights) for k, n in zip(order, sizes)]),
    )
    tables = {"neurons": build_table("neurons", neurons, layers)}

    def per_class(stats: dict[str, ClassMeans], unit: str, count: str, mean: str) -> dict[str, Any]:
        return {
            "phase": record.phase,
            "layer": np.repeat([code[k] for k in stats], [m.units * c for m in stats.values()]),
            "class": np.tile(np.arange(c), sum(m.units for m in stats.values())),
            unit: cat([np.repeat(np.arange(m.units), c) for m in stats.values()]),
            count: cat([np.tile(m.count, m.units) for m in stats.values()]),
            mean: cat([m.mean.T.reshape(-1) for m in stats.values()]),
        }

    tables["classes"] = build_table(
        "classes",
        per_class({k: outputs[k].classes for k in order}, "neuron", "act_count", "act_mean"),
        layers,
    )
    inputs = {k: record.inputs[k] for k in layers if k in record.inputs}
    tables["inputs"] = build_table("inputs", per_class(inputs, "feature", "count", "mean"), layers)
    b = {k: outputs[k].batches for k in order}
    batches = {
        "phase": record.phase,
        "layer": cat([np.full(x.act_mean.size, code[k]) for k, x in b.items()]),
        "batch": cat([np.repeat(x.batch, x.act_mean.shape[1]) for x in b.values()]),
        "neuron": cat([np.tile(np.arange(x.act_mean.shape[1]), len(x.batch)) for x in b.values()]),
    } | {name: cat([getattr(x, name).reshape(-1) for x in b.values()]) for name in BATCH_COLUMNS}
    tables["batches"] = build_table("batches", batches, layers)
    return tables


def old_write(table: pa.Table, path: Path) -> None:
    """``pq.write_table`` of a whole table with the store's settings (the writer before slicing)."""
    pq.write_table(
        table,
        path,
        row_group_size=ROW_GROUP_ROWS,
        compression="snappy",
        use_dictionary=["phase", "layer"],
        write_page_checksum=True,
        write_statistics=[
            c for c in ("layer", "neuron", "feature", "class", "batch") if c in table.column_names
        ],
    )


@pytest.mark.parametrize("slice_rows", [ROW_GROUP_ROWS, SLICE_ROWS])
def test_a_sliced_write_equals_the_whole_table_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, slice_rows: int
) -> None:
    """Every table, every column, row for row, row group for row group and byte for byte; layers cross slice
    boundaries (3 + 20,000 + 9,000 + 1 + 40,000 neurons, 7 classes: 73,000 neurons rows, 511,000 classes rows)."""
    monkeypatch.setattr(store_module, "SLICE_ROWS", slice_rows)
    rng = np.random.default_rng(0)
    sizes = dict(zip(LAYERS, [3, 20_000, 9_000, 1, 40_000]))
    record, weights = phase_record(rng, sizes, 7), layer_weights(rng, sizes)
    previous = {k: rng.normal(size=w.weights.shape).astype(np.float32) for k, w in weights.items()}
    sources = epoch_tables(record, LAYERS, weights, weight_delta_norms(weights, previous), 7)
    expected = whole_tables(record, LAYERS, weights, previous, 7)
    assert sorted(sources) == sorted(expected) == ["batches", "classes", "inputs", "neurons"]
    rows = TraceWriter(tmp_path / "t").write_epoch(0, "train", sources)
    for name, table in expected.items():
        assert rows[name] == table.num_rows
        old_write(table, tmp_path / f"{name}.parquet")
        new, old = (
            pq.ParquetFile(part_path(tmp_path / "t", name, 0)),
            pq.ParquetFile(tmp_path / f"{name}.parquet"),
        )
        assert new.schema_arrow == old.schema_arrow == SCHEMAS[name]
        assert [new.metadata.row_group(i).num_rows for i in range(new.metadata.num_row_groups)] == [
            old.metadata.row_group(i).num_rows for i in range(old.metadata.num_row_groups)
        ]
        got, want = new.read(), old.read()
        for column in SCHEMAS[name].names:  # one column at a time, so a failure names it
            assert got.column(column).equals(want.column(column)), (name, column)
        assert got.equals(want)
        # and the very bytes: the same pages, page checksums and footer
        assert (
            part_path(tmp_path / "t", name, 0).read_bytes() == (tmp_path / f"{name}.parquet").read_bytes()
        ), name


def test_a_single_slice_table_is_kept_for_the_history_index(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    sizes = {"L_in": 5, "L_a": 7}
    sources = epoch_tables(phase_record(rng, sizes, 2), tuple(sizes), layer_weights(rng, sizes), {}, 2)
    writer = TraceWriter(tmp_path / "t")
    writer.write_epoch(0, "train", sources)
    kept = sources["neurons"].built
    assert kept is not None and kept.equals(pq.read_table(part_path(tmp_path / "t", "neurons", 0)))


def test_slices_are_whole_row_groups() -> None:
    with pytest.raises(ValueError, match="multiple of 8192"):
        TableSource("neurons", 10, lambda lo, hi: None, slice_rows=1000)


def wide_record(rng: np.random.Generator, neurons: int, classes: int) -> EpochRecord:
    sizes = {"L_wide": neurons}
    record = phase_record(rng, sizes, classes, batches=False)
    weights = {"L_wide": LayerWeights(rng.normal(size=(neurons, 16)).astype(np.float32), None, None)}
    layer = {"key": "L_wide", "neurons": neurons, "kind": "features", "row_offset": 0}
    layer |= {"in_features": 3, "input_offset": 0}
    layouts = [{"neurons": ["L_wide"], "inputs": ["L_wide"]}]
    meta = {"format": "nn_staining.trace", "format_version": 2, "run_id": "w", "layers": [layer]}
    meta |= {"num_classes": classes, "layouts": layouts}
    return EpochRecord(0, (record,), weights, tuple(sizes), classes, meta, layouts=(0,))


def test_writing_a_wide_epoch_holds_a_slice_not_the_table(tmp_path: Path) -> None:
    """200,000 neurons of fan-in 16 and 10 classes: a 2M-row classes table (~66 MB as Arrow) and a
    neurons table holding 3.2M weights (~25 MB). The writer's numpy and Arrow peak stays within a
    bound proportional to a slice (64 KiB rows: ~20 MB), measured with tracemalloc and a pyarrow
    memory pool of its own."""
    rng = np.random.default_rng(2)
    record = wide_record(rng, 200_000, 10)
    store = TraceWriter(tmp_path / "t")
    pool, previous = PEAK_POOL, pa.default_memory_pool()
    start = pool.max_memory()
    assert pool.bytes_allocated() == 0
    tracemalloc.start()
    try:
        pa.set_memory_pool(pool)
        phase = record.phases[0]
        tables = epoch_tables(phase, record.layers, record.weights, {}, record.num_classes)
        rows = store.write_epoch(0, "train", tables)
        _, numpy_peak = tracemalloc.get_traced_memory()
        del tables
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(previous)
    arrow_peak = pool.max_memory()
    assert start == 0, "the pool's peak is this test's"
    slice_bytes = (
        SLICE_ROWS * 400
    )  # a neurons row: 16 weights (float32, and twice float64 for the norm), 12 scalars
    assert numpy_peak + arrow_peak < slice_bytes, (numpy_peak, arrow_peak)
    assert rows == {"classes": 2_000_000, "inputs": 30, "neurons": 200_000}
    classes = pq.ParquetFile(part_path(tmp_path / "t", "classes", 0))
    assert classes.metadata.num_rows == 2_000_000


def test_the_history_index_is_fed_from_the_written_slice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A small epoch is indexed from the table the writer built, not read back from its part."""
    seen: list[pa.Table | None] = []
    real = TraceWriter.index_committed

    def spy(self, commit: Commit, neurons: pa.Table | None = None) -> None:
        seen.append(neurons)
        real(self, commit, neurons)

    monkeypatch.setattr(TraceWriter, "index_committed", spy)
    rng = np.random.default_rng(3)
    record = wide_record(rng, 100, 3)
    writer = EpochWriter(TraceWriter(tmp_path / "t"), background=False)
    writer.submit_epoch(record)
    assert seen and seen[0] is not None and seen[0].num_rows == 100
    assert seen[0].equals(pq.read_table(part_path(tmp_path / "t", "neurons", 0)))


def test_a_failure_after_some_slices_leaves_no_part_and_no_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slice that fails to build after others reached the file: the epoch's temporaries are removed,
    nothing is committed, and the next epoch is written whole."""
    from nn_staining.store import TraceWriteError

    monkeypatch.setattr(store_module, "SLICE_ROWS", ROW_GROUP_ROWS)
    real = TableSource.slices
    calls = []

    def failing(self):
        for i, piece in enumerate(real(self)):
            calls.append(i)
            if self.name == "classes" and i == 2 and calls.count(2) == 1:  # the first time only
                raise OSError("disk full (simulated)")
            yield piece

    monkeypatch.setattr(TableSource, "slices", failing)
    root = tmp_path / "t"
    writer = EpochWriter(TraceWriter(root), background=False)
    record = wide_record(np.random.default_rng(4), 20_000, 3)
    with pytest.raises(TraceWriteError, match="at the classes table: OSError: disk full"):
        writer.submit_epoch(record)
    assert not [p for p in root.rglob("*.parquet")], "no part or temporary of the failed epoch"
    assert not (root / "epochs.jsonl").exists() or not (root / "epochs.jsonl").read_text()
    writer.submit_epoch(dataclasses.replace(record, epoch=1))
    assert pq.ParquetFile(part_path(root, "classes", 1)).metadata.num_rows == 60_000


def test_weight_delta_norms_only_where_the_previous_weights_match(monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer without previous weights, or with weights of another shape, has no delta; the
    layers after it still have theirs, in float64 over slices of rows (here 3 rows each)."""
    monkeypatch.setattr(tables_module, "SLICE_ROWS", 3)
    rng = np.random.default_rng(2)
    shapes = {"L_new": (4, 3), "L_grown": (5, 2), "L_bias_only": None, "L_kept": (7, 5)}
    weights = {
        k: LayerWeights(
            None if s is None else rng.normal(size=s).astype(np.float32), np.zeros(3, np.float32), None
        )
        for k, s in shapes.items()
    }
    previous = {
        "L_grown": rng.normal(size=(5, 3)).astype(np.float32),
        "L_bias_only": np.zeros((3, 1), np.float32),
        "L_kept": rng.normal(size=(7, 5)).astype(np.float32),
    }
    deltas = weight_delta_norms(weights, previous)
    assert sorted(deltas) == ["L_kept"]
    want = np.sqrt(((weights["L_kept"].weights.astype(np.float64) - previous["L_kept"]) ** 2).sum(axis=1))
    np.testing.assert_allclose(deltas["L_kept"], want, rtol=1e-15)
    assert deltas["L_kept"].dtype == np.float64
