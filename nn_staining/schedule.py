"""Which epochs are recorded, and the order the training events must come in."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

EpochIntervals = int | Sequence[int] | None
#: The store's ``epoch`` column is int32.
MAX_EPOCH = 2**31 - 1


def epoch_rule(epoch_intervals: EpochIntervals, total_epochs: int | None) -> frozenset[int] | int | None:
    """Validate ``epoch_intervals``: None (every epoch), k > 0 (0, k, 2k, … and the last),
    -1 (the last only; needs ``total_epochs``) or a list of epochs."""
    valid = "None, a positive int k (every k-th epoch), -1 (the last epoch) or a list of epochs >= 0"
    if epoch_intervals is None:
        return None
    if isinstance(epoch_intervals, bool):
        raise ValueError(f"epoch_intervals={epoch_intervals!r} is not valid; use {valid}")
    if isinstance(epoch_intervals, int):
        if epoch_intervals > 0:
            return epoch_intervals
        if epoch_intervals == -1:
            if total_epochs is None:
                raise ValueError("epoch_intervals=-1 (record only the last epoch) needs total_epochs=")
            return frozenset({total_epochs - 1})
        raise ValueError(f"epoch_intervals={epoch_intervals!r} is not valid; use {valid}")
    try:
        epochs = list(epoch_intervals)
    except TypeError:
        raise ValueError(f"epoch_intervals={epoch_intervals!r} is not valid; use {valid}") from None
    bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0]
    if bad or not epochs:
        raise ValueError(f"epoch_intervals={epoch_intervals!r} is not valid ({bad or 'empty'}); use {valid}")
    return frozenset(int(e) for e in epochs)


def jsonable_intervals(epoch_intervals: EpochIntervals) -> int | list[int] | None:
    """``epoch_intervals`` as ``meta.json`` stores it."""
    if epoch_intervals is None or isinstance(epoch_intervals, (int, np.integer)):
        return None if epoch_intervals is None else int(epoch_intervals)
    return sorted(int(e) for e in epoch_intervals)


class EpochSchedule:
    """The epoch rule and the open epoch: ``open`` / ``close`` enforce start → end, in increasing order."""

    def __init__(self, epoch_intervals: EpochIntervals, total_epochs: int | None) -> None:
        self.epoch_intervals = epoch_intervals
        self.total_epochs = total_epochs
        self.rule = epoch_rule(epoch_intervals, total_epochs)
        self.current: int | None = None
        self.last_recorded: int | None = None

    def is_recorded(self, epoch: int) -> bool:
        """Whether ``epoch`` is recorded under ``epoch_intervals``."""
        rule = self.rule
        if rule is None:
            return True
        if isinstance(rule, int):
            return epoch % rule == 0 or (self.total_epochs is not None and epoch == self.total_epochs - 1)
        return epoch in rule

    def open(self, epoch: int, store: str) -> tuple[int, bool]:
        """Begin ``epoch``; returns it as an int and whether it is recorded."""
        if self.current is not None:
            raise RuntimeError(
                f"start_epoch({epoch}) called while epoch {self.current} is still open; call end_epoch() first"
            )
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or not 0 <= epoch <= MAX_EPOCH:
            raise ValueError(f"epoch must be an int from 0 to {MAX_EPOCH} (the store's int32), got {epoch!r}")
        epoch = int(epoch)
        recorded = self.is_recorded(epoch)
        if recorded and self.last_recorded is not None and epoch <= self.last_recorded:
            raise ValueError(
                f"epoch {epoch} comes after epoch {self.last_recorded} was recorded in {store!r}; epochs are "
                "recorded in increasing order (to go back after a restart, use NetworkTrace(..., resume=True))"
            )
        self.current = epoch
        if recorded:
            self.last_recorded = epoch
        return epoch, recorded

    def close(self) -> int:
        """End the open epoch and return it."""
        if self.current is None:
            raise RuntimeError(
                "end_epoch() called without start_epoch(); call trace.start_epoch(epoch) first"
            )
        epoch, self.current = self.current, None
        return epoch
