"""Tests for nn_staining.store: the hive-partitioned Parquet layout, its schema, meta.json and
crash-safe writes, checked by reading the files with pyarrow directly."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from conftest import EPOCHS, HIDDEN, MLP_LAYERS, N_CLASSES, N_FEATURES, Run, make_data, make_mlp, train

from nn_staining import NetworkTrace, load_trace
from nn_staining import store as store_module
from nn_staining.catalog import Commit, NotATraceError, TraceCorruptError
from nn_staining.rows import ReadPlan
from nn_staining.store import (
    ROW_GROUP_ROWS,
    TraceWriteError,
    TraceWriter,
    build_table,
    epoch_write_error,
    part_name,
    part_path,
    read_epochs,
    read_part,
    store_size,
)

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
    real_write_table = store_module._write_table

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
        monkeypatch.setattr(store_module, "_write_table", failing_write_table)
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
    real_write_table = store_module._write_table

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
        monkeypatch.setattr(store_module, "_write_table", failing_write_table)
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


# -- store.py's pieces on hand-built tables (no recording): exact values, files and row groups ------------

#: A meta.json that read_meta accepts: one Linear layer of 2 neurons.
HAND_META = {
    "format": "nn_staining.trace",
    "format_version": 2,
    "run_id": "hand",
    "layers": [{"key": "L_a", "neurons": 2, "kind": "features", "row_offset": 0}],
    "layouts": [{"neurons": ["L_a"], "inputs": []}],
}


def neurons_table(
    n: int, layers: tuple[str, ...] = ("L_a",), phase: str = "train", shift: float = 0.0
) -> pa.Table:
    """A neurons part of ``n`` rows of the first layer: neuron i has act_mean i + shift."""
    neuron = np.arange(n)
    return build_table(
        "neurons",
        {"layer": np.zeros(n, np.int32), "phase": phase, "neuron": neuron, "act_mean": neuron + shift},
        layers,
    )


def test_part_names_and_paths() -> None:
    assert part_name("train") == "part-0.parquet" and part_name("eval") == "eval-0.parquet"
    with pytest.raises(ValueError) as info:
        part_name("test")
    assert str(info.value) == "phase 'test' is not one of train, eval"
    assert part_path("/s", "classes", 7, "eval") == Path("/s/classes/epoch=7/eval-0.parquet")
    assert part_path(Path("/s"), "neurons", 0) == Path("/s/neurons/epoch=0/part-0.parquet")


def test_build_table_nulls_dictionary_and_weights() -> None:
    table = build_table(
        "neurons",
        {
            "layer": [1, 1, 0],
            "phase": "eval",
            "neuron": np.array([0, 1, 0], np.int64),
            "act_count": np.array([4.0, 5.0, 6.0]),
            "act_mean": (np.array([1.5, 2.5, np.nan]), np.array([False, True, False])),
            "act_std": (np.array([0.5, np.nan, 1.0]), np.zeros(3, bool)),
            "weights": (np.array([0, 2, 2, 3]), np.array([1.0, 2.0, 3.0]), np.array([False, True, False])),
        },
        ["L_a", "L_b", "L_c"],
    )
    assert table.schema == store_module.SCHEMAS["neurons"]
    layer = table.column("layer").combine_chunks()
    assert layer.dictionary.to_pylist() == ["L_a", "L_b", "L_c"], "the trace-wide dictionary, used or not"
    assert layer.indices.to_pylist() == [1, 1, 0]
    assert table.column("phase").to_pylist() == ["eval"] * 3
    assert table.column("act_count").to_pylist() == [4, 5, 6]
    mean = table.column("act_mean").to_pylist()
    assert mean[0] == 1.5 and mean[1] is None and np.isnan(mean[2]), "a mask makes a null, NaN stays NaN"
    std = table.column("act_std")
    assert std.null_count == 0 and np.isnan(std.to_pylist()[1])
    assert table.column("weights").to_pylist() == [[1.0, 2.0], None, [3.0]]
    for absent in ("bias", "weight_norm", "grad_norm", "act_nan_count"):
        assert table.column(absent).null_count == 3, absent
    plain = build_table(
        "neurons",
        {"layer": [0], "neuron": [0], "weights": (np.array([0, 1]), np.array([7.0]), np.zeros(1, bool))},
        ["L_a"],
    )
    assert plain.column("weights").null_count == 0 and plain.column("weights").to_pylist() == [[7.0]]
    assert plain.column("phase").to_pylist() == [None]


def test_build_table_refuses_more_weights_than_a_list_column_takes() -> None:
    too_many = (np.array([0, 2**31]), np.zeros(1, np.float32), np.zeros(1, bool))
    with pytest.raises(ValueError) as info:
        build_table("neurons", {"layer": [0], "neuron": [0], "weights": too_many}, ["L_a"])
    assert str(info.value) == (
        "an epoch holds 2,147,483,648 weights, more than a Parquet list<float32> column takes; "
        "record it with record_weights=False"
    )


def test_written_parts_have_8192_row_groups_snappy_dictionaries_and_few_statistics(tmp_path: Path) -> None:
    assert ROW_GROUP_ROWS == 8192
    writer = TraceWriter(tmp_path / "t")
    rows = writer.write_epoch(0, "train", {"neurons": neurons_table(20_000)})
    assert rows == {"neurons": 20_000}
    md = pq.ParquetFile(part_path(tmp_path / "t", "neurons", 0)).metadata
    assert [md.row_group(i).num_rows for i in range(md.num_row_groups)] == [8192, 8192, 3616]
    names = md.schema.to_arrow_schema().names
    group = md.row_group(0)
    for i, name in enumerate(names):
        column = group.column(i)
        assert column.compression == "SNAPPY", name
        assert column.is_stats_set == (name in ("layer", "neuron")), name
        dictionary = "RLE_DICTIONARY" in column.encodings or "PLAIN_DICTIONARY" in column.encodings
        assert dictionary == (name in ("phase", "layer")), name
    assert pq.read_table(part_path(tmp_path / "t", "neurons", 0)).equals(neurons_table(20_000))


@pytest.mark.parametrize(
    ("table", "indexed"),
    [
        ("classes", {"layer", "neuron", "class"}),
        ("inputs", {"layer", "feature", "class"}),
        ("batches", {"layer", "batch", "neuron"}),
    ],
)
def test_statistics_are_written_for_the_index_columns_only(
    tmp_path: Path, table: str, indexed: set[str]
) -> None:
    """Engines prune row groups on the index columns' min/max; no other column carries statistics."""
    TraceWriter(tmp_path).write_epoch(0, "train", {table: build_table(table, {"layer": [0, 0]}, ["L_a"])})
    md = pq.ParquetFile(part_path(tmp_path, table, 0)).metadata
    names = md.schema.to_arrow_schema().names
    assert {n for i, n in enumerate(names) if md.row_group(0).column(i).is_stats_set} == indexed


