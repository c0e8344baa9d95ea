"""The trace's Parquet parts: schemas, crash-safe epoch writes and verified row-group reads.

Layout (``epoch`` lives only in the directory name, as pyarrow's ``write_dataset`` does)::

    <store>/meta.json, epochs.jsonl, metrics.jsonl      see :mod:`nn_staining.catalog`
    <store>/<table>/epoch=<e>/part-0.parquet          train rows
    <store>/<table>/epoch=<e>/eval-0.parquet          eval rows (record_eval=True)
    <store>/_history/neurons/<phase>-<first>-<last>-L<level>.parquet   the history index (format 3)

Every part is written under a dot-prefixed temporary name and renamed into place, the
``neurons`` part last; the epoch counts once its line is appended to ``epochs.jsonl``. A failed
write removes every part of that epoch, so no engine sees half of it. Parts carry page
checksums, verified on read. Rows are ordered by layer then neuron (:mod:`nn_staining.rows`),
so a reader reads only the row groups a signature needs.

The history index makes a query over many epochs open few files: the writer copies the scalar
``neurons`` columns of every run of ``INDEX_FANIN`` small committed epochs into one block file,
rows ordered by cell (an epoch part's row) then epoch, so one neuron's history in a block is one
contiguous run of rows; ``INDEX_FANIN`` blocks of one level merge into a block of the next. The
index is a derived copy under ``_history/`` (which engines globbing ``<table>/*/*.parquet`` never
see): the parts stay the record, a block is listed in ``history.jsonl`` only once its file is in
place, and a reader that finds a block gone reads the parts instead. No torch here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .catalog import (
    EPOCH_LOG,
    FORMAT_NAME,
    FORMAT_VERSION,
    INDEX_LOG,
    META,
    METRICS_LOG,
    Commit,
    IndexBlock,
    NotATraceError,
    TraceCorruptError,
    append_line,
    commit_line,
    index_line,
    read_commits,
    read_index,
    read_meta,
    read_metrics,
    regular_file,
    rewrite_log,
    write_json_atomic,
)
from .records import ACTIVATION_COLUMNS, BATCH_COLUMNS
from .rows import ReadPlan

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "NotATraceError", "SCHEMAS", "TraceWriter", "read_epochs"]

log = logging.getLogger(__name__)

TABLES = ("neurons", "classes", "inputs", "batches")
#: Every folder of per-epoch parts (``epoch=<e>`` subfolders): the tables, probe records, checkpoints.
EPOCH_FOLDERS = TABLES + ("probes", "checkpoints")
PHASES = ("train", "eval")
#: Rows per Parquet row group: a query reads whole row groups, so smaller is more selective.
ROW_GROUP_ROWS = 8192
#: Rows of a part built as Arrow at a time (a whole number of row groups, so the row groups are
#: those of a whole-table write): the writer's memory is bounded by a slice, not by the table.
SLICE_ROWS = 8 * ROW_GROUP_ROWS
#: The history index's folder (its ``neurons`` blocks); ``history.jsonl`` lists the live blocks.
HISTORY = "_history"
#: Epochs with at least this many neuron rows are not indexed: their part's open is already amortised.
INDEX_BELOW_ROWS = 65_536
#: Epochs (level 0) or blocks (level l > 0) merged into one block of the next level.
INDEX_FANIN = 16
#: No index block holds more rows than this (its merge is skipped).
INDEX_MAX_ROWS = 2**22
#: Rows per row group in index blocks: a history reads one per block, and a block's footer (parsed
#: at each open) grows with its row groups; 16,384 halves the open of a 2.5M-row block against 8,192.
INDEX_ROW_GROUP_ROWS = 16_384

_LAYER = pa.dictionary(pa.int32(), pa.string())
_F32 = pa.float32()
_KEY_FIELDS = [pa.field("phase", pa.string()), pa.field("layer", _LAYER)]

_COUNT_COLUMNS = {"act_count", "act_nan_count"}


def _stat_fields(names: Sequence[str]) -> list[pa.Field]:
    """Fields of statistic columns named in :mod:`nn_staining.records`: counts int64, the rest float32."""
    return [pa.field(name, pa.int64() if name in _COUNT_COLUMNS else _F32) for name in names]


SCHEMAS: dict[str, pa.Schema] = {
    "neurons": pa.schema(
        _KEY_FIELDS
        + [pa.field("neuron", pa.int32())]
        + _stat_fields(ACTIVATION_COLUMNS)
        + [
            pa.field("bias", _F32),
            pa.field("weight_norm", _F32),
            pa.field("weight_mean", _F32),
            pa.field("weight_delta_norm", _F32),
            pa.field("grad_norm", _F32),
            pa.field("weights", pa.list_(_F32)),
        ]
    ),
    "classes": pa.schema(
        _KEY_FIELDS
        + [
            pa.field("neuron", pa.int32()),
            pa.field("class", pa.int32()),
            pa.field("act_count", pa.int64()),
            pa.field("act_mean", _F32),
        ]
    ),
    "inputs": pa.schema(
        _KEY_FIELDS
        + [
            pa.field("feature", pa.int32()),
            pa.field("class", pa.int32()),
            pa.field("count", pa.int64()),
            pa.field("mean", _F32),
        ]
    ),
    "batches": pa.schema(
        _KEY_FIELDS
        + [pa.field("batch", pa.int32()), pa.field("neuron", pa.int32())]
        + _stat_fields(BATCH_COLUMNS)
    ),
}

#: The ``neurons`` columns the history index copies (every one but the ``weights`` list).
INDEXED_COLUMNS = [f.name for f in SCHEMAS["neurons"] if f.name != "weights"]

#: The index columns of each table (besides ``epoch``) and its cell-level key.
INDEX_COLUMNS = {
    "neurons": ["layer", "neuron"],
    "classes": ["layer", "neuron", "class"],
    "inputs": ["layer", "feature", "class"],
    "batches": ["batch", "layer", "neuron"],
}


# -- writing ---------------------------------------------------------------------------------
def part_name(phase: str) -> str:
    """File name of one epoch's part for ``phase``: ``part-0.parquet`` (train) or ``eval-0.parquet``."""
    if phase not in PHASES:
        raise ValueError(f"phase {phase!r} is not one of {', '.join(PHASES)}")
    return "part-0.parquet" if phase == "train" else "eval-0.parquet"


