"""Where each layer's rows sit inside an epoch's part, both ways (no torch).

Every part orders its rows by layer (in ``meta.json`` order) then neuron (``classes``: then
class; ``inputs``: by feature then class). The recorder calls :func:`assign_offsets` to write
each layer's ``row_offset`` / ``input_offset`` into ``meta.json``; the reader calls
:meth:`RowLayout.plan` to turn a signature's layers and neurons into the row ranges to read. One
module owns the layout, so the writer and the reader cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow.compute as pc

from .signature import IndexSelection


@dataclass(frozen=True)
class ReadPlan:
    """What to read from each epoch's part of a table.

    ``row_ranges`` are half-open row ranges (None: the whole part); they are trusted only when
    the part holds ``expected_rows`` rows, otherwise ``fallback`` (an Arrow filter) selects the
    rows instead, e.g. when a layer produced no rows in some epoch.
    """

    row_ranges: list[tuple[int, int]] | None
    expected_rows: int | None
    fallback: pc.Expression | None


def assign_offsets(layers: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of the layers' ``meta.json`` entries with ``row_offset`` (and, for layers with
    recorded inputs, ``input_offset``) set from their order: the rows :mod:`tables` writes."""
    out, offset, input_offset = [], 0, 0
    for layer in layers:
        info = dict(layer, row_offset=offset)
        offset += info["neurons"]
        if info.get("in_features") is not None:
            info["input_offset"] = input_offset
            input_offset += info["in_features"]
        out.append(info)
    return out


class RowLayout:
    """The row layout of a trace's parts, read from its ``meta.json`` layer entries."""

    def __init__(self, layers: Sequence[dict[str, Any]], num_classes: int | None) -> None:
        self.layers = {info["key"]: info for info in layers}
        self.num_classes = num_classes or 0
        self.num_neurons = sum(info["neurons"] for info in layers)
        self.num_inputs = sum(info["in_features"] for info in layers if info.get("input_offset") is not None)

    def neuron_runs(self, layer: str, neurons: IndexSelection | None) -> list[tuple[int, int]]:
        """The half-open neuron runs of ``layer`` that a selection keeps (a range is not enumerated)."""
        size = self.layers[layer]["neurons"]
        if neurons is None or neurons.is_all:
            return [(0, size)] if size else []
        if neurons.values is None:
            start, stop = neurons.start, min(neurons.stop, size)
            return [(start, stop)] if start < stop else []
        return _runs([v for v in neurons.values if v < size])

    def neuron_ids(self, layers: Sequence[str], neurons: IndexSelection) -> list[int]:
        """Every neuron id a selection keeps in any of ``layers``."""
        runs = [r for k in layers for r in self.neuron_runs(k, neurons)]
        return sorted({i for a, b in runs for i in range(a, b)})

    def plan(self, table: str, layers: Sequence[str], neurons: IndexSelection | None) -> ReadPlan:
        """The rows of (``layers``, ``neurons``) in each part of ``table``.

        Raises ``KeyError`` listing the layers' neuron ids when the selection names none of them.
        """
        filt = pc.field("layer").isin(list(layers))
        narrowed = neurons is not None and not neurons.is_all
        if table == "batches":  # rows are per batch: no fixed layout
            if narrowed:
                filt = filt & pc.field("neuron").isin(self.neuron_ids(layers, neurons))
            return ReadPlan(None, None, filt)
        if table == "inputs":
            return self._input_plan(layers)
        per_row = self.num_classes if table == "classes" else 1
        ranges = []
        for key in layers:
            base = self.layers[key]["row_offset"]
            ranges += [
                ((base + a) * per_row, (base + b) * per_row) for a, b in self.neuron_runs(key, neurons)
            ]
        if not ranges:
            sizes = ", ".join(f"{k}: n_0 … n_{self.layers[k]['neurons'] - 1}" for k in layers)
            raise KeyError(f"neuron {neurons} not in {', '.join(layers)}; neurons: {sizes}")
        if narrowed:
            filt = filt & pc.field("neuron").isin(self.neuron_ids(layers, neurons))
        return ReadPlan(ranges, self.num_neurons * per_row, filt)

    def _input_plan(self, layers: Sequence[str]) -> ReadPlan:
        with_inputs = [k for k in layers if self.layers[k].get("input_offset") is not None]
        c = self.num_classes
        ranges = []
        for key in with_inputs:
            info = self.layers[key]
            start = info["input_offset"] * c
            ranges.append((start, start + info["in_features"] * c))
        return ReadPlan(ranges, self.num_inputs * c, pc.field("layer").isin(with_inputs))


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted ints as half-open (start, stop) pairs."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs
