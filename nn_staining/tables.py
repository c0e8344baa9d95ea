"""Build one epoch's parts from typed records as Arrow, one slice of rows at a time (no torch here).

Rows follow the layout :mod:`nn_staining.rows` describes: layers in the trace-wide order, then
neurons (then classes); ``inputs`` rows by layer, feature, class. Each table is a
:class:`~nn_staining.store.TableSource`: a list of per-layer segments whose rows ``[a, b)`` are
built on demand from views of the records, so writing a wide layer holds one slice of its rows as
Arrow (and as numpy columns), never the whole table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from .records import ACTIVATION_COLUMNS, BATCH_COLUMNS, ClassMeans, LayerWeights, PhaseRecord
from .store import SLICE_ROWS, TableSource, build_table

#: The parameter columns of the ``neurons`` table besides the ``weights`` list, in schema order.
WEIGHT_COLUMNS = ("bias", "weight_norm", "weight_mean", "weight_delta_norm", "grad_norm")


@dataclass(frozen=True)
class _Segment:
    """One layer's rows of a table: ``build(a, b)`` gives its local rows ``[a, b)`` as columns
    (numpy arrays; ``(values, missing)`` for nullable ones; ``weights`` as ``(lengths, values, missing)``)."""

    rows: int
    build: Callable[[int, int], dict[str, Any]]


def weight_delta_norms(
    weights: dict[str, LayerWeights], previous: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Each layer's per-neuron ``weight_delta_norm``: the float64 norm of the change of its incoming
    weights since ``previous`` (the previous recorded epoch's), a slice of rows at a time. A layer
    without previous weights of the same shape has none. Taken before the epoch's tables are built,
    so the writer can let go of the previous weights (at width, as large as the epoch's own)."""
    deltas = {}
    for key, w in weights.items():
        matrix, prev = w.weights, previous.get(key)
        if matrix is None or prev is None or prev.shape != matrix.shape:
            continue
        norms = np.empty(matrix.shape[0])
        for a in range(0, matrix.shape[0], SLICE_ROWS):
            b = a + SLICE_ROWS
            norms[a:b] = np.linalg.norm(matrix[a:b].astype(np.float64) - prev[a:b], axis=1)
        deltas[key] = norms
    return deltas


def epoch_tables(
    record: PhaseRecord,
    layers: Sequence[str],
    weights: dict[str, LayerWeights],
    weight_deltas: dict[str, np.ndarray],
    num_classes: int,
    record_weights: bool = True,
) -> dict[str, TableSource]:
    """The phase's tables (neurons, and classes, inputs, batches when recorded), to be built slice by slice.

    ``layers`` is the trace-wide layer order (the ``layer`` dictionary); ``weights`` the epoch's
    per-layer snapshots and ``weight_deltas`` their :func:`weight_delta_norms`.
    """
    outputs = record.outputs
    order = [k for k in layers if k in outputs]
    code = {k: i for i, k in enumerate(layers)}
    with_weights = record_weights and any(k in weights and weights[k].weights is not None for k in order)
    if with_weights:
        total = sum(weights[k].weights.size for k in order if k in weights and weights[k].weights is not None)
        if total > np.iinfo(np.int32).max:
            raise ValueError(
                f"an epoch holds {total:,} weights, more than a Parquet list<float32> column takes; "
                "record it with record_weights=False"
            )
    segments = [
        _neuron_segment(code[k], outputs[k].activations, weights.get(k), weight_deltas.get(k), with_weights)
        for k in order
    ]
    tables = {"neurons": _source("neurons", record.phase, segments, layers)}
    class_means = {k: outputs[k].classes for k in order if outputs[k].classes is not None}
    if num_classes and class_means:
        segments = [
            _class_segment(code[k], m, ("neuron", "act_count", "act_mean")) for k, m in class_means.items()
        ]
        tables["classes"] = _source("classes", record.phase, segments, layers)
        inputs = {k: record.inputs[k] for k in layers if k in record.inputs}
        if inputs:
            segments = [_class_segment(code[k], m, ("feature", "count", "mean")) for k, m in inputs.items()]
            tables["inputs"] = _source("inputs", record.phase, segments, layers)
    batches = {k: outputs[k].batches for k in order if outputs[k].batches is not None}
    if batches:
        segments = [_batch_segment(code[k], b) for k, b in batches.items()]
        tables["batches"] = _source("batches", record.phase, segments, layers)
    return tables