def part_path(root: str | os.PathLike, table: str, epoch: int, phase: str = "train") -> Path:
    """Where ``table``'s rows of ``epoch`` and ``phase`` live."""
    return Path(root) / table / f"epoch={epoch}" / part_name(phase)


def build_table(table: str, columns: dict[str, Any], layers: Sequence[str]) -> pa.Table:
    """An Arrow table of ``table``'s schema from whole numpy columns.

    ``columns["layer"]`` holds int32 codes into ``layers`` (the trace-wide dictionary); a
    ``(values, missing)`` pair gives a column with nulls; ``columns["weights"]``, when present,
    is ``(offsets, values, missing)``; absent columns are null.
    """
    schema = SCHEMAS[table]
    n = len(columns["layer"])
    arrays = []
    for f in schema:
        value = columns.get(f.name)
        if f.name == "layer":
            codes = _numeric(np.asarray(value, dtype=np.int32), pa.int32())
            arrays.append(pa.DictionaryArray.from_arrays(codes, _strings(list(layers))))
        elif value is None:
            arrays.append(pa.nulls(n, f.type))
        elif f.name == "phase":
            arrays.append(_repeated(value, n))
        elif f.name == "weights":
            offsets, values, missing = value
            if offsets[-1] > np.iinfo(np.int32).max:
                raise ValueError(
                    f"an epoch holds {offsets[-1]:,} weights, more than a Parquet list<float32> column takes; "
                    "record it with record_weights=False"
                )
            arrays.append(
                pa.ListArray.from_arrays(
                    _numeric(np.asarray(offsets, np.int32), pa.int32()),
                    _numeric(np.asarray(values, np.float32), _F32),
                    mask=_booleans(missing) if missing.any() else None,
                )
            )
        else:
            arrays.append(_column(value, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


# Arrow arrays are made from their buffers, not by ``pa.array``: that imports pandas (about 45 MiB
# resident) the first time it runs, which a process that only records has no other use for.
def _column(values: Any, type_: pa.DataType) -> pa.Array:
    """A numpy column as Arrow; ``(values, missing)`` marks nulls (NaN stays NaN in floats)."""
    mask = None
    if isinstance(values, tuple):
        values, mask = values
        mask = mask if mask.any() else None
    return _numeric(np.asarray(values), type_, mask)


def _numeric(values: np.ndarray, type_: pa.DataType, missing: np.ndarray | None = None) -> pa.Array:
    """A 1-D numpy column as an Arrow array of the fixed-width ``type_`` (no copy when the column
    already has that dtype and is contiguous); ``missing`` marks nulls."""
    data = np.ascontiguousarray(values, dtype=type_.to_pandas_dtype())
    if missing is not None:
        missing = np.asarray(missing, dtype=bool)
    if data.ndim != 1 or (missing is not None and missing.shape != data.shape):
        shape = None if missing is None else missing.shape
        raise ValueError(f"a column must be 1-D with a mask of its length, not {data.shape} (mask {shape})")
    validity = None if missing is None else pa.py_buffer(np.packbits(~missing, bitorder="little"))
    nulls = 0 if missing is None else int(np.count_nonzero(missing))
    return pa.Array.from_buffers(type_, len(data), [validity, pa.py_buffer(data)], null_count=nulls)


def _booleans(values: np.ndarray) -> pa.Array:
    """A numpy bool column as an Arrow boolean array (bit-packed)."""
    bits = np.packbits(np.asarray(values, dtype=bool), bitorder="little")
    return pa.Array.from_buffers(pa.bool_(), len(values), [None, pa.py_buffer(bits)])


def _repeated(value: str, n: int) -> pa.Array:
    """``value`` ``n`` times, as an Arrow string array."""
    encoded = value.encode()
    offsets = np.arange(n + 1, dtype=np.int32) * np.int32(len(encoded))
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets), pa.py_buffer(encoded * n)])


