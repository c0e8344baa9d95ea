"""Tests for the history index (store format 3): blocks of committed epochs copied neuron-major
into ``_history/``. Every check compares against the epoch parts read with plain pyarrow, the
record the index is derived from."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import N_CLASSES, make_data, make_mlp, train

from nn_staining import NetworkTrace, load_trace
from nn_staining import catalog as catalog_module
from nn_staining import store as store_module
from nn_staining.catalog import INDEX_LOG, Commit, TraceCorruptError
from nn_staining.store import HISTORY, INDEXED_COLUMNS, TraceWriter, build_table, part_path

LAYERS = ("L_a", "L_b")
META = {
    "format": "nn_staining.trace",
    "format_version": 3,
    "run_id": "index",
    "layers": [
        {"key": "L_a", "neurons": 3, "kind": "features", "row_offset": 0},
        {"key": "L_b", "neurons": 2, "kind": "features", "row_offset": 3},
    ],
    "layouts": [{"neurons": ["L_a", "L_b"], "inputs": []}, {"neurons": ["L_a"], "inputs": []}],
}
VALUE_COLUMNS = ["act_count", "act_mean", "act_std", "bias"]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 4 epochs, merged 4 at a time: three levels within a few dozen epochs."""
    monkeypatch.setattr(store_module, "INDEX_FANIN", 4)


def part(epoch: int, phase: str = "train", layout: int = 0, salt: float = 0.0) -> pa.Table:
    """An epoch's neurons part with values that name the epoch, the row and ``salt``."""
    layer = np.array([0, 0, 0, 1, 1] if layout == 0 else [0, 0, 0], np.int32)
    neuron = np.array([0, 1, 2, 0, 1] if layout == 0 else [0, 1, 2], np.int32)
    row = np.arange(len(layer))
    missing = row == 1
    return build_table(
        "neurons",
        {
            "layer": layer,
            "phase": phase,
            "neuron": neuron,
            "act_count": epoch * 10 + row,
            "act_mean": epoch * 100.0 + row + salt,
            "act_std": np.float32(0.5) * row - epoch,
            "bias": (np.where(missing, np.nan, epoch + row / 8), missing),
        },
        LAYERS,
    )


def commit_epoch(
    writer: TraceWriter, epoch: int, phase: str = "train", layout: int = 0, salt: float = 0.0
) -> None:
    """What the epoch writer does: write the part, commit it, add it to the index."""
    rows = writer.write_epoch(epoch, phase, {"neurons": part(epoch, phase, layout, salt)})
    commit = Commit(epoch, phase, layout, rows)
    writer.commit(commit)
    writer.index_committed(commit)


def new_store(root: Path, epochs: range | list[int], salt: float = 0.0) -> TraceWriter:
    writer = TraceWriter(root)
    writer.write_meta(META)
    for epoch in epochs:
        commit_epoch(writer, epoch, salt=salt)
    return writer


def parts_frame(root: Path, phase: str = "train") -> pd.DataFrame:
    """Every committed epoch's part read with plain pyarrow, indexed (epoch, layer, neuron)."""
    lines = [json.loads(line) for line in (root / "epochs.jsonl").read_text().splitlines()]
    frames = []
    for epoch in sorted({line["epoch"] for line in lines if line["phase"] == phase}):
        table = pq.read_table(part_path(root, "neurons", epoch, phase)).to_pandas()
        frames.append(table.assign(epoch=epoch, row=np.arange(len(table))))
    frame = pd.concat(frames, ignore_index=True)
    frame["layer"] = frame["layer"].astype(str)
    frame["epoch"] = frame["epoch"].astype(np.int32)
    return frame


def listed_blocks(root: Path) -> list[tuple[int, int, int]]:
    """(level, first, last) of each line of the index log."""
    lines = [json.loads(line) for line in (root / INDEX_LOG).read_text().splitlines()]
    return [(line["level"], line["epochs"][0], line["epochs"][-1]) for line in lines]


def block_files(root: Path) -> list[str]:
    folder = root / HISTORY / "neurons"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def live(root: Path) -> list[tuple[int, int, int]]:
    return [(b.level, b.epochs[0], b.epochs[-1]) for b in load_trace(root)._blocks]


def assert_reads_like_the_parts(root: Path, signature: str, phase: str = "train") -> pd.DataFrame:
    """``t.query`` with the index equals the same query of the parts alone and the pyarrow rows."""
    t = load_trace(root, phase=phase)
    got = t.query(signature, columns=VALUE_COLUMNS)
    plain = load_trace(root, phase=phase)
    plain._blocks.clear()
    pd.testing.assert_frame_equal(got, plain.query(signature, columns=VALUE_COLUMNS))
    expected = parts_frame(root, phase).set_index(["epoch", "layer", "neuron"]).loc[got.index, VALUE_COLUMNS]
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    assert got.index.is_unique, "an epoch read twice"
    return got


