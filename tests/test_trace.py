"""Tests for nn_staining.trace: load_trace, the E_/L_/n_ views, query, to_dataframe, to_dict, errors,
and that a query reads only the row groups it needs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import (
    EPOCHS,
    HIDDEN,
    MLP_LAYERS,
    N_CLASSES,
    N_SAMPLES,
    WIDE,
    Run,
    assert_close,
    assert_same_cell,
    class_means,
    labels_of,
    rows_of,
)

from nn_staining import load_trace
from nn_staining.catalog import TraceChangedError, TraceCorruptError
from nn_staining.signature import GRAMMAR
from nn_staining.store import ROW_GROUP_ROWS, SCHEMAS

METRICS = [
    "act_count",
    "act_mean",
    "act_std",
    "act_min",
    "act_max",
    "act_active_frac",
    "act_nan_count",
    "bias",
    "weight_norm",
    "weight_mean",
    "weight_delta_norm",
    "grad_norm",
]
NEURONS = {
    "L_input": HIDDEN,
    "L_relu_1": HIDDEN,
    "L_hidden_1": HIDDEN,
    "L_relu_2": HIDDEN,
    "L_output": N_CLASSES,
}


def raw_neurons(store: Path) -> pd.DataFrame:
    """The whole neurons table read by pyarrow alone, indexed (epoch, layer, neuron) and sorted."""
    table = ds.dataset(store / "neurons", format="parquet", partitioning="hive").to_table()
    frame = table.to_pandas()
    frame["layer"] = frame["layer"].astype(str)
    frame["epoch"] = frame["epoch"].astype(np.int64)
    return frame.set_index(["epoch", "layer", "neuron"]).sort_index()


# -- 7. the three ways to address a cell -------------------------------------------------------------
def test_nested_slash_and_legacy_access_give_the_same_dict(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    nested = t["E_3"]["L_hidden_1"]["n_20"]
    assert_same_cell(nested, t["E_3/L_hidden_1/n_20"])
    assert_same_cell(nested, t["E_3-L_hidden_1-n_20"])
    assert_same_cell(nested, t["E_3"]["L_hidden_1"][20])
    assert_same_cell(nested, t["E_3"]["hidden_1"]["n_20"])


def test_cell_dict_holds_every_metric_with_the_recorded_values(mlp_run: Run) -> None:
    cell = load_trace(mlp_run.store)["E_3/L_hidden_1/n_20"]
    assert set(METRICS) | {"weights"} <= set(cell)
    batches = mlp_run.capture.outputs[3]["L_hidden_1"]
    rows = rows_of(batches)
    assert cell["act_count"] == N_SAMPLES
    assert cell["act_mean"] == pytest.approx(rows[:, 20].mean(), rel=1e-5)
    assert cell["act_std"] == pytest.approx(rows[:, 20].std(), rel=1e-5)
    params = mlp_run.params[3]["L_hidden_1"]
    np.testing.assert_array_equal(cell["weights"], params["weight"][20].astype(np.float32))
    assert cell["bias"] == pytest.approx(params["bias"][20], rel=1e-6)
    _, means = class_means(rows, labels_of(batches, mlp_run.labels[3]), N_CLASSES)
    assert cell["class_mean"] == pytest.approx(dict(enumerate(means[20])), rel=1e-5)


def test_trace_is_a_mapping_of_epochs_layers_and_neurons(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    assert t.epochs == list(range(EPOCHS))
    assert list(t) == [f"E_{e}" for e in range(EPOCHS)]
    assert len(t) == EPOCHS
    assert "E_2" in t and "E_9" not in t
    assert t.layers == MLP_LAYERS
    epoch = t["E_1"]
    assert list(epoch) == MLP_LAYERS and len(epoch) == len(MLP_LAYERS)
    layer = epoch["L_output"]
    assert list(layer) == ["n_0", "n_1", "n_2"] and len(layer) == N_CLASSES
    assert t.num_classes == N_CLASSES
    frame = layer.to_dataframe()
    pd.testing.assert_frame_equal(frame, t.query("E_1/L_output"))


# -- query ------------------------------------------------------------------------------------------------
def test_query_history_of_one_neuron(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    frame = t.query("E_*/L_hidden_1/n_20")
    assert frame.index.names == ["epoch", "layer", "neuron"]
    assert frame.index.tolist() == [(e, "L_hidden_1", 20) for e in range(EPOCHS)]
    assert list(frame.columns) == METRICS
    expected = [rows_of(mlp_run.capture.outputs[e]["L_hidden_1"])[:, 20].mean() for e in range(EPOCHS)]
    assert_close(frame["act_mean"], expected)
    pd.testing.assert_frame_equal(frame, t["E_*/L_hidden_1/n_20"])


def select(full: pd.DataFrame, epochs, layers, neurons) -> pd.DataFrame:
    """Rows of ``full`` whose epoch, layer and neuron pass the three predicates."""
    idx = full.index
    keep = [
        epochs(e) and layers(layer) and neurons(n)
        for e, layer, n in zip(idx.get_level_values(0), idx.get_level_values(1), idx.get_level_values(2))
    ]
    return full[np.array(keep)]


def every(_: object) -> bool:
    return True


@pytest.mark.parametrize(
    ("signature", "epochs", "layers", "neurons"),
    [
        ("E_1:3/L_hidden_1/n_2:5", lambda e: 1 <= e < 3, lambda x: x == "L_hidden_1", lambda n: 2 <= n < 5),
        ("E_0,3/L_output/n_0,2", lambda e: e in (0, 3), lambda x: x == "L_output", lambda n: n in (0, 2)),
        ("E_2/L_relu_*", lambda e: e == 2, lambda x: x.startswith("L_relu_"), every),
        ("E_*/L_*put/n_1", every, lambda x: x in ("L_input", "L_output"), lambda n: n == 1),
        ("E_1", lambda e: e == 1, every, every),
        ("E_*/L_*", every, every, every),
        ("E_1:3/L_hidden_1", lambda e: e in (1, 2), lambda x: x == "L_hidden_1", every),
        ("E_0:100/L_hidden_?/n_*", every, lambda x: x == "L_hidden_1", every),
        ("E_3/L_input/n_0,5,23", lambda e: e == 3, lambda x: x == "L_input", lambda n: n in (0, 5, 23)),
        ("E_3-L_input-n_0:2", lambda e: e == 3, lambda x: x == "L_input", lambda n: n < 2),
        ("E_*/L_*/n_0:3", every, every, lambda n: n < 3),
    ],
)
def test_query_ranges_lists_and_globs(mlp_run: Run, signature: str, epochs, layers, neurons) -> None:
    t = load_trace(mlp_run.store)
    expected = select(raw_neurons(mlp_run.store)[METRICS], epochs, layers, neurons)
    got = t.query(signature)
    assert not got.empty
    pd.testing.assert_frame_equal(
        got.sort_index(), expected.sort_index(), check_index_type=False, check_dtype=False, check_names=True
    )


def test_layer_glob_with_a_neuron_only_some_layers_have(mlp_run: Run) -> None:
    """``L_*/n_20`` names recorded neurons (of the wide layers): those rows, no KeyError."""
    t = load_trace(mlp_run.store)
    frame = t.query("E_0/L_*/n_20")
    assert frame.index.get_level_values("layer").tolist() == ["L_input", "L_relu_1", "L_hidden_1", "L_relu_2"]
    assert set(frame.index.get_level_values("neuron")) == {20}


def test_layer_glob_with_a_neuron_no_layer_has(mlp_run: Run) -> None:
    with pytest.raises(KeyError, match=r"\b99\b") as info:
        load_trace(mlp_run.store).query("E_0/L_*/n_99")
    assert "L_hidden_1" in str(info.value) and "n_23" in str(info.value)


def test_query_columns(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    frame = t.query("E_0/L_hidden_1", columns=["act_mean", "weights"])
    assert list(frame.columns) == ["act_mean", "weights"]
    np.testing.assert_array_equal(np.stack(frame["weights"].to_numpy()), t.weights(0, "L_hidden_1"))
    assert t.weights(0, "L_hidden_1").shape == (HIDDEN, HIDDEN)
    assert "weights" not in t.query("E_0/L_hidden_1").columns, "weights must be asked for"
    with pytest.raises(KeyError, match=r"'act_maen'.*act_mean"):
        t.query("E_0/L_hidden_1", columns=["act_maen"])


def test_to_dataframe_is_the_whole_neurons_table(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    frame = t.to_dataframe()
    assert frame.index.names == ["epoch", "layer", "neuron"]
    assert len(frame) == EPOCHS * sum(NEURONS.values())
    assert frame.index.is_unique
    raw = raw_neurons(mlp_run.store)
    pd.testing.assert_frame_equal(frame.sort_index(), raw[METRICS], check_index_type=False, check_dtype=False)
    sizes = frame.xs(0, level="epoch").groupby(level="layer", sort=False).size()
    assert sizes.to_dict() == NEURONS


def test_to_dict_is_nested_by_epoch_layer_neuron(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    nested = t.to_dict("E_3/L_hidden_1")
    assert list(nested) == ["E_3"]
    assert list(nested["E_3"]) == ["L_hidden_1"]
    assert list(nested["E_3"]["L_hidden_1"]) == [f"n_{i}" for i in range(HIDDEN)]
    cell = t["E_3/L_hidden_1/n_20"]
    for metric, value in nested["E_3"]["L_hidden_1"]["n_20"].items():
        assert value == pytest.approx(cell[metric], nan_ok=True), metric
    everything = t.to_dict()
    assert list(everything) == [f"E_{e}" for e in range(EPOCHS)]
    assert {k: len(v) for k, v in everything["E_0"].items()} == NEURONS
    assert np.isnan(everything["E_0"]["L_input"]["n_0"]["weight_delta_norm"])


def test_classes_inputs_and_batches_views_take_signatures(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    classes = t.classes("E_1/L_hidden_1/n_20")
    assert classes.index.tolist() == [(1, "L_hidden_1", 20, c) for c in range(N_CLASSES)]
    assert classes["act_mean"].tolist() == pytest.approx(
        list(t["E_1/L_hidden_1/n_20"]["class_mean"].values())
    )
    inputs = t.inputs("E_1/L_hidden_1")
    assert len(inputs) == HIDDEN * N_CLASSES
    batches = t.batches("E_2/L_output/n_1")
    assert batches.index.tolist() == [(2, b, "L_output", 1) for b in range(4)]


# -- a query reads only what it needs -------------------------------------------------------------
@pytest.fixture
def row_group_counter(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the row groups requested from any Parquet file (a whole-file read counts all of them)."""
    requested: list[int] = []
    read_row_groups, read_row_group, read = (
        pq.ParquetFile.read_row_groups,
        pq.ParquetFile.read_row_group,
        pq.ParquetFile.read,
    )

    def counting_groups(self, row_groups, *args, **kwargs):
        requested.append(len(list(row_groups)))
        return read_row_groups(self, row_groups, *args, **kwargs)

    def counting_group(self, i, *args, **kwargs):
        requested.append(1)
        return read_row_group(self, i, *args, **kwargs)

    def counting_read(self, *args, **kwargs):
        requested.append(self.metadata.num_row_groups)
        return read(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", counting_groups)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", counting_group)
    monkeypatch.setattr(pq.ParquetFile, "read", counting_read)
    return requested