def _strings(values: Sequence[str]) -> pa.Array:
    """Python strings as an Arrow string array."""
    encoded = [v.encode() for v in values]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int32)
    np.cumsum([len(b) for b in encoded], out=offsets[1:])
    return pa.Array.from_buffers(
        pa.string(), len(encoded), [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))]
    )


class TableSource:
    """A part's rows built as Arrow one slice at a time: ``build(lo, hi)`` gives rows ``[lo, hi)``
    of ``name``'s schema. The writer streams the slices to one Parquet file, so at most one slice
    of the table exists as Arrow. A table of one slice is kept once built (:attr:`built`): the
    history index copies small epochs without reading the part back."""

    def __init__(
        self,
        name: str,
        num_rows: int,
        build: Callable[[int, int], pa.Table],
        schema: pa.Schema | None = None,
        slice_rows: int | None = None,
    ) -> None:
        slice_rows = SLICE_ROWS if slice_rows is None else slice_rows
        if slice_rows <= 0 or slice_rows % ROW_GROUP_ROWS:
            raise ValueError(f"slice_rows must be a multiple of {ROW_GROUP_ROWS}, not {slice_rows}")
        self.name, self.num_rows, self._build = name, num_rows, build
        self.schema = SCHEMAS[name] if schema is None else schema
        self.slice_rows = slice_rows
        self.built: pa.Table | None = None

    def slices(self) -> Iterator[pa.Table]:
        """The rows in slices of ``slice_rows`` (one empty slice for an empty table)."""
        if self.num_rows <= self.slice_rows:
            if self.built is None:
                self.built = self._build(0, self.num_rows)
            yield self.built
            return
        for lo in range(0, self.num_rows, self.slice_rows):
            yield self._build(lo, min(lo + self.slice_rows, self.num_rows))

    def to_table(self) -> pa.Table:
        """The whole table (materialised: for tests and small tables)."""
        pieces = list(self.slices())
        return pieces[0] if len(pieces) == 1 else pa.concat_tables(pieces)