# -- what the index holds --------------------------------------------------------------------------------
def test_blocks_hold_the_parts_rows_cell_major_and_merge_by_level(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(40))
    assert live(root) == [(1, 0, 15), (1, 16, 31), (0, 32, 35), (0, 36, 39)]
    assert block_files(root) == [
        "train-0-15-L1.parquet",
        "train-16-31-L1.parquet",
        "train-32-35-L0.parquet",
        "train-36-39-L0.parquet",
    ], "merged blocks' files are deleted"
    parts = parts_frame(root)
    for level, first, last in live(root):
        block = pq.read_table(root / HISTORY / "neurons" / f"train-{first}-{last}-L{level}.parquet")
        assert block.column_names == INDEXED_COLUMNS
        assert pq.ParquetFile(
            root / HISTORY / "neurons" / f"train-{first}-{last}-L{level}.parquet"
        ).metadata.row_group(0).num_rows == min(16_384, 5 * (last - first + 1))
        expected = parts[parts["epoch"].between(first, last)].sort_values(["row", "epoch"], kind="stable")
        got = block.to_pandas()
        got["layer"] = got["layer"].astype(str)
        pd.testing.assert_frame_equal(
            got.reset_index(drop=True), expected[INDEXED_COLUMNS].reset_index(drop=True), check_dtype=False
        )


def test_index_blocks_carry_page_checksums(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(4))
    path = root / HISTORY / "neurons" / "train-0-3-L0.parquet"
    md = pq.ParquetFile(path).metadata
    chunk = md.row_group(0).column(md.schema.to_arrow_schema().get_field_index("act_mean"))
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    path.write_bytes(bytes(data))
    with pytest.raises(TraceCorruptError, match=r"train-0-3-L0.parquet' is damaged: .*CRC"):
        load_trace(root).query("E_*/L_a/n_0", columns=["act_mean"])


@pytest.mark.parametrize(
    "signature",
    ["E_*/L_a/n_1", "E_*/L_b/n_0,1", "E_*/L_*", "E_*", "E_3:30/L_b", "E_5,17,33,34/L_a/n_0:2", "E_7/L_a/n_2"],
)
def test_queries_with_the_index_equal_the_parts(tmp_path: Path, signature: str) -> None:
    root = tmp_path / "t"
    new_store(root, range(42))
    assert_reads_like_the_parts(root, signature)


def test_a_history_reads_the_blocks_instead_of_one_part_per_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "t"
    new_store(root, range(42))
    opened: list[str] = []
    real = store_module.read_part
    monkeypatch.setattr(
        store_module, "read_part", lambda path, *a: opened.append(Path(path).name) or real(path, *a)
    )
    load_trace(root).query("E_*/L_a/n_1")
    assert sorted(opened) == sorted(block_files(root) + ["part-0.parquet"] * 2), "2 epochs wait for a block"
    opened.clear()
    load_trace(root).query("E_20/L_a")  # one epoch: its part, not a 16-epoch block
    assert opened == ["part-0.parquet"]
    opened.clear()
    load_trace(root).query("E_1:3/L_a", columns=["weights"])  # the index has no weights
    assert opened == ["part-0.parquet"] * 2


def test_weights_and_other_tables_come_from_the_parts(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(8))
    t = load_trace(root)
    frame = t.query("E_*/L_a/n_0", columns=["act_mean", "weights"])
    assert frame.index.get_level_values("epoch").tolist() == list(range(8))
    assert frame["act_mean"].tolist() == [e * 100.0 for e in range(8)]


def test_big_epochs_are_not_indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "INDEX_BELOW_ROWS", 5)
    root = tmp_path / "t"
    new_store(root, range(10))
    assert live(root) == [] and block_files(root) == []
    assert_reads_like_the_parts(root, "E_*/L_a/n_1")


def test_a_block_never_spans_two_row_layouts_or_a_gap_in_the_run(tmp_path: Path) -> None:
    root = tmp_path / "t"
    writer = new_store(root, range(6))  # a block 0-3; 4, 5 wait
    for epoch in range(6, 9):
        commit_epoch(writer, epoch, layout=1)  # another layout: 4, 5 stay unindexed
    for epoch in range(9, 18):
        commit_epoch(writer, epoch)
    assert live(root) == [(0, 0, 3), (0, 9, 12), (0, 13, 16)]
    assert_reads_like_the_parts(root, "E_*/L_a/n_2")
    assert_reads_like_the_parts(root, "E_*/L_b")