def test_write_epoch_returns_rows_renames_neurons_last_and_leaves_no_temporary(tmp_path: Path) -> None:
    root = tmp_path / "t"
    writer = TraceWriter(root)
    classes = build_table("classes", {"layer": [0, 0], "neuron": [0, 0], "class": [0, 1]}, ["L_a"])
    rows = writer.write_epoch(3, "eval", {"neurons": neurons_table(2), "classes": classes})
    assert list(rows.items()) == [("classes", 2), ("neurons", 2)]
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert files == ["classes/epoch=3/eval-0.parquet", "neurons/epoch=3/eval-0.parquet"]
    assert writer.write_epoch(4, "train", {}) == {}


@pytest.mark.parametrize("fail_at", ["write", "rename"])
def test_a_failed_write_epoch_names_the_table_and_removes_every_part(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    root = tmp_path / "t"
    writer = TraceWriter(root)
    tables = {"neurons": neurons_table(2), "inputs": build_table("inputs", {"layer": [0]}, ["L_a"])}
    writer.write_epoch(0, "train", tables)
    tables["classes"] = build_table("classes", {"layer": [0]}, ["L_a"])
    if fail_at == "write":
        real = store_module._write_table

        def failing(table, path):
            real(table, path)
            if "inputs" in str(path):
                raise OSError("boom")

        monkeypatch.setattr(store_module, "_write_table", failing)
    else:
        real_replace = os.replace

        def failing_replace(src, dst):
            if "inputs" in str(dst):
                raise OSError("boom")
            real_replace(src, dst)

        monkeypatch.setattr(store_module.os, "replace", failing_replace)
    with pytest.raises(store_module._EpochFailure) as info:
        writer.write_epoch(1, "train", tables)
    assert info.value.table == "inputs" and str(info.value) == "inputs: boom"
    assert isinstance(info.value.error, OSError)
    monkeypatch.undo()
    left = sorted(str(p.relative_to(root)) for p in root.glob("*/*/*"))
    assert left == ["inputs/epoch=0/part-0.parquet", "neurons/epoch=0/part-0.parquet"]
    assert sorted(str(p.relative_to(root)) for p in root.glob("*/*")) == ["inputs/epoch=0", "neurons/epoch=0"]
    assert pq.read_table(part_path(root, "neurons", 0)).equals(neurons_table(2)), "epoch 0 is intact"


def test_remove_parts_keeps_the_other_phase_and_removes_empty_folders(tmp_path: Path) -> None:
    root = tmp_path / "t"
    writer = TraceWriter(root)
    writer.write_epoch(2, "train", {"neurons": neurons_table(2)})
    writer.write_epoch(2, "eval", {"neurons": neurons_table(2)})
    writer.write_epoch(3, "train", {"neurons": neurons_table(2)})
    (root / "neurons" / "epoch=3" / ".part-0.parquet.tmp").write_text("x")
    (root / "classes" / "epoch=3").mkdir(parents=True)
    writer.remove_parts(2, "train")
    writer.remove_parts(3, "train")
    left = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert left == ["classes", "neurons", "neurons/epoch=2", "neurons/epoch=2/eval-0.parquet"]


def test_remove_extras_deletes_one_epochs_probes_and_checkpoints(tmp_path: Path) -> None:
    root = tmp_path / "t"
    writer = TraceWriter(root)
    for folder in ("probes", "checkpoints", "neurons"):
        for epoch in (3, 4):
            (root / folder / f"epoch={epoch}").mkdir(parents=True)
            (root / folder / f"epoch={epoch}" / "x").write_text("x")
    writer.remove_extras(3)
    writer.remove_extras(7)  # nothing recorded for it: nothing to remove, no error
    left = sorted(str(p.relative_to(root)) for p in root.iterdir() for p in p.iterdir())
    assert left == [
        "checkpoints/epoch=4",
        "neurons/epoch=3",
        "neurons/epoch=4",
        "probes/epoch=4",
    ]


def test_write_meta_rewrites_only_a_changed_meta(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = []
    real = store_module.write_json_atomic
    monkeypatch.setattr(store_module, "write_json_atomic", lambda p, m: written.append(m) or real(p, m))
    writer = TraceWriter(tmp_path / "t")
    writer.write_meta(dict(HAND_META))
    writer.write_meta(dict(HAND_META))
    writer.write_meta(dict(HAND_META, run_id="other"))
    assert [m["run_id"] for m in written] == ["hand", "other"]
    assert json.loads((tmp_path / "t" / "meta.json").read_text()) == dict(HAND_META, run_id="other")


def test_commit_and_metrics_lines(tmp_path: Path) -> None:
    writer = TraceWriter(tmp_path / "t")
    writer.commit(Commit(2, "eval", 0, {"neurons": 2}))
    writer.append_metrics("2", {"loss": 0.5})
    writer.append_metrics("run", {"acc": 1})
    assert (tmp_path / "t" / "epochs.jsonl").read_text() == (
        '{"epoch":2,"phase":"eval","layout":0,"rows":{"neurons":2}}\n'
    )
    assert (tmp_path / "t" / "metrics.jsonl").read_text() == (
        '{"key":"2","values":{"loss":0.5}}\n{"key":"run","values":{"acc":1}}\n'
    )


def hand_trace(root: Path) -> None:
    root.mkdir(parents=True)
    (root / "meta.json").write_text(json.dumps(HAND_META))


def test_writer_refuses_an_existing_trace_without_resume_or_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "t"
    hand_trace(root)
    with pytest.raises(FileExistsError) as info:
        TraceWriter(root)
    assert str(info.value) == (
        f"{str(root)!r} already holds a trace; pass resume=True to continue it, "
        "overwrite=True to replace it, or choose another store path"
    )


def test_writer_refuses_a_foreign_folder_with_table_names(tmp_path: Path) -> None:
    for name in ("probes", "neurons", "figures"):
        (tmp_path / name).mkdir()
    with pytest.raises(FileExistsError) as info:
        TraceWriter(tmp_path)
    assert str(info.value) == (
        f"{str(tmp_path)!r} is not an nn_staining trace but has folders named like its tables "
        "(neurons, probes); choose another store path"
    )
    (tmp_path / "meta.json").write_text('{"format": "other"}')
    with pytest.raises(NotATraceError):
        TraceWriter(tmp_path, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures", "meta.json", "neurons", "probes"]
    TraceWriter(tmp_path / "new" / "deeper")
    assert (tmp_path / "new" / "deeper").is_dir()


def populated(root: Path) -> None:
    hand_trace(root)
    for folder in ("neurons", "classes", "inputs", "batches", "probes", "checkpoints", "figures"):
        (root / folder / "epoch=0").mkdir(parents=True)
    for name in ("epochs.jsonl", "metrics.jsonl", "notes.txt"):
        (root / name).write_text("")


def test_writer_resume_keeps_everything_and_overwrite_clears_the_trace(tmp_path: Path) -> None:
    root = tmp_path / "t"
    populated(root)
    before = sorted(p.name for p in root.iterdir())
    TraceWriter(root, resume=True)
    assert sorted(p.name for p in root.iterdir()) == before
    (root / "interventions" / "epoch=0").mkdir(parents=True)  # effects measured on the replaced run
    TraceWriter(root, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["figures", "notes.txt"]
    (root / "meta.json").write_text(json.dumps(HAND_META))
    (root / "interventions").write_text("a file of the user's, not the folder of effects")
    TraceWriter(root, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["figures", "interventions", "notes.txt"]


def test_drop_epochs_forgets_every_epoch_from_the_first_dropped(tmp_path: Path) -> None:
    root = tmp_path / "t"
    populated(root)
    lines = [
        {"epoch": e, "phase": p, "layout": 0, "rows": {"neurons": 2}}
        for e in (0, 1, 2, 3)
        for p in ("eval", "train")
    ]
    (root / "epochs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    metrics = [{"key": k, "values": {"loss": 1}} for k in ("0", "run", "1", "2", "3")]
    (root / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in metrics))
    for folder, epoch in [
        ("neurons", 1),
        ("neurons", 2),
        ("probes", 3),
        ("checkpoints", 10),
        ("neurons", "x2"),
    ]:
        (root / folder / f"epoch={epoch}").mkdir()
    (root / "neurons" / "other=5").mkdir()
    (root / "classes" / "epoch=7").write_text("a stray file named like an epoch folder: skipped, no error")
    shutil.rmtree(root / "batches")  # a table never recorded: the folders after it are still cleared
    TraceWriter(root, resume=True).drop_epochs(2)
    kept = [json.loads(line) for line in (root / "epochs.jsonl").read_text().splitlines()]
    assert [(line["epoch"], line["phase"]) for line in kept] == [
        (0, "train"),
        (1, "train"),
        (0, "eval"),
        (1, "eval"),
    ]
    assert (root / "metrics.jsonl").read_text() == (
        '{"key":"0","values":{"loss":1}}\n{"key":"run","values":{"loss":1}}\n{"key":"1","values":{"loss":1}}\n'
    )
    folders = sorted(str(p.relative_to(root)) for p in root.glob("*/*"))
    assert folders == [
        "checkpoints/epoch=0",
        "classes/epoch=0",
        "classes/epoch=7",
        "figures/epoch=0",
        "inputs/epoch=0",
        "neurons/epoch=0",
        "neurons/epoch=1",
        "neurons/epoch=x2",
        "neurons/other=5",
        "probes/epoch=0",
    ]
    TraceWriter(root, resume=True).drop_epochs(0)
    assert (root / "epochs.jsonl").read_text() == "" and not list(root.glob("neurons/epoch=[0-9]*"))
    assert (root / "metrics.jsonl").read_text() == '{"key":"run","values":{"loss":1}}\n'


def test_epoch_write_error_names_epoch_table_store_cause_and_intact_epochs() -> None:
    failure = store_module._EpochFailure("classes", OSError(28, "No space left on device"))
    error = epoch_write_error(Path("/s"), 5, "eval", failure, [0, 1])
    assert isinstance(error, TraceWriteError) and isinstance(error, OSError)
    tail = "That epoch is not in the trace and left nothing on disk; the epochs written before are intact: "
    assert str(error) == (
        "writing epoch 5 (eval) of '/s' failed at the classes table: OSError: [Errno 28] No space left on device. "
        + tail
        + "[0, 1]; later epochs are still written"
    )
    error = epoch_write_error(Path("/s"), 12, "train", ValueError("bad"), list(range(12)))
    assert str(error) == (
        "writing epoch 12 (train) of '/s' failed: ValueError: bad. "
        + tail
        + f"{list(range(12))}; later epochs are still written"
    )
    error = epoch_write_error(Path("/s"), 13, "train", ValueError("bad"), list(range(13)))
    assert "intact: [0, 1, 2, 3, 4, '…', 10, 11, 12]; later" in str(error)


# -- reading: exactly the row groups a plan needs -------------------------------------------------------
@pytest.fixture
def groups_read(monkeypatch: pytest.MonkeyPatch) -> list[list[int]]:
    """The row groups of each ``ParquetFile.read_row_groups`` call (a whole-file read is recorded as "all")."""
    calls: list = []
    read_row_groups, read = pq.ParquetFile.read_row_groups, pq.ParquetFile.read

    def spy_groups(self, row_groups, *args, **kwargs):
        calls.append(list(row_groups))
        return read_row_groups(self, row_groups, *args, **kwargs)

    def spy_read(self, *args, **kwargs):
        calls.append("all")
        return read(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy_groups)
    monkeypatch.setattr(pq.ParquetFile, "read", spy_read)
    return calls


@pytest.fixture(scope="module")
def three_groups(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One neurons part of 20,000 rows (row groups 0-8191, 8192-16383, 16384-19999); act_mean = row."""
    root = tmp_path_factory.mktemp("groups") / "t"
    TraceWriter(root).write_epoch(0, "train", {"neurons": neurons_table(20_000)})
    return part_path(root, "neurons", 0)


@pytest.mark.parametrize(
    ("ranges", "groups", "rows"),
    [
        ([(5, 10)], [0], list(range(5, 10))),
        ([(0, 8192)], [0], list(range(8192))),
        ([(8192, 8193)], [1], [8192]),
        ([(8190, 8195)], [0, 1], list(range(8190, 8195))),
        ([(8191, 8192), (16384, 16385)], [0, 2], [8191, 16384]),
        ([(100, 101), (16390, 16392)], [0, 2], [100, 16390, 16391]),
        ([(16390, 16391), (5, 6)], [0, 2], [16390, 5]),
        ([(3, 3), (19998, 20000)], [2], [19998, 19999]),
        ([(0, 20_000)], [0, 1, 2], list(range(20_000))),
    ],
)
def test_read_part_reads_only_the_row_groups_of_its_ranges(
    three_groups: Path, groups_read: list, ranges, groups, rows
) -> None:
    table = read_part(three_groups, ["neuron", "act_mean"], ReadPlan(ranges, 20_000, None), 0)
    assert groups_read == [groups], "one read of exactly these row groups"
    assert table.column_names == ["neuron", "act_mean"]
    assert table.column("neuron").to_pylist() == rows
    assert table.column("act_mean").to_pylist() == [float(r) for r in rows]


def test_a_small_read_does_not_hold_its_row_groups(three_groups: Path) -> None:
    """A few rows out of a row group are copied, so the decoded row group can be freed."""
    one = read_part(three_groups, ["act_mean"], ReadPlan([(10, 11)], 20_000, None), 0)
    assert one.get_total_buffer_size() < 1000
    most = read_part(three_groups, ["act_mean"], ReadPlan([(0, 8000)], 20_000, None), 0)
    assert most.get_total_buffer_size() >= 8192 * 4, "most of a row group: a zero-copy slice"


def test_read_part_without_ranges_reads_the_whole_part_and_filters(
    three_groups: Path, groups_read: list
) -> None:
    everything = read_part(three_groups, ["neuron"], ReadPlan(None, None, None), 0)
    assert everything.column("neuron").to_pylist() == list(range(20_000))
    some = read_part(three_groups, ["neuron"], ReadPlan(None, 20_000, pc.field("neuron") < 3), 0)
    assert some.column("neuron").to_pylist() == [0, 1, 2]
    assert groups_read == ["all", "all"]
    empty = read_part(three_groups, ["neuron", "act_mean"], ReadPlan([(4, 4)], 20_000, None), 0)
    assert empty.num_rows == 0 and empty.schema.names == ["neuron", "act_mean"]
    assert groups_read == ["all", "all"], "an empty range reads nothing"


def test_read_part_errors_name_the_epoch_and_file(tmp_path: Path, three_groups: Path) -> None:
    plan = ReadPlan([(0, 1)], 20_000, None)
    with pytest.raises(TraceCorruptError) as info:
        read_part(three_groups, ["neuron"], ReadPlan([(0, 1)], 19_999, None), 4)
    assert str(info.value) == (
        f"epoch 4: {str(three_groups)!r} holds 20,000 rows where the trace's metadata says 19,999; "
        "the part or meta.json/epochs.jsonl is damaged"
    )
    with pytest.raises(TraceCorruptError) as info:
        read_part(tmp_path / "gone.parquet", ["neuron"], plan, 3)
    assert (
        str(info.value)
        == f"epoch 3 is listed in the trace but its part {str(tmp_path / 'gone.parquet')!r} is missing"
    )
    with pytest.raises(TraceCorruptError) as info:
        read_part(tmp_path, ["neuron"], plan, 3)
    assert str(info.value) == f"{str(tmp_path)!r} (part of epoch 3) is not a regular file"
    (tmp_path / "junk.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    with pytest.raises(
        TraceCorruptError, match=r"^epoch 2: '.*junk.parquet' is not a readable Parquet part: "
    ):
        read_part(tmp_path / "junk.parquet", ["neuron"], plan, 2)


def test_read_epochs_adds_the_epoch_column_and_reads_the_phase(tmp_path: Path) -> None:
    root = tmp_path / "t"
    writer = TraceWriter(root)
    for epoch in range(6):
        writer.write_epoch(epoch, "train", {"neurons": neurons_table(3, shift=10 * epoch)})
        writer.write_epoch(epoch, "eval", {"neurons": neurons_table(3, shift=-10 * epoch, phase="eval")})
    plans = [(e, ReadPlan([(0, 1), (2, 3)] if e % 2 else [(1, 2)], 3, None)) for e in (5, 0, 1, 2, 3, 4)]
    for phase, sign in (("train", 1), ("eval", -1)):
        table = read_epochs(root, "neurons", plans, phase, ["neuron", "act_mean", "phase"])
        assert table.column_names == ["epoch", "neuron", "act_mean", "phase"]
        assert table.schema.field("epoch").type == pa.int32()
        assert table.column("epoch").to_pylist() == [5, 5, 0, 1, 1, 2, 3, 3, 4]
        assert table.column("neuron").to_pylist() == [0, 2, 1, 0, 2, 1, 0, 2, 1]
        expected = [
            n + sign * 10 * e for e, n in zip([5, 5, 0, 1, 1, 2, 3, 3, 4], [0, 2, 1, 0, 2, 1, 0, 2, 1])
        ]
        assert table.column("act_mean").to_pylist() == expected
        assert set(table.column("phase").to_pylist()) == {phase}
    few = read_epochs(str(root), "neurons", plans[:2], "train", ["act_mean"])
    assert few.column("epoch").to_pylist() == [5, 5, 0] and few.column("act_mean").to_pylist() == [50, 52, 1]
    empty = read_epochs(root, "classes", [], "train", ["class", "act_mean"])
    assert empty.num_rows == 0
    assert empty.schema == pa.schema(
        [("epoch", pa.int32()), ("class", pa.int32()), ("act_mean", pa.float32())]
    )


def test_store_size_counts_metadata_logs_and_parts_only(tmp_path: Path) -> None:
    files = {
        "meta.json": 10,
        "epochs.jsonl": 20,
        "metrics.jsonl": 40,
        "neurons/epoch=0/part-0.parquet": 100,
        "classes/epoch=1/eval-0.parquet": 200,
        "checkpoints/epoch=0/model.safetensors": 400,
        "probes/epoch=0/L_a.parquet": 800,
        "neurons/epoch=0/notes.txt": 1,
        "figures/a.png": 2,
        "other.parquet": 4,
        "figures/epoch=0/x.parquet": 8,
    }
    for name, size in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x" * size)
    assert store_size(tmp_path) == 1570
    assert store_size(str(tmp_path / "none")) == 0


RECORD_WITHOUT_PANDAS = """
import sys
import torch
from torch import nn
from nn_staining import NetworkTrace

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
with NetworkTrace(model, sys.argv[1], num_classes=3, drop_batches=False, record_eval=True) as trace:
    for epoch in range(18):  # a history index block after 16
        trace.start_epoch(epoch)
        trace.set_targets(torch.tensor([0, 1, 2, 1]))
        model(torch.randn(4, 4)).sum().backward()
        model.eval()
        with torch.no_grad():
            model(torch.randn(3, 4))
        model.train()
        trace.end_epoch()
print(sorted(m for m in ("pandas", "pyarrow.dataset") if m in sys.modules))
"""


def test_recording_does_not_import_pandas(tmp_path: Path) -> None:
    """A process that only records never imports pandas (about 45 MiB resident): Arrow columns
    are built from their buffers, since ``pa.array`` imports pandas when it first runs."""
    import subprocess
    import sys

    store = tmp_path / "t"
    out = subprocess.run(
        [sys.executable, "-c", RECORD_WITHOUT_PANDAS, str(store)], capture_output=True, text=True, check=True
    )
    assert out.stdout.split("\n")[-2] == "[]", out.stdout + out.stderr
    t = load_trace(store)
    assert t.epochs == list(range(18)) and (store / "_history").is_dir()
    assert len(load_trace(store, phase="eval").epochs) == 18
    assert len(t.batches()) > 0 and t.weights(17, "L_0").shape == (5, 4)


def test_build_table_refuses_a_2d_column_or_a_mask_of_another_length() -> None:
    """Columns become Arrow through their buffers: a wrong shape is an error, not flattened rows."""
    base = {"layer": np.zeros(3, np.int32), "neuron": np.arange(3, dtype=np.int32)}
    with pytest.raises(ValueError, match=r"1-D with a mask of its length, not \(3, 2\)"):
        build_table("neurons", base | {"act_mean": np.zeros((3, 2))}, ["L_a"])
    with pytest.raises(ValueError, match=r"mask \(4,\)"):
        build_table(
            "neurons", base | {"act_mean": (np.zeros(3), np.array([False, True, False, False]))}, ["L_a"]
        )
