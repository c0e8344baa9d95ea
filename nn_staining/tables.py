"""Assemble one epoch's Arrow tables from per-layer numpy statistics (no torch here)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from .store import build_table

ACTIVATION_COLUMNS = (
    "act_count",
    "act_mean",
    "act_std",
    "act_min",
    "act_max",
    "act_active_frac",
    "act_nan_count",
)


def epoch_tables(
    phase: str,
    dictionary: list[str],
    outputs: dict[str, dict[str, np.ndarray]],
    inputs: dict[str, dict[str, np.ndarray]],
    weights: dict[str, dict[str, np.ndarray | None]],
    previous_weights: dict[str, np.ndarray],
    num_classes: int,
    record_weights: bool = True,
) -> dict[str, pa.Table]:
    """The epoch's Arrow tables (neurons, classes, inputs, batches), built column by column.

    ``dictionary`` is the trace-wide layer order; ``outputs`` / ``inputs`` are per-layer numpy
    statistics from :mod:`nn_staining.stats`; ``weights`` per-layer snapshots (weights, bias,
    grad_norm) and ``previous_weights`` those of the previous recorded epoch.
    """
    order = [k for k in dictionary if k in outputs]
    code = {k: i for i, k in enumerate(dictionary)}
    sizes = [len(outputs[k]["act_mean"]) for k in order]
    cat = np.concatenate
    neurons: dict[str, Any] = {
        "phase": phase,
        "layer": np.repeat([code[k] for k in order], sizes).astype(np.int32),
        "neuron": cat([np.arange(n, dtype=np.int32) for n in sizes]),
    }
    for column in ACTIVATION_COLUMNS:
        neurons[column] = cat([outputs[k][column] for k in order])
    neurons.update(_weight_columns(order, sizes, weights, previous_weights, record_weights))
    tables = {"neurons": build_table("neurons", neurons, dictionary)}
    if num_classes and any("class_mean" in outputs[k] for k in order):
        tables["classes"] = build_table(
            "classes", _class_columns(phase, order, outputs, code, num_classes), dictionary
        )
        if inputs:
            tables["inputs"] = build_table(
                "inputs", _input_columns(phase, dictionary, inputs, code, num_classes), dictionary
            )
    if any("batches" in outputs[k] for k in order):
        tables["batches"] = build_table("batches", _batch_columns(phase, order, outputs, code), dictionary)
    return tables


def _weight_columns(
    order: list[str], sizes: list[int], weights: dict, previous: dict, record_weights: bool
) -> dict[str, Any]:
    def column(fn) -> tuple[np.ndarray, np.ndarray]:
        """(values, missing) over every layer; layers without the value are null."""
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

    def stat(reduce):
        return lambda key, e: None if e["weights"] is None else reduce(e["weights"])

    def delta(key, e):
        prev = previous.get(key)
        if e["weights"] is None or prev is None or prev.shape != e["weights"].shape:
            return None
        return np.linalg.norm(e["weights"] - prev, axis=1)

    columns: dict[str, Any] = {
        "bias": column(lambda k, e: e["bias"]),
        "weight_norm": column(stat(lambda a: np.linalg.norm(a, axis=1))),
        "weight_mean": column(stat(lambda a: a.mean(axis=1))),
        "weight_delta_norm": column(delta),
        "grad_norm": column(lambda k, e: e["grad_norm"]),
    }
    if record_weights and any(weights.get(k, {}).get("weights") is not None for k in order):
        lengths, values, missing = [], [], []
        for key, n in zip(order, sizes):
            wk = weights.get(key, {}).get("weights")
            lengths.append(np.full(n, 0 if wk is None else wk.shape[1], dtype=np.int64))
            missing.append(np.full(n, wk is None))
            if wk is not None:
                values.append(wk.reshape(-1))
        offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
        columns["weights"] = (offsets, np.concatenate(values), np.concatenate(missing))
    return columns


def _per_class_columns(
    phase: str, keys: list[str], stats: dict[str, dict[str, np.ndarray]], code: dict[str, int], c: int
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray]:
    """Rows (layer, unit, class) from per-layer ``class_count`` (c,) and ``class_mean`` (c, units):
    the key columns, then each row's unit, count and mean."""
    widths = [stats[k]["class_mean"].shape[1] for k in keys]
    cat = np.concatenate
    columns = {
        "phase": phase,
        "layer": np.repeat([code[k] for k in keys], [w * c for w in widths]).astype(np.int32),
        "class": np.tile(np.arange(c, dtype=np.int32), sum(widths)),
    }
    units = cat([np.repeat(np.arange(w, dtype=np.int32), c) for w in widths])
    counts = cat([np.tile(stats[k]["class_count"], w) for k, w in zip(keys, widths)])
    means = cat([stats[k]["class_mean"].T.reshape(-1) for k in keys])
    return columns, units, counts, means


def _class_columns(phase, order, outputs, code, c) -> dict[str, Any]:
    """Rows (layer, neuron, class) of the ``classes`` table."""
    columns, neurons, counts, means = _per_class_columns(phase, order, outputs, code, c)
    return columns | {"neuron": neurons, "act_count": counts, "act_mean": means}


def _input_columns(phase, dictionary, inputs, code, c) -> dict[str, Any]:
    """Rows (layer, feature, class) of the ``inputs`` table."""
    keys = [k for k in dictionary if k in inputs]
    columns, features, counts, means = _per_class_columns(phase, keys, inputs, code, c)
    return columns | {"feature": features, "count": counts, "mean": means}


def _batch_columns(phase, order, outputs, code) -> dict[str, Any]:
    """Rows (layer, batch, neuron); ``batch`` is the batch's index in the epoch."""
    parts: dict[str, list[np.ndarray]] = {name: [] for name in ("layer", "batch", "neuron", "stats")}
    for key in order:
        stats = outputs[key].get("batches")
        if stats is None:
            continue
        nb, f = stats.shape[1], stats.shape[2]
        parts["layer"].append(np.full(nb * f, code[key], dtype=np.int32))
        parts["batch"].append(np.repeat(outputs[key]["batch_ids"], f))
        parts["neuron"].append(np.tile(np.arange(f, dtype=np.int32), nb))
        parts["stats"].append(stats.reshape(5, -1))
    stats = np.concatenate(parts["stats"], axis=1)
    return {
        "phase": phase,
        "layer": np.concatenate(parts["layer"]),
        "batch": np.concatenate(parts["batch"]),
        "neuron": np.concatenate(parts["neuron"]),
        "act_count": stats[0].astype(np.int64),
        "act_mean": stats[1],
        "act_std": stats[2],
        "act_min": stats[3],
        "act_max": stats[4],
    }
