"""Typed hand-offs between the recorder, the writer and the tables (numpy only, no torch).

Each record is a frozen dataclass of whole numpy arrays. The field names of
:class:`ActivationStats` and :class:`BatchStats` are the store's column names, declared here once:
``tables.py`` and ``store.py`` take them from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ActivationStats:
    """One layer's per-neuron activation statistics for one phase of an epoch, each ``(neurons,)``."""

    act_count: np.ndarray
    act_mean: np.ndarray
    act_std: np.ndarray
    act_min: np.ndarray
    act_max: np.ndarray
    act_active_frac: np.ndarray
    act_nan_count: np.ndarray

    @property
    def neurons(self) -> int:
        return len(self.act_mean)


@dataclass(frozen=True)
class ClassMeans:
    """Per-class counts ``(classes,)`` and means ``(classes, units)`` of a layer's outputs or inputs."""

    count: np.ndarray
    mean: np.ndarray

    @property
    def units(self) -> int:
        return self.mean.shape[1]


@dataclass(frozen=True)
class BatchStats:
    """Per-batch statistics of one layer: ``batch`` ids ``(batches,)``, each column ``(batches, neurons)``."""

    batch: np.ndarray
    act_count: np.ndarray
    act_mean: np.ndarray
    act_std: np.ndarray
    act_min: np.ndarray
    act_max: np.ndarray


#: The ``neurons`` table's activation columns, in schema order.
ACTIVATION_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(ActivationStats))
#: The ``batches`` table's statistic columns, in schema order.
BATCH_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(BatchStats) if f.name != "batch")


@dataclass(frozen=True)
class LayerStats:
    """Everything recorded about one layer's outputs in one phase of an epoch."""

    activations: ActivationStats
    classes: ClassMeans | None = None
    batches: BatchStats | None = None


@dataclass(frozen=True)
class PhaseRecord:
    """One phase (train or eval) of one epoch: per-layer output statistics and Linear input class means."""

    phase: str
    outputs: dict[str, LayerStats]
    inputs: dict[str, ClassMeans] = field(default_factory=dict)


@dataclass(frozen=True)
class LayerWeights:
    """Host copies of a layer's per-neuron parameters at an epoch's end."""

    weights: np.ndarray | None  # (neurons, inputs)
    bias: np.ndarray | None  # (neurons,)
    grad_norm: np.ndarray | None  # (neurons,)


@dataclass(frozen=True)
class EpochRecord:
    """All an epoch's writer needs, handed over whole: the writer reads no training-thread state.

    ``layers`` is the trace-wide layer order (the ``layer`` dictionary and the row order);
    ``meta`` is the ``meta.json`` to write once the epoch's parts are in place.
    """

    epoch: int
    phases: tuple[PhaseRecord, ...]
    weights: dict[str, LayerWeights]
    layers: tuple[str, ...]
    num_classes: int
    meta: dict[str, Any]
    layouts: tuple[int, ...] = ()  # each phase's row layout: an index into meta["layouts"]
    checkpoint: dict[str, Any] | None = None  # CPU copies of the model's state_dict (record_checkpoints)
    probe: Any | None = None  # the probe set's representations (probe=)
