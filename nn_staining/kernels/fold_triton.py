"""The fused chunk reduction for CUDA rows, in Triton: the GPU counterpart of ``reduce.cpp``.

:func:`fold_chunk` takes the C++ kernel's arguments and folds a chunk of float32 rows into the
running sums of :class:`~nn_staining.stats.Moments` in two launches and no host synchronisation:

1. ``_fold_split``: a grid of (column tile, row split, class group) programs. Each reads its rows
   once, in blocks of ``BLOCK_ROWS``: per column the sums of ``x - shift`` and of its squares (in
   float64, ``x - shift`` included: no rescaling is needed however far a value strays), min and
   max (NaN propagating, as ``amin``/``amax``), the active (> 0) and non-finite counts, and per
   class the sums of ``x - shift``, by one ``(classes × rows) @ (rows × columns)`` product in IEEE
   float32 per block folded into float64. A block holding a NaN, an infinity or a value beyond
   2^100 of its shift sums its classes one by one in float64 instead, so a bad row spoils only its
   own class and no float32 sum overflows. Partial results go to a float64 workspace, one slice
   per split.
2. ``_combine``: per column, the splits' partials folded into the accumulators in split order, so
   the result does not depend on scheduling (no atomics).

Per-batch rows (``keep_batches``) are not made here: ``per_batch = False`` tells
:class:`~nn_staining.stats.Moments` to take them with torch ops. With ``TRITON_INTERPRET=1`` the
same code runs on CPU tensors, which is how the tests check it on a machine without a GPU.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

#: This backend gives no per-batch rows; Moments takes them with torch ops.
per_batch = False

BLOCK_ROWS = 32
BLOCK_COLS = 64
#: class slots a program sums at once; more classes take more class groups (each re-reads the rows)
MAX_CLASS_SLOTS = 64
#: float64 rows of the workspace per split: sum, sum of squares, active, non-finite, NaN, min, max
STATS = 7
#: how many programs to aim for: enough to fill a large GPU several times over
TARGET_PROGRAMS = 1024


@triton.jit(do_not_specialize=["n", "rows_per_split"])  # one compilation for every chunk length
def _fold_split(
    rows,
    shift,
    labels,
    dropped,
    work,
    class_work,
    count_work,
    n,
    f,
    rows_per_split,
    classes,
    HAS_LABELS: tl.constexpr,
    HAS_DROPPED: tl.constexpr,
    FULL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    SLOTS: tl.constexpr,
    STATS_ROWS: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    group = tl.program_id(2)
    cols = tile * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    in_cols = cols < f
    centre = tl.load(shift + cols, mask=in_cols, other=0.0)
    first = split * rows_per_split
    last = tl.minimum(first + rows_per_split, n)
    slots = group * SLOTS + tl.arange(0, SLOTS)  # the classes this program sums
    total = tl.zeros([BLOCK_COLS], tl.float64)
    squares = tl.zeros([BLOCK_COLS], tl.float64)
    active = tl.zeros([BLOCK_COLS], tl.float64)
    bad = tl.zeros([BLOCK_COLS], tl.float64)
    nans = tl.zeros([BLOCK_COLS], tl.float64)
    low = tl.full([BLOCK_COLS], float("inf"), tl.float32)
    high = tl.full([BLOCK_COLS], float("-inf"), tl.float32)
    class_total = tl.zeros([SLOTS, BLOCK_COLS], tl.float64)
    class_rows = tl.zeros([SLOTS], tl.float64)
    for start in range(0, rows_per_split, BLOCK_ROWS):
        r = first + start + tl.arange(0, BLOCK_ROWS)
        keep = r < last
        if HAS_DROPPED:
            keep = keep & (tl.load(dropped + r, mask=keep, other=1) == 0)
        inside = keep[:, None] & in_cols[None, :]
        x = tl.load(rows + r[:, None].to(tl.int64) * f + cols[None, :], mask=inside, other=0.0)
        c64 = tl.where(inside, x.to(tl.float64) - centre[None, :].to(tl.float64), 0.0)  # exact
        is_nan = inside & (x != x)
        not_finite = inside & ((x != x) | (tl.abs(x) == float("inf")))
        if FULL and group == 0:  # the per-column statistics are the first class group's job
            total += tl.sum(c64, axis=0)
            squares += tl.sum(c64 * c64, axis=0)
            active += tl.sum((inside & (x > 0)).to(tl.float64), axis=0)
            bad += tl.sum(not_finite.to(tl.float64), axis=0)
            nans += tl.sum(is_nan.to(tl.float64), axis=0)
            low = tl.minimum(low, tl.min(tl.where(inside & (x == x), x, float("inf")), axis=0))
            high = tl.maximum(high, tl.max(tl.where(inside & (x == x), x, float("-inf")), axis=0))
        if HAS_LABELS:
            label = tl.load(labels + r, mask=keep, other=-1)
            member = (slots[:, None] == label[None, :]) & keep[None, :] & (slots[:, None] < classes)
            class_rows += tl.sum(member.to(tl.float64), axis=1)
            # beyond 2^100 from the shift (or not finite), float32 sums of a block could overflow
            large = inside & ~(tl.abs(c64) <= 1.2676506002282294e30)
            if tl.max(tl.sum(large.to(tl.int32), axis=1), axis=0) == 0:
                part = tl.dot(member.to(tl.float32), c64.to(tl.float32), input_precision="ieee").to(
                    tl.float64
                )
            else:  # a product would spread 0 × NaN to every class: sum class by class, in float64
                part = tl.zeros([SLOTS, BLOCK_COLS], tl.float64)
                for s in tl.static_range(SLOTS):
                    mine = tl.sum(tl.where((label == group * SLOTS + s)[:, None] & inside, c64, 0.0), axis=0)
                    part += tl.where((tl.arange(0, SLOTS) == s)[:, None], mine[None, :], 0.0)
            class_total += part
    if FULL and group == 0:
        out = work + (split * STATS_ROWS) * f + cols
        tl.store(out, total, mask=in_cols)
        tl.store(out + f, squares, mask=in_cols)
        tl.store(out + 2 * f, active, mask=in_cols)
        tl.store(out + 3 * f, bad, mask=in_cols)
        tl.store(out + 4 * f, nans, mask=in_cols)
        tl.store(out + 5 * f, low.to(tl.float64), mask=in_cols)
        tl.store(out + 6 * f, high.to(tl.float64), mask=in_cols)
    if HAS_LABELS:
        in_slots = slots < classes
        place = class_work + (split * classes + slots[:, None]).to(tl.int64) * f + cols[None, :]
        tl.store(place, class_total, mask=in_slots[:, None] & in_cols[None, :])
        if tile == 0:
            tl.store(count_work + split * classes + slots, class_rows, mask=in_slots)


@triton.jit(do_not_specialize=["splits"])
def _combine(
    work,
    class_work,
    count_work,
    total,
    squares,
    low,
    high,
    active,
    bad,
    class_count,
    class_sum,
    splits,
    f,
    classes,
    HAS_LABELS: tl.constexpr,
    FULL: tl.constexpr,
    BLOCK_COLS: tl.constexpr,
    SLOTS: tl.constexpr,
    STATS_ROWS: tl.constexpr,
):
    tile = tl.program_id(0)
    group = tl.program_id(1)
    cols = tile * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    in_cols = cols < f
    if FULL and group == 0:
        s1 = tl.load(total + cols, mask=in_cols, other=0.0)
        s2 = tl.load(squares + cols, mask=in_cols, other=0.0)
        on = tl.load(active + cols, mask=in_cols, other=0.0)
        nf = tl.load(bad + cols, mask=in_cols, other=0.0)
        lo = tl.load(low + cols, mask=in_cols, other=0.0)
        hi = tl.load(high + cols, mask=in_cols, other=0.0)
        nan_seen = (lo != lo).to(tl.float64)  # an earlier chunk's NaN stays
        for split in range(splits):
            part = work + (split * STATS_ROWS) * f + cols
            s1 += tl.load(part, mask=in_cols, other=0.0)
            s2 += tl.load(part + f, mask=in_cols, other=0.0)
            on += tl.load(part + 2 * f, mask=in_cols, other=0.0)
            nf += tl.load(part + 3 * f, mask=in_cols, other=0.0)
            nan_seen += tl.load(part + 4 * f, mask=in_cols, other=0.0)
            lo = tl.minimum(lo, tl.load(part + 5 * f, mask=in_cols, other=0.0).to(tl.float32))
            hi = tl.maximum(hi, tl.load(part + 6 * f, mask=in_cols, other=0.0).to(tl.float32))
        lo = tl.where(nan_seen > 0, float("nan"), lo)
        hi = tl.where(nan_seen > 0, float("nan"), hi)
        tl.store(total + cols, s1, mask=in_cols)
        tl.store(squares + cols, s2, mask=in_cols)
        tl.store(active + cols, on, mask=in_cols)
        tl.store(bad + cols, nf, mask=in_cols)
        tl.store(low + cols, lo, mask=in_cols)
        tl.store(high + cols, hi, mask=in_cols)
    if HAS_LABELS:
        slots = group * SLOTS + tl.arange(0, SLOTS)
        in_slots = slots < classes
        inside = in_slots[:, None] & in_cols[None, :]
        place = slots[:, None].to(tl.int64) * f + cols[None, :]
        sums = tl.load(class_sum + place, mask=inside, other=0.0)
        rows_seen = tl.load(class_count + slots, mask=in_slots, other=0.0)
        for split in range(splits):
            sums += tl.load(class_work + (split * classes) * f + place, mask=inside, other=0.0)
            rows_seen += tl.load(count_work + split * classes + slots, mask=in_slots, other=0.0)
        tl.store(class_sum + place, sums, mask=inside)
        if tile == 0:
            tl.store(class_count + slots, rows_seen, mask=in_slots)


def _slots(classes: int) -> int:
    """Class slots per program: a power of two of at least 16 (``tl.dot``'s smallest side)."""
    return max(16, min(MAX_CLASS_SLOTS, triton.next_power_of_2(max(classes, 1))))


def _splits(n: int, tiles: int, groups: int) -> int:
    """Row splits: enough programs to fill the GPU, each with at least a few blocks of rows."""
    wanted = max(1, TARGET_PROGRAMS // (tiles * groups))
    return max(1, min(wanted, triton.cdiv(n, 4 * BLOCK_ROWS)))


def fold_chunk(
    rows: torch.Tensor,
    shift: torch.Tensor,
    labels: torch.Tensor | None,
    dropped: torch.Tensor | None,
    classes: int,
    class_only: bool,
    sum: torch.Tensor,
    sum_sq: torch.Tensor,
    minimum: torch.Tensor,
    maximum: torch.Tensor,
    active: torch.Tensor,
    nonfinite: torch.Tensor,
    class_count: torch.Tensor,
    class_sum: torch.Tensor,
    starts: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    offsets: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fold ``rows`` (n, f) float32 into the accumulators, as ``torch.ops.nn_staining.fold_chunk``
    does on the CPU (same arguments; per-batch runs are refused: see ``per_batch``)."""
    if starts is not None or lengths is not None or offsets is not None:
        raise ValueError(
            "the Triton fold gives no per-batch rows; take them with torch ops (per_batch is False)"
        )
    if rows.dim() != 2 or rows.dtype != torch.float32:
        raise ValueError(f"rows must be a 2-D float32 tensor, not {rows.dtype} of shape {tuple(rows.shape)}")
    rows = rows.contiguous()
    n, f = rows.shape
    empty = rows.new_empty((5, 0, f), dtype=torch.float64)
    has_labels = labels is not None and classes > 0
    full = not class_only
    if n == 0 or f == 0 or not (full or has_labels):
        return empty
    accumulators = (sum, sum_sq, minimum, maximum, active, nonfinite) if full else ()
    _check(rows, shift, accumulators + ((class_count, class_sum) if has_labels else ()))
    for given in (labels if has_labels else None, dropped):
        if given is not None and given.device != rows.device:
            raise ValueError(f"the Triton fold needs labels and masks on {rows.device}, got {given.device}")
    with torch.cuda.device(rows.device) if rows.is_cuda else contextlib.nullcontext():
        _launch(
            rows,
            shift,
            labels if has_labels else None,
            dropped,
            classes,
            full,
            accumulators,
            class_count,
            class_sum,
        )
    return empty


def _check(rows: torch.Tensor, shift: torch.Tensor, accumulators: tuple[torch.Tensor, ...]) -> None:
    """The accumulators must be contiguous and on the rows' device (the kernel writes through raw pointers)."""
    for t in (shift, *accumulators):
        if t.device != rows.device or not t.is_contiguous():
            raise ValueError(
                f"the Triton fold needs contiguous accumulators on {rows.device}, got one on {t.device}"
                f"{'' if t.is_contiguous() else ' (not contiguous)'}"
            )


def _launch(
    rows: torch.Tensor,
    shift: torch.Tensor,
    labels: torch.Tensor | None,
    dropped: torch.Tensor | None,
    classes: int,
    full: bool,
    accumulators: tuple[torch.Tensor, ...],
    class_count: torch.Tensor,
    class_sum: torch.Tensor,
) -> None:
    """The two launches. Triton launches on the current device, so the caller makes it the rows'
    (a model split over GPUs has chunks on several)."""
    n, f = rows.shape
    has_labels = labels is not None
    slots = _slots(classes)
    groups = triton.cdiv(classes, slots) if has_labels else 1
    tiles = triton.cdiv(f, BLOCK_COLS)
    splits = _splits(n, tiles, groups)
    rows_per_split = triton.cdiv(triton.cdiv(n, splits), BLOCK_ROWS) * BLOCK_ROWS
    splits = triton.cdiv(n, rows_per_split)
    work = rows.new_empty((splits * STATS * f if full else 1,), dtype=torch.float64)
    class_work = rows.new_empty((splits * classes * f if has_labels else 1,), dtype=torch.float64)
    count_work = rows.new_empty((splits * classes if has_labels else 1,), dtype=torch.float64)
    label_rows = labels.contiguous() if has_labels else rows.new_empty((1,), dtype=torch.int64)
    drop_rows = dropped.reshape(-1).contiguous().view(torch.uint8) if dropped is not None else None
    _fold_split[(tiles, splits, groups)](
        rows,
        shift.contiguous(),
        label_rows,
        drop_rows if drop_rows is not None else label_rows,
        work,
        class_work,
        count_work,
        n,
        f,
        rows_per_split,
        classes,
        HAS_LABELS=has_labels,
        HAS_DROPPED=drop_rows is not None,
        FULL=full,
        BLOCK_ROWS=BLOCK_ROWS,
        BLOCK_COLS=BLOCK_COLS,
        SLOTS=slots,
        STATS_ROWS=STATS,
    )
    accumulators = accumulators if full else (work,) * 6
    _combine[(tiles, groups)](
        work,
        class_work,
        count_work,
        *accumulators,
        class_count if has_labels else count_work,
        class_sum if has_labels else class_work,
        splits,
        f,
        classes,
        HAS_LABELS=has_labels,
        FULL=full,
        BLOCK_COLS=BLOCK_COLS,
        SLOTS=slots,
        STATS_ROWS=STATS,
    )


def smoke_test() -> None:
    """Fold two rows on the current CUDA device once: Triton compiles and launches here, so a
    machine where it cannot (no C compiler for its launcher, a GPU it does not support, a
    read-only cache) is found when the backend is chosen, not in the middle of training."""
    rows = torch.tensor([[1.0, -2.0, 3.0], [0.5, 4.0, -1.0]], device="cuda")
    sums = torch.zeros(4 * 3 + 2 + 2 * 3, dtype=torch.float64, device="cuda")
    total, squares, active, bad, count, per_class = sums.split([3, 3, 3, 3, 2, 6])
    low = torch.full((3,), float("inf"), device="cuda")
    high = torch.full((3,), float("-inf"), device="cuda")
    labels = torch.tensor([0, 1], device="cuda")
    fold_chunk(
        rows, rows.mean(0), labels, None, 2, False, total, squares, low, high, active, bad, count, per_class
    )
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(0)  # this one check waits for the GPU, even inside a guarded loop
    try:
        right = torch.equal(high.cpu(), torch.tensor([1.0, 4.0, 3.0])) and count.cpu().tolist() == [1.0, 1.0]
    finally:
        torch.cuda.set_sync_debug_mode(mode)
    if not right:
        raise RuntimeError(
            f"the Triton fold gave wrong sums on this GPU (max {high.tolist()}, counts {count.tolist()})"
        )
