"""On-device per-neuron accumulators for one phase of one recorded epoch.

Hooks only copy each batch's activations into a preallocated device buffer (one kernel per
layer). The buffers of a run of batches form a :class:`Chunk`; a full chunk is reduced and folded
into float64 running sums taken around a per-neuron shift, so ``act_std`` keeps its precision
over long epochs: on the CPU by a fused C++ kernel that reads each value once
(:mod:`nn_staining.kernels`), elsewhere, or where it cannot be built, by a few large tensor
operations (``index_add_`` gives every per-class sum at once). Reductions run on the training thread (asynchronous kernels on a GPU; on the
CPU a second thread of tensor work would fight the training's own OpenMP threads). Buffers are
allocated once and reused every epoch, so memory stays flat. The host sees the statistics once
per epoch, every layer's in one buffer and one copy (:func:`host_statistics`), finished there by a
few numpy operations over all layers at once; a large epoch's CPU sums are finished where they lie
instead, layer by layer, since at width a copy doubles the epoch's memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch

from . import kernels
from .records import ActivationStats, BatchStats, ClassMeans, LayerStats, PhaseRecord

#: Device memory one chunk's buffers may take before they are reduced.
DEFAULT_CHUNK_BYTES = 32 * 2**20
#: At most this many batches are buffered before a reduction.
MAX_BATCHES_PER_CHUNK = 64


class Segment(NamedTuple):
    """One batch's run of rows in a layer's buffer: its batch index, its rows and its samples
    (the size of the layer output's batch dimension, which labels and masks must match)."""

    batch: int
    rows: int
    samples: int


class Batch:
    """One forward pass of a phase: its index, the labels and mask given for it, and whether any of
    its rows are buffered yet. A pass writes into the chunk current when each of its layers fires
    (another thread's pass may end a chunk in the middle of it), so its labels and mask are stored
    beside its rows in every chunk it writes into."""

    __slots__ = ("index", "labels", "mask", "placed", "row_labels")

    def __init__(self, index: int, labels: torch.Tensor | None, mask: torch.Tensor | None) -> None:
        self.index = index
        self.labels = labels
        self.mask = mask
        self.placed = False
        self.row_labels: dict[tuple[int, int], torch.Tensor] = {}  # (rows, samples) -> folded labels


@dataclass(frozen=True)
class LabelSummary:
    """Every label given in a phase of an epoch: how many lie at or above ``num_classes``, the range."""

    out_of_range: int
    low: int
    high: int


@dataclass
class Moments:
    """Running sums of one layer's neurons (and per class), kept on the device.

    Sums are of ``x - shift`` (``shift`` is the neuron's mean over the first chunk), taken in
    float32 within a chunk and accumulated across chunks in float64:
    ``mean = shift + S1 / n`` and ``std = sqrt(S2 / n - (S1 / n)^2)`` (population). A neuron whose
    chunk strays more than 2^30 from its shift is summed divided by a power of two (exact), so its
    squares cannot overflow float32 (they would from |x - shift| ≈ 1.8e19). The accumulator tensors
    are only ever updated in place (:meth:`fold_batch` keeps them as the kernel's arguments).
    """

    num_features: int
    num_classes: int
    device: torch.device
    keep_batches: bool = False
    class_only: bool = False
    shift: torch.Tensor | None = None
    count: int = 0
    kept: torch.Tensor | None = None  # observations of masked chunks, counted on the device
    sum: torch.Tensor = field(init=False)
    sum_sq: torch.Tensor = field(init=False)
    minimum: torch.Tensor = field(init=False)
    maximum: torch.Tensor = field(init=False)
    active: torch.Tensor = field(init=False)
    nonfinite: torch.Tensor = field(init=False)
    class_count: torch.Tensor = field(init=False)
    class_sum: torch.Tensor = field(init=False)
    batches: list[tuple[list[int], torch.Tensor]] = field(default_factory=list)
    _accumulators: tuple | None = field(default=None, init=False, repr=False)  # the kernel's argument tail
    spent: bool = field(default=False, init=False)  # finished in place: the sums hold statistics now

    def __post_init__(self) -> None:
        f, c, dev = self.num_features, self.num_classes, self.device
        sums = torch.zeros(4 * f + c + c * f, dtype=torch.float64, device=dev)  # one allocation
        self.sum, self.sum_sq, self.active, self.nonfinite, self.class_count, class_sum = sums.split(
            [f, f, f, f, c, c * f]
        )
        self.class_sum = class_sum.view(c, f)
        self.minimum = torch.full((f,), math.inf, dtype=torch.float32, device=dev)
        self.maximum = torch.full((f,), -math.inf, dtype=torch.float32, device=dev)

    def update(
        self,
        rows: torch.Tensor,
        labels: torch.Tensor | None = None,
        segments: list[Segment] | None = None,
        scratch: Scratch | None = None,
        dropped: torch.Tensor | None = None,
    ) -> None:
        """Fold a chunk of observations ``rows`` (n, features) into the sums.

        ``labels`` (n,) int64 gives each row's class, ``num_classes`` for rows without a valid
        label (None without labels); ``segments`` are the chunk's per-batch runs (for per-batch
        rows); ``dropped`` (n, 1) bool marks rows that are not observations (masked positions);
        ``scratch`` holds reusable temporaries (fresh multi-MB allocations cost page faults).
        """
        self.check_unspent()
        if self.shift is None:
            self.shift = torch.nan_to_num(rows.mean(0), nan=0.0, posinf=0.0, neginf=0.0)
        ops = kernels.fused_ops(rows)
        if ops is not None:
            self._fold_fused(ops, rows, labels, segments, dropped)
            return
        scratch = scratch or Scratch()
        centred = scratch.take(0, rows.shape, rows.device)
        scale = None
        if self.class_only:  # per-class sums alone overflow float32 only past ~1e33
            torch.sub(rows, self.shift, out=centred)
        else:
            low = rows if dropped is None else rows.masked_fill(dropped, math.inf)
            high = rows if dropped is None else rows.masked_fill(dropped, -math.inf)
            chunk_min, chunk_max = low.amin(0), high.amax(0)
            torch.minimum(self.minimum, chunk_min, out=self.minimum)
            torch.maximum(self.maximum, chunk_max, out=self.maximum)
            scale = _chunk_scale(chunk_min, chunk_max, self.shift)
            inverse = scale.reciprocal().to(torch.float32)
            torch.addcmul(-(self.shift * inverse), rows, inverse, out=centred)  # (x - shift) / scale
        self._count(rows, dropped)
        if dropped is not None:
            centred.masked_fill_(dropped, 0.0)
            if labels is not None:
                labels = labels.masked_fill(dropped[:, 0], self.num_classes)
        total = self._class_sums(centred, labels, scale) if labels is not None else None
        if self.class_only:
            return
        self.sum += (centred.sum(0) if total is None else total) * scale
        work = scratch.take(1, rows.shape, rows.device)
        self.sum_sq += torch.mul(centred, centred, out=work).sum(0) * (scale * scale)
        active = torch.gt(rows, 0, out=work)  # a float 0/1 mask sums faster than a bool one
        self.active += (active if dropped is None else active.masked_fill_(dropped, 0.0)).sum(0)
        if rows.is_cuda or dropped is not None or not bool(torch.isfinite(self.sum).all()):
            # on the CPU the NaN/Inf count is taken only once the sums show a non-finite value
            bad = ~torch.isfinite(rows)
            self.nonfinite += (bad if dropped is None else bad & ~dropped).sum(0)
        if self.keep_batches and segments:
            self._update_batches(rows, segments)

    def fold_batch(self, ops: Any, rows: torch.Tensor, labels: torch.Tensor | None) -> None:
        """:meth:`update` of one labelled, unmasked batch without per-batch rows by a kernel that
        gives them (the C++ one: ``ops.per_batch``), with the kernel's arguments built once: the
        hook's hot path."""
        if ops is None or self.shift is None or self.keep_batches or not ops.per_batch:
            self.update(rows, labels)
            return
        self.count += rows.shape[0]
        if self.class_only and labels is None:
            return
        no_runs = (None, None, None)  # starts, lengths, offsets: no per-batch rows
        ops.fold_chunk(rows.contiguous(), self.shift, labels, None, *self._kernel_accumulators(), *no_runs)

    def _kernel_accumulators(self) -> tuple:
        """The kernels' arguments after rows, shift, labels and dropped rows: the class count, whether
        only class sums are wanted, and the accumulators (built once; they are updated in place)."""
        if self._accumulators is None:
            self._accumulators = (
                self.num_classes,
                self.class_only,
                self.sum,
                self.sum_sq,
                self.minimum,
                self.maximum,
                self.active,
                self.nonfinite,
                self.class_count,
                self.class_sum,
            )
        return self._accumulators

    def _fold_fused(
        self,
        ops: Any,
        rows: torch.Tensor,
        labels: torch.Tensor | None,
        segments: list[Segment] | None,
        dropped: torch.Tensor | None,
    ) -> None:
        """:meth:`update` by a fused kernel (``nn_staining/kernels``: C++ on the CPU, Triton on CUDA):
        one pass over ``rows``. A kernel without per-batch rows leaves them to torch ops."""
        self._count(rows, dropped)
        if self.class_only and labels is None:
            return
        batch_rows = self.keep_batches and segments and not self.class_only
        if batch_rows and not ops.per_batch:
            self._update_batches(rows, segments)
            batch_rows = False
        runs = _batch_runs(segments) if batch_rows else None
        per_batch = ops.fold_chunk(
            rows.contiguous(),
            self.shift.contiguous(),
            None if labels is None else labels.contiguous(),
            None if dropped is None else dropped.reshape(-1).contiguous(),
            *self._kernel_accumulators(),
            *(runs[1:] if runs else (None, None, None)),
        )
        if runs:
            self.batches.append((runs[0], per_batch.reshape(-1)))

    def _count(self, rows: torch.Tensor, dropped: torch.Tensor | None) -> None:
        """Add the chunk's observations: its rows, or (counted on the device) those not ``dropped``."""
        if dropped is None:
            self.count += rows.shape[0]
        else:
            kept = (~dropped).sum(0, dtype=torch.float64)  # (1,): staged for the host as it is
            self.kept = kept if self.kept is None else self.kept + kept

    def _class_sums(
        self, centred: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | None
    ) -> torch.Tensor:
        """Add per-class sums (of ``centred × scale``) and counts; returns the chunk's total of
        ``centred`` (all rows, labelled or not).

        ``index_add_`` on every device: its output size is fixed (no sync), a NaN row spoils only
        its own class, and no (classes × rows) one-hot matrix is built.
        """
        c = self.num_classes
        sums = centred.new_zeros(c + 1, centred.shape[1]).index_add_(0, labels, centred)
        counts = centred.new_zeros(c + 1).index_add_(0, labels, centred.new_ones(labels.shape[0]))
        self.class_sum += sums[:c] if scale is None else sums[:c] * scale
        self.class_count += counts[:c]
        return sums.sum(0)

    def _update_batches(self, rows: torch.Tensor, segments: list[Segment]) -> None:
        """Per-batch count, mean, std, min and max of the chunk, stacked as (5, batches, features)."""
        batch_ids = [s.batch for s in segments]
        unique = sorted(set(batch_ids))
        position = {b: i for i, b in enumerate(unique)}
        host_index = torch.repeat_interleave(
            torch.tensor([position[b] for b in batch_ids]), torch.tensor([s.rows for s in segments])
        )
        seg_index = host_index.to(rows.device, non_blocking=True)
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
        self.batches.append((unique, torch.stack([count, mean, var.sqrt(), low, high]).view(-1)))

    def class_means(self) -> ClassMeans | None:
        """Per-class counts and means on the host (None without classes)."""
        self.check_unspent()
        return host_statistics({}, {"": self})[1].get("")

    def check_unspent(self) -> None:
        """Refuse to read or fold sums that were finished in place (they hold statistics now)."""
        if self.spent:
            raise RuntimeError("these running sums were finished in place: they hold statistics now")

    def recentre(self, shift: torch.Tensor) -> None:
        """Express the sums around ``shift`` instead of the current one, exactly:
        with d = old − new, S2' = S2 + 2d·S1 + n·d², S1' = S1 + n·d, per-class sums + n_c·d."""
        shift = shift.to(self.class_sum.device, torch.float32)
        if self.shift is not None:
            d = self.shift.to(torch.float64) - shift.to(torch.float64)
            self.class_sum += self.class_count.unsqueeze(1) * d
            if not self.class_only:
                n = float(self.observations())
                self.sum_sq += 2 * d * self.sum + n * d * d
                self.sum += n * d
        self.shift = shift

    def nbytes(self) -> int:
        """The size of the running sums and of the per-batch rows kept so far: about what
        ``end_epoch`` copies to the host."""
        f, c = self.num_features, self.num_classes
        kept = sum(rows.numel() * rows.element_size() for _, rows in self.batches)
        return 8 * (4 * f + c + c * f) + 4 * 2 * f + kept

    def observations(self) -> int:
        """How many observations (rows not masked out) were folded in."""
        return self.count + (0 if self.kept is None else round(float(self.kept)))

    def result(self) -> LayerStats:
        """The epoch's statistics as host numpy arrays (one device-to-host transfer).

        A layer with no observation (only empty batches) has count 0 and NaN statistics."""
        self.check_unspent()
        return host_statistics({"": self}, {})[0][""]


def host_statistics(
    outputs: dict[str, Moments],
    inputs: dict[str, Moments],
    extra: torch.Tensor | None = None,
    in_place: bool = False,
) -> tuple[dict[str, LayerStats], dict[str, ClassMeans], np.ndarray | None]:
    """Every layer's statistics on the host from one device-to-host copy (with ``extra``, a float64
    vector, beside them): outputs' :class:`LayerStats`, inputs' :class:`ClassMeans`, ``extra``.

    The sums are queued statistic by statistic, so each statistic of all layers lies in one run of
    the host buffer and is finished for all of them by one numpy operation; each layer's arrays are
    views of those (a few large operations per phase, not a few small ones per layer).

    With ``in_place`` and every sum on the CPU, each layer's statistics are instead finished in its
    own running sums, layer by layer, with no copy: the sums must not be used again (an epoch's
    last use). At width the copy is the epoch's largest array, as large as the sums themselves.
    """
    outs, ins = list(outputs.values()), list(inputs.values())
    if in_place and _on_the_cpu([*outs, *ins]):
        groups = [([m], [m], _own_sums(m, output=True)) for m in outs]
        groups += [([], [m], _own_sums(m, output=False)) for m in ins]
        finished = [_finish(o, c, sums) for o, c, sums in groups]
        stats = [s for layers, _, _ in finished for s in layers]
        means = [m for _, group_means, _ in finished for m in group_means]
        batches = [b for _, _, group_batches in finished for b in group_batches]
        seen = None if extra is None else extra.to("cpu", torch.float64).numpy()
    else:
        sums, seen = _copied_sums(outs, ins, extra)
        stats, means, batches = _finish(outs, [*outs, *ins], sums)
    layers = {key: LayerStats(a, c, b) for key, a, c, b in zip(outputs, stats, means, batches)}
    return layers, dict(zip(inputs, means[len(outs) :])), seen


def _on_the_cpu(moments: list[Moments]) -> bool:
    return all(m.sum.device.type == "cpu" for m in moments)


class _Sums(NamedTuple):
    """A group of layers' sums on the host, each statistic of all of them in one array
    (``values[name]``): the layers' shifts, observation counts and per-batch (ids, rows) blocks."""

    values: dict[str, np.ndarray]
    shift: np.ndarray
    counts: list[int]
    batches: list[list[tuple[list[int], np.ndarray]]]


_SUM_NAMES = ("sum", "sum_sq", "active", "nonfinite", "minimum", "maximum")


def _copied_sums(
    outs: list[Moments], ins: list[Moments], extra: torch.Tensor | None
) -> tuple[_Sums, np.ndarray | None]:
    """All layers' sums (and ``extra``) brought to the host by one :class:`HostTransfer`."""
    classed = [*outs, *ins]
    transfer = HostTransfer()
    runs = {name: [transfer.add(getattr(m, name)) for m in outs] for name in _SUM_NAMES}
    kept = [None if m.kept is None else transfer.add(m.kept) for m in outs]
    shifts = [None if m.shift is None else transfer.add(m.shift) for m in classed]
    if classed and classed[0].num_classes:
        runs["class_count"] = [transfer.add(m.class_count) for m in classed]
        runs["class_sum"] = [transfer.add_columns([m.class_sum for m in classed])]
    batches = [[(ids, transfer.add(t)) for ids, t in m.batches] for m in outs]
    extra_at = None if extra is None else transfer.add(extra)
    host = transfer.run()
    widths = [m.num_features for m in classed]
    shift = host.joined(shifts) if all(p is not None for p in shifts) else _with_zeros(host, shifts, widths)
    sums = _Sums(
        {name: host.joined(places) for name, places in runs.items()},
        shift,
        [m.count + (0 if k is None else round(float(host[k][0]))) for m, k in zip(outs, kept)],
        [[(ids, host[at]) for ids, at in b] for b in batches],
    )
    return sums, None if extra_at is None else host[extra_at]


def _own_sums(m: Moments, output: bool) -> _Sums:
    """One layer's sums as numpy views of its own CPU tensors (finishing them overwrites the sums);
    an input's (``output`` False) only its class sums."""
    values = {name: getattr(m, name).numpy() for name in (_SUM_NAMES if output else ())}
    if m.num_classes:
        values["class_count"] = m.class_count.numpy()
        values["class_sum"] = m.class_sum.numpy().reshape(-1)
    shift = np.zeros(m.num_features) if m.shift is None else m.shift.numpy().astype(np.float64)
    kept = 0 if m.kept is None else round(float(m.kept))
    batches = [(ids, t.numpy()) for ids, t in m.batches]
    return _Sums(values, shift, [m.count + kept], [batches])


def _finish(
    outs: list[Moments], classed: list[Moments], sums: _Sums
) -> tuple[list[ActivationStats], list[ClassMeans | None], list[BatchStats | None]]:
    """A group's statistics from its sums: outputs' activations and per-batch rows, and the class
    means of ``classed`` (the outputs, then inputs), all in place in ``sums``' arrays."""
    num_classes = classed[0].num_classes if classed else 0
    widths = np.array([m.num_features for m in classed], dtype=np.int64)
    counts = np.array(sums.counts, dtype=np.int64)
    stats = _activations(sums.values, counts, widths[: len(outs)], sums.shift) if outs else []
    no_classes: list[ClassMeans | None] = [None] * len(classed)
    means = _class_means(sums.values, num_classes, widths, sums.shift) if num_classes else no_classes
    batches = [_host_batches(b, m.num_features) for m, b in zip(outs, sums.batches)]
    return stats, means, batches


def _activations(
    values: dict[str, np.ndarray], n: np.ndarray, widths: np.ndarray, shift: np.ndarray
) -> list[ActivationStats]:
    """Each layer's :class:`ActivationStats` (views), from all layers' sums finished at once:
    ``mean = shift + S1 / n``, ``std = sqrt(max(S2 / n - (S1 / n)^2, 0))``, NaN where ``n`` is 0."""
    count = np.repeat(n, widths)
    with np.errstate(divide="ignore", invalid="ignore"):  # in place in the host buffer: at width it is large
        mean_centred = np.divide(values["sum"], count, out=values["sum"])  # 0 / 0: NaN without observations
        var = np.divide(values["sum_sq"], count, out=values["sum_sq"])
        var -= mean_centred * mean_centred
        np.maximum(var, 0.0, out=var)
        # torch's sqrt, as before on the CPU (numpy's differs by an ulp on ~1% of values)
        std = torch.from_numpy(var).sqrt_().numpy()
        mean = np.add(mean_centred, shift[: len(count)], out=mean_centred)
        active = np.divide(values["active"], count, out=values["active"])
    nonfinite = np.round(values["nonfinite"]).astype(np.int64)
    # finished in place the sums' own float32 minimum and maximum, not a copy
    low, high = (values[name].astype(np.float32, copy=False) for name in ("minimum", "maximum"))
    if not n.all():
        low[count == 0] = high[count == 0] = np.nan
    ends = np.cumsum(widths)
    return [
        ActivationStats(
            *(column[end - f : end] for column in (count, mean, std, low, high, active, nonfinite))
        )
        for f, end in zip(widths.tolist(), ends.tolist())
    ]


def _class_means(
    values: dict[str, np.ndarray], c: int, widths: np.ndarray, shift: np.ndarray
) -> list[ClassMeans]:
    """Each layer's :class:`ClassMeans` (views), all layers' ``shift + S_c / n_c`` (NaN where
    ``n_c`` is 0): the sums arrive as one (classes, all units) matrix of the host buffer, which
    becomes the means in place (at width, a copy of it would be the epoch's largest allocation)."""
    counts = values["class_count"].reshape(len(widths), c)  # (layers, classes)
    mean = values["class_sum"].reshape(c, -1)
    ends = np.cumsum(widths).tolist()
    with np.errstate(divide="ignore", invalid="ignore"):
        for i, (f, end) in enumerate(zip(widths.tolist(), ends)):
            block = mean[:, end - f : end]
            block /= counts[i][:, None]  # 0 / 0 is NaN: a class without rows
            block[counts[i] == 0] = np.nan  # also where its sums are not 0 (never, but exact)
    mean += shift  # NaN stays NaN
    whole = np.round(counts).astype(np.int64)
    return [
        ClassMeans(whole[i], mean[:, end - f : end]) for i, (f, end) in enumerate(zip(widths.tolist(), ends))
    ]


def _with_zeros(host: HostValues, places: list[tuple[bool, slice] | None], widths: list[int]) -> np.ndarray:
    """The layers' shifts one after the other, 0 for a layer that has none (it saw no rows)."""
    parts = [np.zeros(f) if p is None else host[p] for p, f in zip(places, widths)]
    return np.concatenate(parts) if parts else np.zeros(0)


class HostTransfer:
    """Device tensors gathered into one float64 buffer that reaches the host in one copy.

    :meth:`add` returns where the tensor's values will lie; :meth:`run` writes the float64 tensors
    straight into one buffer by a few concatenations (runs of 1-D tensors, and blocks joined along
    their columns), the float32 ones into a buffer of their own (one ``cat`` of mixed dtypes is
    several times slower) that is then copied in converted (exactly), and brings the buffer to the
    host once. No part is concatenated twice: at width the buffer is the epoch's largest array.
    """

    def __init__(self) -> None:
        self._parts: dict[torch.dtype, list[torch.Tensor | list[torch.Tensor]]] = {
            torch.float64: [],
            torch.float32: [],
        }
        self._sizes = {torch.float64: 0, torch.float32: 0}

    def add(self, tensor: torch.Tensor) -> tuple[bool, slice]:
        """Queue a 1-D float64 or float32 tensor; returns its place, for :class:`HostValues`."""
        return self._queue(tensor, tensor.dtype, tensor.shape[0])

    def add_columns(self, blocks: list[torch.Tensor]) -> tuple[bool, slice]:
        """Queue (rows, columns_i) float64 blocks joined along their columns, flattened row-major;
        returns the place of the (rows, sum of columns) matrix."""
        return self._queue(list(blocks), torch.float64, sum(b.numel() for b in blocks))

    def _queue(
        self, part: torch.Tensor | list[torch.Tensor], dtype: torch.dtype, size: int
    ) -> tuple[bool, slice]:
        self._parts[dtype].append(part)
        start = self._sizes[dtype]
        self._sizes[dtype] = start + size
        return dtype == torch.float32, slice(start, start + size)

    def run(self) -> HostValues:
        """The queued values on the host: a few concatenations on their device, one copy."""
        wide, narrow = self._parts[torch.float64], self._parts[torch.float32]
        if not wide and not narrow:
            return HostValues(np.empty(0), 0)
        device = _first_tensor(wide or narrow).device
        n64, n32 = self._sizes[torch.float64], self._sizes[torch.float32]
        flat = torch.empty(n64 + n32, dtype=torch.float64, device=device)
        at, run = 0, []
        for part in [*wide, None]:
            if isinstance(part, torch.Tensor):
                run.append(part)
                continue
            if run:  # a run of 1-D tensors: one cat
                size = sum(t.shape[0] for t in run)
                _cat(run, out=flat[at : at + size])
                at, run = at + size, []
            if part:  # blocks joined along their columns, written as one (rows, columns) matrix
                size = sum(b.numel() for b in part)
                _cat(part, dim=1, out=flat[at : at + size].view(part[0].shape[0], -1))
                at += size
        if narrow:
            flat[n64:].copy_(_cat(narrow))
        return HostValues(flat.cpu().numpy(), n64)


def _first_tensor(parts: list[torch.Tensor | list[torch.Tensor]]) -> torch.Tensor:
    first = parts[0]
    return first if isinstance(first, torch.Tensor) else first[0]


class HostValues:
    """The host buffer of a :class:`HostTransfer`: ``values[place]`` is a numpy view of one tensor's values."""

    def __init__(self, flat: np.ndarray, float32_start: int) -> None:
        self.flat = flat
        self._float32_start = float32_start

    def __getitem__(self, place: tuple[bool, slice]) -> np.ndarray:
        float32, at = place
        offset = self._float32_start if float32 else 0
        return self.flat[at.start + offset : at.stop + offset]

    def joined(self, places: list[tuple[bool, slice]]) -> np.ndarray:
        """The values of tensors queued one after the other (one view)."""
        if not places:
            return self.flat[:0]
        return self[places[0][0], slice(places[0][1].start, places[-1][1].stop)]


def _cat(parts: list[torch.Tensor], dim: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.cat`` on the first part's device, or ``out``'s (the parts of a model split over
    devices join it)."""
    device = parts[0].device if out is None else out.device
    parts = [p if p.device == device else p.to(device) for p in parts]
    return torch.cat(parts, dim=dim) if out is None else torch.cat(parts, dim=dim, out=out)


def _host_batches(batches: list[tuple[list[int], np.ndarray]], f: int) -> BatchStats | None:
    """Per-batch rows on the host: each chunk's (5, batches, neurons) block, joined."""
    if not batches:
        return None
    blocks = [values.reshape(5, len(ids), f) for ids, values in batches]
    stacked = blocks[0] if len(blocks) == 1 else np.concatenate(blocks, axis=1)
    ids = np.array([b for ids, _ in batches for b in ids], dtype=np.int32)
    if len(np.unique(ids)) < len(ids):
        ids, stacked = _merge_batch_runs(ids, stacked)
    return BatchStats(ids, stacked[0].round().astype(np.int64), *stacked[1:])


def _chunk_scale(low: torch.Tensor, high: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Per neuron, the float64 power of two that brings the chunk's ``x - shift`` within 2^30
    (1 for ordinary values, and where the chunk holds NaN, ±Inf or no observation)."""
    shift = shift.to(torch.float64)
    reach = torch.maximum(high.to(torch.float64) - shift, shift - low.to(torch.float64))
    exponent = torch.ceil(torch.log2(reach)) - 30
    exponent = torch.where(torch.isfinite(exponent), exponent, 0.0).clamp_min(0.0)
    return torch.exp2(exponent)


def _batch_runs(segments: list[Segment]) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk's batches in order, and for the kernel each batch's row runs: (batch ids, run starts,
    run lengths, offsets), batch ``g`` owning the runs ``offsets[g]:offsets[g + 1]``."""
    runs: dict[int, list[tuple[int, int]]] = {}
    start = 0
    for segment in segments:
        runs.setdefault(segment.batch, []).append((start, segment.rows))
        start += segment.rows
    unique = sorted(runs)
    ordered = [run for batch in unique for run in runs[batch]]
    offsets = np.cumsum([0] + [len(runs[batch]) for batch in unique])
    return (
        unique,
        torch.tensor([s for s, _ in ordered], dtype=torch.int64),
        torch.tensor([n for _, n in ordered], dtype=torch.int64),
        torch.from_numpy(offsets.astype(np.int64)),
    )


def _merge_batch_runs(ids: np.ndarray, stacked: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch (count, mean, std, min, max) rows of a batch split over several chunks (a pass of
    another thread ended a chunk in the middle of its pass) merged into one row per batch."""
    unique, where = np.unique(ids, return_inverse=True)
    count, mean, std, low, high = stacked
    out = np.zeros((5, len(unique), stacked.shape[2]))
    np.add.at(out[0], where, count)
    np.add.at(out[1], where, count * mean)
    np.add.at(out[2], where, count * (std * std + mean * mean))
    out[1] /= out[0]
    out[2] = np.sqrt(np.maximum(out[2] / out[0] - out[1] * out[1], 0.0))
    out[3], out[4] = np.inf, -np.inf
    np.minimum.at(out[3], where, low)
    np.maximum.at(out[4], where, high)
    return unique.astype(np.int32), out


class Scratch:
    """Reusable float32 temporaries for the reductions, grown on demand and kept."""

    def __init__(self) -> None:
        self._slots: dict[int, torch.Tensor] = {}

    def take(
        self, slot: int, shape: torch.Size | tuple[int, ...], device: torch.device | None = None
    ) -> torch.Tensor:
        """A tensor of ``shape`` backed by slot ``slot``'s storage (its contents are garbage)."""
        numel = math.prod(shape)
        held = self._slots.get(slot)
        if held is None or held.numel() < numel or (device is not None and held.device != device):
            held = self._slots[slot] = torch.empty(max(numel, 1), dtype=torch.float32, device=device)
        return held[:numel].view(shape)


@dataclass
class _Buffer:
    """A layer's preallocated rows buffer and the (batch, rows) runs it holds."""

    rows: torch.Tensor
    capacity: int
    fill: int = 0
    segments: list[Segment] = field(default_factory=list)


class Chunk:
    """Device buffers for a run of batches: each layer's rows and the batches' labels."""

    def __init__(self) -> None:
        self.outputs: dict[str, _Buffer] = {}
        self.inputs: dict[str, _Buffer] = {}
        self.labels: torch.Tensor | None = None
        self.label_fill = 0
        self.label_runs: dict[int, tuple[int, int]] = {}
        self.repeated_labels: list[tuple[int, int]] = []  # runs stored before in an earlier chunk
        self.masks: dict[int, torch.Tensor] = {}
        self.batches = 0
        self.nbytes = 0

    def buffers(self) -> list[tuple[str, bool, _Buffer]]:
        """Every (layer, is_input, buffer) of the chunk."""
        return [(k, False, b) for k, b in self.outputs.items()] + [
            (k, True, b) for k, b in self.inputs.items()
        ]

    def clear(self) -> None:
        for _, _, buf in self.buffers():
            buf.fill = 0
            buf.segments = []
        self.label_fill = 0
        self.label_runs = {}
        self.repeated_labels = []
        self.masks = {}
        self.batches = 0
        self.nbytes = 0


class ChunkPool:
    """The chunk of buffers a recorder reuses across epochs, and the reductions' scratch."""

    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.chunk_bytes = chunk_bytes
        self.scratch = Scratch()
        self._free = [Chunk()]

    def acquire(self) -> Chunk:
        """A cleared chunk (a new one only when every kept chunk is in use, e.g. train and eval)."""
        return self._free.pop() if self._free else Chunk()

    def release(self, chunk: Chunk) -> None:
        """Return ``chunk`` for reuse, emptied."""
        chunk.clear()
        self._free.append(chunk)


@contextmanager
def plain_tensor_mode(device: torch.device | str = "cpu") -> Iterator[None]:
    """Ordinary tensors whatever mode the user's forward runs in: no autograd, no inference-mode
    tensors (they could not be updated once the user leaves ``torch.inference_mode``), no autocast
    (the sums must stay float32/float64)."""
    device_type = torch.device(device).type
    with torch.inference_mode(False), torch.no_grad(), torch.autocast(device_type, enabled=False):
        yield


class PhaseStats:
    """Accumulates every layer of one phase (train or eval) of one epoch.

    Call :meth:`start_batch` once per forward pass, :meth:`add` / :meth:`add_mean` from each
    layer's hook (``inputs=True`` for a Linear's input, whose per-class means feed pathways), then
    :meth:`finish` once. A full chunk is reduced when the next batch starts. Passes of several
    threads give each its :class:`Batch` to ``add``; the caller serialises the calls.
    """

    def __init__(
        self,
        num_classes: int,
        keep_batches: bool = False,
        pool: ChunkPool | None = None,
        phase: str = "train",
    ) -> None:
        self.phase = phase
        self.num_classes = num_classes
        self.keep_batches = keep_batches
        self.pool = pool or ChunkPool()
        self.moments: dict[str, Moments] = {}
        self.inputs: dict[str, Moments] = {}
        self._chunk: Chunk | None = None
        self._current: Batch | None = None  # the batch of callers that pass none
        self._empty: dict[str, tuple[int, torch.device]] = {}  # layers seen in empty batches only
        self._batch = -1
        self._label_low: torch.Tensor | None = None
        self._label_high: torch.Tensor | None = None
        self._label_bad: torch.Tensor | None = None
        self._labels_seen: LabelSummary | None = None  # read at finish with the statistics
        self.has_rows = False
        self._spent = False  # finished in place: the running sums now hold the statistics

    def set_num_classes(self, num_classes: int) -> None:
        """Fix the number of classes once it is known (before anything was reduced)."""
        if not self.moments:
            self.num_classes = num_classes

    # -- per batch -------------------------------------------------------------------------------
    def start_batch(self, labels: torch.Tensor | None, mask: torch.Tensor | None = None) -> Batch:
        """Begin a forward pass; ``labels`` (batch,) int64 on any device, or None; ``mask``
        (batch, …) bool marks the samples / positions that are observations (None: all).

        The chunk is reduced first when it holds ``chunk_bytes`` or ``MAX_BATCHES_PER_CHUNK`` batches.
        Returns the pass's :class:`Batch` (also the default of :meth:`add` from now on).
        """
        self._check_unspent()
        chunk = self._chunk
        if chunk is None:
            chunk = self._chunk = self.pool.acquire()
        elif chunk.nbytes >= self.pool.chunk_bytes or chunk.batches >= MAX_BATCHES_PER_CHUNK:
            self._reduce_chunk()
            chunk = self._chunk = self.pool.acquire()
        self._batch += 1
        chunk.batches += 1
        self._current = Batch(self._batch, labels, mask)
        return self._current

    def add(
        self,
        layer: str,
        rows: torch.Tensor,
        samples: int | None = None,
        *,
        inputs: bool = False,
        batch: Batch | None = None,
    ) -> None:
        """Copy one batch of a layer's observations (n, features) into its buffer (the hot path).

        ``samples`` is the size of the output's batch dimension (default: one sample per row);
        the batch's labels and mask apply only when it equals their sample count. ``batch`` is the
        pass the rows belong to (default: the last one started).
        """
        self._check_unspent()
        n = rows.shape[0]
        if n == 0:
            self._saw_empty(layer, inputs, rows.shape[1], rows.device)
            return
        ops = self.hook_kernel(rows, batch or self._current)
        if ops is not None:
            self.fold_now(layer, rows, n if samples is None else samples, inputs, batch or self._current, ops)
            return
        buf = self._room(layer, inputs, n, rows.shape[1], rows.device)
        buf.rows[buf.fill : buf.fill + n].copy_(rows)
        self._filled(buf, batch, n, rows.device, n if samples is None else samples)

    def hook_kernel(self, rows: torch.Tensor, batch: Batch | None) -> Any | None:
        """The C++ kernel when a batch's rows are folded straight into the running sums, while the
        hook's output is still in cache, instead of being copied into the chunk and read again when
        it is reduced: CPU float32 rows of a pass whose labels are known, with no mask and no
        per-batch rows (those need the chunk's runs). None otherwise."""
        if batch is None or batch.labels is None or batch.mask is not None or self.keep_batches:
            return None
        if rows.dtype != torch.float32 or not rows.is_cpu:
            return None
        ops = kernels.cpu_ops()
        return ops if ops is not None and ops.per_batch else None

    def fold_now(
        self, layer: str, rows: torch.Tensor, samples: int, inputs: bool, batch: Batch, ops: Any
    ) -> None:
        """Fold one batch's rows into the layer's running sums at once by ``ops`` (see
        :meth:`hook_kernel`); the batch's labels are still stored in the chunk, where they are counted."""
        user_mode = torch.is_inference_mode_enabled() or torch.is_autocast_enabled("cpu")
        # running sums made here must not be inference tensors
        with plain_tensor_mode(rows.device) if user_mode else nullcontext():
            moments = self._layer_moments(layer, rows.shape[1], rows.device, inputs)
            self.fold_into(moments, rows, samples, batch, ops)

    def fold_into(self, moments: Moments, rows: torch.Tensor, samples: int, batch: Batch, ops: Any) -> None:
        """:meth:`fold_now` into ``moments``, the layer's (or its input's) running sums, by ``ops``
        (:meth:`hook_kernel`). A hook's planned call (``tap._Plan``) keeps them and calls this directly,
        in whatever mode the user's forward runs: they exist and have their shift, so the kernel
        only updates them in place (the batch's row labels made here are temporaries)."""
        chunk = self._chunk
        if chunk is None:  # reduced since the batch started (reduce_pending), as _room allows
            chunk = self._chunk = self.pool.acquire()
        if batch.index not in chunk.label_runs:
            self._store_labels(batch, rows.device)
        batch.placed = True
        self.has_rows = True
        labels = self._batch_row_labels(batch, rows.shape[0], samples)
        moments.fold_batch(ops, rows, labels)

    def _layer_moments(self, layer: str, width: int, device: torch.device, inputs: bool) -> Moments:
        """The running sums of a layer's outputs (or with ``inputs`` of its input), made on first use."""
        moments = self.layer_moments(inputs).get(layer)
        return self.add_layer(layer, width, device, inputs) if moments is None else moments

    def _batch_row_labels(self, batch: Batch, n: int, samples: int) -> torch.Tensor | None:
        """Each of a batch's ``n`` rows' class, as :meth:`_row_labels` gives it for a chunk, for the
        C++ kernel, which takes a label outside ``0..num_classes - 1`` as no class itself (kept on
        the batch: the layers of a pass share them)."""
        if not self.num_classes:
            return None
        key = (n, samples)
        labels = batch.row_labels.get(key)
        if labels is None:
            labels = self._labels_per_row(batch.labels.to("cpu"), n, samples, "cpu")
            labels = batch.row_labels[key] = labels.to(torch.int64).contiguous()
        return labels

    def add_mean(
        self, layer: str, values: torch.Tensor, dims: tuple[int, ...], batch: Batch | None = None
    ) -> None:
        """Like :meth:`add` for the mean of ``values`` over ``dims`` (convolution channels).

        The mean is taken in float32 whatever the model's dtype (bf16/fp16 means lose the spread).
        """
        self._check_unspent()
        n = values.shape[0]
        if n == 0:
            self._saw_empty(layer, False, values.shape[1], values.device)
            return
        buf = self._room(layer, False, n, values.shape[1], values.device)
        target = buf.rows[buf.fill : buf.fill + n]
        if values.dtype == torch.float32:
            torch.mean(values, dim=dims, out=target)
        else:
            target.copy_(values.mean(dim=dims, dtype=torch.float32))
        self._filled(buf, batch, n, values.device, n)

    def _saw_empty(self, layer: str, inputs: bool, f: int, device: torch.device) -> None:
        """An empty batch: the layer is still written (count 0) if no batch gives it rows."""
        if not inputs and f and layer not in self._empty:
            self._empty[layer] = (f, device)
            self.has_rows = True

    def _room(self, layer: str, inputs: bool, n: int, f: int, device: torch.device) -> _Buffer:
        """The layer's buffer with room for ``n`` more rows."""
        if self._current is None:  # rows before any start_batch: a batch of their own
            self.start_batch(None)
        elif self._chunk is None:
            self._chunk = self.pool.acquire()
        buf = (self._chunk.inputs if inputs else self._chunk.outputs).get(layer)
        if buf is None or buf.fill + n > buf.capacity:
            buf = self._make_room(layer, inputs, n, f, device)
        return buf

    def _filled(self, buf: _Buffer, batch: Batch | None, n: int, device: torch.device, samples: int) -> None:
        batch = batch or self._current
        chunk = self._chunk
        buf.fill += n
        buf.segments.append(Segment(batch.index, n, samples))
        chunk.nbytes += n * buf.rows.shape[1] * 4
        self.has_rows = True
        if batch.labels is not None and batch.index not in chunk.label_runs:
            self._store_labels(batch, device)
        if batch.mask is not None and batch.index not in chunk.masks:
            chunk.masks[batch.index] = batch.mask
        batch.placed = True

    def _make_room(self, layer: str, inputs: bool, n: int, f: int, device: torch.device) -> _Buffer:
        """A layer's buffer with room for ``n`` more rows: new (first batch) or grown."""
        table = self._chunk.inputs if inputs else self._chunk.outputs
        buf = table.get(layer)
        with plain_tensor_mode(device):
            if buf is None or buf.rows.device != device or buf.rows.shape[1] != f:
                if buf is not None and buf.fill:
                    raise ValueError(
                        f"layer {layer!r} produced {f} features on {device} after {buf.rows.shape[1]} on "
                        f"{buf.rows.device} in the same batch run; record it with a fixed width"
                    )
                capacity = 4 * n
                buf = table[layer] = _Buffer(
                    torch.empty(capacity, f, dtype=torch.float32, device=device), capacity
                )
            else:
                capacity = max(buf.fill + n, 2 * buf.capacity)
                grown = buf.rows.new_empty((capacity, f))
                grown[: buf.fill].copy_(buf.rows[: buf.fill])
                buf.rows, buf.capacity = grown, capacity
        return buf

    def _store_labels(self, batch: Batch, device: torch.device) -> None:
        labels = batch.labels
        chunk, n = self._chunk, labels.shape[0]
        if chunk.labels is None or chunk.labels.device != device or chunk.label_fill + n > len(chunk.labels):
            with plain_tensor_mode(device):
                grown = torch.empty(max(4 * (chunk.label_fill + n), 256), dtype=torch.int64, device=device)
                if chunk.labels is not None and chunk.label_fill:
                    grown[: chunk.label_fill].copy_(chunk.labels[: chunk.label_fill])
            chunk.labels = grown
        chunk.labels[chunk.label_fill : chunk.label_fill + n].copy_(labels, non_blocking=True)
        chunk.label_runs[batch.index] = (chunk.label_fill, n)
        if batch.placed:  # counted with the chunk it was first stored in
            chunk.repeated_labels.append((chunk.label_fill, n))
        chunk.label_fill += n

    # -- reductions ------------------------------------------------------------------------------
    def _reduce_chunk(self) -> None:
        """Fold the current chunk into the running sums and give its buffers back."""
        chunk, self._chunk = self._chunk, None
        if chunk is None:
            return
        if chunk.label_fill and self.num_classes:
            self._count_labels(chunk.labels[: chunk.label_fill], chunk.repeated_labels)
        with plain_tensor_mode(self._chunk_device(chunk)):
            self._reduce(chunk)
        self.pool.release(chunk)

    def _count_labels(self, labels: torch.Tensor, repeated: list[tuple[int, int]]) -> None:
        """Track, on the device, the range of the labels and how many lie at or above num_classes
        (negative labels mean "ignore", as ``ignore_index`` does); ``repeated`` runs were counted
        with an earlier chunk."""
        low, high = torch.aminmax(labels)
        bad = (labels >= self.num_classes).sum()
        for start, n in repeated:
            bad = bad - (labels[start : start + n] >= self.num_classes).sum()
        if self._label_low is None:
            self._label_low, self._label_high, self._label_bad = low, high, bad
        else:
            self._label_low = torch.minimum(self._label_low, low)
            self._label_high = torch.maximum(self._label_high, high)
            self._label_bad = self._label_bad + bad

    @staticmethod
    def _chunk_device(chunk: Chunk) -> torch.device:
        for _, _, buf in chunk.buffers():
            return buf.rows.device
        return torch.device("cpu")

    def _reduce(self, chunk: Chunk) -> None:
        row_labels: dict[tuple, torch.Tensor | None] = {}
        row_drops: dict[tuple, torch.Tensor | None] = {}
        for layer, inputs, buf in chunk.buffers():
            if buf.fill == 0:
                continue
            moments = self._layer_moments(layer, buf.rows.shape[1], buf.rows.device, inputs)
            runs = tuple(buf.segments)
            if runs not in row_labels:  # layers with the same runs share their row labels
                row_labels[runs] = self._row_labels(chunk, buf.segments, buf.rows.device)
                row_drops[runs] = self._row_drops(chunk, buf.segments, buf.rows.device)
            moments.update(
                buf.rows[: buf.fill], row_labels[runs], buf.segments, self.pool.scratch, row_drops[runs]
            )

    def _row_labels(self, chunk: Chunk, segments: list[Segment], device: torch.device) -> torch.Tensor | None:
        """Each buffered row's class (``num_classes`` for rows without a valid label), or None
        without classes. A batch's labels apply to a layer only when the layer's output has as
        many samples as there are labels (an output shared by the batch, such as a position
        embedding of batch size 1, gets none); each sample's rows carry its label."""
        if not self.num_classes:
            return None
        parts = []
        for segment in segments:
            run = chunk.label_runs.get(segment.batch)
            labels = None if run is None else chunk.labels[run[0] : run[0] + run[1]]
            parts.append(self._labels_per_row(labels, segment.rows, segment.samples, device))
        labels = parts[0] if len(parts) == 1 else torch.cat([p.to(device, non_blocking=True) for p in parts])
        return self._valid_labels(labels.to(device, non_blocking=True))

    def _labels_per_row(
        self, labels: torch.Tensor | None, rows: int, samples: int, device: torch.device | str
    ) -> torch.Tensor:
        """A pass's labels (one per sample) on its ``rows`` rows of ``samples`` samples: each sample's
        rows carry its label. They apply only when the output has as many samples as there are
        labels (an output shared by the batch, such as a position embedding of batch size 1, gets
        none) and a whole number of rows per sample; otherwise every row is ``num_classes``."""
        if labels is None or labels.shape[0] != samples or rows % labels.shape[0]:
            return torch.full((rows,), self.num_classes, dtype=torch.int64, device=device)
        return labels if rows == samples else labels.repeat_interleave(rows // samples)

    def _valid_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Labels outside ``0..num_classes - 1`` (ignored, or out of range) as ``num_classes``: no class."""
        return labels.masked_fill((labels < 0) | (labels >= self.num_classes), self.num_classes)

    def _row_drops(self, chunk: Chunk, segments: list[Segment], device: torch.device) -> torch.Tensor | None:
        """(rows, 1) bool: the buffered rows a mask excludes (None when no batch of these runs has one).

        A (batch, …) mask applies to a layer whose output has the batch's samples: position by
        position when the layer has one row per mask element, sample by sample (a sample counts
        while any of its positions does) when it has one row per sample.
        """
        if not any(s.batch in chunk.masks for s in segments):
            return None
        parts = []
        for segment in segments:
            mask = chunk.masks.get(segment.batch)
            keep = None
            if mask is not None and mask.shape[0] == segment.samples:
                if segment.rows == mask.numel():
                    keep = mask.reshape(-1)
                elif segment.rows % segment.samples == 0:
                    per_sample = mask.reshape(segment.samples, -1).any(1)
                    keep = per_sample.repeat_interleave(segment.rows // segment.samples)
            if keep is None:
                keep = torch.ones(segment.rows, dtype=torch.bool, device=device)
            parts.append(keep.to(device, non_blocking=True))
        return ~torch.cat(parts).unsqueeze(1)

    def reduce_pending(self) -> None:
        """Fold the buffered batches into the running sums now (before a merge across ranks)."""
        self._check_unspent()
        self._reduce_chunk()
        self._add_empty_layers()

    def _add_empty_layers(self) -> None:
        """Running sums (count 0) for the layers that saw only empty batches."""
        for layer, (width, device) in self._empty.items():
            self._layer_moments(layer, width, device, inputs=False)

    def nbytes(self) -> int:
        """The size of every layer's running sums (and per-batch rows) in this phase, once the
        buffered batches are folded (:meth:`reduce_pending`)."""
        return sum(m.nbytes() for m in (*self.moments.values(), *self.inputs.values()))

    def layer_moments(self, inputs: bool = False) -> dict[str, Moments]:
        """Each layer's running sums (of its outputs, or with ``inputs`` of a Linear's inputs)."""
        return self.inputs if inputs else self.moments

    def add_layer(self, layer: str, width: int, device: torch.device, inputs: bool = False) -> Moments:
        """Empty running sums for a layer this phase has not seen (another rank has)."""
        keep = self.keep_batches and not inputs
        moments = Moments(width, self.num_classes, device, keep, class_only=inputs)
        self.layer_moments(inputs)[layer] = moments
        self.has_rows = True
        return moments

    def label_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(out-of-range count, lowest, highest) label tensors on the device, or None."""
        if self._label_low is None:
            return None
        return self._label_bad, self._label_low, self._label_high

    def set_label_state(self, bad: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> None:
        """Replace the label counts (with those merged across ranks)."""
        self._label_bad, self._label_low, self._label_high = bad, low, high

    def finish(self, in_place: bool = False) -> PhaseRecord:
        """Reduce what is left and bring the phase's statistics to the host (once per epoch); with
        ``in_place``, CPU sums become the statistics where they lie (the phase is not used again)."""
        self._check_unspent()
        self._reduce_chunk()
        self._add_empty_layers()
        labels = None
        if self._label_low is not None:
            labels = torch.stack([self._label_bad, self._label_low, self._label_high]).double()
        every = [*self.moments.values(), *self.inputs.values()]
        self._spent = in_place and _on_the_cpu(every)
        for m in every if self._spent else ():
            m.spent = True  # from here on their tensors are the statistics
        outputs, inputs, seen = host_statistics(self.moments, self.inputs, labels, self._spent)
        if seen is not None:
            self._labels_seen = LabelSummary(*(int(v) for v in seen))
        return PhaseRecord(self.phase, outputs, {k: v for k, v in inputs.items() if v is not None})

    def _check_unspent(self) -> None:
        if self._spent:
            raise RuntimeError(
                f"the {self.phase} phase was finished in place: its running sums hold its statistics now"
            )

    def label_summary(self) -> LabelSummary | None:
        """The labels given this phase (call after :meth:`finish`), or None when none were given."""
        if self._label_low is None:
            return None
        if self._labels_seen is not None:
            return self._labels_seen
        bad, low, high = torch.stack([self._label_bad, self._label_low, self._label_high]).tolist()
        return LabelSummary(int(bad), int(low), int(high))


def checked_on_the_host(labels: torch.Tensor) -> bool:
    """Whether ``labels`` are checked at once (CPU tensors: looking costs no device sync) rather
    than counted on their device and refused at the epoch's end."""
    return labels.device.type == "cpu"


class LabelFaults:
    """Float labels that name no class: fractional, NaN or infinite values (NaN or infinite values
    in one-hot / probability rows). CPU labels are refused at once; labels on an accelerator are
    counted there, with no host transfer per batch, and refused by :meth:`raise_any` at end_epoch."""

    def __init__(self) -> None:
        self._counted: dict[bool, tuple[torch.Tensor, torch.Tensor]] = {}  # rows? -> (count, first)

    def check(self, labels: torch.Tensor, rows: bool = False, defer: bool = True) -> torch.Tensor | None:
        """The faulty labels (a bool mask over the labels, or over the rows with ``rows``) to leave
        unlabelled, None when there are none to leave; raises ``ValueError`` when checked at once."""
        if labels.numel() == 0:
            return None
        values = labels.detach()
        bad = ~torch.isfinite(values) if rows else (values != torch.round(values)) | ~torch.isfinite(values)
        if not defer or checked_on_the_host(values):
            if bool(bad.any()):
                raise ValueError(self._message(int(bad.sum()), float(values[bad][0]), rows))
            return None
        flat = bad.reshape(-1)
        first = values.take(flat.to(torch.uint8).argmax()).to(torch.float64)  # a tensor index: no sync
        count = flat.sum().to(torch.float64)
        if rows in self._counted:
            total, example = self._counted[rows]
            first, count = torch.where(total > 0, example, first), total + count
        self._counted[rows] = (count, first)
        return bad.any(1) if rows else bad

    def raise_any(self, epoch: int) -> None:
        """Raise ``ValueError`` when faulty labels were counted this epoch (one host transfer)."""
        if not self._counted:
            return
        kinds = sorted(self._counted)
        found = torch.stack([v for kind in kinds for v in self._counted[kind]]).tolist()
        problems = [
            self._message(round(found[2 * i]), found[2 * i + 1], kind)
            for i, kind in enumerate(kinds)
            if found[2 * i]
        ]
        if problems:
            raise ValueError(
                f"epoch {epoch}: {'; '.join(problems)}. They were left out of the per-class statistics and "
                "the epoch was still written"
            )

    @staticmethod
    def _message(count: int, example: float, rows: bool) -> str:
        if rows:
            return (
                f"set_targets got {count} NaN or infinite values in one-hot / probability rows "
                f"(e.g. {example:g}); rows must be finite"
            )
        return (
            f"set_targets got {count} float labels that are not class indices (fractional, NaN or "
            f"infinite; e.g. {example:g}); give integer classes, or 0/1 and one-hot floats that are "
            "exactly integral"
        )