def _source(name: str, phase: str, segments: list[_Segment], layers: Sequence[str]) -> TableSource:
    """A table whose rows are its segments' rows, one after another."""
    starts = np.cumsum([0] + [s.rows for s in segments])

    def build(lo: int, hi: int) -> pa.Table:
        pieces = []
        for segment, start in zip(segments, starts):
            a, b = max(lo - int(start), 0), min(hi - int(start), segment.rows)
            if a < b:
                pieces.append(segment.build(a, b))
        columns = _concat(pieces) if pieces else {"layer": np.empty(0, np.int32)}
        if "weights" in columns:
            lengths, values, missing = columns["weights"]
            columns["weights"] = (np.concatenate([[0], np.cumsum(lengths)]), values, missing)
        return build_table(name, columns | {"phase": phase}, layers)

    return TableSource(name, int(starts[-1]), build)


def _concat(pieces: list[dict[str, Any]]) -> dict[str, Any]:
    """The segments' columns of one slice, joined (a slice within one segment is not copied)."""
    if len(pieces) == 1:
        return dict(pieces[0])
    out: dict[str, Any] = {}
    for name, first in pieces[0].items():
        parts = [p[name] for p in pieces]
        if isinstance(first, tuple):
            out[name] = tuple(np.concatenate(group) for group in zip(*parts))
        else:
            out[name] = np.concatenate(parts)
    return out


def _neuron_segment(
    code: int,
    acts: Any,
    w: LayerWeights | None,
    delta: np.ndarray | None,
    with_weights: bool,
) -> _Segment:
    """A layer's ``neurons`` rows; parameters the layer lacks are null."""
    matrix = None if w is None else w.weights

    def values(a: int, b: int) -> dict[str, np.ndarray | None]:
        if w is None:
            return dict.fromkeys(WEIGHT_COLUMNS)
        rows = None if matrix is None else matrix[a:b]
        wide = None if rows is None else rows.astype(np.float64)  # float64: no overflow
        return {
            "bias": None if w.bias is None else w.bias[a:b],
            "weight_norm": None if wide is None else np.linalg.norm(wide, axis=1),
            "weight_mean": None if rows is None else rows.mean(axis=1),
            "weight_delta_norm": None if delta is None else delta[a:b],
            "grad_norm": None if w.grad_norm is None else w.grad_norm[a:b],
        }

    def build(a: int, b: int) -> dict[str, Any]:
        n = b - a
        columns: dict[str, Any] = {
            "layer": np.full(n, code, dtype=np.int32),
            "neuron": np.arange(a, b, dtype=np.int32),
        }
        for column in ACTIVATION_COLUMNS:
            columns[column] = getattr(acts, column)[a:b]
        for column, value in values(a, b).items():
            if value is None:
                columns[column] = (np.full(n, np.nan, dtype=np.float32), np.ones(n, dtype=bool))
            else:
                columns[column] = (np.asarray(value, dtype=np.float32), np.zeros(n, dtype=bool))
        if with_weights:
            if matrix is None:
                columns["weights"] = (np.zeros(n, np.int64), np.empty(0, np.float32), np.ones(n, bool))
            else:
                lengths = np.full(n, matrix.shape[1], dtype=np.int64)
                columns["weights"] = (lengths, matrix[a:b].reshape(-1), np.zeros(n, bool))
        return columns

    return _Segment(acts.neurons, build)


def _class_segment(code: int, m: ClassMeans, names: tuple[str, str, str]) -> _Segment:
    """A layer's per-class rows (unit, class): ``names`` are the unit, count and mean columns."""
    c = m.mean.shape[0]
    unit, count, mean = names

    def build(a: int, b: int) -> dict[str, Any]:
        u0, u1 = a // c, -(-b // c)  # the units the rows touch, then trimmed to [a, b)
        cut = slice(a - u0 * c, b - u0 * c)
        return {
            "layer": np.full(b - a, code, dtype=np.int32),
            "class": np.tile(np.arange(c, dtype=np.int32), u1 - u0)[cut],
            unit: np.repeat(np.arange(u0, u1, dtype=np.int32), c)[cut],
            count: np.tile(m.count, u1 - u0)[cut],
            mean: m.mean[:, u0:u1].T.reshape(-1)[cut],
        }

    return _Segment(m.units * c, build)


def _batch_segment(code: int, b: Any) -> _Segment:
    """A layer's per-batch rows (batch, neuron); ``batch`` is the batch's index in the epoch."""
    nb, f = b.act_mean.shape

    def build(lo: int, hi: int) -> dict[str, Any]:
        rows = np.arange(lo, hi)
        columns: dict[str, Any] = {
            "layer": np.full(hi - lo, code, dtype=np.int32),
            "batch": b.batch[rows // f],
            "neuron": (rows % f).astype(np.int32),
        }
        for name in BATCH_COLUMNS:
            columns[name] = getattr(b, name).reshape(-1)[lo:hi]
        return columns

    return _Segment(nb * f, build)