def test_eval_epochs_have_their_own_blocks(tmp_path: Path) -> None:
    root = tmp_path / "t"
    writer = new_store(root, range(8))
    for epoch in range(8):
        commit_epoch(writer, epoch, phase="eval", salt=0.25)
    assert [(b.phase, b.epochs[0]) for b in load_trace(root, phase="eval")._blocks] == [
        ("eval", 0),
        ("eval", 4),
    ]
    got = assert_reads_like_the_parts(root, "E_*/L_a/n_1", phase="eval")
    assert got["act_mean"].tolist() == [e * 100.0 + 1.25 for e in range(8)]


def test_the_largest_block_stops_merging(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_module, "INDEX_MAX_ROWS", 5 * 8)  # 8 epochs of 5 rows
    root = tmp_path / "t"
    new_store(root, range(20))
    assert live(root) == [(0, e, e + 3) for e in range(0, 20, 4)], "a 16-epoch block would pass the cap"


# -- engines and the trace's other readers do not see the index ----------------------------------------
def test_engines_and_trace_sql_see_each_epoch_once(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(20))
    count = duckdb.sql(
        f"SELECT count(*), count(DISTINCT epoch) FROM read_parquet('{root}/neurons/*/*.parquet', hive_partitioning=true)"
    ).fetchall()[0]
    assert count == (20 * 5, 20)
    assert load_trace(root).sql("SELECT count(*) AS n FROM neurons")["n"].tolist() == [100]
    assert pd.read_parquet(root / "neurons").shape[0] == 100
    assert load_trace(root).size_bytes() > sum(p.stat().st_size for p in (root / HISTORY).rglob("*.parquet"))


# -- consistency: what a reader trusts ------------------------------------------------------------------
def test_a_block_of_epochs_that_are_not_committed_is_ignored(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(8))
    with open(root / INDEX_LOG, "a") as log:  # a block naming epochs 8-11, never committed
        log.write(
            json.dumps({"phase": "train", "level": 0, "epochs": [8, 9, 10, 11], "layout": 0, "rows": 5})
            + "\n"
        )
        log.write(
            json.dumps({"phase": "train", "level": 0, "epochs": [4, 5, 6, 7], "layout": 1, "rows": 3}) + "\n"
        )
    assert live(root) == [(0, 0, 3)], "the other layout's block replaced 4-7 and is not trusted either"
    assert_reads_like_the_parts(root, "E_*/L_a/n_1")


@pytest.mark.parametrize(
    "line",
    [
        {"phase": "test", "level": 0, "epochs": [0], "layout": 0, "rows": 5},
        {"phase": "train", "level": -1, "epochs": [0], "layout": 0, "rows": 5},
        {"phase": "train", "level": 0, "epochs": [], "layout": 0, "rows": 5},
        {"phase": "train", "level": 0, "epochs": [1, 1], "layout": 0, "rows": 5},
        {"phase": "train", "level": 0, "epochs": [0, 2**31], "layout": 0, "rows": 5},
        {"phase": "train", "level": 0, "epochs": [0], "layout": "0", "rows": 5},
        {"phase": "train", "level": 0, "epochs": [0], "layout": 0, "rows": 0},
    ],
)
def test_a_malformed_index_line_is_an_error_naming_the_log(tmp_path: Path, line: dict) -> None:
    root = tmp_path / "t"
    new_store(root, range(2))
    (root / INDEX_LOG).write_text(json.dumps(line) + "\n")
    with pytest.raises(TraceCorruptError, match=r"history.jsonl' line 1 is not a valid index block"):
        load_trace(root)


def test_a_torn_last_index_line_is_no_block(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(8))
    with open(root / INDEX_LOG, "a") as log:
        log.write('{"phase": "train", "level": 1, "epochs": [0, 1, 2')
    assert live(root) == [(0, 0, 3), (0, 4, 7)]


def test_a_block_with_the_wrong_rows_is_an_error(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(8))
    folder = root / HISTORY / "neurons"
    short = pq.read_table(folder / "train-4-7-L0.parquet").slice(0, 19)
    pq.write_table(short, folder / "train-4-7-L0.parquet")
    with pytest.raises(TraceCorruptError, match=r"train-4-7-L0.parquet' holds 19 rows where .* 20"):
        load_trace(root).query("E_*/L_b/n_1")


