"""Assemble one epoch's Arrow tables from typed records (no torch here).

Rows follow the layout :mod:`nn_staining.rows` describes: layers in the trace-wide order, then
neurons (then classes); ``inputs`` rows by layer, feature, class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .records import ACTIVATION_COLUMNS, BATCH_COLUMNS, ClassMeans, LayerWeights, PhaseRecord
from .store import build_table


def epoch_tables(
    record: PhaseRecord,
    layers: Sequence[str],
    weights: dict[str, LayerWeights],
    previous_weights: dict[str, np.ndarray],
    num_classes: int,
    record_weights: bool = True,
) -> dict[str, pa.Table]:
    """The phase's Arrow tables (neurons, and classes, inputs, batches when recorded).

    ``layers`` is the trace-wide layer order (the ``layer`` dictionary); ``weights`` the epoch's
    per-layer snapshots and ``previous_weights`` those of the previous recorded epoch.
    """
    outputs = record.outputs
    order = [k for k in layers if k in outputs]
    code = {k: i for i, k in enumerate(layers)}
    sizes = [outputs[k].activations.neurons for k in order]
    cat = np.concatenate
    neurons: dict[str, Any] = {
        "phase": record.phase,
        "layer": np.repeat([code[k] for k in order], sizes).astype(np.int32),
        "neuron": cat([np.arange(n, dtype=np.int32) for n in sizes]),
    }
    for column in ACTIVATION_COLUMNS:
        neurons[column] = cat([getattr(outputs[k].activations, column) for k in order])
    neurons.update(_weight_columns(order, sizes, weights, previous_weights, record_weights))
    tables = {"neurons": build_table("neurons", neurons, layers)}
    class_means = {k: outputs[k].classes for k in order if outputs[k].classes is not None}
    if num_classes and class_means:
        units, counts, means = _per_class_rows(class_means)
        tables["classes"] = build_table(
            "classes",
            _per_class_keys(record.phase, class_means, code, num_classes)
            | {"neuron": units, "act_count": counts, "act_mean": means},
            layers,
        )
        inputs = {k: record.inputs[k] for k in layers if k in record.inputs}
        if inputs:
            features, counts, means = _per_class_rows(inputs)
            tables["inputs"] = build_table(
                "inputs",
                _per_class_keys(record.phase, inputs, code, num_classes)
                | {"feature": features, "count": counts, "mean": means},
                layers,
            )
    batches = {k: outputs[k].batches for k in order if outputs[k].batches is not None}
    if batches:
        tables["batches"] = build_table("batches", _batch_columns(record.phase, batches, code), layers)
    return tables


def _weight_columns(
    order: list[str],
    sizes: list[int],
    weights: dict[str, LayerWeights],
    previous: dict[str, np.ndarray],
    record_weights: bool,
) -> dict[str, Any]:
    """The neurons table's parameter columns; layers without the value are null."""

    def column(fn: Callable[[str, LayerWeights], np.ndarray | None]) -> tuple[np.ndarray, np.ndarray]:
        values = np.full(sum(sizes), np.nan, dtype=np.float32)
        missing = np.ones(len(values), dtype=bool)
        start = 0
        for key, n in zip(order, sizes):
            value = fn(key, weights[key]) if key in weights else None
            if value is not None:
                values[start : start + n] = value
                missing[start : start + n] = False
            start += n
        return values, missing

    def of_weights(reduce: Callable[[np.ndarray], np.ndarray]):
        return lambda key, w: None if w.weights is None else reduce(w.weights)

    def delta(key: str, w: LayerWeights) -> np.ndarray | None:
        prev = previous.get(key)
        if w.weights is None or prev is None or prev.shape != w.weights.shape:
            return None
        return np.linalg.norm(w.weights.astype(np.float64) - prev, axis=1)  # float64: no overflow

    columns: dict[str, Any] = {
        "bias": column(lambda k, w: w.bias),
        "weight_norm": column(of_weights(lambda a: np.linalg.norm(a.astype(np.float64), axis=1))),
        "weight_mean": column(of_weights(lambda a: a.mean(axis=1))),
        "weight_delta_norm": column(delta),
        "grad_norm": column(lambda k, w: w.grad_norm),
    }
    matrices = [weights[k].weights if k in weights else None for k in order]
    if record_weights and any(m is not None for m in matrices):
        lengths = [
            np.full(n, 0 if m is None else m.shape[1], dtype=np.int64) for m, n in zip(matrices, sizes)
        ]
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
        values = np.concatenate([m.reshape(-1) for m in matrices if m is not None])
        missing = np.concatenate([np.full(n, m is None) for m, n in zip(matrices, sizes)])
        columns["weights"] = (offsets, values, missing)
    return columns


def _per_class_keys(phase: str, stats: dict[str, ClassMeans], code: dict[str, int], c: int) -> dict[str, Any]:
    """The (phase, layer, class) columns of rows (layer, unit, class) for per-layer class means."""
    widths = [m.units for m in stats.values()]
    return {
        "phase": phase,
        "layer": np.repeat([code[k] for k in stats], [w * c for w in widths]).astype(np.int32),
        "class": np.tile(np.arange(c, dtype=np.int32), sum(widths)),
    }


def _per_class_rows(stats: dict[str, ClassMeans]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each (layer, unit, class) row's unit, count and mean."""
    c = len(next(iter(stats.values())).count)
    units = np.concatenate([np.repeat(np.arange(m.units, dtype=np.int32), c) for m in stats.values()])
    counts = np.concatenate([np.tile(m.count, m.units) for m in stats.values()])
    means = np.concatenate([m.mean.T.reshape(-1) for m in stats.values()])
    return units, counts, means


def _batch_columns(phase: str, batches: dict, code: dict[str, int]) -> dict[str, Any]:
    """Rows (layer, batch, neuron); ``batch`` is the batch's index in the epoch."""
    columns: dict[str, Any] = {"phase": phase}
    shapes = {k: b.act_mean.shape for k, b in batches.items()}
    columns["layer"] = np.concatenate(
        [np.full(nb * f, code[k], dtype=np.int32) for k, (nb, f) in shapes.items()]
    )
    columns["batch"] = np.concatenate([np.repeat(b.batch, shapes[k][1]) for k, b in batches.items()])
    columns["neuron"] = np.concatenate(
        [np.tile(np.arange(f, dtype=np.int32), nb) for nb, f in shapes.values()]
    )
    for name in BATCH_COLUMNS:
        columns[name] = np.concatenate([getattr(b, name).reshape(-1) for b in batches.values()])
    return columns