def test_one_neuron_query_reads_fewer_row_groups(wide_store: Path, row_group_counter: list[int]) -> None:
    part = pq.ParquetFile(wide_store / "neurons" / "epoch=0" / "part-0.parquet")
    assert part.metadata.num_row_groups >= 3
    neuron = ROW_GROUP_ROWS + 7
    t = load_trace(wide_store)
    one = t.query(f"E_*/L_0/n_{neuron}")
    one_groups = sum(row_group_counter)
    row_group_counter.clear()
    everything = t.to_dataframe()
    all_groups = sum(row_group_counter)
    assert 0 < one_groups < all_groups
    assert one_groups <= 2, "one neuron in two epoch files: one row group each"
    pd.testing.assert_frame_equal(one, everything.xs(neuron, level="neuron", drop_level=False))


R = ROW_GROUP_ROWS


@pytest.mark.parametrize(
    ("signature", "neurons"),
    [
        (f"E_1/L_0/n_{R - 1}", [R - 1]),
        (f"E_1/L_0/n_{R}", [R]),
        (f"E_1/L_0/n_{WIDE - 1}", [WIDE - 1]),
        (f"E_*/L_0/n_{R - 3}:{R + 4}", list(range(R - 3, R + 4))),
        (f"E_0/L_0/n_1,{R + 1},{2 * R - 1},{2 * R}", [1, R + 1, 2 * R - 1, 2 * R]),
        (f"E_0/L_0/n_{2 * R + 5}:{WIDE + 100}", list(range(2 * R + 5, WIDE))),
    ],
)
def test_row_group_boundaries(wide_store: Path, signature: str, neurons: list[int]) -> None:
    t = load_trace(wide_store)
    got = t.query(signature)
    raw = raw_neurons(wide_store)[METRICS]
    pd.testing.assert_frame_equal(got, raw.loc[got.index], check_index_type=False, check_dtype=False)
    assert sorted(set(got.index.get_level_values("neuron"))) == neurons