def test_a_reader_whose_blocks_were_merged_away_reads_the_parts(tmp_path: Path) -> None:
    root = tmp_path / "t"
    writer = new_store(root, range(12))
    before = load_trace(root)
    assert [b.epochs[0] for b in before._blocks] == [0, 4, 8]
    for epoch in range(12, 16):
        commit_epoch(writer, epoch)  # 0-3, 4-7, 8-11, 12-15 merge into 0-15; their files go
    assert block_files(root) == ["train-0-15-L1.parquet"]
    frame = before.query("E_*/L_a/n_2", columns=["act_mean"])
    assert frame.index.get_level_values("epoch").tolist() == list(range(12)), "its epochs, no more"
    assert frame["act_mean"].tolist() == [e * 100.0 + 2 for e in range(12)]


# -- crashes and failures at each step of building a block -------------------------------------------------
class Crash(BaseException):
    """The process dying at this point: nothing after it runs."""


STEPS = ["write", "rename", "list", "delete"]


def crash_at(monkeypatch: pytest.MonkeyPatch, step: str, level: int) -> None:
    """Make the first ``level`` block's ``step`` raise: writing its temporary file, renaming it
    into place, appending its index line, or deleting the blocks it merged."""
    name = f"-L{level}.parquet"
    if step == "write":
        real_write = store_module._write_table

        def write(table, path, *args):
            if name in str(path):
                raise Crash
            real_write(table, path, *args)

        monkeypatch.setattr(store_module, "_write_table", write)
    elif step == "rename":
        real_replace = os.replace

        def replace(src, dst):
            if name in str(dst):
                raise Crash
            real_replace(src, dst)

        monkeypatch.setattr(store_module.os, "replace", replace)
    elif step == "list":
        real_append = store_module.append_line

        def append(path, payload):
            if Path(path).name == INDEX_LOG and payload["level"] == level:
                raise Crash
            real_append(path, payload)

        monkeypatch.setattr(store_module, "append_line", append)
    else:
        real_unlink = Path.unlink

        def unlink(self, missing_ok=False):
            if HISTORY in self.parts and "-L0.parquet" in self.name and not self.name.startswith("."):
                raise Crash
            real_unlink(self, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)


@pytest.mark.parametrize(
    ("step", "level"),
    [
        (step, level) for level in (0, 1) for step in STEPS if (step, level) != ("delete", 0)
    ],  # L0 deletes nothing
)
def test_a_crash_at_any_step_of_a_block_leaves_every_committed_epoch_readable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, level: int
) -> None:
    root = tmp_path / "t"
    writer = new_store(root, range(15))
    crash_at(monkeypatch, step, level)
    with pytest.raises(Crash):
        commit_epoch(writer, 15)  # completes 12-15 (level 0), then merges 0-15 (level 1)
    monkeypatch.undo()
    for signature in ("E_*/L_a/n_1", "E_*/L_*", "E_2:14/L_b/n_0"):
        got = assert_reads_like_the_parts(root, signature)
    assert sorted(set(got.index.get_level_values("epoch"))) == list(range(2, 14))
    assert load_trace(root).epochs == list(range(16)), "the epoch committed before the crash counts"
    leftovers = [f for f in block_files(root) if f.startswith(".")]
    # the writer reopened after the crash removes what no live block names, then indexes on
    resumed = TraceWriter(root, resume=True)
    listed = {f"train-{first}-{last}-L{lv}.parquet" for lv, first, last in live(root)}
    assert set(block_files(root)) == listed, f"left behind: {leftovers}"
    for epoch in range(16, 36):
        commit_epoch(resumed, epoch)
    assert_reads_like_the_parts(root, "E_*/L_a/n_1")
    assert_reads_like_the_parts(root, "E_*/L_b")
    assert set(block_files(root)) == {f"train-{f}-{la}-L{lv}.parquet" for lv, f, la in live(root)}


def test_a_failed_index_update_is_logged_and_the_epoch_stays_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_write = store_module._write_table

    def write(table, path, *args):
        if HISTORY in Path(path).parts:
            raise OSError("disk full (simulated)")
        real_write(table, path, *args)

    monkeypatch.setattr(store_module, "_write_table", write)
    model = make_mlp()
    x, y = make_data()
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES, background=False) as trace:
        train(model, x, y, epochs=5, trace=trace)
    assert "history index of" in caplog.text and "disk full (simulated)" in caplog.text
    t = load_trace(tmp_path / "t")
    assert t.epochs == list(range(5)) and t._blocks == []
    assert not list((tmp_path / "t" / HISTORY).rglob("*")), "no temporary left behind"


