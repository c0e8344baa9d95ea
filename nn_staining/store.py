"""The trace's Parquet parts: schemas, crash-safe epoch writes and verified row-group reads.

Layout (``epoch`` lives only in the directory name, as pyarrow's ``write_dataset`` does)::

    <store>/meta.json, epochs.jsonl, metrics.jsonl      see :mod:`nn_staining.catalog`
    <store>/<table>/epoch=<e>/part-0.parquet          train rows
    <store>/<table>/epoch=<e>/eval-0.parquet          eval rows (record_eval=True)

Every part is written under a dot-prefixed temporary name and renamed into place, the
``neurons`` part last; the epoch counts once its line is appended to ``epochs.jsonl``. A failed
write removes every part of that epoch, so no engine sees half of it. Parts carry page
checksums, verified on read. Rows are ordered by layer then neuron (:mod:`nn_staining.rows`),
so a reader reads only the row groups a signature needs. No torch here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .catalog import (
    EPOCH_LOG,
    FORMAT_NAME,
    FORMAT_VERSION,
    META,
    METRICS_LOG,
    Commit,
    NotATraceError,
    TraceCorruptError,
    append_line,
    commit_line,
    read_commits,
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
            codes = pa.array(np.asarray(value, dtype=np.int32))
            arrays.append(pa.DictionaryArray.from_arrays(codes, pa.array(list(layers), pa.string())))
        elif f.name == "phase":
            arrays.append(pa.repeat(pa.scalar(value, pa.string()), n))
        elif value is None:
            arrays.append(pa.nulls(n, f.type))
        elif f.name == "weights":
            offsets, values, missing = value
            if offsets[-1] > np.iinfo(np.int32).max:
                raise ValueError(
                    f"an epoch holds {offsets[-1]:,} weights, more than a Parquet list<float32> column takes; "
                    "record it with record_weights=False"
                )
            arrays.append(
                pa.ListArray.from_arrays(
                    pa.array(np.asarray(offsets, np.int32)),
                    pa.array(np.asarray(values, np.float32)),
                    mask=pa.array(missing) if missing.any() else None,
                )
            )
        else:
            arrays.append(_column(value, f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _column(values: Any, type_: pa.DataType) -> pa.Array:
    """A numpy column as Arrow; ``(values, missing)`` marks nulls (NaN stays NaN in floats)."""
    mask = None
    if isinstance(values, tuple):
        values, mask = values
        mask = mask if mask.any() else None
    data = np.asarray(values).astype(type_.to_pandas_dtype(), copy=False)
    return pa.array(data, type=type_, mask=mask)


def _temporary(path: Path) -> Path:
    """The dot-prefixed name a part is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


def _write_table(table: pa.Table, path: Path) -> None:
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        path,
        row_group_size=ROW_GROUP_ROWS,
        compression="snappy",
        use_dictionary=["phase", "layer"],
        write_page_checksum=True,
        # statistics only where engines prune on them: a small footer keeps each file quick to open
        write_statistics=[
            c for c in ("layer", "neuron", "feature", "class", "batch") if c in table.column_names
        ],
    )


class TraceWriteError(OSError):
    """Writing an epoch failed; the message names the epoch, the table, the store and the intact epochs."""


class TraceWriter:
    """Creates (or continues) a store and writes one epoch's parts at a time, crash-safely."""

    def __init__(self, root: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
        self.root = Path(root)
        meta = self.root / META
        folders = [self.root / t for t in EPOCH_FOLDERS if (self.root / t).exists()]
        self._meta: dict[str, Any] | None = None
        if meta.exists():
            read_meta(self.root)  # only a folder that really is a trace is continued or cleared
            if resume:
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
            for log_name in (EPOCH_LOG, METRICS_LOG):
                (self.root / log_name).unlink(missing_ok=True)
        elif folders:
            raise FileExistsError(
                f"{str(self.root)!r} is not an nn_staining trace but has folders named like its tables "
                f"({', '.join(t.name for t in folders)}); choose another store path"
            )
        self.root.mkdir(parents=True, exist_ok=True)

    def write_epoch(self, epoch: int, phase: str, tables: dict[str, pa.Table]) -> dict[str, int]:
        """Write every table's part for (epoch, phase) under temporary names, then rename them
        into place, ``neurons`` last. On failure every part of the epoch is removed again (no
        engine sees half an epoch) and the error names the table. Returns each part's rows."""
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
        """Forget every epoch from ``first`` on: the logs stop listing them (atomically), then
        their parts, probe records and checkpoints are deleted."""
        meta = read_meta(self.root)
        commits = read_commits(self.root, meta)
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


def read_epochs(
    root: str | os.PathLike,
    table: str,
    plans: Sequence[tuple[int, ReadPlan]],
    phase: str,
    columns: Sequence[str],
) -> pa.Table:
    """Concatenate the rows each epoch's plan selects from ``table``, with an int32 ``epoch`` column first.

    Parts are read on a few threads (pyarrow decodes without the GIL). Every listed epoch must
    have its part: a missing or damaged one is an error naming the file, never a short answer.
    """
    folder, name = os.path.join(os.fspath(root), table), part_name(phase)

    def one(item: tuple[int, ReadPlan]) -> pa.Table:
        epoch, plan = item
        return read_part(Path(folder, f"epoch={epoch}", name), columns, plan, epoch)

    if len(plans) > 4:
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 2))) as pool:
            parts = list(pool.map(one, plans))
    else:
        parts = [one(item) for item in plans]
    if not parts:
        empty = SCHEMAS[table].empty_table().select(list(columns))
        return empty.add_column(0, "epoch", pa.array([], pa.int32()))
    data = pa.concat_tables(parts, promote_options="permissive")
    epoch = np.repeat(np.array([e for e, _ in plans], dtype=np.int32), [p.num_rows for p in parts])
    return data.add_column(0, "epoch", pa.array(epoch))


def store_size(root: str | os.PathLike) -> int:
    """Bytes on disk of the trace: its metadata and logs and every table's parts (not figures beside them)."""
    root = Path(root)
    files = [root / META, root / EPOCH_LOG, root / METRICS_LOG]
    files += [
        p for t in EPOCH_FOLDERS for p in (root / t).rglob("*") if p.suffix in (".parquet", ".safetensors")
    ]
    return sum(p.stat().st_size for p in files if p.is_file())