def test_load_trace_does_not_import_torch(mlp_run: Run) -> None:
    code = (
        "import sys, nn_staining\n"
        f"t = nn_staining.load_trace({str(mlp_run.store)!r})\n"
        "t.query('E_*/L_hidden_1/n_20'); t['E_1/L_hidden_1/n_2']\n"
        "assert 'torch' not in sys.modules, 'load_trace imported torch'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


# -- 10. errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "signature", ["E_x/L_a", "E_1/hidden_1", "E_1/L_hidden_1/n_-1", "E_3:1", "", "L_hidden_1/n_2"]
)
def test_malformed_signature_quotes_it_and_shows_the_grammar(mlp_run: Run, signature: str) -> None:
    t = load_trace(mlp_run.store)
    for access in (t.__getitem__, t.query):
        with pytest.raises(ValueError) as info:
            access(signature)
        message = str(info.value)
        assert repr(signature) in message
        assert GRAMMAR in message


@pytest.mark.parametrize(
    "access",
    [
        lambda t: t["E_1/L_hiden_1/n_2"],
        lambda t: t["E_1"]["L_hiden_1"],
        lambda t: t.query("E_*/L_hiden_1"),
        lambda t: t.query("E_*/L_conv*"),
    ],
)
def test_unknown_layer_lists_the_layers(mlp_run: Run, access) -> None:
    with pytest.raises(KeyError, match="hiden_1|conv") as info:
        access(load_trace(mlp_run.store))
    for layer in MLP_LAYERS:
        assert layer in str(info.value)


@pytest.mark.parametrize(
    "access",
    [
        lambda t: t["E_9"],
        lambda t: t["E_9/L_hidden_1/n_2"],
        lambda t: t.query("E_7:9/L_hidden_1"),
        lambda t: t.query("E_5,6"),
    ],
)
def test_unknown_epoch_lists_the_recorded_epochs(mlp_run: Run, access) -> None:
    with pytest.raises(KeyError, match=r"\[0, 1, 2, 3\]"):
        access(load_trace(mlp_run.store))


@pytest.mark.parametrize(
    "access",
    [
        lambda t: t["E_1/L_output/n_3"],
        lambda t: t["E_1"]["L_output"]["n_7"],
        lambda t: t.query("E_1/L_output/n_5:9"),
    ],
)
def test_unknown_neuron_lists_the_range(mlp_run: Run, access) -> None:
    with pytest.raises(KeyError, match=r"n_0 … n_2"):
        access(load_trace(mlp_run.store))


def test_empty_folder_is_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"not an nn_staining trace"):
        load_trace(tmp_path)


