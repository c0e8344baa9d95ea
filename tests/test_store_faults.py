"""A trace you can trust (issue 11): damaged, tampered or hostile stores give a clear error naming the
file, never a short or wrong answer; the commit of an epoch costs the same at any epoch count."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, load_trace
from nn_staining.catalog import NotATraceError, TraceChangedError, TraceCorruptError

EPOCHS = 5


def record(store: Path, epochs: int = EPOCHS, overwrite: bool = False, metrics: bool = False) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    with NetworkTrace(model, store, num_classes=3, overwrite=overwrite) as trace:
        for epoch in range(epochs):
            trace.start_epoch(epoch)
            trace.set_targets(y)
            loss = nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            trace.end_epoch()
            if metrics:
                trace.log_metrics(epoch, loss=float(loss))


@pytest.fixture
def store(tmp_path: Path) -> Path:
    record(tmp_path / "t")
    return tmp_path / "t"


def part(store: Path, table: str, epoch: int) -> Path:
    return store / table / f"epoch={epoch}" / "part-0.parquet"


# -- 1. listed epochs missing or short on disk ------------------------------------------------------
def test_a_deleted_epoch_folder_is_an_error_naming_the_file(store: Path) -> None:
    shutil.rmtree(store / "neurons" / "epoch=3")
    t = load_trace(store)
    assert t.epochs == list(range(EPOCHS))
    missing = r"epoch 3 is listed in the trace but its part .*neurons/epoch=3/part-0.parquet' is missing"
    for ask in (
        lambda: t.query("E_*/L_0/n_1"),
        lambda: t["E_3"]["L_0"].to_dataframe(),
        lambda: t.to_dataframe(),
        lambda: t["E_3/L_0/n_0"],
    ):
        with pytest.raises(TraceCorruptError, match=missing):
            ask()
    assert len(t.query("E_0:3/L_0/n_1")) == 3  # the intact epochs still answer


def test_a_deleted_classes_folder_is_an_error_not_empty_classes(store: Path) -> None:
    shutil.rmtree(store / "classes" / "epoch=3")
    t = load_trace(store)
    with pytest.raises(TraceCorruptError, match="classes/epoch=3/part-0.parquet' is missing"):
        t.classes()
    with pytest.raises(TraceCorruptError, match="classes/epoch=3"):
        t["E_3/L_2/n_0"]


def test_a_short_part_is_an_error(store: Path) -> None:
    path = part(store, "neurons", 2)
    pq.write_table(pq.read_table(path).slice(0, 7), path)
    with pytest.raises(
        TraceCorruptError, match=r"epoch 2: .*neurons/epoch=2/part-0.parquet' holds 7 rows where .* 15"
    ):
        load_trace(store).query("E_*/L_2")


# -- 2. a store re-recorded under an open Trace ------------------------------------------------------
def test_an_open_trace_notices_the_store_was_re_recorded(store: Path) -> None:
    t = load_trace(store)
    assert len(t.query("E_*/L_0/n_0")) == EPOCHS
    record(store, epochs=2, overwrite=True)
    with pytest.raises(TraceChangedError, match="re-recorded .* call load_trace again"):
        t.query("E_*/L_0/n_0")
    with pytest.raises(TraceChangedError):
        t.sql("SELECT count(*) FROM neurons")
    assert load_trace(store).epochs == [0, 1]


# -- 3. garbled bytes inside a data page ---------------------------------------------------------------
def test_garbled_page_bytes_fail_the_checksum(store: Path) -> None:
    path = part(store, "neurons", 1)
    md = pq.ParquetFile(path).metadata
    column = md.schema.to_arrow_schema().get_field_index("weights")
    chunk = md.row_group(0).column(column)
    start = chunk.data_page_offset
    data = bytearray(path.read_bytes())
    middle = start + chunk.total_compressed_size // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    path.write_bytes(bytes(data))
    with pytest.raises(TraceCorruptError, match=r"epoch 1: .*neurons/epoch=1/part-0.parquet' is damaged"):
        load_trace(store).weights(1, "L_0")


def page_headers_carry_a_crc(path: Path) -> list[bool]:
    """For each column chunk's first page (dictionary page, then data page) of row group 0: whether its
    Thrift header (compact protocol) has field 4, the CRC; without it field 5 or 7 follows field 3."""

    def skip_varint(i: int) -> int:
        while data[i] & 0x80:
            i += 1
        return i + 1

    data, md = path.read_bytes(), pq.ParquetFile(path).metadata
    flags = []
    for c in range(md.num_columns):
        chunk = md.row_group(0).column(c)
        offsets = [chunk.dictionary_page_offset] if chunk.has_dictionary_page else []
        for i in offsets + [chunk.data_page_offset]:
            for _ in range(3):  # page type, uncompressed size, compressed size: an i32 (0x15) each
                assert data[i] == 0x15
                i = skip_varint(i + 1)
            flags.append(data[i] == 0x15)
    return flags


def test_parts_carry_page_checksums(store: Path) -> None:
    for table in ("neurons", "classes", "inputs"):
        flags = page_headers_carry_a_crc(part(store, table, 0))
        assert len(flags) > 5 and all(flags), table
    unchecked = store / "unchecked.parquet"
    pq.write_table(pq.read_table(part(store, "neurons", 0)), unchecked, write_page_checksum=False)
    assert not any(page_headers_carry_a_crc(unchecked)), "the check tells a part without checksums"


def hand_store(root: Path, rows: int = 1000) -> pa.Table:
    """A trace of one layer of ``rows`` neurons at epoch 0 written by the store's writer, act_mean random
    normal (incompressible, so a flipped byte decodes to other numbers): returns the written table."""
    from nn_staining.store import TraceWriter, build_table

    writer = TraceWriter(root)
    layer = {"key": "L_a", "neurons": rows, "kind": "features", "row_offset": 0}
    layouts = [{"neurons": ["L_a"], "inputs": []}]
    meta = {"format": "nn_staining.trace", "format_version": 2, "run_id": "h", "layers": [layer]}
    writer.write_meta(meta | {"layouts": layouts})
    act_mean = np.random.default_rng(0).normal(size=rows)
    columns = {"layer": np.zeros(rows, np.int32), "neuron": np.arange(rows), "act_mean": act_mean}
    table = build_table("neurons", columns, ["L_a"])
    counts = writer.write_epoch(0, "train", {"neurons": table})
    (root / "epochs.jsonl").write_text(
        json.dumps({"epoch": 0, "phase": "train", "layout": 0, "rows": counts}) + "\n"
    )
    return table


def test_a_flipped_byte_in_a_hand_built_part_fails_every_verified_read(tmp_path: Path) -> None:
    """Without the written and verified checksums these reads would return other numbers silently."""
    from nn_staining.rows import ReadPlan
    from nn_staining.store import read_part

    root = tmp_path / "t"
    written = hand_store(root)
    path = part(root, "neurons", 0)
    assert all(page_headers_carry_a_crc(path))
    t = load_trace(root)
    np.testing.assert_array_equal(t.query("E_0/L_a", columns=["act_mean"])["act_mean"], written["act_mean"])
    md = pq.ParquetFile(path).metadata
    chunk = md.row_group(0).column(md.schema.to_arrow_schema().get_field_index("act_mean"))
    data = bytearray(path.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data[middle : middle + 4] = bytes(b ^ 0xFF for b in data[middle : middle + 4])
    path.write_bytes(bytes(data))
    unverified = pq.ParquetFile(path).read(columns=["act_mean"]).column(0)
    assert not unverified.equals(written.column("act_mean")), "the flip changes numbers, not the format"
    with pytest.raises(
        TraceCorruptError, match=r"^epoch 0: .*neurons/epoch=0/part-0.parquet' is damaged: .*CRC"
    ):
        read_part(path, ["act_mean"], ReadPlan([(0, 1000)], 1000, None), 0)
    with pytest.raises(TraceCorruptError, match="is damaged"):
        read_part(path, ["act_mean"], ReadPlan(None, None, None), 0)
    with pytest.raises(TraceCorruptError, match="is damaged"):
        t.query("E_0/L_a/n_999", columns=["act_mean"])
    with pytest.raises(OSError, match="CRC checksum verification failed"):
        t.dataset().to_table(columns=["act_mean"])


# -- 4. tampered meta.json ------------------------------------------------------------------------------
def edit_meta(store: Path, change) -> None:
    meta = json.loads((store / "meta.json").read_text())
    change(meta)
    (store / "meta.json").write_text(json.dumps(meta))


def test_a_tampered_row_offset_is_refused(store: Path) -> None:
    edit_meta(store, lambda m: m["layers"][2].update(row_offset=0))
    with pytest.raises(TraceCorruptError, match=r"layers\[2\].row_offset is 0 but the layers before hold 12"):
        load_trace(store)


def test_halved_neurons_are_refused_not_cut_short(store: Path) -> None:
    def halve(meta):
        meta["layers"][0]["neurons"] = 3
        meta["layers"][1]["row_offset"] = 3
        meta["layers"][2]["row_offset"] = 9
        meta["num_neurons"] = 12

    edit_meta(store, halve)
    t = load_trace(store)
    with pytest.raises(
        TraceCorruptError, match="meta.json's layers make 12 neurons rows but the epoch committed 15"
    ):
        t.query("E_1/L_0")


# -- 10. unreadable parts and malformed metadata ---------------------------------------------------------
def test_a_truncated_part_names_the_file_and_epoch(store: Path) -> None:
    path = part(store, "neurons", 4)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(
        TraceCorruptError, match=r"epoch 4: .*neurons/epoch=4/part-0.parquet' is not a readable"
    ):
        load_trace(store).query("E_4/L_0")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(layers="x"), "layers must be a list"),
        (lambda m: m.pop("run_id"), "run_id is missing"),
        (lambda m: m.update(layouts=[{"neurons": ["L_nope"], "inputs": []}]), "layouts"),
        (lambda m: m["layers"][0].update(neurons=-2), r"layers\[0\].neurons -2 is not a count"),
        (lambda m: m.update(num_classes="3"), "num_classes '3' is not a positive count"),
        (lambda m: m.update(format_version=99), "format_version is 99"),
    ],
)
def test_malformed_meta_json_is_a_clear_error(store: Path, change, message: str) -> None:
    edit_meta(store, change)
    with pytest.raises(TraceCorruptError, match=message):
        load_trace(store)


def test_meta_json_of_the_wrong_shape_is_not_a_trace(store: Path) -> None:
    (store / "meta.json").write_text("[]")
    with pytest.raises(NotATraceError, match="not an nn_staining trace"):
        load_trace(store)


def test_the_cli_prints_the_damaged_field(store: Path) -> None:
    edit_meta(store, lambda m: m.pop("layouts"))
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    run = subprocess.run(
        [sys.executable, "-m", "nn_staining", "info", str(store)], capture_output=True, text=True, env=env
    )
    assert run.returncode != 0
    assert "layouts must list the layer keys" in run.stderr


def test_a_torn_last_commit_line_is_no_commit(store: Path) -> None:
    with open(store / "epochs.jsonl", "a") as f:
        f.write('{"epoch": 5, "phase": "tr')
    assert load_trace(store).epochs == list(range(EPOCHS))


# -- 13. a hostile folder ---------------------------------------------------------------------------------
def test_a_huge_meta_json_is_refused_without_reading_it(store: Path) -> None:
    with open(store / "meta.json", "r+b") as f:
        f.truncate(200 * 2**20)  # sparse: 200 MB on paper
    with pytest.raises(TraceCorruptError, match=r"meta.json' \(meta.json\) is 209,715,200 bytes"):
        load_trace(store)


def test_a_parquet_bomb_is_refused_before_its_rows_are_read(store: Path) -> None:
    path = part(store, "neurons", 1)
    schema = pq.read_schema(path)
    n = 2_000_000
    columns = {}
    for field in schema:
        if field.name == "layer":
            columns[field.name] = pa.DictionaryArray.from_arrays(
                pa.array(np.zeros(n, np.int32)), pa.array(["L_0", "L_1", "L_2"])
            )
        elif field.name == "phase":
            columns[field.name] = pa.array(np.full(n, "train"))
        else:
            columns[field.name] = pa.nulls(n, field.type)
    pq.write_table(pa.table(columns, schema=schema), path, compression="snappy")
    assert path.stat().st_size < 2**20
    with pytest.raises(TraceCorruptError, match="holds 2,000,000 rows where the trace's metadata says 15"):
        load_trace(store).query("E_*/L_0/n_1")


def test_a_part_that_is_a_fifo_is_refused_without_hanging(store: Path) -> None:
    path = part(store, "neurons", 2)
    path.unlink()
    os.mkfifo(path)
    outcome: list[BaseException | None] = []

    def query() -> None:
        try:
            load_trace(store).query("E_*/L_0/n_1")
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    worker = threading.Thread(target=query, daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive(), "the query hung on a FIFO"
    assert isinstance(outcome[0], TraceCorruptError)
    assert "is not a regular file" in str(outcome[0])


# -- 14. committing an epoch does not grow with the number of epochs -------------------------------------
def test_meta_json_is_not_rewritten_per_epoch_and_logs_grow_by_one_line(tmp_path: Path) -> None:
    store = tmp_path / "t"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    inodes = []
    with NetworkTrace(model, store, num_classes=2, background=False) as trace:
        for epoch in range(30):
            trace.start_epoch(epoch)
            trace.set_targets(y)
            model(x)
            trace.end_epoch()
            trace.log_metrics(epoch, loss=0.1 * epoch)
            inodes.append(os.stat(store / "meta.json").st_ino)
            lines = (store / "epochs.jsonl").read_text().splitlines()
            assert len(lines) == epoch + 1
    assert len(set(inodes)) == 1  # written once, when the layers became known, then never replaced
    t = load_trace(store)
    assert t.epochs == list(range(30))
    np.testing.assert_allclose(t.metrics["loss"].to_numpy(), 0.1 * np.arange(30))
    assert len((store / "metrics.jsonl").read_text().splitlines()) == 30


# -- 9. a full disk ----------------------------------------------------------------------------------------
def test_a_full_disk_names_epoch_table_and_store_and_leaves_no_debris(tmp_path: Path, monkeypatch) -> None:
    store = tmp_path / "t"
    from nn_staining import store as store_module

    real = store_module._write_table

    def full_disk(table, where, *args, **kwargs):
        if "epoch=2" in str(where) and "classes" in str(where):
            real(table, where, *args, **kwargs)  # half an epoch reaches the disk first
            raise OSError(28, "No space left on device")
        real(table, where, *args, **kwargs)

    monkeypatch.setattr(store_module, "_write_table", full_disk)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    errors = []
    with NetworkTrace(model, store, num_classes=3) as trace:
        for epoch in range(5):
            trace.start_epoch(epoch)
            trace.set_targets(y)
            nn.functional.cross_entropy(model(x), y).backward()
            optimiser.step()
            optimiser.zero_grad()
            try:
                trace.end_epoch()
                trace.flush()
            except OSError as exc:
                errors.append(str(exc))
    assert len(errors) == 1
    assert "writing epoch 2 (train) of" in errors[0] and str(store) in errors[0]
    assert "failed at the classes table: OSError: [Errno 28] No space left on device" in errors[0]
    assert "intact: [0, 1]" in errors[0]
    assert load_trace(store).epochs == [0, 1, 3, 4]  # the epochs after the failure are kept
    assert not list(store.rglob("epoch=2")), "no empty epoch folder"
    assert not [p for p in store.rglob("*") if p.name.startswith(".")], "no temporary file"
    import duckdb

    parts = duckdb.sql(
        f"SELECT count(DISTINCT epoch) FROM read_parquet('{store}/neurons/*/*.parquet')"
    ).fetchall()
    assert parts == [(4,)]  # an engine globbing the folders sees exactly the listed epochs
    # weight_delta_norm is against the previous epoch written: none for epoch 3 (epoch 2's write
    # failed, and epoch 1's weights were let go of once epoch 2's changes were taken)
    t = load_trace(store)

    def delta(epoch: int, layer: str) -> np.ndarray:
        rows = pq.read_table(store / f"neurons/epoch={epoch}/part-0.parquet").to_pandas()
        return rows.loc[rows.layer == layer, "weight_delta_norm"].to_numpy()

    for layer in ("L_0", "L_2"):  # the Linear layers
        assert np.isnan(delta(3, layer)).all()
        for e in (1, 4):
            want = np.linalg.norm(t.weights(e, layer).astype(np.float64) - t.weights(e - 1, layer), axis=1)
            assert (want > 0).any()
            np.testing.assert_allclose(delta(e, layer), want, rtol=1e-6)


def test_a_failed_meta_json_write_leaves_no_temporary(tmp_path: Path, monkeypatch) -> None:
    from nn_staining import catalog

    path = tmp_path / "meta.json"

    def no_space(self, data, *args, **kwargs):
        Path.write_bytes(self, data.encode()[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", no_space)
    with pytest.raises(OSError, match="No space"):
        catalog.write_json_atomic(path, {"a": 1})
    assert list(tmp_path.iterdir()) == []


# -- 7, 8. epochs in order and within int32; names that look like globs ----------------------------------
def test_epochs_must_increase_and_fit_the_int32_column(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    with NetworkTrace(model, tmp_path / "t") as trace:
        for epoch in (5, 7):
            with trace.epoch(epoch):
                model(torch.randn(3, 2))
        with pytest.raises(ValueError, match=r"epoch 3 comes after epoch 7 was recorded .* resume=True"):
            trace.start_epoch(3)
        with pytest.raises(ValueError, match="epoch must be an int from 0 to 2147483647"):
            trace.start_epoch(2**31)
    assert load_trace(tmp_path / "t").epochs == [5, 7]


def test_a_module_named_like_a_glob_is_addressable(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("x", nn.Linear(3, 2))
    model.add_module("[x]", nn.Linear(2, 4))
    x = torch.randn(5, 3)
    with NetworkTrace(model, tmp_path / "t") as trace, trace.epoch(0):
        model(x)
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_x", "L_[x]"]
    got = t.query("E_0/L_[x]")
    assert got.index.get_level_values("layer").unique().tolist() == ["L_[x]"]
    with torch.no_grad():
        expected = model(x).numpy().mean(0)
    np.testing.assert_allclose(got["act_mean"], expected, rtol=1e-5, atol=1e-6)
    assert t["E_0/L_[x]/n_3"]["act_count"] == 5
