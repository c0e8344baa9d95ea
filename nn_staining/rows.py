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
    """What to read from one epoch's part of a table.

    ``row_ranges`` are half-open row ranges (None: the whole part, filtered by ``fallback``);
    the part must hold exactly ``expected_rows`` rows (None: unknown), or it is damaged.
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
    """The row layout of one epoch's parts: the layers present (all of ``layers`` by default, or
    those a layout in ``meta.json`` lists), in meta order, with offsets computed from their sizes."""

    def __init__(
        self,
        layers: Sequence[dict[str, Any]],
        num_classes: int | None,
        present: Sequence[str] | None = None,
        present_inputs: Sequence[str] | None = None,
    ) -> None:
        keep = None if present is None else set(present)
        keep_inputs = None if present_inputs is None else set(present_inputs)
        self.layers = {info["key"]: info for info in layers if keep is None or info["key"] in keep}
        self.num_classes = num_classes or 0
        self.offsets: dict[str, int] = {}
        self.input_offsets: dict[str, int] = {}
        offset = input_offset = 0
        for key, info in self.layers.items():
            self.offsets[key] = offset
            offset += info["neurons"]
        for info in layers:
            in_features = info.get("in_features")
            if in_features is None or not (
                info.get("input_offset") is not None or present_inputs is not None
            ):
                continue
            if keep_inputs is not None and info["key"] not in keep_inputs:
                continue
            self.input_offsets[info["key"]] = input_offset
            input_offset += in_features
        self.num_neurons, self.num_inputs = offset, input_offset
        self._sizes = {info["key"]: info for info in layers}

    def rows(self, table: str) -> int | None:
        """The rows a part of ``table`` holds under this layout (None for ``batches``: per batch)."""
        c = self.num_classes
        return {
            "neurons": self.num_neurons,
            "classes": self.num_neurons * c,
            "inputs": self.num_inputs * c,
        }.get(table)

    def neuron_runs(self, layer: str, neurons: IndexSelection | None) -> list[tuple[int, int]]:
        """The half-open neuron runs of ``layer`` that a selection keeps (a range is not enumerated)."""
        size = self._sizes[layer]["neurons"]
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

    def check_selection(self, layers: Sequence[str], neurons: IndexSelection | None) -> None:
        """``KeyError`` listing the layers' neuron ids when the selection names none of them."""
        if not any(self.neuron_runs(k, neurons) for k in layers):
            sizes = ", ".join(f"{k}: n_0 … n_{self._sizes[k]['neurons'] - 1}" for k in layers)
            raise KeyError(f"neuron {neurons} not in {', '.join(layers)}; neurons: {sizes}")

    def plan(self, table: str, layers: Sequence[str], neurons: IndexSelection | None) -> ReadPlan | None:
        """The rows of (``layers``, ``neurons``) in a part of ``table`` under this layout; None when
        none of ``layers`` is in it."""
        if table == "batches":  # rows are per batch: no fixed layout, a filter selects them
            filt = pc.field("layer").isin(list(layers))
            if neurons is not None and not neurons.is_all:
                filt = filt & pc.field("neuron").isin(self.neuron_ids(layers, neurons))
            return ReadPlan(None, None, filt)
        ranges = []
        if table == "inputs":
            c = self.num_classes
            for key in layers:
                if key in self.input_offsets:
                    start = self.input_offsets[key] * c
                    ranges.append((start, start + self._sizes[key]["in_features"] * c))
        else:
            per_row = self.num_classes if table == "classes" else 1
            for key in layers:
                if key in self.offsets:
                    base = self.offsets[key]
                    ranges += [
                        ((base + a) * per_row, (base + b) * per_row)
                        for a, b in self.neuron_runs(key, neurons)
                    ]
        if not ranges:
            return None
        return ReadPlan(ranges, self.rows(table), None)


def _runs(values: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted ints as half-open (start, stop) pairs."""
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0], v + 1)
        else:
            runs.append((v, v + 1))
    return runs