def _temporary(path: Path) -> Path:
    """The dot-prefixed name a part is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def _write_table(table: pa.Table | TableSource, path: Path, row_group_rows: int = ROW_GROUP_ROWS) -> None:
    """Write a part through one ``ParquetWriter`` in row groups of ``row_group_rows``: a
    :class:`TableSource` slice by slice (its slices are whole row groups), a table at once."""
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    schema = table.schema
    names = schema.names
    with pq.ParquetWriter(
        path,
        schema,
        compression="snappy",  # per-column codecs cost ~0.2 ms per part to set up; weights gain nothing
        use_dictionary=["phase", "layer"],
        write_page_checksum=True,
        # statistics only where engines prune on them: a small footer keeps each file quick to open
        write_statistics=[c for c in ("layer", "neuron", "feature", "class", "batch") if c in names],
    ) as writer:
        for piece in table.slices() if isinstance(table, TableSource) else [table]:
            writer.write_table(piece, row_group_size=row_group_rows)


class TraceWriteError(OSError):
    """Writing an epoch failed; the message names the epoch, the table, the store and the intact epochs."""


class TraceWriter:
    """Creates (or continues) a store and writes one epoch's parts at a time, crash-safely."""

    def __init__(self, root: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
        self.root = Path(root)
        meta = self.root / META
        folders = [self.root / t for t in EPOCH_FOLDERS if (self.root / t).exists()]
        self._meta: dict[str, Any] | None = None
        self._index: dict[str, _IndexState] = {}
        if meta.exists():
            read_meta(self.root)  # only a folder that really is a trace is continued or cleared
            if resume:
                self.remove_unlisted_blocks()
                return
            if not overwrite:
                raise FileExistsError(
                    f"{str(self.root)!r} already holds a trace; pass resume=True to continue it, "
                    "overwrite=True to replace it, or choose another store path"
                )
            meta.unlink()  # first: a reader of the old run now finds no trace, not a mix
            derived = self.root / "interventions"  # effects measured on the replaced run
            for folder in folders + ([derived] if derived.is_dir() else []):
                shutil.rmtree(folder)
            shutil.rmtree(self.root / HISTORY, ignore_errors=True)
            for log_name in (EPOCH_LOG, METRICS_LOG, INDEX_LOG):
                (self.root / log_name).unlink(missing_ok=True)
        elif folders:
            raise FileExistsError(
                f"{str(self.root)!r} is not an nn_staining trace but has folders named like its tables "
                f"({', '.join(t.name for t in folders)}); choose another store path"
            )
        self.root.mkdir(parents=True, exist_ok=True)

    def write_epoch(
        self, epoch: int, phase: str, tables: Mapping[str, pa.Table | TableSource]
    ) -> dict[str, int]:
        """Write every table's part for (epoch, phase) under temporary names, then rename them
        into place, ``neurons`` last. A :class:`TableSource` is streamed slice by slice. On
        failure every part of the epoch is removed again (no engine sees half an epoch) and the
        error names the table. Returns each part's rows."""
        ordered = sorted(tables, key=lambda name: name == "neurons")
        paths = [part_path(self.root, name, epoch, phase) for name in ordered]
        table = ordered[0] if ordered else "-"
        try:
            for table, path in zip(ordered, paths):
                _write_table(tables[table], _temporary(path))
            for name, path in zip(ordered, paths):
                table = name
                os.replace(_temporary(path), path)
        except BaseException as exc:
            self.remove_parts(epoch, phase, paths)
            raise _EpochFailure(table, exc) from exc
        return {name: tables[name].num_rows for name in ordered}

    def remove_parts(self, epoch: int, phase: str, paths: Sequence[Path] | None = None) -> None:
        """Delete (epoch, phase)'s parts and temporaries, and the epoch folders they leave empty."""
        if paths is None:
            paths = [part_path(self.root, name, epoch, phase) for name in TABLES]
        for path in paths:
            for candidate in (path, _temporary(path)):
                with contextlib.suppress(OSError):
                    candidate.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when empty

    def remove_extras(self, epoch: int) -> None:
        """Delete an uncommitted epoch's probe record and checkpoint folders."""
        for folder in ("probes", "checkpoints"):
            shutil.rmtree(self.root / folder / f"epoch={epoch}", ignore_errors=True)

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Atomically replace ``meta.json`` when its content changed (it holds nothing per epoch)."""
        if meta != self._meta:
            write_json_atomic(self.root / META, meta)
            self._meta = meta

    def commit(self, commit: Commit) -> None:
        """Append the (epoch, phase)'s line to the epoch log: from now on readers see it."""
        append_line(self.root / EPOCH_LOG, commit_line(commit))

    def append_metrics(self, key: str, values: dict[str, Any]) -> None:
        """Append ``log_metrics`` values for ``key`` (an epoch, or ``"run"``)."""
        append_line(self.root / METRICS_LOG, {"key": key, "values": values})

    def drop_epochs(self, first: int) -> None:
        """Forget every epoch from ``first`` on: the logs stop listing them (atomically; the history
        index first), then their parts, index blocks, probe records and checkpoints are deleted."""
        meta = read_meta(self.root)
        commits = read_commits(self.root, meta)
        blocks = read_index(self.root, meta, commits)
        kept_blocks = [index_line(b) for phase in blocks.values() for b in phase if b.epochs[-1] < first]
        if (self.root / INDEX_LOG).exists():
            rewrite_log(self.root / INDEX_LOG, kept_blocks)
        self._index.clear()
        kept = [commit_line(c) for phase in commits.values() for e, c in sorted(phase.items()) if e < first]
        rewrite_log(self.root / EPOCH_LOG, kept)
        metrics = read_metrics(self.root, meta)
        lines = [{"key": k, "values": v} for k, v in metrics.items() if k == "run" or int(k) < first]
        rewrite_log(self.root / METRICS_LOG, lines)
        for folder in EPOCH_FOLDERS:
            base = self.root / folder
            if not base.is_dir():
                continue
            for child in base.iterdir():
                number = child.name[6:]
                if child.name.startswith("epoch=") and number.isdigit() and int(number) >= first:
                    shutil.rmtree(child, ignore_errors=True)
        self.remove_unlisted_blocks()

    # -- the history index -------------------------------------------------------------------------
    def remove_unlisted_blocks(self) -> None:
        """Delete index files no live block names: those of a merge or a resume interrupted before
        its clean-up, and temporaries (only the writer of a store calls this)."""
        folder = self.root / HISTORY / "neurons"
        if not folder.is_dir():
            return
        meta = read_meta(self.root)
        live = {
            b.file
            for phase in read_index(self.root, meta, read_commits(self.root, meta)).values()
            for b in phase
        }
        for child in folder.iterdir():
            if child.name not in live:
                with contextlib.suppress(OSError):
                    child.unlink()

    def index_committed(self, commit: Commit, neurons: pa.Table | None = None) -> None:
        """Add a just-committed epoch to the history index: every ``INDEX_FANIN`` consecutive small
        epochs of one row layout become a level-0 block, and ``INDEX_FANIN`` consecutive blocks of
        one level merge into one of the next (up to ``INDEX_MAX_ROWS`` rows). ``neurons``, the
        table just written, spares reading the part back."""
        rows = commit.rows.get("neurons", 0)
        state = self._index.get(commit.phase)
        if state is None:  # first commit since the store was opened: the logs include this one
            state = self._index[commit.phase] = self._load_index_state(commit.phase)
        else:
            key = (commit.layout, rows)
            if not 0 < rows < INDEX_BELOW_ROWS or key != state.key:
                state.tail.clear()
                state.run.clear()
                state.written.clear()
                state.key = key
            if 0 < rows < INDEX_BELOW_ROWS:
                state.tail.append(commit.epoch)
        if not 0 < rows < INDEX_BELOW_ROWS:
            return
        if neurons is not None and neurons.num_rows == rows:
            state.written[commit.epoch] = neurons.select(INDEXED_COLUMNS)
        try:
            while len(state.tail) >= INDEX_FANIN and INDEX_FANIN * rows <= INDEX_MAX_ROWS:
                epochs, state.tail = state.tail[:INDEX_FANIN], state.tail[INDEX_FANIN:]
                block = IndexBlock(commit.phase, 0, tuple(epochs), commit.layout, rows)
                sources = [self._epoch_rows(e, commit.phase, rows, state.written.get(e)) for e in epochs]
                self._write_block(block, sources, 1)
                state.written = {e: t for e, t in state.written.items() if e in state.tail}
                state.run.append(block)
                self._merge_full_levels(state)
        except BaseException:
            state.tail.clear()
            state.run.clear()
            state.written.clear()
            raise

    def _merge_full_levels(self, state: _IndexState) -> None:
        """Merge the newest ``INDEX_FANIN`` blocks of the run while they share a level."""
        while len(state.run) >= INDEX_FANIN:
            group = state.run[-INDEX_FANIN:]
            first = group[0]
            epochs = tuple(e for b in group for e in b.epochs)
            if len({b.level for b in group}) != 1 or len(epochs) * first.rows > INDEX_MAX_ROWS:
                return
            merged = IndexBlock(first.phase, first.level + 1, epochs, first.layout, first.rows)
            k = len(first.epochs)
            self._write_block(merged, [self._block_rows(b) for b in group], k)
            state.run[-INDEX_FANIN:] = [merged]
            for b in (
                group
            ):  # listed as superseded already: a crash here leaves files remove_unlisted_blocks deletes
                with contextlib.suppress(OSError):
                    index_path(self.root, b).unlink()

    def _write_block(self, block: IndexBlock, sources: list[pa.Table], k: int) -> None:
        """Interleave ``sources`` (each ``block.rows`` cells × ``k`` epochs, cell-major) into one
        cell-major block file, rename it into place, then list it in the index log."""
        path = index_path(self.root, block)
        data = pa.concat_tables(sources)
        order = np.arange(data.num_rows).reshape(len(sources), block.rows, k).transpose(1, 0, 2).ravel()
        try:
            _write_table(data.take(_numeric(order, pa.int64())), _temporary(path), INDEX_ROW_GROUP_ROWS)
            os.replace(_temporary(path), path)
        except BaseException:
            _temporary(path).unlink(missing_ok=True)
            raise
        append_line(self.root / INDEX_LOG, index_line(block))

    def _epoch_rows(self, epoch: int, phase: str, rows: int, written: pa.Table | None = None) -> pa.Table:
        """The indexed columns of a committed epoch's ``neurons`` part: ``written`` when the writer
        kept the table, else read back from the part (checksums verified)."""
        if written is not None:
            return written
        path = part_path(self.root, "neurons", epoch, phase)
        return read_part(path, INDEXED_COLUMNS, ReadPlan(None, rows, None), epoch)

    def _block_rows(self, block: IndexBlock) -> pa.Table:
        path = index_path(self.root, block)
        return read_part(
            path, INDEXED_COLUMNS, ReadPlan(None, block.rows * len(block.epochs), None), block.epochs[0]
        )

    def _load_index_state(self, phase: str) -> _IndexState:
        """The index as the logs leave it: the epochs committed after the last live block wait in
        the tail, and the newest blocks that follow each other with nothing between them may still
        merge."""
        meta = read_meta(self.root)
        commits = read_commits(self.root, meta)
        blocks = read_index(self.root, meta, commits).get(phase, [])
        done = commits.get(phase, {})
        order = sorted(done)
        position = {e: i for i, e in enumerate(order)}
        last = blocks[-1].epochs[-1] if blocks else -1
        state = _IndexState()
        for epoch in order[position[last] + 1 if blocks else 0 :]:
            key = (done[epoch].layout, done[epoch].rows.get("neurons", 0))
            if key != state.key:
                state.tail.clear()
                state.key = key
            state.tail.append(epoch)
        if state.key is not None and not 0 < state.key[1] < INDEX_BELOW_ROWS:
            state.tail.clear()
        if blocks and (not state.tail or position[state.tail[0]] == position[last] + 1):
            key = (blocks[-1].layout, blocks[-1].rows)
            if state.key in (None, key):
                state.key = key
                run = [blocks[-1]]
                for block in reversed(blocks[:-1]):
                    follows = position[block.epochs[-1]] + 1 == position[run[0].epochs[0]]
                    if not follows or (block.layout, block.rows) != key:
                        break
                    run.insert(0, block)
                state.run = run
        return state


class _IndexState:
    """The writer's view of one phase's index: the epochs not yet in a block (consecutive, one row
    layout; at most ``INDEX_FANIN`` small tables kept in memory) and the newest run of consecutive
    blocks that may still merge."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.tail: list[int] = []
        self.run: list[IndexBlock] = []
        self.written: dict[int, pa.Table] = {}  # the tail's tables as the writer wrote them


def index_path(root: str | os.PathLike, block: IndexBlock) -> Path:
    """Where an index block's file lives."""
    return Path(root) / HISTORY / "neurons" / block.file


class _EpochFailure(Exception):
    """Internal: which table an epoch's write failed at."""

    def __init__(self, table: str, error: BaseException) -> None:
        super().__init__(f"{table}: {error}")
        self.table, self.error = table, error


def epoch_write_error(
    root: Path, epoch: int, phase: str, failure: BaseException, intact: Sequence[int]
) -> TraceWriteError:
    """The error a failed epoch write raises: epoch, table, store, cause and the intact epochs."""
    where = f" at the {failure.table} table" if isinstance(failure, _EpochFailure) else ""
    cause = failure.error if isinstance(failure, _EpochFailure) else failure
    shown = list(intact) if len(intact) <= 12 else [*intact[:5], "…", *intact[-3:]]
    return TraceWriteError(
        f"writing epoch {epoch} ({phase}) of {str(root)!r} failed{where}: {type(cause).__name__}: {cause}. "
        f"That epoch is not in the trace and left nothing on disk; the epochs written before are intact: "
        f"{shown}; later epochs are still written"
    )


def read_part(path: Path, columns: Sequence[str], plan: ReadPlan, epoch: int) -> pa.Table:
    """Read ``columns`` of the rows ``plan`` selects from one part, touching only their row groups
    (each read once) and verifying their page checksums.

    A part that is missing, not a regular file, unreadable, or not holding the rows its epoch
    committed is a :class:`~nn_staining.catalog.TraceCorruptError` naming the file.
    """
    try:
        regular_file(path, f"part of epoch {epoch}")
        pf = pq.ParquetFile(path, pre_buffer=False, page_checksum_verification=True)
    except FileNotFoundError:
        raise TraceCorruptError(
            f"epoch {epoch} is listed in the trace but its part {str(path)!r} is missing"
        ) from None
    except (OSError, pa.ArrowException) as exc:
        raise TraceCorruptError(
            f"epoch {epoch}: {str(path)!r} is not a readable Parquet part: {exc}"
        ) from exc
    md = pf.metadata
    if plan.expected_rows is not None and md.num_rows != plan.expected_rows:
        raise TraceCorruptError(
            f"epoch {epoch}: {str(path)!r} holds {md.num_rows:,} rows where the trace's metadata says "
            f"{plan.expected_rows:,}; the part or meta.json/epochs.jsonl is damaged"
        )
    try:
        if plan.row_ranges is None:
            table = pf.read(columns=list(columns))
            return table if plan.fallback is None else table.filter(plan.fallback)
        return _read_ranges(pf, columns, plan.row_ranges)
    except (OSError, pa.ArrowException) as exc:
        raise TraceCorruptError(f"epoch {epoch}: {str(path)!r} is damaged: {exc}") from exc


def _read_ranges(
    pf: pq.ParquetFile, columns: Sequence[str], row_ranges: Sequence[tuple[int, int]]
) -> pa.Table:
    md = pf.metadata
    starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
    row_ranges = [(lo, hi) for lo, hi in row_ranges if lo < hi]
    groups = sorted(
        {
            g
            for lo, hi in row_ranges
            for g in range(
                int(np.searchsorted(starts, lo, side="right")) - 1, int(np.searchsorted(starts, hi))
            )
        }
    )
    if not groups:
        return pf.schema_arrow.empty_table().select(list(columns))
    chunk = pf.read_row_groups(groups, columns=list(columns), use_threads=False)
    position = {g: int(sum(starts[h + 1] - starts[h] for h in groups[:i])) for i, g in enumerate(groups)}
    pieces = []
    for lo, hi in row_ranges:
        g = int(np.searchsorted(starts, lo, side="right")) - 1
        pieces.append(chunk.slice(position[g] + lo - int(starts[g]), hi - lo))
    table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    if table.num_rows * 2 < chunk.num_rows:
        table = table.take(np.arange(table.num_rows))  # a copy, so the row groups can be freed
    return table


@dataclass(frozen=True)
class BlockRead:
    """What to read from one history-index block: the epochs at ``positions`` of ``block.epochs``
    and, of each, the rows ``plan`` selects in that epoch's part (``plan.row_ranges`` set)."""

    block: IndexBlock
    positions: list[int]
    plan: ReadPlan

    @property
    def epochs(self) -> list[int]:
        return [self.block.epochs[p] for p in self.positions]


def read_block(root: str | os.PathLike, read: BlockRead, columns: Sequence[str]) -> pa.Table:
    """The rows ``read`` selects from an index block, epoch-major (as the parts would give them,
    epoch after epoch), reading only the row groups of the selected cells. ``FileNotFoundError``
    when the block is gone (a merge or resume replaced it); a damaged block is a
    :class:`~nn_staining.catalog.TraceCorruptError` naming the file."""
    block, k = read.block, len(read.block.epochs)
    path = index_path(root, block)
    if not path.exists():
        raise FileNotFoundError(path)
    ranges = [(lo * k, hi * k) for lo, hi in read.plan.row_ranges or []]
    table = read_part(path, columns, ReadPlan(ranges, block.rows * k, None), block.epochs[0])
    cells = table.num_rows // k
    order = np.arange(cells * k).reshape(cells, k)[:, read.positions].T.ravel()
    return table.take(order)


def read_epochs(
    root: str | os.PathLike,
    table: str,
    plans: Sequence[tuple[int, ReadPlan]],
    phase: str,
    columns: Sequence[str],
    blocks: Sequence[BlockRead] = (),
) -> pa.Table:
    """Concatenate the rows each epoch's plan selects from ``table``, with an int32 ``epoch`` column first.

    Rows come in the order of ``plans``; ``blocks`` are epochs read from the history index instead
    of their parts (a block found gone is read from the parts), and with them every piece is put
    in epoch order. Parts are read on a few threads (pyarrow decodes without the GIL).
    Every listed epoch must have its part: a missing or damaged one is an error naming the file,
    never a short answer.
    """
    folder, name = os.path.join(os.fspath(root), table), part_name(phase)

    def one(item: tuple[int, ReadPlan] | BlockRead) -> tuple[list[int], pa.Table]:
        if isinstance(item, BlockRead):
            try:
                return item.epochs, read_block(root, item, columns)
            except FileNotFoundError:
                parts = [one((e, item.plan)) for e in item.epochs]
                return item.epochs, pa.concat_tables([t for _, t in parts])
        epoch, plan = item
        return [epoch], read_part(Path(folder, f"epoch={epoch}", name), columns, plan, epoch)

    jobs: list[tuple[int, ReadPlan] | BlockRead] = [*plans, *blocks]
    if len(jobs) > 4:
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 2))) as pool:
            pieces = list(pool.map(one, jobs))
    else:
        pieces = [one(item) for item in jobs]
    if not pieces:
        empty = SCHEMAS[table].empty_table().select(list(columns))
        return empty.add_column(0, "epoch", pa.array([], pa.int32()))
    if blocks:  # blocks go where their epochs fall (plans come in epoch order then)
        pieces.sort(key=lambda piece: piece[0][0])
    data = pa.concat_tables([t for _, t in pieces], promote_options="permissive")
    epochs = [e for es, _ in pieces for e in es]
    counts = [t.num_rows // len(es) for es, t in pieces for _ in es]
    epoch = np.repeat(np.array(epochs, dtype=np.int32), counts)
    return data.add_column(0, "epoch", pa.array(epoch))


def store_size(root: str | os.PathLike) -> int:
    """Bytes on disk of the trace: its metadata and logs and every table's parts (not figures beside them)."""
    root = Path(root)
    files = [root / META, root / EPOCH_LOG, root / METRICS_LOG]
    files += [root / INDEX_LOG] + [
        p
        for t in (*EPOCH_FOLDERS, HISTORY)
        for p in (root / t).rglob("*")
        if p.suffix in (".parquet", ".safetensors")
    ]
    return sum(p.stat().st_size for p in files if p.is_file())
