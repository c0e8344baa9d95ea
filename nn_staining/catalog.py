"""What a store holds, besides its Parquet parts: ``meta.json``, the epoch log and the metrics log.

- ``meta.json`` describes the run and changes rarely (layers, classes, config, run id, the row
  layouts epochs use): it is rewritten atomically only when its content changes.
- ``epochs.jsonl`` is the commit log: one line per (epoch, phase), appended after the epoch's
  parts are in place. A reader sees exactly the epochs with a complete line; a torn last line
  (a crash while appending) is no commit. Appending costs the same at epoch 10 and 100,000.
- ``metrics.jsonl`` is appended by ``log_metrics``; a later line wins for the same key.
- ``history.jsonl`` lists the history index's blocks (format 3): each line names a block file
  under ``_history/`` that holds a run of committed epochs' neuron rows ordered neuron-major,
  appended after the file is in place. A later block supersedes the blocks whose epochs it
  covers. The index is derived from the parts: a reader that finds a block file gone reads the
  parts instead.

Loading validates all three (size bounds, types, consistent row offsets) so a damaged or hostile
folder gets a clear error, never a memory blow-up or a wrong answer. No torch here.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_NAME = "nn_staining.trace"
FORMAT_VERSION = 3
#: Versions this code reads: 2 (no history index) and 3 (2 plus ``history.jsonl`` and ``_history/``).
READABLE_VERSIONS = (2, 3)
META = "meta.json"
EPOCH_LOG = "epochs.jsonl"
METRICS_LOG = "metrics.jsonl"
INDEX_LOG = "history.jsonl"
#: Loading refuses larger metadata files (a real one is a few KB per layer).
MAX_META_BYTES = 32 * 2**20
MAX_LOG_BYTES = 512 * 2**20
MAX_EPOCH = 2**31 - 1


class NotATraceError(ValueError):
    """The path exists but holds no nn_staining trace."""


class TraceCorruptError(ValueError):
    """The store is damaged or inconsistent: a listed part is missing, short or garbled, or the
    metadata contradicts the parts. The message names the file."""


class TraceChangedError(RuntimeError):
    """The store was re-recorded (``overwrite=True``) after this ``Trace`` was loaded."""


@dataclass(frozen=True)
class Commit:
    """One committed (epoch, phase): its row layout (an index into ``meta["layouts"]``) and the
    row count of each table's part."""

    epoch: int
    phase: str
    layout: int
    rows: dict[str, int]


@dataclass(frozen=True)
class IndexBlock:
    """One block of the history index: ``epochs`` (committed, consecutive in commit order, one
    row layout) of ``phase`` in one file, ``rows`` neuron rows per epoch, ordered by cell (the row
    of an epoch's part) then epoch; ``level`` counts the merges that built it."""

    phase: str
    level: int
    epochs: tuple[int, ...]
    layout: int
    rows: int

    @property
    def file(self) -> str:
        """The block's file name under ``_history/neurons/``: phase, first and last epoch, level."""
        return f"{self.phase}-{self.epochs[0]}-{self.epochs[-1]}-L{self.level}.parquet"


def new_run_id() -> str:
    """A fresh id for a recording: readers notice when the store is re-recorded under them."""
    return uuid.uuid4().hex


# -- writing ---------------------------------------------------------------------------------
def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON under a dot-prefixed temporary name, then rename it into place;
    a failed write leaves nothing behind."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(json.dumps(payload))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def append_line(path: Path, payload: dict[str, Any]) -> None:
    """Append one JSON line (O(1) whatever the log's length); a torn line is ignored by readers."""
    line = json.dumps(payload, separators=(",", ":")) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)


def commit_line(commit: Commit) -> dict[str, Any]:
    return {"epoch": commit.epoch, "phase": commit.phase, "layout": commit.layout, "rows": commit.rows}


def rewrite_log(path: Path, lines: list[dict[str, Any]]) -> None:
    """Atomically replace a log with ``lines`` (used when a resume drops epochs)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -- reading ---------------------------------------------------------------------------------
def regular_file(path: Path, what: str) -> os.stat_result:
    """``stat`` of ``path``, refusing anything but a regular file (a FIFO would hang a reader)."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise TraceCorruptError(f"{str(path)!r} ({what}) is not a regular file")
    return info


_READ_CHARS = 2**20


def _bounded_text(path: Path, limit: int, what: str) -> str:
    """The text of ``path``, at most ``limit + 1`` characters (a file that grew past ``limit`` since its
    size was checked shows as longer than it may be)."""
    info = regular_file(path, what)
    if info.st_size > limit:
        raise TraceCorruptError(
            f"{str(path)!r} ({what}) is {info.st_size:,} bytes, more than the {limit:,} a trace's {what} may take"
        )
    parts, size = [], 0
    with open(path, encoding="utf-8", errors="strict") as f:
        # in 1 MiB reads: f.read(limit + 1) allocates the whole limit (512 MiB for a log) up front
        while size <= limit and (part := f.read(_READ_CHARS)):
            parts.append(part)
            size += len(part)
    return "".join(parts)[: limit + 1]


