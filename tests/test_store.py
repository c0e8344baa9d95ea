"""Tests for nn_staining.store: the hive-partitioned Parquet layout, its schema, meta.json and
crash-safe writes, checked by reading the files with pyarrow directly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from conftest import EPOCHS, HIDDEN, MLP_LAYERS, N_CLASSES, N_FEATURES, Run, make_data, make_mlp, train

from nn_staining import NetworkTrace, load_trace

TABLES = ("neurons", "classes", "inputs", "batches")
F32 = pa.float32()
SCHEMAS = {
    "neurons": {
        "phase": pa.string(),
        "neuron": pa.int32(),
        "act_count": pa.int64(),
        "act_mean": F32,
        "act_std": F32,
        "act_min": F32,
        "act_max": F32,
        "act_active_frac": F32,
        "act_nan_count": pa.int64(),
        "bias": F32,
        "weight_norm": F32,
        "weight_mean": F32,
        "weight_delta_norm": F32,
        "grad_norm": F32,
        "weights": pa.list_(F32),
    },
    "classes": {
        "phase": pa.string(),
        "neuron": pa.int32(),
        "class": pa.int32(),
        "act_count": pa.int64(),
        "act_mean": F32,
    },
    "inputs": {
        "phase": pa.string(),
        "feature": pa.int32(),
        "class": pa.int32(),
        "count": pa.int64(),
        "mean": F32,
    },
    "batches": {
        "phase": pa.string(),
        "batch": pa.int32(),
        "neuron": pa.int32(),
        "act_count": pa.int64(),
        "act_mean": F32,
        "act_std": F32,
        "act_min": F32,
        "act_max": F32,
    },
}
NEURON_COUNTS = {
    "L_input": HIDDEN,
    "L_relu_1": HIDDEN,
    "L_hidden_1": HIDDEN,
    "L_relu_2": HIDDEN,
    "L_output": N_CLASSES,
}


def test_layout_is_one_part_per_table_and_epoch(mlp_run: Run) -> None:
    store = mlp_run.store
    files = sorted(str(p.relative_to(store)) for p in store.rglob("*") if p.is_file())
    expected = sorted(
        ["meta.json", "epochs.jsonl"]
        + [f"{table}/epoch={e}/part-0.parquet" for table in TABLES for e in range(EPOCHS)]
    )
    assert files == expected, "no temporary, pickled or extra files"


@pytest.mark.parametrize("table", TABLES)
def test_part_schema_is_typed_and_has_no_epoch_column(mlp_run: Run, table: str) -> None:
    schema = pq.read_schema(mlp_run.store / table / "epoch=2" / "part-0.parquet")
    assert "epoch" not in schema.names, "epoch lives in the directory name only"
    assert pa.types.is_dictionary(schema.field("layer").type)
    assert schema.field("layer").type.value_type in (pa.string(), pa.large_string())
    for name, type_ in SCHEMAS[table].items():
        assert schema.field(name).type == type_, name
    assert set(schema.names) == set(SCHEMAS[table]) | {"layer"}


def test_hive_dataset_has_one_int_epoch_column(mlp_run: Run) -> None:
    table = ds.dataset(mlp_run.store / "neurons", format="parquet", partitioning="hive").to_table()
    assert table.column_names.count("epoch") == 1
    assert pa.types.is_integer(table.schema.field("epoch").type)
    assert sorted(set(table.column("epoch").to_pylist())) == list(range(EPOCHS))
    assert table.num_rows == EPOCHS * sum(NEURON_COUNTS.values())


@pytest.mark.parametrize(
    ("table", "rows_per_epoch"),
    [
        ("neurons", sum(NEURON_COUNTS.values())),
        ("classes", sum(NEURON_COUNTS.values()) * N_CLASSES),
        ("inputs", (N_FEATURES + HIDDEN + HIDDEN) * N_CLASSES),
        ("batches", sum(NEURON_COUNTS.values()) * 4),
    ],
)
def test_rows_are_one_per_key(mlp_run: Run, table: str, rows_per_epoch: int) -> None:
    keys = {
        "neurons": ["layer", "neuron"],
        "classes": ["layer", "neuron", "class"],
        "inputs": ["layer", "feature", "class"],
        "batches": ["batch", "layer", "neuron"],
    }[table]
    part = pq.read_table(mlp_run.store / table / "epoch=1" / "part-0.parquet").to_pandas()
    assert len(part) == rows_per_epoch
    assert not part.duplicated(keys).any()
    assert set(part["phase"]) == {"train"}


def test_neurons_part_values_per_layer(mlp_run: Run) -> None:
    part = pq.read_table(mlp_run.store / "neurons" / "epoch=0" / "part-0.parquet").to_pandas()
    part["layer"] = part["layer"].astype(str)
    assert part.groupby("layer", sort=False).size().to_dict() == NEURON_COUNTS
    for layer, n in NEURON_COUNTS.items():
        assert sorted(part.loc[part["layer"] == layer, "neuron"]) == list(range(n))
    relu = part[part["layer"] == "L_relu_1"]
    assert relu["bias"].isna().all() and relu["weights"].isna().all() and relu["weight_norm"].isna().all()
    hidden = part[part["layer"] == "L_hidden_1"].sort_values("neuron")
    weights = np.stack(hidden["weights"].to_numpy())
    np.testing.assert_array_equal(weights, mlp_run.params[0]["L_hidden_1"]["weight"].astype(np.float32))
    assert part["weight_delta_norm"].isna().all(), "nothing to compare with at the first recorded epoch"


def test_meta_json_describes_the_trace(mlp_run: Run) -> None:
    meta = json.loads((mlp_run.store / "meta.json").read_text())
    assert isinstance(meta["format_version"], int)
    assert [layer["key"] for layer in meta["layers"]] == MLP_LAYERS
    by_key = {layer["key"]: layer for layer in meta["layers"]}
    assert {k: v["neurons"] for k, v in by_key.items()} == NEURON_COUNTS
    assert by_key["L_hidden_1"]["type"] == "Linear"
    assert by_key["L_relu_1"]["type"] == "ReLU"
    assert by_key["L_hidden_1"]["module"] == "hidden_1"
    assert by_key["L_input"]["params"] == {"weight": [HIDDEN, N_FEATURES], "bias": [HIDDEN]}
    assert by_key["L_relu_2"]["params"] == {}
    assert meta["num_classes"] == N_CLASSES
    assert "epochs" not in meta and "metrics" not in meta  # per-epoch facts live in the logs
    log = [json.loads(line) for line in (mlp_run.store / "epochs.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line["phase"]) for line in log] == [(e, "train") for e in range(EPOCHS)]
    assert meta["layouts"] == [{"neurons": MLP_LAYERS, "inputs": ["L_input", "L_hidden_1", "L_output"]}]
    assert all(line["layout"] == 0 for line in log)
    assert meta["config"]["drop_batches"] is False
    assert {"nn_staining", "torch"} <= set(meta["versions"])


def test_meta_json_keeps_class_names_and_config(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    names = ["cat", "dog", "bird"]
    with NetworkTrace(
        model, tmp_path / "t", num_classes=3, class_names=names, epoch_intervals=2, config={"lr": 0.1}
    ) as trace:
        train(model, x, y, epochs=3, trace=trace)
    t = load_trace(tmp_path / "t")
    assert t.class_names == names
    assert t.meta["config"]["epoch_intervals"] == 2
    assert t.meta["config"]["lr"] == 0.1
    assert t.epochs == [0, 2]


def test_meta_json_lists_epochs_as_they_complete(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    store = tmp_path / "t"
    with NetworkTrace(model, store) as trace:
        for epoch in range(3):
            with trace.epoch(epoch):
                model(x)
            assert trace.load().epochs == list(range(epoch + 1))
            lines = (store / "epochs.jsonl").read_text().splitlines()
            assert [json.loads(line)["epoch"] for line in lines] == list(range(epoch + 1))


def test_a_crash_while_writing_an_epoch_leaves_the_completed_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The neurons part is written under a temporary name: a failure before the rename leaves no
    part-0.parquet for the epoch, and meta.json still lists only the completed epochs."""
    model = make_mlp()
    x, y = make_data()
    store = tmp_path / "t"
    real_write_table = pq.write_table

    def failing_write_table(table, where, *args, **kwargs):
        real_write_table(table, where, *args, **kwargs)
        if "epoch=1" in str(where) and "neurons" in str(where):
            raise OSError("disk full")

    with (
        pytest.raises(OSError, match="disk full"),
        NetworkTrace(model, store, num_classes=N_CLASSES) as trace,
    ):
        train(model, x, y, epochs=1, trace=trace)
        assert trace["E_0/L_hidden_1/n_20"]["act_count"] == len(x)  # epoch 0 is on disk
        monkeypatch.setattr(pq, "write_table", failing_write_table)
        trace.start_epoch(1)
        trace.set_targets(y)
        model(x)
        trace.end_epoch()
    monkeypatch.undo()
    t = load_trace(store)
    assert t.epochs == [0]
    assert not (store / "neurons" / "epoch=1" / "part-0.parquet").exists()
    assert t.to_dataframe().index.get_level_values("epoch").unique().tolist() == [0]
    assert len(t.query("E_*/L_hidden_1/n_20")) == 1


