"""The store read without nn_staining: DuckDB, Polars, pandas and pyarrow see the same numbers as
``Trace.query``, with exactly one ``epoch`` column."""

from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pyarrow.dataset as ds
import pytest
from conftest import EPOCHS, HIDDEN, MLP_LAYERS, N_CLASSES, Run

from nn_staining import load_trace

COLUMNS = ["act_count", "act_mean", "act_std", "act_min", "act_max", "act_active_frac", "bias", "weight_norm"]


def expected_history(run: Run) -> pd.DataFrame:
    return load_trace(run.store).query("E_*/L_hidden_1/n_20", columns=COLUMNS).reset_index(drop=True)


def assert_same_values(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    for column in COLUMNS:
        np.testing.assert_array_equal(frame[column].to_numpy(), expected[column].to_numpy(), err_msg=column)


def test_duckdb_reads_the_store_as_the_trace_does(mlp_run: Run) -> None:
    frame = duckdb.sql(
        f"SELECT epoch, layer, neuron, {', '.join(COLUMNS)} "
        f"FROM read_parquet('{mlp_run.store}/neurons/*/*.parquet', hive_partitioning=true) "
        "WHERE layer = 'L_hidden_1' AND neuron = 20 ORDER BY epoch"
    ).df()
    assert frame["epoch"].tolist() == list(range(EPOCHS))
    assert set(frame["layer"]) == {"L_hidden_1"} and set(frame["neuron"]) == {20}
    assert_same_values(frame, expected_history(mlp_run))


def test_duckdb_aggregates_classes_and_sees_one_epoch_column(mlp_run: Run) -> None:
    columns = duckdb.sql(
        f"DESCRIBE SELECT * FROM read_parquet('{mlp_run.store}/neurons/*/*.parquet', hive_partitioning=true)"
    ).df()["column_name"]
    assert columns.tolist().count("epoch") == 1
    counts = duckdb.sql(
        f"SELECT epoch, count(*) AS n FROM read_parquet('{mlp_run.store}/classes/*/*.parquet', "
        "hive_partitioning=true) GROUP BY epoch ORDER BY epoch"
    ).df()
    assert counts["n"].tolist() == [(4 * HIDDEN + N_CLASSES) * N_CLASSES] * EPOCHS
    best = duckdb.sql(
        f"SELECT class, act_mean FROM read_parquet('{mlp_run.store}/classes/*/*.parquet', hive_partitioning=true) "
        "WHERE epoch = 3 AND layer = 'L_hidden_1' AND neuron = 20 ORDER BY class"
    ).df()
    cell = load_trace(mlp_run.store)["E_3/L_hidden_1/n_20"]
    np.testing.assert_array_equal(
        best["act_mean"].to_numpy(np.float32), np.float32(list(cell["class_mean"].values()))
    )


def test_polars_scan_parquet_reads_the_store_as_the_trace_does(mlp_run: Run) -> None:
    lazy = pl.scan_parquet(f"{mlp_run.store}/neurons/*/*.parquet", hive_partitioning=True)
    assert lazy.collect_schema().names().count("epoch") == 1
    frame = (
        lazy.filter((pl.col("layer").cast(pl.String) == "L_hidden_1") & (pl.col("neuron") == 20))
        .sort("epoch")
        .collect()
        .to_pandas()
    )
    assert frame["epoch"].tolist() == list(range(EPOCHS))
    assert_same_values(frame, expected_history(mlp_run))


def test_pandas_read_parquet_of_the_table_folder(mlp_run: Run) -> None:
    frame = pd.read_parquet(mlp_run.store / "neurons")
    assert list(frame.columns).count("epoch") == 1
    frame["epoch"] = frame["epoch"].astype(int)
    frame["layer"] = frame["layer"].astype(str)
    assert sorted(frame["epoch"].unique()) == list(range(EPOCHS))
    assert sorted(frame["layer"].unique()) == sorted(MLP_LAYERS)
    history = frame[(frame["layer"] == "L_hidden_1") & (frame["neuron"] == 20)].sort_values("epoch")
    assert_same_values(history.reset_index(drop=True), expected_history(mlp_run))


@pytest.mark.parametrize("table", ["classes", "inputs", "batches"])
def test_pandas_reads_every_table(mlp_run: Run, table: str) -> None:
    frame = pd.read_parquet(mlp_run.store / table)
    assert list(frame.columns).count("epoch") == 1
    assert len(frame) == len(getattr(load_trace(mlp_run.store), table)())


def test_pyarrow_dataset_filter_pushdown(mlp_run: Run) -> None:
    dataset = ds.dataset(mlp_run.store / "neurons", format="parquet", partitioning="hive")
    table = dataset.to_table(
        columns=["epoch", *COLUMNS],
        filter=(ds.field("layer") == "L_hidden_1") & (ds.field("neuron") == 20) & (ds.field("epoch") >= 0),
    )
    frame = table.to_pandas().sort_values("epoch").reset_index(drop=True)
    assert frame["epoch"].tolist() == list(range(EPOCHS))
    assert_same_values(frame, expected_history(mlp_run))


def test_every_engine_reads_the_weights_list_as_the_trace_does(mlp_run: Run) -> None:
    """The ``weights`` list column reads the same in pyarrow, pandas, DuckDB,
    Polars and ``Trace.sql`` as in ``Trace.query``."""
    trace = load_trace(mlp_run.store)
    expected = trace.query("E_*/L_hidden_1/n_20", columns=["weights"])["weights"].tolist()
    assert len(expected) == EPOCHS and all(len(w) > 0 for w in expected)
    where = "layer = 'L_hidden_1' AND neuron = 20"
    glob = f"{mlp_run.store}/neurons/*/*.parquet"
    duck = duckdb.sql(
        f"SELECT weights FROM read_parquet('{glob}', hive_partitioning=true) WHERE {where} ORDER BY epoch"
    ).df()["weights"]
    polars = (
        pl.scan_parquet(glob, hive_partitioning=True)
        .filter((pl.col("layer") == "L_hidden_1") & (pl.col("neuron") == 20))
        .sort("epoch")
        .collect()["weights"]
        .to_list()
    )
    table = ds.dataset(f"{mlp_run.store}/neurons", format="parquet", partitioning="hive").to_table(
        filter=(ds.field("layer") == "L_hidden_1") & (ds.field("neuron") == 20)
    )
    arrow = [table["weights"][i].as_py() for i in np.argsort(table["epoch"].to_numpy())]
    frame = pd.read_parquet(f"{mlp_run.store}/neurons")
    frame = frame[(frame["layer"] == "L_hidden_1") & (frame["neuron"] == 20)].sort_values("epoch")
    sql = trace.sql(f"SELECT weights FROM neurons WHERE {where} ORDER BY epoch")["weights"]
    for name, got in [
        ("duckdb", duck),
        ("polars", polars),
        ("pyarrow", arrow),
        ("pandas", frame["weights"]),
        ("sql", sql),
    ]:
        got = list(got)
        assert len(got) == EPOCHS, name
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32), err_msg=name)
