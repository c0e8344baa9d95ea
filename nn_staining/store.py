"""The trace on disk: a hive-partitioned Parquet dataset plus ``meta.json``.

Layout (``epoch`` lives only in the directory name, as pyarrow's ``write_dataset`` does)::

    <store>/meta.json
    <store>/<table>/epoch=<e>/part-0.parquet      train rows
    <store>/<table>/epoch=<e>/eval-0.parquet      eval rows (record_eval=True)

Every part is written under a dot-prefixed temporary name and renamed into place, the
``neurons`` part last and ``meta.json`` after it, so readers (which trust ``meta.json``) see
exactly the completed epochs. Rows are ordered by layer (in ``meta.json`` order) then neuron,
so a reader turns a signature into row ranges and reads only the row groups that hold them.
No torch here: the recorder hands over numpy arrays.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .records import ACTIVATION_COLUMNS, BATCH_COLUMNS
from .rows import ReadPlan

log = logging.getLogger(__name__)

FORMAT_NAME = "nn_staining.trace"
FORMAT_VERSION = 1
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


class NotATraceError(ValueError):
    """The path exists but holds no nn_staining trace."""


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
        # statistics only where engines prune on them: a small footer keeps each file quick to open
        write_statistics=[
            c for c in ("layer", "neuron", "feature", "class", "batch") if c in table.column_names
        ],
    )


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON under a temporary name, then rename it into place."""
    tmp = _temporary(path)
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, path)


class TraceWriter:
    """Creates a store and writes one epoch's tables at a time, crash-safely."""

    def __init__(self, root: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> None:
        self.root = Path(root)
        meta = self.root / "meta.json"
        folders = [self.root / t for t in EPOCH_FOLDERS if (self.root / t).exists()]
        if meta.exists():
            read_meta(self.root)  # only a folder that really is a trace is continued or cleared
            if resume:
                return
            if not overwrite:
                raise FileExistsError(
                    f"{str(self.root)!r} already holds a trace; pass resume=True to continue it, "
                    "overwrite=True to replace it, or choose another store path"
                )
            for folder in folders:
                shutil.rmtree(folder)
            meta.unlink()
        elif folders:
            raise FileExistsError(
                f"{str(self.root)!r} is not an nn_staining trace but has folders named like its tables "
                f"({', '.join(t.name for t in folders)}); choose another store path"
            )
        self.root.mkdir(parents=True, exist_ok=True)

    def drop_epochs(self, epochs: Iterable[int]) -> None:
        """Delete every part of ``epochs`` (call after ``meta.json`` stopped listing them)."""
        for epoch in epochs:
            for folder in EPOCH_FOLDERS:
                shutil.rmtree(self.root / folder / f"epoch={epoch}", ignore_errors=True)

    def write_epoch(self, epoch: int, phase: str, tables: dict[str, pa.Table]) -> int:
        """Write every table's part for (epoch, phase) under temporary names, then rename them
        into place, ``neurons`` last; a failure leaves no part of the epoch. Returns bytes written."""
        ordered = sorted(tables, key=lambda name: name == "neurons")
        paths = [part_path(self.root, name, epoch, phase) for name in ordered]
        try:
            for name, path in zip(ordered, paths):
                _write_table(tables[name], _temporary(path))
        except BaseException:
            for path in paths:
                _temporary(path).unlink(missing_ok=True)
            raise
        written = 0
        for path in paths:
            os.replace(_temporary(path), path)
            written += path.stat().st_size
        return written

    def write_meta(self, meta: dict[str, Any]) -> None:
        """Atomically replace ``meta.json``."""
        write_json_atomic(self.root / "meta.json", meta)


# -- reading ---------------------------------------------------------------------------------
def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    """The store's ``meta.json``; a clear error when ``root`` is not a trace."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no trace at {str(root)!r}: the path does not exist")
    meta_path = root / "meta.json"
    if not root.is_dir() or not meta_path.exists():
        raise NotATraceError(
            f"{str(root)!r} is not an nn_staining trace: expected a folder with meta.json and "
            f"{', '.join(t + '/' for t in TABLES[:2])}… as written by NetworkTrace"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise NotATraceError(f"{str(meta_path)!r} is not valid JSON: {exc}") from exc
    if meta.get("format") != FORMAT_NAME:
        raise NotATraceError(
            f"{str(meta_path)!r} is not an nn_staining trace (format {meta.get('format')!r})"
        )
    return meta


def read_part(path: Path, columns: Sequence[str], plan: ReadPlan | None = None) -> pa.Table:
    """Read ``columns`` of the rows ``plan`` selects from one part, touching only their row groups
    (each read once). ``columns`` must include those the plan's fallback filter uses.

    When the file does not hold the plan's expected row count (a layer missing that epoch), the
    row ranges are not trusted and the fallback filter selects the rows instead.
    """
    pf = pq.ParquetFile(path, pre_buffer=False)  # a few small column chunks: coalescing reads costs more
    md = pf.metadata
    if (
        plan is None
        or plan.row_ranges is None
        or (plan.expected_rows is not None and md.num_rows != plan.expected_rows)
    ):
        table = pf.read(columns=list(columns))
        return table if plan is None or plan.fallback is None else table.filter(plan.fallback)
    starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
    row_ranges = [(lo, hi) for lo, hi in plan.row_ranges if lo < hi]
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
    epochs: Iterable[int],
    phase: str,
    columns: Sequence[str],
    plan: ReadPlan | None = None,
) -> pa.Table:
    """Concatenate the rows ``plan`` selects from ``table`` over ``epochs``, with an int32 ``epoch``
    column first.

    Parts are read on a few threads (pyarrow decodes without the GIL); an epoch without a part
    of this table contributes no rows.
    """
    epochs = list(epochs)
    folder, name = os.path.join(os.fspath(root), table), part_name(phase)
    paths = [os.path.join(folder, f"epoch={e}", name) for e in epochs]

    def one(path: str) -> pa.Table | None:
        try:
            return read_part(Path(path), columns, plan)
        except FileNotFoundError:
            return None

    if len(paths) > 4:
        with ThreadPoolExecutor(max_workers=min(8, 2 * (os.cpu_count() or 2))) as pool:
            parts = list(pool.map(one, paths))
    else:
        parts = [one(p) for p in paths]
    found = [(e, p) for e, p in zip(epochs, parts) if p is not None]
    if not found:
        empty = SCHEMAS[table].empty_table().select(list(columns))
        return empty.add_column(0, "epoch", pa.array([], pa.int32()))
    data = pa.concat_tables([p for _, p in found], promote_options="permissive")
    epoch = np.repeat(np.array([e for e, _ in found], dtype=np.int32), [p.num_rows for _, p in found])
    return data.add_column(0, "epoch", pa.array(epoch))


def store_size(root: str | os.PathLike) -> int:
    """Bytes on disk of the trace: ``meta.json`` and every table's parts (not figures beside them)."""
    root = Path(root)
    files = [root / "meta.json"] + [p for t in TABLES for p in (root / t).rglob("*.parquet")]
    return sum(p.stat().st_size for p in files if p.is_file())