def test_a_failed_epoch_write_leaves_no_part_in_any_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Engines that glob ``<table>/*/*.parquet`` must not see half of a failed epoch either."""
    model = make_mlp()
    x, y = make_data()
    store = tmp_path / "t"
    real_write_table = pq.write_table

    def failing_write_table(table, where, *args, **kwargs):
        if "epoch=1" in str(where) and "neurons" in str(where):
            raise OSError("disk full")
        real_write_table(table, where, *args, **kwargs)

    with (
        pytest.raises(OSError, match="disk full"),
        NetworkTrace(model, store, num_classes=N_CLASSES) as trace,
    ):
        train(model, x, y, epochs=1, trace=trace)
        assert trace["E_0/L_hidden_1/n_20"]["act_count"] == len(x)
        monkeypatch.setattr(pq, "write_table", failing_write_table)
        trace.start_epoch(1)
        trace.set_targets(y)
        model(x)
        trace.end_epoch()
    monkeypatch.undo()
    assert load_trace(store).epochs == [0]
    stray = [p.relative_to(store) for p in store.rglob("*.parquet") if "epoch=1" in p.parts]
    assert not [p for p in stray if not p.name.startswith(".")], stray


def test_no_pickle_in_the_store(mlp_run: Run) -> None:
    for path in mlp_run.store.rglob("*"):
        if path.is_file():
            head = path.read_bytes()[:4]
            assert head == b"PAR1" or path.name in ("meta.json", "epochs.jsonl", "metrics.jsonl"), path
            assert not head.startswith(b"\x80"), f"{path} looks like a pickle"


def test_float_columns_are_float32_and_nan_free_where_defined(mlp_run: Run) -> None:
    part = pq.read_table(mlp_run.store / "neurons" / "epoch=3" / "part-0.parquet")
    for name in ("act_mean", "act_std", "act_min", "act_max", "act_active_frac"):
        column = part.column(name)
        assert column.type == F32
        assert column.null_count == 0
        assert not np.isnan(column.to_numpy()).any(), name


def test_empty_optional_columns_keep_their_types(tmp_path: Path) -> None:
    """A model without parameters still writes the declared schema (all-null bias, weights, …)."""
    model = torch.nn.Sequential(torch.nn.ReLU())
    with NetworkTrace(model, tmp_path / "t") as trace, trace.epoch(0):
        model(torch.randn(5, 3))
    schema = pq.read_schema(tmp_path / "t" / "neurons" / "epoch=0" / "part-0.parquet")
    for name, type_ in SCHEMAS["neurons"].items():
        assert schema.field(name).type == type_, name
    frame = load_trace(tmp_path / "t").to_dataframe(columns=["act_count", "bias", "weight_norm", "grad_norm"])
    assert (frame["act_count"] == 5).all()
    assert frame[["bias", "weight_norm", "grad_norm"]].isna().all().all()


def test_the_neurons_part_is_renamed_into_place_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader that sees an epoch's neurons part can read all its other parts: neurons are renamed last."""
    import os as os_module

    from nn_staining import store as store_module

    renamed: list[str] = []
    real_replace = os_module.replace

    def spy(src, dst):
        renamed.append(Path(dst).parent.parent.name)
        real_replace(src, dst)

    monkeypatch.setattr(store_module.os, "replace", spy)
    model = make_mlp()
    x, y = make_data()
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES, background=False) as trace:
        train(model, x, y, epochs=1, trace=trace)
    parts = [name for name in renamed if name in TABLES]
    assert parts[-1] == "neurons" and sorted(parts[:-1]) == ["classes", "inputs"]