def read_meta(root: str | os.PathLike) -> dict[str, Any]:
    """The store's validated ``meta.json``; a clear error when ``root`` is not a trace or the
    metadata is damaged."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"no trace at {str(root)!r}: the path does not exist")
    meta_path = root / META
    if not root.is_dir() or not meta_path.exists():
        raise NotATraceError(
            f"{str(root)!r} is not an nn_staining trace: expected a folder with meta.json and "
            "neurons/, classes/, … as written by NetworkTrace"
        )
    try:
        meta = json.loads(_bounded_text(meta_path, MAX_META_BYTES, "meta.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NotATraceError(f"{str(meta_path)!r} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise NotATraceError(f"{str(meta_path)!r} is not an nn_staining trace (format {found!r})")
    validate_meta(meta, meta_path)
    return meta


def _fail(path: Path, field: str, problem: str) -> TraceCorruptError:
    return TraceCorruptError(f"{str(path)!r}: {field} {problem}; the metadata is damaged")


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def validate_meta(meta: dict[str, Any], path: Path) -> None:
    """Check the fields readers rely on, and that every layer's row offsets follow from the layer
    order and sizes (tampered offsets would make a query return another layer's rows)."""
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = _is_int(version) and version > FORMAT_VERSION
        raise _fail(
            path,
            "format_version",
            f"is {version!r}; this nn_staining reads versions {', '.join(map(str, READABLE_VERSIONS))} "
            + ("(the trace was written by a newer nn_staining: upgrade it)" if newer else "(re-record it)"),
        )
    layers = meta.get("layers")
    if not isinstance(layers, list):
        raise _fail(path, "layers", f"must be a list, not {type(layers).__name__}")
    offset = input_offset = 0
    keys = set()
    for i, info in enumerate(layers):
        where = f"layers[{i}]"
        if not isinstance(info, dict):
            raise _fail(path, where, "must be an object")
        key = info.get("key")
        if not isinstance(key, str) or not key.startswith("L_") or key in keys:
            raise _fail(path, f"{where}.key", f"{key!r} is not a new layer key L_<name>")
        keys.add(key)
        if not _is_int(info.get("neurons")):
            raise _fail(path, f"{where}.neurons", f"{info.get('neurons')!r} is not a count")
        if info.get("kind") not in ("features", "channels"):
            raise _fail(path, f"{where}.kind", f"{info.get('kind')!r} is not 'features' or 'channels'")
        if info.get("row_offset") != offset:
            raise _fail(
                path,
                f"{where}.row_offset",
                f"is {info.get('row_offset')!r} but the layers before hold {offset}",
            )
        offset += info["neurons"]
        in_features = info.get("in_features")
        if in_features is not None and not _is_int(in_features):
            raise _fail(path, f"{where}.in_features", f"{in_features!r} is not a count")
        if "input_offset" in info:
            if in_features is None or info["input_offset"] != input_offset:
                raise _fail(
                    path,
                    f"{where}.input_offset",
                    f"is {info['input_offset']!r} but the inputs before hold {input_offset}",
                )
            input_offset += in_features
    for i, info in enumerate(layers):
        _validate_graph(info, keys, path, f"layers[{i}]")
    if meta.get("num_neurons", offset) != offset:
        raise _fail(path, "num_neurons", f"is {meta.get('num_neurons')!r} but the layers hold {offset}")
    classes = meta.get("num_classes")
    if classes is not None and not _is_int(classes, 1):
        raise _fail(path, "num_classes", f"{classes!r} is not a positive count")
    for field, kind in (("config", dict), ("class_names", (list, type(None)))):
        if field in meta and not isinstance(meta[field], kind):
            raise _fail(path, field, f"has the wrong type ({type(meta[field]).__name__})")
    layouts = meta.get("layouts")
    if not isinstance(layouts, list) or not all(
        isinstance(lay, dict)
        and all(isinstance(lay.get(t), list) and set(lay[t]) <= keys for t in ("neurons", "inputs"))
        for lay in layouts
    ):
        raise _fail(path, "layouts", "must list the layer keys of each row layout")
    if not isinstance(meta.get("run_id"), str):
        raise _fail(path, "run_id", "is missing")


def _validate_graph(info: dict[str, Any], keys: set[str], path: Path, where: str) -> None:
    """A layer's place in the layer graph, when recorded: ``inputs_from`` lists layer keys, ``input_ops``
    one list of operation names per source, ``elementwise`` is a bool."""
    if "inputs_from" not in info:
        return
    sources, ops = info["inputs_from"], info.get("input_ops")
    if not isinstance(sources, list) or not all(isinstance(k, str) and k in keys for k in sources):
        raise _fail(path, f"{where}.inputs_from", f"{sources!r:.200} is not a list of the trace's layer keys")
    if (
        not isinstance(ops, list)
        or len(ops) != len(sources)
        or not all(isinstance(o, list) and all(isinstance(n, str) for n in o) for o in ops)
    ):
        raise _fail(path, f"{where}.input_ops", f"{ops!r:.200} is not one list of operation names per source")
    if not isinstance(info.get("elementwise"), bool):
        raise _fail(path, f"{where}.elementwise", f"{info.get('elementwise')!r} is not true or false")


def _read_log(path: Path, what: str) -> list[dict[str, Any]]:
    """The complete lines of a JSON-lines log (a torn last line, from a crash, is skipped)."""
    if not path.exists():
        return []
    text = _bounded_text(path, MAX_LOG_BYTES, what)
    complete = text.split("\n")[:-1]  # the last piece lacks its newline: it was being appended
    try:  # one parse for the whole log; line by line only to name a bad line
        out = json.loads("[" + ",".join(complete) + "]")
        if len(out) == len(complete) and all(type(value) is dict for value in out):
            return out
    except json.JSONDecodeError:
        pass
    out = []
    for number, line in enumerate(complete, 1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TraceCorruptError(f"{str(path)!r} line {number} is not JSON: {exc}") from None
        if not isinstance(value, dict):
            raise TraceCorruptError(f"{str(path)!r} line {number} is not an object")
        out.append(value)
    return out


def read_commits(root: str | os.PathLike, meta: dict[str, Any]) -> dict[str, dict[int, Commit]]:
    """The committed epochs of each phase with their layouts and row counts."""
    root = Path(root)
    out: dict[str, dict[int, Commit]] = {"train": {}, "eval": {}}
    layouts = len(meta["layouts"])
    path = root / EPOCH_LOG
    for number, line in enumerate(_read_log(path, "epoch log"), 1):
        epoch, phase, layout, rows = (
            line.get("epoch"),
            line.get("phase"),
            line.get("layout"),
            line.get("rows"),
        )
        if (
            type(epoch) is not int  # bool and float are not epochs
            or not 0 <= epoch <= MAX_EPOCH
            or phase not in out
            or type(layout) is not int
            or not 0 <= layout < layouts
            or type(rows) is not dict
            or not all(type(k) is str and type(v) is int and v >= 0 for k, v in rows.items())
        ):
            raise TraceCorruptError(f"{str(path)!r} line {number} is not a valid epoch commit: {line!r:.200}")
        out[phase][epoch] = Commit(epoch, phase, layout, rows)
    return out


def read_metrics(root: str | os.PathLike, meta: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Metrics given to ``log_metrics``: ``{"run" or epoch: {name: value}}``, later values winning."""
    out: dict[str, dict[str, Any]] = {k: dict(v) for k, v in meta.get("metrics", {}).items()}
    for line in _read_log(Path(root) / METRICS_LOG, "metrics log"):
        key, values = line.get("key"), line.get("values")
        if isinstance(key, str) and isinstance(values, dict):
            out.setdefault(key, {}).update(values)
    return out


def index_line(block: IndexBlock) -> dict[str, Any]:
    return {
        "phase": block.phase,
        "level": block.level,
        "epochs": list(block.epochs),
        "layout": block.layout,
        "rows": block.rows,
    }


def read_index(
    root: str | os.PathLike, meta: dict[str, Any], commits: dict[str, dict[int, Commit]]
) -> dict[str, list[IndexBlock]]:
    """The history index's live blocks per phase, in epoch order: each later line supersedes the
    blocks it overlaps, and a block is used only when every epoch in it is committed with its
    layout and row count (an index left behind by a resume that dropped epochs is ignored)."""
    path = Path(root) / INDEX_LOG
    live: dict[str, dict[int, IndexBlock]] = {"train": {}, "eval": {}}
    for number, line in enumerate(_read_log(path, "history index"), 1):
        phase, level, epochs, layout, rows = (
            line.get(k) for k in ("phase", "level", "epochs", "layout", "rows")
        )
        if (
            phase not in live
            or not _is_int(level)
            or not isinstance(epochs, list)
            or not epochs
            or not all(_is_int(e) and e <= MAX_EPOCH for e in epochs)
            or any(a >= b for a, b in zip(epochs, epochs[1:]))
            or not _is_int(layout)
            or not _is_int(rows, 1)
        ):
            raise TraceCorruptError(f"{str(path)!r} line {number} is not a valid index block: {line!r:.200}")
        block = IndexBlock(phase, level, tuple(epochs), layout, rows)
        blocks = live[phase]
        for first in [
            f for f, b in blocks.items() if b.epochs[0] <= epochs[-1] and epochs[0] <= b.epochs[-1]
        ]:
            del blocks[first]
        blocks[epochs[0]] = block
    out: dict[str, list[IndexBlock]] = {}
    for phase, blocks in live.items():
        if not blocks:
            out[phase] = []
            continue
        done = {e: (c.layout, c.rows.get("neurons")) for e, c in commits.get(phase, {}).items()}
        out[phase] = [
            b for _, b in sorted(blocks.items()) if all(done.get(e) == (b.layout, b.rows) for e in b.epochs)
        ]
    return out