# -- resume and overwrite ------------------------------------------------------------------------------
def test_resume_drops_the_blocks_of_dropped_epochs_before_they_are_rerecorded(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(40))
    writer = TraceWriter(root, resume=True)
    writer.drop_epochs(22)
    assert listed_blocks(root) == [(1, 0, 15)], "the log lists only blocks below the first dropped epoch"
    assert block_files(root) == ["train-0-15-L1.parquet"]
    for epoch in range(22, 40):
        commit_epoch(writer, epoch, salt=0.5)  # new values: a stale block would show the old ones
    got = assert_reads_like_the_parts(root, "E_*/L_a/n_1")
    assert got["act_mean"].tolist() == [e * 100.0 + 1 + (0.5 if e >= 22 else 0) for e in range(40)]
    assert live(root) == [(1, 0, 15), (1, 16, 31), (0, 32, 35), (0, 36, 39)], "16-21 indexed again"


def record(trace: NetworkTrace, model, x, y, epochs: range) -> None:
    for epoch in epochs:
        trace.start_epoch(epoch)
        trace.set_targets(y)
        model(x)
        trace.end_epoch()


def test_resume_through_the_recorder_rerecords_indexed_epochs(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    store = tmp_path / "t"
    with NetworkTrace(model, store, num_classes=N_CLASSES) as trace:
        record(trace, model, x, y, range(10))
    assert live(store) == [(0, 0, 3), (0, 4, 7)]
    first = load_trace(store).query("E_*/L_hidden_1/n_3", columns=["act_mean"])["act_mean"].to_numpy()
    with NetworkTrace(model, store, num_classes=N_CLASSES, resume=True) as trace:
        record(trace, model, x * 2, y, range(6, 16))
    assert load_trace(store).epochs == list(range(16))
    assert live(store) == [(1, 0, 15)]
    got = assert_reads_like_the_parts(store, "E_*/L_hidden_1/n_3")["act_mean"].to_numpy()
    np.testing.assert_array_equal(got[:6], first[:6])
    assert not np.array_equal(got[6:10], first[6:10]), "epochs 6-9 hold the re-recorded values"


def test_overwrite_removes_the_index(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(8))
    TraceWriter(root, overwrite=True)
    assert not (root / HISTORY).exists() and not (root / INDEX_LOG).exists()


# -- older stores ------------------------------------------------------------------------------------------
def test_a_format_2_store_is_read_and_indexed_when_resumed(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "t"
    monkeypatch.setattr(store_module, "INDEX_FANIN", 10**6)  # written as version 2 wrote it: no index
    writer = new_store(root, range(10))
    writer.write_meta(dict(META, format_version=2))
    assert load_trace(root).meta["format_version"] == 2
    assert_reads_like_the_parts(root, "E_*/L_a/n_1")
    monkeypatch.setattr(store_module, "INDEX_FANIN", 4)
    resumed = TraceWriter(root, resume=True)
    resumed.write_meta(META)
    commit_epoch(resumed, 10)  # the first commit indexes the ten stored epochs too
    assert live(root) == [(0, 0, 3), (0, 4, 7)]
    assert_reads_like_the_parts(root, "E_*/L_a/n_1")


def test_a_newer_format_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    root = tmp_path / "t"
    new_store(root, range(2)).write_meta(dict(META, format_version=catalog_module.FORMAT_VERSION + 1))
    with pytest.raises(TraceCorruptError, match="written by a newer nn_staining: upgrade it"):
        load_trace(root)


def test_blocks_built_from_the_writers_tables_equal_the_parts(tmp_path: Path) -> None:
    """The writer hands the tables it just wrote to the index (no read-back): same rows as the parts."""
    model = make_mlp()
    x, y = make_data()
    store = tmp_path / "t"
    with NetworkTrace(model, store, num_classes=N_CLASSES, record_eval=True) as trace:
        train(model, x, y, epochs=9, trace=trace)
    assert live(store) == [(0, 0, 3), (0, 4, 7)]
    parts = parts_frame(store)
    block = pq.read_table(store / HISTORY / "neurons" / "train-4-7-L0.parquet").to_pandas()
    block["layer"] = block["layer"].astype(str)
    expected = parts[parts["epoch"].between(4, 7)].sort_values(["row", "epoch"], kind="stable")
    pd.testing.assert_frame_equal(
        block.reset_index(drop=True), expected[INDEXED_COLUMNS].reset_index(drop=True), check_dtype=False
    )
    assert_reads_like_the_parts(store, "E_*/L_*")
