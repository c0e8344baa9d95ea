"""Recording under ``torch.distributed``: one epoch's statistics merged across ranks.

Every rank accumulates its own shard of the data. At ``end_epoch`` the ranks first agree on
what they recorded (the epoch, the classes, each layer's width: a disagreement is an error on
every rank, never a hang or a corrupt store), then merge with three collectives:

1. an all-reduce SUM of ``n·shift`` and ``n`` per layer gives a common shift ``s0`` (each rank's
   sums were taken around its own shift; adding sums around different shifts would be wrong);
2. each rank re-centres its float64 sums on ``s0`` (exact), then one packed all-reduce SUM of
   counts, sums, squares, active and non-finite counts, per-class counts and sums;
3. one packed all-reduce MIN of minima, negated maxima and the label range.

After the merge every rank holds the statistics of all ranks' data; only rank 0 writes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .stats import Moments, PhaseStats


@dataclass(frozen=True)
class RankGroup:
    """The default process group of an initialised ``torch.distributed`` run with several ranks."""

    rank: int
    world_size: int

    @classmethod
    def current(cls) -> RankGroup | None:
        """The running group, or None for a single process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls(dist.get_rank(), dist.get_world_size())

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the store (rank 0)."""
        return self.rank == 0

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (small, JSON-like), in rank order."""
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def broadcast_error(self, message: str | None, store: str) -> None:
        """Raise ``message`` (rank 0's error, None for none) on every rank."""
        box = [message]
        dist.broadcast_object_list(box, src=0)
        if box[0] is not None:
            raise RuntimeError(f"rank 0 could not open the store {store!r}: {box[0]}")

    def check_agreement(self, what: str, values: list[Any]) -> None:
        """Raise on every rank when the ranks' ``values`` differ, naming each rank's value."""
        if any(v != values[0] for v in values[1:]):
            listed = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise RuntimeError(
                f"the ranks disagree on {what} ({listed}); every rank must construct NetworkTrace with the "
                "same model, layers and num_classes and call the same start_epoch / end_epoch"
            )


def merge_epoch(
    group: RankGroup, epoch: int, recorded: bool, phases: dict[str, PhaseStats], num_classes: int
) -> None:
    """Merge the ranks' statistics of ``epoch`` in place (for an epoch not recorded, only check that
    every rank ended the same epoch)."""
    for stats in phases.values():
        stats.reduce_pending()
    layers = {
        f"{phase}/{'inputs' if inputs else 'outputs'}/{key}": m.num_features
        for phase, stats in phases.items()
        for inputs in (False, True)
        for key, m in stats.layer_moments(inputs).items()
    }
    specs = group.gather(
        {
            "epoch": epoch,
            "recorded": recorded,
            "num_classes": num_classes,
            "phases": sorted(phases),
            "layers": layers,
        }
    )
    group.check_agreement("the epoch ended", [(s["epoch"], s["recorded"]) for s in specs])
    if not recorded:
        return
    group.check_agreement("num_classes", [s["num_classes"] for s in specs])
    group.check_agreement("the recorded phases (record_eval)", [s["phases"] for s in specs])
    union: dict[str, int] = {}
    for spec in specs:
        for name, width in spec["layers"].items():
            if union.setdefault(name, width) != width:
                widths = ", ".join(f"rank {r}: {s['layers'].get(name)}" for r, s in enumerate(specs))
                raise RuntimeError(f"the ranks disagree on the width of {name} ({widths})")
    device = _device(phases)
    moments: list[Moments] = []
    for name in sorted(union):
        phase, kind, key = name.split("/", 2)
        table = phases[phase].layer_moments(kind == "inputs")
        moments.append(table.get(key) or phases[phase].add_layer(key, union[name], device, kind == "inputs"))
    _merge_moments(moments, device)
    _merge_labels(list(phases.values()), device)


def _device(phases: dict[str, PhaseStats]) -> torch.device:
    """Where the collectives run: the accumulators' device (gloo: CPU; NCCL: the rank's GPU)."""
    for stats in phases.values():
        for inputs in (False, True):
            for m in stats.layer_moments(inputs).values():
                return m.class_sum.device
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _merge_moments(moments: list[Moments], device: torch.device) -> None:
    f64 = torch.float64
    counts = torch.tensor([float(m.observations()) for m in moments], dtype=f64, device=device)
    shifts = [
        (m.shift if m.shift is not None else torch.zeros(m.num_features, device=device)).to(device, f64)
        for m in moments
    ]
    packed = torch.cat([counts] + [n * s for n, s in zip(counts, shifts)])
    dist.all_reduce(packed)
    total, weighted = packed[: len(moments)], packed[len(moments) :].split([m.num_features for m in moments])
    for m, n, w in zip(moments, total, weighted):
        m.recentre(torch.where(n > 0, w / n.clamp_min(1.0), torch.zeros_like(w)))
    sums = [counts]
    for m in moments:
        sums += [m.class_count, m.class_sum.reshape(-1)]
        if not m.class_only:
            sums += [m.sum, m.sum_sq, m.active, m.nonfinite]
    packed = torch.cat(sums)
    dist.all_reduce(packed)
    parts = iter(packed.split([p.numel() for p in sums]))
    merged_counts = next(parts)
    for m, n in zip(moments, merged_counts.tolist()):
        m.class_count.copy_(next(parts))
        m.class_sum.copy_(next(parts).reshape(m.class_sum.shape))
        if not m.class_only:
            for t in (m.sum, m.sum_sq, m.active, m.nonfinite):
                t.copy_(next(parts))
        m.count, m.kept = int(round(n)), None
    outputs = [m for m in moments if not m.class_only]
    if outputs:
        extremes = torch.cat([torch.cat([m.minimum, -m.maximum]).to(device) for m in outputs])
        dist.all_reduce(extremes, op=dist.ReduceOp.MIN)
        for m, part in zip(outputs, extremes.split([2 * m.num_features for m in outputs])):
            m.minimum.copy_(part[: m.num_features])
            m.maximum.copy_(-part[m.num_features :])


def _merge_labels(phases: list[PhaseStats], device: torch.device) -> None:
    """The label range and out-of-range count of all ranks, so every rank raises the same error."""
    bad, extremes = [], []
    for stats in phases:
        state = stats.label_state()
        if state is None:
            bad.append(torch.zeros((), dtype=torch.float64, device=device))
            extremes += [torch.tensor(math.inf, device=device), torch.tensor(math.inf, device=device)]
        else:
            bad.append(state[0].to(device, torch.float64))
            extremes += [state[1].to(device, torch.float64), -state[2].to(device, torch.float64)]
    bad_t, ext_t = torch.stack(bad), torch.stack(extremes).to(torch.float64)
    dist.all_reduce(bad_t)
    dist.all_reduce(ext_t, op=dist.ReduceOp.MIN)
    for i, stats in enumerate(phases):
        low, high = ext_t[2 * i], -ext_t[2 * i + 1]
        if math.isfinite(float(low)):
            stats.set_label_state(bad_t[i].round().to(torch.int64), low.to(torch.int64), high.to(torch.int64))