def test_nonexistent_path_is_not_a_trace(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_trace(tmp_path / "nowhere")


@pytest.mark.parametrize("content", ["{not json", '{"format": "something else"}'])
def test_foreign_meta_json_is_not_a_trace(tmp_path: Path, content: str) -> None:
    (tmp_path / "meta.json").write_text(content)
    with pytest.raises(ValueError, match=r"not"):
        load_trace(tmp_path)


def test_unknown_phase(mlp_run: Run) -> None:
    with pytest.raises(ValueError, match="phase"):
        load_trace(mlp_run.store, phase="test")


# -- engines: Trace.sql and Trace.dataset answer what Trace.query does ---------------------------------
@pytest.mark.parametrize("table", ["neurons", "classes", "inputs", "batches"])
def test_dataset_holds_exactly_the_rows_query_gives(mlp_run: Run, table: str) -> None:
    t = load_trace(mlp_run.store)
    frame = t.query("E_*/L_*", table=table)
    index = list(frame.index.names)
    got = t.dataset(table).to_table().to_pandas()
    got["layer"] = got["layer"].astype(str)
    assert got["epoch"].dtype == np.int32
    got = got.set_index(index).sort_index()[list(frame.columns)]
    pd.testing.assert_frame_equal(got, frame.sort_index(), check_dtype=False)


def test_sql_aggregate_equals_pandas_on_query(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    got = t.sql(
        "SELECT epoch, layer, avg(act_mean) AS mean, max(act_max) AS top, count(*) AS n "
        "FROM neurons GROUP BY ALL ORDER BY epoch, layer"
    ).set_index(["epoch", "layer"])
    frame = t.query("E_*/L_*").reset_index()
    expected = frame.groupby(["epoch", "layer"]).agg(
        mean=("act_mean", "mean"), top=("act_max", "max"), n=("act_mean", "size")
    )
    assert list(got.index) == list(expected.index)
    np.testing.assert_allclose(got["mean"], expected["mean"], rtol=1e-6)
    np.testing.assert_array_equal(got["top"], expected["top"])
    np.testing.assert_array_equal(got["n"], expected["n"])


def test_sql_joins_tables_and_sees_only_this_phase(tmp_path: Path) -> None:
    import torch
    from torch import nn

    from nn_staining import NetworkTrace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    with NetworkTrace(model, tmp_path / "t", num_classes=2, record_eval=True) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            trace.set_targets(y)
            model(x)
            model.eval()
            model(x[:5])
            model.train()
            trace.end_epoch()
    train, evaluation = load_trace(tmp_path / "t"), load_trace(tmp_path / "t", phase="eval")
    assert train.sql("SELECT DISTINCT phase FROM neurons")["phase"].tolist() == ["train"]
    counts = evaluation.sql("SELECT DISTINCT act_count FROM neurons")["act_count"].tolist()
    assert counts == [5]
    joined = train.sql(
        "SELECT n.epoch, n.layer, n.neuron, c.class, c.act_mean FROM neurons n JOIN classes c "
        "USING (epoch, layer, neuron) WHERE n.layer = 'L_2' ORDER BY n.epoch, n.neuron, c.class"
    )
    expected = train.classes("E_*/L_2")["act_mean"].to_numpy()
    np.testing.assert_array_equal(joined["act_mean"].to_numpy(), expected)


def test_sql_on_a_trace_with_no_epochs_sees_empty_tables(tmp_path: Path) -> None:
    from torch import nn

    from nn_staining import NetworkTrace

    NetworkTrace(nn.Sequential(nn.Linear(2, 2)), tmp_path / "t").close()
    t = load_trace(tmp_path / "t")
    assert t.sql("SELECT count(*) AS n FROM neurons")["n"].tolist() == [0]
    assert t.dataset("classes").count_rows() == 0


def test_epoch_and_layer_views_to_dataframe_take_columns(mlp_run: Run) -> None:
    t = load_trace(mlp_run.store)
    epoch_frame = t["E_2"].to_dataframe(columns=["act_max", "bias"])
    assert list(epoch_frame.columns) == ["act_max", "bias"]
    pd.testing.assert_frame_equal(epoch_frame, t.query("E_2/L_*", columns=["act_max", "bias"]))
    layer_frame = t["E_2"]["L_output"].to_dataframe(columns=["act_std"])
    assert list(layer_frame.columns) == ["act_std"]
    pd.testing.assert_frame_equal(layer_frame, t.query("E_2/L_output", columns=["act_std"]))


# -- a hand-built store: meta.json, epochs.jsonl and parts written by the test, values known by formula ------
# Three layers (a Linear of 3 neurons with 2 inputs, a ReLU of 3, a Linear of 2 with 3 inputs); layout 0
# holds them all, layout 1 only L_c (L_a and L_b did not fire). Train epochs 0 (layout 0), 1 (layout 1) and
# 5 (layout 0, neurons only: no labels); eval epoch 0; per-batch rows (batches 0 and 1) at train epoch 0
# only. Every value says where it sits: see ``value``.
HAND_LAYERS = [
    {"key": "L_a", "module": "a", "type": "Linear", "neurons": 3, "kind": "features", "in_features": 2},
    {"key": "L_b", "module": "b", "type": "ReLU", "neurons": 3, "kind": "features", "in_features": None},
    {"key": "L_c", "module": "c", "type": "Linear", "neurons": 2, "kind": "features", "in_features": 3},
]
HAND_KEYS = [layer["key"] for layer in HAND_LAYERS]
HAND_LAYOUTS = [{"neurons": HAND_KEYS, "inputs": ["L_a", "L_c"]}, {"neurons": ["L_c"], "inputs": ["L_c"]}]
HAND_COMMITS = [(0, "train", 0, True), (1, "train", 1, True), (5, "train", 0, False), (0, "eval", 0, True)]
HAND_METRICS = [
    {"key": "0", "values": {"loss": 1.0, "acc": 0.5}},
    {"key": "5", "values": {"loss": 0.25}},
    {"key": "run", "values": {"confusion": [[1, 0], [0, 1]]}},
]


def value(epoch: int, phase: str, layer: str, neuron: int) -> float:
    """act_mean of a hand-built row: 1000 epoch + 100 layer index + neuron (+0.5 in eval)."""
    return 1000 * epoch + 100 * HAND_KEYS.index(layer) + neuron + (0.5 if phase == "eval" else 0.0)


def hand_row(epoch: int, phase: str, layer: str, neuron: int) -> dict:
    """Every default column of a hand-built neurons row, and its weights (Linear layers only)."""
    v = value(epoch, phase, layer, neuron)
    info = HAND_LAYERS[HAND_KEYS.index(layer)]
    linear = info["in_features"] is not None
    return {
        "act_count": 10 + epoch,
        "act_mean": v,
        "act_std": 0.5,
        "act_min": -v,
        "act_max": v + 1,
        "act_active_frac": 0.25,
        "act_nan_count": 0,
        "bias": v / 4 if linear else np.nan,
        "weight_norm": 2.0 if linear else np.nan,
        "weight_mean": np.nan,
        "weight_delta_norm": np.nan,
        "grad_norm": np.nan,
        "weights": [v + f / 4 for f in range(info["in_features"])] if linear else None,
    }


def write_hand_store(root: Path) -> None:
    """The store described above, written with the store's own writer from plain numpy columns."""
    from nn_staining.rows import assign_offsets
    from nn_staining.store import TraceWriter, build_table

    writer = TraceWriter(root)
    writer.write_meta(
        {
            "format": "nn_staining.trace",
            "format_version": 2,
            "run_id": "hand-run",
            "layers": assign_offsets(HAND_LAYERS),
            "num_neurons": 8,
            "num_classes": 2,
            "class_names": ["cat", "dog"],
            "layouts": HAND_LAYOUTS,
            "config": {"feature_names": ["x0", "x1"]},
        }
    )
    code = {k: i for i, k in enumerate(HAND_KEYS)}
    lines = []
    for epoch, phase, layout, labelled in HAND_COMMITS:
        present = HAND_LAYOUTS[layout]["neurons"]
        cells = [(k, n) for k in present for n in range(HAND_LAYERS[code[k]]["neurons"])]
        rows = [hand_row(epoch, phase, k, n) for k, n in cells]
        weights = [r["weights"] for r in rows]
        columns = {
            "layer": [code[k] for k, _ in cells],
            "phase": phase,
            "neuron": [n for _, n in cells],
            **{c: np.array([r[c] for r in rows]) for c in METRICS},
            "weights": (
                np.cumsum([0] + [len(w or []) for w in weights]),
                np.array([x for w in weights for x in (w or [])]),
                np.array([w is None for w in weights]),
            ),
        }
        tables = {"neurons": build_table("neurons", columns, HAND_KEYS)}
        if labelled:
            tables["classes"] = build_table(
                "classes",
                {
                    "layer": [code[k] for k, _ in cells for _ in range(2)],
                    "phase": phase,
                    "neuron": [n for _, n in cells for _ in range(2)],
                    "class": [c for _ in cells for c in range(2)],
                    "act_count": [c + 1 for _ in cells for c in range(2)],
                    "act_mean": [value(epoch, phase, k, n) + c / 8 for k, n in cells for c in range(2)],
                },
                HAND_KEYS,
            )
            inputs = [
                (k, f, c)
                for k in HAND_LAYOUTS[layout]["inputs"]
                for f in range(HAND_LAYERS[code[k]]["in_features"])
                for c in range(2)
            ]
            if phase == "train":
                tables["inputs"] = build_table(
                    "inputs",
                    {
                        "layer": [code[k] for k, _, _ in inputs],
                        "phase": phase,
                        "feature": [f for _, f, _ in inputs],
                        "class": [c for _, _, c in inputs],
                        "count": [3] * len(inputs),
                        "mean": [value(epoch, phase, k, 10 * f) + c for k, f, c in inputs],
                    },
                    HAND_KEYS,
                )
        if (epoch, phase) == (0, "train"):
            batched = [(b, k, n) for b in (0, 1) for k, n in cells]
            tables["batches"] = build_table(
                "batches",
                {
                    "layer": [code[k] for _, k, _ in batched],
                    "phase": phase,
                    "batch": [b for b, _, _ in batched],
                    "neuron": [n for _, _, n in batched],
                    "act_count": [5 + b for b, _, _ in batched],
                    "act_mean": [value(0, phase, k, n) + b / 4 for b, k, n in batched],
                },
                HAND_KEYS,
            )
        counts = writer.write_epoch(epoch, phase, tables)
        lines.append({"epoch": epoch, "phase": phase, "layout": layout, "rows": counts})
    (root / "epochs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (root / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in HAND_METRICS))


@pytest.fixture(scope="module")
def hand(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hand") / "it's a trace"
    write_hand_store(root)
    return root


def expected_neurons(
    cells: list[tuple[int, str, int]], phase: str = "train", columns=METRICS
) -> pd.DataFrame:
    """The neurons frame of (epoch, layer, neuron) cells, from the formula."""
    index = pd.MultiIndex.from_tuples(cells, names=["epoch", "layer", "neuron"])
    rows = [{c: hand_row(e, phase, k, n)[c] for c in columns} for e, k, n in cells]
    return pd.DataFrame(rows, index=index, columns=list(columns))


def cells_of(epochs_layers: list[tuple[int, list[str]]], neurons=None) -> list[tuple[int, str, int]]:
    sizes = {layer["key"]: layer["neurons"] for layer in HAND_LAYERS}
    return [
        (e, k, n)
        for e, layers in epochs_layers
        for k in layers
        for n in range(sizes[k])
        if neurons is None or n in neurons
    ]


def assert_frame(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, check_index_type=False)


def test_hand_trace_describes_itself(hand: Path) -> None:
    t = load_trace(hand)
    assert t.epochs == [0, 1, 5] and list(t) == ["E_0", "E_1", "E_5"] and len(t) == 3
    assert load_trace(hand, phase="eval").epochs == [0]
    assert t.layers == HAND_KEYS
    assert t.layer_info("c") == dict(HAND_LAYERS[2], row_offset=6, input_offset=2)
    assert t.layer_info("L_b")["row_offset"] == 3
    assert (t.num_classes, t.class_names, t.feature_names, t.run_id) == (
        2,
        ["cat", "dog"],
        ["x0", "x1"],
        "hand-run",
    )
    assert repr(t) == f"Trace({str(hand)!r}, phase='train', epochs=[0, 1, 5], layers=['L_a', 'L_b', 'L_c'])"
    assert repr(t["E_1"]) == "EpochView(E_1, layers=['L_a', 'L_b', 'L_c'])"
    assert repr(t["E_1"]["c"]) == "LayerView(E_1/L_c, neurons=2)"
    files = [p for p in hand.rglob("*") if p.is_file()]
    assert t.size_bytes() == sum(p.stat().st_size for p in files)


def test_hand_trace_metrics(hand: Path) -> None:
    t = load_trace(hand)
    expected = pd.DataFrame({"loss": [1.0, 0.25], "acc": [0.5, np.nan]}, index=pd.Index([0, 5], name="epoch"))
    pd.testing.assert_frame_equal(t.metrics, expected)
    assert t.run_metrics == {"confusion": [[1, 0], [0, 1]]}
    t.run_metrics["confusion"] = None
    assert t.run_metrics == {"confusion": [[1, 0], [0, 1]]}, "a copy"


def test_a_trace_without_metrics_names_or_classes(tmp_path: Path) -> None:
    """A meta.json with no classes, names or config and no epoch or metrics log yet."""
    (tmp_path / "meta.json").write_text(
        json.dumps(
            {"format": "nn_staining.trace", "format_version": 2, "run_id": "r", "layers": [], "layouts": []}
        )
    )
    t = load_trace(tmp_path)
    assert t.metrics.empty and t.metrics.index.name == "epoch"
    assert t.run_metrics == {} and t.class_names == [] and t.feature_names is None and t.num_classes is None
    assert repr(t) == f"Trace({str(tmp_path)!r}, phase='train', epochs=[], layers=[])"


@pytest.mark.parametrize(
    ("signature", "cells"),
    [
        ("E_*/L_a", cells_of([(0, ["L_a"]), (5, ["L_a"])])),
        ("E_*/L_c/n_1", cells_of([(0, ["L_c"]), (1, ["L_c"]), (5, ["L_c"])], {1})),
        ("E_0:2/L_*/n_0,2", cells_of([(0, HAND_KEYS), (1, ["L_c"])], {0, 2})),
        ("E_5", cells_of([(5, HAND_KEYS)])),
        ("E_1/L_*", cells_of([(1, ["L_c"])])),
        ("E_0,5/L_b/n_1:9", cells_of([(0, ["L_b"]), (5, ["L_b"])], {1, 2})),
    ],
)
def test_hand_queries_return_exactly_the_written_rows(hand: Path, signature: str, cells) -> None:
    assert_frame(load_trace(hand).query(signature), expected_neurons(cells))


def test_hand_query_of_a_layer_absent_in_every_selected_epoch_is_empty(hand: Path) -> None:
    frame = load_trace(hand).query("E_1/L_a")
    assert (
        frame.empty and frame.index.names == ["epoch", "layer", "neuron"] and list(frame.columns) == METRICS
    )


def test_hand_eval_phase_reads_the_eval_parts(hand: Path) -> None:
    t = load_trace(hand, phase="eval")
    assert_frame(
        t.query("E_0/L_b", columns=["act_mean"]),
        expected_neurons(cells_of([(0, ["L_b"])]), "eval", ["act_mean"]),
    )
    classes = t.classes("E_0/L_c/n_1")
    assert classes["act_mean"].tolist() == [201.5, 201.625]
    with pytest.raises(KeyError) as info:
        t["E_1"]
    assert info.value.args[0] == (
        "epoch 1 not in trace (eval); recorded epochs: [0] (eval passes are kept only with record_eval=True / --record-eval)"
    )


def test_hand_classes_and_inputs(hand: Path) -> None:
    t = load_trace(hand)
    classes = t.classes("E_*/L_c/n_0")
    assert classes.index.tolist() == [(e, "L_c", 0, c) for e in (0, 1) for c in (0, 1)], (
        "epoch 5 has no labels"
    )
    assert classes.columns.tolist() == ["act_count", "act_mean"]
    assert classes["act_mean"].tolist() == [200.0, 200.125, 1200.0, 1200.125]
    assert classes["act_count"].tolist() == [1, 2, 1, 2]
    inputs = t.inputs()
    expected = [
        (e, k, f, c)
        for e, ks in ((0, ["L_a", "L_c"]), (1, ["L_c"]))
        for k in ks
        for f in range(HAND_LAYERS[HAND_KEYS.index(k)]["in_features"])
        for c in (0, 1)
    ]
    assert inputs.index.tolist() == expected
    assert inputs["mean"].tolist() == [value(e, "train", k, 10 * f) + c for e, k, f, c in expected]
    assert inputs["count"].tolist() == [3] * len(expected)
    assert t.inputs("E_*/L_b").empty, "an activation has no inputs"
    assert t.classes("E_0/L_a", columns="act_count")["act_count"].tolist() == [1, 2] * 3


def test_hand_cell_dict_and_views(hand: Path) -> None:
    t = load_trace(hand)
    cell = t["E_0/L_c/n_1"]
    row = hand_row(0, "train", "L_c", 1)
    weights = cell.pop("weights")
    np.testing.assert_array_equal(weights, np.float32(row.pop("weights")))
    assert cell.keys() == set(METRICS) | {"class_mean"}
    assert cell["class_mean"] == {0: 201.0, 1: 201.125}
    for metric in METRICS:
        assert cell[metric] == pytest.approx(row[metric], nan_ok=True), metric
    assert type(cell["act_count"]) is int and type(cell["act_mean"]) is float
    assert t["E_5/L_c/n_1"]["class_mean"] == {}, "no labelled part at epoch 5"
    assert isinstance(t["E_0"], Mapping) and type(t["E_0"]).__name__ == "EpochView"
    assert type(t["E_0/L_a"]).__name__ == "LayerView" and list(t["E_0/L_a"]) == ["n_0", "n_1", "n_2"]
    for signature in ("E_0:2/L_c", "E_0/L_*", "E_0/L_a/n_0:2", "E_*"):
        assert isinstance(t[signature], pd.DataFrame), signature
    assert_frame(t["E_0/L_a/n_0:2"], expected_neurons(cells_of([(0, ["L_a"])], {0, 1})))
    with pytest.raises(KeyError) as info:
        t["E_1"]["L_a"]["n_0"]
    assert info.value.args[0] == "layer 'L_a' has no rows at epoch 1; epochs with it: [0, 5]"
    for neuron in (2, -1, "n_2"):
        with pytest.raises(KeyError) as info:
            t["E_0"]["L_c"][neuron]
        assert info.value.args[0] == f"neuron {neuron!r} not in layer 'L_c'; neurons: n_0 … n_1"
    assert_same_cell(t["E_0"]["L_c"][0], t["E_0"]["L_c"]["n_0"])


def test_hand_contains(hand: Path) -> None:
    t = load_trace(hand)
    assert "E_0/L_a/n_2" in t and "E_5" in t and "E_0/L_c" in t
    assert "E_0/L_a/n_3" not in t and "E_2" not in t and "E_x" not in t and "E_0/L_q" not in t
    assert 5 not in t and None not in t


def test_hand_weights_and_to_dict(hand: Path) -> None:
    t = load_trace(hand)
    np.testing.assert_array_equal(t.weights(0, "c"), np.float32([[200, 200.25, 200.5], [201, 201.25, 201.5]]))
    for epoch, layer in ((0, "L_b"), (1, "L_a")):
        with pytest.raises(KeyError) as info:
            t.weights(epoch, layer)
        assert info.value.args[0] == f"layer {layer!r} has no recorded weights at epoch {epoch}"
    nested = t.to_dict("E_1", columns=["act_mean", "act_count"])
    assert nested == {
        "E_1": {
            "L_c": {
                "n_0": {"act_mean": 1200.0, "act_count": 11},
                "n_1": {"act_mean": 1201.0, "act_count": 11},
            }
        }
    }
    assert type(nested["E_1"]["L_c"]["n_0"]["act_count"]) is int


def test_hand_query_errors(hand: Path, hand_wide: Path) -> None:
    t = load_trace(hand)
    with pytest.raises(ValueError) as info:
        t.query("E_0", table="cells")
    assert str(info.value) == "table 'cells' is not one of neurons, classes, inputs, batches"
    with pytest.raises(KeyError) as info:
        load_trace(hand_wide).batches()
    assert info.value.args[0] == (
        f"{str(hand_wide)!r} has no batches table; record with drop_batches=False (main.py --keep-batches)"
    )
    with pytest.raises(KeyError) as info:
        t.query("E_0", columns=["mean"])
    assert info.value.args[0] == (
        "column 'mean' not in the neurons table; columns: phase, act_count, act_mean, act_std, act_min, "
        "act_max, act_active_frac, act_nan_count, bias, weight_norm, weight_mean, weight_delta_norm, grad_norm, weights"
    )
    with pytest.raises(KeyError) as info:
        t.inputs("E_0").pipe(lambda _: t.query("E_0", columns="act_mean", table="inputs"))
    assert info.value.args[0] == "column 'act_mean' not in the inputs table; columns: phase, count, mean"
    with pytest.raises(KeyError) as info:
        t.query("E_0/L_z*")
    assert info.value.args[0] == "layer pattern 'L_z*' matches no layer; layers: L_a, L_b, L_c"
    with pytest.raises(KeyError) as info:
        t.layer_info("q")
    assert info.value.args[0] == "layer 'q' not in trace; layers: L_a, L_b, L_c"
    assert t.query("E_0/L_c", columns="act_max").columns.tolist() == ["act_max"]


def test_hand_part_files_dataset_and_sql(hand: Path) -> None:
    t = load_trace(hand)
    assert t.part_files() == [str(hand / "neurons" / f"epoch={e}" / "part-0.parquet") for e in (0, 1, 5)]
    assert t.part_files("classes") == [
        str(hand / "classes" / f"epoch={e}" / "part-0.parquet") for e in (0, 1)
    ]
    assert t.part_files("batches") == [str(hand / "batches" / "epoch=0" / "part-0.parquet")]
    evaluation = load_trace(hand, phase="eval")
    assert evaluation.part_files("batches") == []
    assert evaluation.part_files("classes") == [str(hand / "classes" / "epoch=0" / "eval-0.parquet")]
    with pytest.raises(ValueError) as info:
        t.part_files("cells")
    assert str(info.value) == "table 'cells' is not one of neurons, classes, inputs, batches"

    table = t.dataset("classes").to_table()
    assert table.schema.field("epoch").type == pa.int32()
    assert table.schema.names == [f.name for f in SCHEMAS["classes"]] + ["epoch"]
    got = sorted(
        zip(*(table.column(c).to_pylist() for c in ("epoch", "layer", "neuron", "class", "act_mean")))
    )
    cells = cells_of([(0, HAND_KEYS), (1, ["L_c"])])
    assert got == sorted((e, k, n, c, value(e, "train", k, n) + c / 8) for e, k, n in cells for c in (0, 1))
    empty = evaluation.dataset("batches")
    assert empty.count_rows() == 0 and empty.schema.names == [f.name for f in SCHEMAS["batches"]] + ["epoch"]

    frame = t.sql("SELECT epoch, layer, neuron, act_mean, phase FROM neurons ORDER BY epoch, layer, neuron")
    cells = cells_of([(0, HAND_KEYS), (1, ["L_c"]), (5, HAND_KEYS)])
    assert list(frame.itertuples(index=False, name=None)) == [
        (e, k, n, value(e, "train", k, n), "train") for e, k, n in cells
    ]
    assert frame["epoch"].dtype == np.int32
    eval_frame = evaluation.sql("SELECT epoch, sum(act_mean) AS s, count(*) AS n FROM classes GROUP BY epoch")
    assert eval_frame.to_dict("records") == [
        {
            "epoch": 0,
            "s": sum(value(0, "eval", k, n) * 2 + 0.125 for _, k, n in cells_of([(0, HAND_KEYS)])),
            "n": 16,
        }
    ]
    batches = evaluation.sql("SELECT * FROM batches")
    assert batches.empty and batches.columns.tolist() == [f.name for f in SCHEMAS["batches"]] + ["epoch"]


def test_hand_missing_part_is_named(tmp_path: Path) -> None:
    write_hand_store(tmp_path / "t")
    gone = tmp_path / "t" / "classes" / "epoch=1" / "part-0.parquet"
    gone.unlink()
    t = load_trace(tmp_path / "t")
    with pytest.raises(TraceCorruptError) as info:
        t.part_files("classes")
    assert str(info.value) == f"listed epochs' parts are missing: {gone}"
    assert t.part_files() == [
        str(tmp_path / "t" / "neurons" / f"epoch={e}" / "part-0.parquet") for e in (0, 1, 5)
    ]


def test_hand_committed_rows_must_match_the_layout(tmp_path: Path) -> None:
    write_hand_store(tmp_path / "t")
    log = tmp_path / "t" / "epochs.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    lines[1]["rows"]["classes"] = 5  # layout 1: L_c's 2 neurons x 2 classes = 4
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    t = load_trace(tmp_path / "t")
    assert len(t.query("E_1/L_c")) == 2
    with pytest.raises(TraceCorruptError) as info:
        t.classes("E_*/L_c")
    assert str(info.value) == (
        f"epoch 1: meta.json's layers make 4 classes rows but the epoch committed 5 ({str(log)!r}); the metadata is damaged"
    )


def test_hand_trace_follows_a_rewritten_meta_of_the_same_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nn_staining import trace as trace_module

    root = tmp_path / "t"
    write_hand_store(root)
    t = load_trace(root)
    meta = (root / "meta.json").read_text()
    (root / "meta.json").unlink()
    (root / "meta.json").write_text(meta + " ")  # a new file (inode, size) of the same run
    reads = []
    real = trace_module.read_meta
    monkeypatch.setattr(trace_module, "read_meta", lambda p: reads.append(p) or real(p))
    assert len(t.query("E_0/L_c")) == 2
    assert len(t.query("E_1/L_c")) == 2
    assert len(reads) == 1, "the new file is checked once, then remembered"
    assert t.part_files("classes") and reads == [root]


@pytest.mark.parametrize("change", ["other run", "removed", "garbled"])
def test_hand_trace_refuses_a_re_recorded_store(tmp_path: Path, change: str) -> None:
    root = tmp_path / "t"
    write_hand_store(root)
    t = load_trace(root)
    meta = root / "meta.json"
    if change == "other run":
        meta.write_text(meta.read_text().replace("hand-run", "new-run!"))
    elif change == "removed":
        meta.unlink()
    else:
        meta.write_text("{")
    message = f"{str(root)!r} was re-recorded (or removed) after this Trace was loaded; call load_trace again for the new run"
    for ask in (lambda: t.query("E_0/L_c"), lambda: t.part_files(), lambda: t.dataset("classes")):
        with pytest.raises(TraceChangedError) as info:
            ask()
        assert str(info.value) == message


def test_short_epoch_lists() -> None:
    from nn_staining.trace import _short

    assert _short(list(range(12))) == str(list(range(12)))
    assert _short(list(range(13))) == "[0, 1, 2, 3, 4, …, 10, 11, 12] (13)"
    assert _short([]) == "[]"


@pytest.fixture(scope="module")
def hand_wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A hand-built store of one layer ``L_0`` of WIDE neurons (two and a half row groups), epochs 0 and 1;
    act_count = neuron + epoch."""
    from nn_staining.store import TraceWriter, build_table

    root = tmp_path_factory.mktemp("hand_wide") / "t"
    writer = TraceWriter(root)
    layer = {"key": "L_0", "neurons": WIDE, "kind": "features", "in_features": None, "row_offset": 0}
    meta = {"format": "nn_staining.trace", "format_version": 2, "run_id": "w", "layers": [layer]}
    writer.write_meta(meta | {"layouts": [{"neurons": ["L_0"], "inputs": []}]})
    lines = []
    for epoch in (0, 1):
        neuron = np.arange(WIDE)
        columns = {"layer": np.zeros(WIDE, np.int32), "neuron": neuron, "act_count": neuron + epoch}
        rows = writer.write_epoch(epoch, "train", {"neurons": build_table("neurons", columns, ["L_0"])})
        lines.append(json.dumps({"epoch": epoch, "phase": "train", "layout": 0, "rows": rows}) + "\n")
    (root / "epochs.jsonl").write_text("".join(lines))
    return root


def test_a_one_neuron_query_reads_one_row_group_per_epoch(
    hand_wide: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Exactly the row groups holding the asked neurons (8192 rows each) are read, in one call per part."""
    calls: list[list[int]] = []
    real = pq.ParquetFile.read_row_groups

    def spy(self, row_groups, *args, **kwargs):
        calls.append(list(row_groups))
        return real(self, row_groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    t = load_trace(hand_wide)
    for signature, groups, cells in [
        (f"E_*/L_0/n_{R + 7}", [[1], [1]], [(0, R + 7), (1, R + 7)]),
        (f"E_0/L_0/n_{R - 1}:{R + 1}", [[0, 1]], [(0, R - 1), (0, R)]),
        (f"E_1/L_0/n_0,{2 * R}", [[0, 2]], [(1, 0), (1, 2 * R)]),
        (f"E_1/L_0/n_{WIDE - 2}:{WIDE + 100}", [[2]], [(1, WIDE - 2), (1, WIDE - 1)]),
        ("E_0/L_0/n_0", [[0]], [(0, 0)]),
    ]:
        calls.clear()
        frame = t.query(signature, columns=["act_count"])
        assert calls == groups, signature
        assert frame.index.tolist() == [(e, "L_0", n) for e, n in cells]
        assert frame["act_count"].tolist() == [n + e for e, n in cells]


def test_probe_views_read_the_probe_sets_activations(tmp_path: Path) -> None:
    """``Trace.probe``/``probe_gram``/``probe_labels`` against the model run on the probe samples by hand."""
    import torch
    from torch import nn

    from nn_staining import NetworkTrace

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
    x, y = torch.randn(10, 3), torch.tensor([0, 1] * 5)
    with NetworkTrace(model, tmp_path / "t", num_classes=2, probe=(x[:6], y[:6])) as trace:
        for epoch in range(2):
            with torch.no_grad():
                model[0].bias += 1.0  # a different network each epoch
            trace.start_epoch(epoch)
            trace.set_targets(y)
            model(x)
            trace.end_epoch()
    t = load_trace(tmp_path / "t")
    with torch.no_grad():
        bias = model[0].bias.clone()
        model[0].bias -= 1.0
        first = model[0](x[:6]).double().numpy()
        model[0].bias.copy_(bias)
        last = model(x[:6]).double().numpy()
    np.testing.assert_allclose(t.probe(0, "0"), first, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t.probe(1, "L_1"), last, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t.probe_gram(1, "1"), last @ last.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(t.probe_gram(0, "L_0"), first @ first.T, rtol=1e-5, atol=1e-5)
    assert t.probe_labels.dtype == np.int64 and t.probe_labels.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(KeyError, match="layer 'L_9' not in trace"):
        t.probe(0, "L_9")
    with pytest.raises(KeyError, match="layer '9' not in trace"):
        t.probe_gram(0, "9")


def test_hand_defaults_whole_tables_and_views(hand: Path) -> None:
    """The default signatures (every epoch and layer), ``to_dataframe`` and the views' frames."""
    t = load_trace(hand)
    everything = cells_of([(0, HAND_KEYS), (1, ["L_c"]), (5, HAND_KEYS)])
    assert_frame(t.to_dataframe(), expected_neurons(everything))
    assert_frame(t.to_dataframe(columns=["act_min"]), expected_neurons(everything, columns=["act_min"]))
    labelled = cells_of([(0, HAND_KEYS), (1, ["L_c"])])
    classes = t.to_dataframe(table="classes")
    assert classes.index.tolist() == [(e, k, n, c) for e, k, n in labelled for c in (0, 1)]
    pd.testing.assert_frame_equal(t.classes(), classes)
    pd.testing.assert_frame_equal(t.classes(columns=["act_count"]), classes[["act_count"]])
    nested = t.to_dict()
    assert list(nested) == ["E_0", "E_1", "E_5"] and list(nested["E_1"]) == ["L_c"]
    assert nested["E_5"]["L_a"]["n_2"]["act_max"] == value(5, "train", "L_a", 2) + 1
    assert sum(len(cells) for layers in nested.values() for cells in layers.values()) == len(everything)
    epoch = t["E_1"]
    assert list(epoch) == HAND_KEYS and len(epoch) == 3, "an epoch view lists the trace's layers"
    assert_frame(epoch.to_dataframe(), expected_neurons(cells_of([(1, ["L_c"])])))
    assert_frame(
        epoch.to_dataframe(["act_std"]), expected_neurons(cells_of([(1, ["L_c"])]), columns=["act_std"])
    )
    layer = t["E_0"]["L_a"]
    assert len(layer) == 3
    assert_frame(layer.to_dataframe(), expected_neurons(cells_of([(0, ["L_a"])])))
    assert_frame(layer.to_dataframe(["bias"]), expected_neurons(cells_of([(0, ["L_a"])]), columns=["bias"]))


def test_hand_batches(hand: Path) -> None:
    t = load_trace(hand)
    frame = t.batches()
    cells = cells_of([(0, HAND_KEYS)])
    assert frame.index.names == ["epoch", "batch", "layer", "neuron"]
    assert frame.index.tolist() == [(0, b, k, n) for b in (0, 1) for _, k, n in cells]
    assert frame["act_mean"].tolist() == [
        value(0, "train", k, n) + b / 4 for b in (0, 1) for _, k, n in cells
    ]
    assert frame["act_count"].tolist() == [5] * len(cells) + [6] * len(cells)
    assert frame.columns.tolist() == ["act_count", "act_mean", "act_std", "act_min", "act_max"]
    one = t.batches("E_*/L_c/n_1", columns=["act_mean"])
    assert one.index.tolist() == [(0, 0, "L_c", 1), (0, 1, "L_c", 1)] and one["act_mean"].tolist() == [
        201.0,
        201.25,
    ]
    assert t.batches("E_*/L_b/n_0,2")["act_mean"].tolist() == [100.0, 102.0, 100.25, 102.25]
    assert t.batches("E_1:6").empty, "no per-batch rows after epoch 0"


@pytest.mark.parametrize("parent", ["epoch=9", "lr=0.1"])
def test_sql_and_dataset_of_a_store_under_a_hive_like_folder(tmp_path: Path, parent: str) -> None:
    """DuckDB reads ``key=value`` from every folder of a part's path: a store kept under ``epoch=9`` must
    still give each part's own epoch, and one under ``lr=0.1`` no extra column."""
    root = tmp_path / parent / "t"
    write_hand_store(root)
    t = load_trace(root)
    expected = [(e, 8 if e != 1 else 2) for e in (0, 1, 5)]
    counts = t.sql("SELECT epoch, count(*) AS n FROM neurons GROUP BY epoch ORDER BY epoch")
    assert list(counts.itertuples(index=False, name=None)) == expected
    assert t.sql("SELECT * FROM classes").columns.tolist() == [f.name for f in SCHEMAS["classes"]] + ["epoch"]
    assert t.sql("SELECT typeof(epoch) AS t FROM neurons LIMIT 1")["t"].tolist() == ["INTEGER"]
    epochs = t.dataset().to_table(columns=["epoch"]).column("epoch").to_pylist()
    assert sorted(set(epochs)) == [0, 1, 5]
    assert "PYTHON_ARROW_SCAN" in sql_plan(t), "scanned through the Arrow dataset"


def sql_plan(t) -> str:
    """DuckDB's plan of a scan of the neurons view."""
    return "\n".join(t.sql("EXPLAIN SELECT act_mean FROM neurons")["explain_value"].astype(str))


def test_sql_reads_the_parts_with_duckdbs_parquet_reader(hand: Path) -> None:
    """A store in ordinary folders is read by DuckDB's own Parquet reader (file pruning, speed)."""
    plan = sql_plan(load_trace(hand))
    assert "READ_PARQUET" in plan and "ARROW" not in plan


def test_sql_without_duckdb_says_how_to_install_it(hand: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "duckdb", None)
    with pytest.raises(ImportError) as info:
        load_trace(hand).sql("SELECT 1")
    assert str(info.value) == "Trace.sql needs DuckDB: pip install duckdb"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_hand_an_epoch_without_a_table_is_skipped_not_the_end(tmp_path: Path) -> None:
    """Epoch 0 recorded no labels (no classes part): epoch 1's classes are still read."""
    root = tmp_path / "t"
    write_hand_store(root)
    log = root / "epochs.jsonl"
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    del lines[0]["rows"]["classes"]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    shutil.rmtree(root / "classes" / "epoch=0")
    frame = load_trace(root).classes()
    assert frame.index.tolist() == [(1, "L_c", n, c) for n in (0, 1) for c in (0, 1)]


def test_hand_a_short_part_is_refused_though_the_layout_agrees(tmp_path: Path) -> None:
    """The part must hold the rows its epoch committed: a cut part is an error, never fewer rows."""
    root = tmp_path / "t"
    write_hand_store(root)
    path = root / "neurons" / "epoch=0" / "part-0.parquet"
    pq.write_table(pq.read_table(path).slice(0, 7), path)
    with pytest.raises(TraceCorruptError) as info:
        load_trace(root).query("E_0/L_a/n_0")
    assert str(info.value) == (
        f"epoch 0: {str(path)!r} holds 7 rows where the trace's metadata says 8; "
        "the part or meta.json/epochs.jsonl is damaged"
    )


def test_hand_batches_take_any_neuron_and_phase_must_be_known(hand: Path) -> None:
    """Per-batch rows are filtered, not laid out: a neuron no layer has is an empty frame, not an error."""
    t = load_trace(hand)
    assert t.batches("E_0/L_c/n_5").empty
    with pytest.raises(KeyError):
        t.query("E_0/L_c/n_5")
    with pytest.raises(ValueError) as info:
        load_trace(hand, phase="test")
    assert str(info.value) == "phase 'test' is not one of train, eval"
