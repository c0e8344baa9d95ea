"""Tests for nn_staining.trace: load_trace, the E_/L_/n_ views, query, to_dataframe, to_dict, errors,
and that a query reads only the row groups it needs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
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
from nn_staining.signature import GRAMMAR
from nn_staining.store import ROW_GROUP_ROWS

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
