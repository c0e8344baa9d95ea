"""On-device per-neuron accumulators for one phase of one recorded epoch.

Hooks only copy each batch's activations into a preallocated device buffer (one kernel per
layer); the reductions run once per chunk of batches, fused into a few large tensor operations
(one-hot matrix products for the per-class sums), and accumulate in float64 around a per-neuron
shift so that ``act_std`` keeps its precision over long epochs. The host sees the results once,
in :meth:`PhaseStats.finish`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

#: Device memory the chunk buffers of one phase may take before they are reduced.
DEFAULT_BUFFER_BYTES = 64 * 2**20
#: At most this many batches are buffered before a reduction.
MAX_BATCHES_PER_CHUNK = 64


@dataclass
class Moments:
    """Running float64 sums of one layer's neurons (and per class), kept on the device."""

    num_features: int
    num_classes: int
    device: torch.device
    keep_batches: bool = False
    class_only: bool = False
    shift: torch.Tensor | None = None
    count: int = 0
    sum: torch.Tensor = field(init=False)
    sum_sq: torch.Tensor = field(init=False)
    minimum: torch.Tensor = field(init=False)
    maximum: torch.Tensor = field(init=False)
    active: torch.Tensor = field(init=False)
    nan: torch.Tensor = field(init=False)
    class_count: torch.Tensor = field(init=False)
    class_sum: torch.Tensor = field(init=False)
    batches: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        f, c, dev = self.num_features, self.num_classes, self.device
        f64 = torch.float64
        self.sum = torch.zeros(f, dtype=f64, device=dev)
        self.sum_sq = torch.zeros(f, dtype=f64, device=dev)
        self.minimum = torch.full((f,), math.inf, dtype=torch.float32, device=dev)
        self.maximum = torch.full((f,), -math.inf, dtype=torch.float32, device=dev)
        self.active = torch.zeros(f, dtype=torch.int64, device=dev)
        self.nan = torch.zeros(f, dtype=torch.int64, device=dev)
        self.class_count = torch.zeros(c, dtype=f64, device=dev)
        self.class_sum = torch.zeros(c, f, dtype=f64, device=dev)

    def update(
        self,
        rows: torch.Tensor,
        one_hot: torch.Tensor | None,
        segments: list[tuple[int, int]] | None = None,
    ) -> None:
        """Fold a chunk of observations ``rows`` (n, features) into the sums.

        ``one_hot`` is the (classes, n) float32 class-membership matrix (None without labels);
        ``segments`` are (batch index, row count) runs, needed only for per-batch statistics.
        """
        if self.shift is None:
            self.shift = torch.nan_to_num(rows.mean(0), nan=0.0, posinf=0.0, neginf=0.0)
        centred = rows - self.shift
        self.count += rows.shape[0]
        if one_hot is not None:
            self.class_count += one_hot.sum(1, dtype=torch.float64)
            self.class_sum += (one_hot @ centred).to(torch.float64)
        if self.class_only:
            return
        self.sum += centred.sum(0, dtype=torch.float64)
        self.sum_sq += (centred * centred).sum(0, dtype=torch.float64)
        low, high = torch.aminmax(rows, dim=0)
        torch.minimum(self.minimum, low, out=self.minimum)
        torch.maximum(self.maximum, high, out=self.maximum)
        self.active += (rows > 0).sum(0)
        self.nan += torch.isnan(rows).sum(0)
        if self.keep_batches and segments:
            self._update_batches(rows, segments)

    def _update_batches(self, rows: torch.Tensor, segments: list[tuple[int, int]]) -> None:
        """Per-batch count, mean, std, min and max of the chunk, stacked as (5, batches, features)."""
        batch_ids = [b for b, _ in segments]
        unique = sorted(set(batch_ids))
        position = {b: i for i, b in enumerate(unique)}
        seg_index = torch.repeat_interleave(
            torch.tensor([position[b] for b in batch_ids], device=rows.device),
            torch.tensor([n for _, n in segments], device=rows.device),
        )
        nb, f = len(unique), rows.shape[1]
        index = seg_index.unsqueeze(1).expand(-1, f)
        rows64 = rows.to(torch.float64)
        count = torch.zeros(nb, f, dtype=torch.float64, device=rows.device)
        count.index_add_(0, seg_index, torch.ones_like(rows64))
        total = torch.zeros_like(count).index_add_(0, seg_index, rows64)
        mean = total / count
        dev = rows64 - mean[seg_index]
        var = torch.zeros_like(count).index_add_(0, seg_index, dev * dev) / count
        low = torch.full_like(count, math.inf).scatter_reduce(0, index, rows64, "amin")
        high = torch.full_like(count, -math.inf).scatter_reduce(0, index, rows64, "amax")
        stacked = torch.stack([count, mean, var.sqrt(), low, high])
        self.batches.append((unique[0], stacked))

    def result(self) -> dict[str, np.ndarray]:
        """The epoch's statistics as host numpy arrays (one device-to-host transfer per tensor)."""
        n = self.count
        shift = self.shift.to(torch.float64) if self.shift is not None else 0.0
        out: dict[str, np.ndarray] = {}
        if self.num_classes:
            counts = self.class_count.unsqueeze(1)
            class_mean = torch.where(counts > 0, self.class_sum / counts.clamp_min(1) + shift, torch.nan)
            out["class_count"] = self.class_count.to(torch.int64).cpu().numpy()
            out["class_mean"] = class_mean.cpu().numpy()
        if self.class_only:
            return out
        mean_centred = self.sum / n
        var = (self.sum_sq / n - mean_centred * mean_centred).clamp_min(0.0)
        out |= {
            "act_count": np.full(self.num_features, n, dtype=np.int64),
            "act_mean": (mean_centred + shift).cpu().numpy(),
            "act_std": var.sqrt().cpu().numpy(),
            "act_min": self.minimum.cpu().numpy(),
            "act_max": self.maximum.cpu().numpy(),
            "act_active_frac": (self.active.to(torch.float64) / n).cpu().numpy(),
            "act_nan_count": self.nan.cpu().numpy(),
        }
        if self.batches:
            out["batch_first"] = np.array([b for b, _ in self.batches], dtype=np.int64)
            out["batches"] = torch.cat([t for _, t in self.batches], dim=1).cpu().numpy()
        return out


@dataclass
class _Buffer:
    """A layer's preallocated rows buffer and the (batch, rows) runs it holds."""

    rows: torch.Tensor
    fill: int = 0
    segments: list[tuple[int, int]] = field(default_factory=list)


class PhaseStats:
    """Accumulates every layer of one phase (train or eval) of one epoch, sharing one label buffer.

    Call :meth:`start_batch` once per forward pass, :meth:`add` from each layer's hook, and
    :meth:`finish` at the end of the epoch.
    """

    def __init__(
        self,
        num_classes: int,
        keep_batches: bool = False,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
    ) -> None:
        self.num_classes = num_classes
        self.keep_batches = keep_batches
        self.buffer_bytes = buffer_bytes
        self.moments: dict[str, Moments] = {}
        self.inputs: dict[str, Moments] = {}
        self._buffers: dict[tuple[str, bool], _Buffer] = {}
        self._labels: torch.Tensor | None = None
        self._label_fill = 0
        self._label_runs: dict[int, tuple[int, int]] = {}
        self._pending_labels: torch.Tensor | None = None
        self._batch = -1
        self._chunk_batches = 0
        self._max_chunk_batches = MAX_BATCHES_PER_CHUNK
        self._sized = False
        self.invalid_labels: torch.Tensor | None = None

    # -- per batch -------------------------------------------------------------------------
    def start_batch(self, labels: torch.Tensor | None) -> None:
        """Begin a forward pass; ``labels`` (batch,) int64 on any device, or None."""
        if self._chunk_batches and not self._sized:
            self._size_chunks()
        if self._chunk_batches >= self._max_chunk_batches:
            self.flush()
        self._batch += 1
        self._chunk_batches += 1
        self._pending_labels = labels

    def batch_size_of_labels(self) -> int | None:
        """The number of labels given for the current batch, or None."""
        return None if self._pending_labels is None else self._pending_labels.shape[0]

    def add(self, layer: str, rows: torch.Tensor, *, inputs: bool = False) -> None:
        """Copy one batch of a layer's observations (n, features) into its buffer."""
        key = (layer, inputs)
        buf = self._buffers.get(key)
        n = rows.shape[0]
        if buf is None:
            buf = self._new_buffer(key, rows)
        elif buf.fill + n > buf.rows.shape[0]:
            self._grow(buf, buf.fill + n)
        buf.rows[buf.fill : buf.fill + n].copy_(rows)
        self._note_rows(buf, n)

    def add_mean(self, layer: str, values: torch.Tensor, dims: tuple[int, ...]) -> None:
        """Like :meth:`add` for the mean of ``values`` over ``dims`` (convolution channels)."""
        n, f = values.shape[0], values.shape[1]
        key = (layer, False)
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._new_buffer(key, values.new_empty((n, f), dtype=torch.float32))
        elif buf.fill + n > buf.rows.shape[0]:
            self._grow(buf, buf.fill + n)
        target = buf.rows[buf.fill : buf.fill + n]
        if values.dtype == torch.float32:
            torch.mean(values, dim=dims, out=target)
        else:
            target.copy_(values.mean(dim=dims))
        self._note_rows(buf, n)

    def _note_rows(self, buf: _Buffer, n: int) -> None:
        buf.fill += n
        if buf.segments and buf.segments[-1][0] == self._batch:
            b, m = buf.segments[-1]
            buf.segments[-1] = (b, m + n)
        else:
            buf.segments.append((self._batch, n))
        if self._pending_labels is not None:
            self._store_labels(buf.rows.device)

    def _store_labels(self, device: torch.device) -> None:
        labels, self._pending_labels = self._pending_labels, None
        n = labels.shape[0]
        if self._labels is None or self._labels.device != device:
            self._labels = torch.empty(max(4 * n, 1024), dtype=torch.int64, device=device)
            self._label_fill = 0
        if self._label_fill + n > self._labels.shape[0]:
            grown = torch.empty(2 * (self._label_fill + n), dtype=torch.int64, device=device)
            grown[: self._label_fill].copy_(self._labels[: self._label_fill])
            self._labels = grown
        self._labels[self._label_fill : self._label_fill + n].copy_(labels, non_blocking=True)
        self._label_runs[self._batch] = (self._label_fill, n)
        self._label_fill += n

    def _new_buffer(self, key: tuple[str, bool], rows: torch.Tensor) -> _Buffer:
        n, f = rows.shape
        capacity = n * (self._max_chunk_batches if self._sized else 4)
        buf = _Buffer(torch.empty(max(capacity, n), f, dtype=torch.float32, device=rows.device))
        self._buffers[key] = buf
        layer, inputs = key
        table = self.inputs if inputs else self.moments
        if layer not in table:
            keep = self.keep_batches and not inputs
            table[layer] = Moments(f, self.num_classes, rows.device, keep, class_only=inputs)
        return buf

    def _grow(self, buf: _Buffer, needed: int) -> None:
        grown = buf.rows.new_empty((max(needed, 2 * buf.rows.shape[0]), buf.rows.shape[1]))
        grown[: buf.fill].copy_(buf.rows[: buf.fill])
        buf.rows = grown

    def _size_chunks(self) -> None:
        """After the first batch: buffer as many batches as the memory budget allows."""
        per_batch = sum(b.fill * b.rows.shape[1] * 4 for b in self._buffers.values())
        k = self.buffer_bytes // max(per_batch, 1)
        self._max_chunk_batches = int(max(1, min(MAX_BATCHES_PER_CHUNK, k)))
        self._sized = True

    # -- reductions --------------------------------------------------------------------------
    def flush(self) -> None:
        """Reduce every buffered chunk into the running sums and empty the buffers."""
        one_hots: dict[tuple, torch.Tensor] = {}
        for (layer, inputs), buf in self._buffers.items():
            if buf.fill == 0:
                continue
            rows = buf.rows[: buf.fill]
            one_hot = None
            if self.num_classes:
                runs = tuple(buf.segments)
                if runs not in one_hots:
                    one_hots[runs] = self._one_hot(buf.segments, rows.device)
                one_hot = one_hots[runs]
            moments = self.inputs[layer] if inputs else self.moments[layer]
            moments.update(rows, one_hot, buf.segments)
            buf.fill = 0
            buf.segments = []
        if self._label_fill:
            self._count_invalid_labels(self._labels[: self._label_fill])
        self._label_fill = 0
        self._label_runs = {}
        self._chunk_batches = 0

    def _one_hot(self, segments: list[tuple[int, int]], device: torch.device) -> torch.Tensor | None:
        """The (classes, rows) membership matrix of a chunk; rows without labels belong to none."""
        parts = []
        for batch, n in segments:
            run = self._label_runs.get(batch)
            if run is None:
                parts.append(torch.full((n,), -1, dtype=torch.int64, device=device))
                continue
            start, size = run
            labels = self._labels[start : start + size]
            parts.append(labels if n == size else labels.repeat_interleave(n // size))
        labels = parts[0] if len(parts) == 1 else torch.cat(parts)
        classes = torch.arange(self.num_classes, device=device).unsqueeze(1)
        return (classes == labels.unsqueeze(0)).to(torch.float32)

    def _count_invalid_labels(self, labels: torch.Tensor) -> None:
        """Count labels outside [0, num_classes) on the device; checked once at the epoch's end."""
        bad = ((labels < 0) | (labels >= self.num_classes)).sum()
        self.invalid_labels = bad if self.invalid_labels is None else self.invalid_labels + bad

    def finish(self) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
        """Flush and return (per-layer output statistics, per-layer input class means) on the host."""
        self.flush()
        outputs = {layer: m.result() for layer, m in self.moments.items()}
        inputs = {layer: m.result() for layer, m in self.inputs.items()}
        return outputs, inputs
