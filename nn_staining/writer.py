"""The epoch writer: turns :class:`~nn_staining.records.EpochRecord` s into Parquet parts off the
training thread.

The training thread hands over a complete, immutable record (statistics, weights and the
``meta.json`` to write after it) and goes on; one writer thread builds each table's Arrow rows
one slice at a time and streams them to its part, so a wide layer never exists as a whole Arrow
table. The writer keeps only the last written epoch's weights, for the next epoch's
``weight_delta_norm``, and lets go of them once those are taken, before the epoch's tables are
built (after a failed write the next epoch has none); it has no reference to the recorder, so it
cannot read training-thread state. At most ``max_pending`` epochs wait in memory. A failed write
removes what it wrote and commits nothing, so no log lists an epoch whose parts are missing;
later epochs are still written. After each commit the writer adds the epoch to the store's
history index; a failure there is only logged, since the index is a derived copy and readers
fall back to the parts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import numpy as np

from .catalog import Commit
from .records import EpochRecord
from .store import TraceWriter, epoch_write_error
from .tables import epoch_tables, weight_delta_norms

log = logging.getLogger(__name__)

#: Epochs handed to the writer thread and not yet on disk before ``submit_epoch`` waits for the oldest.
MAX_PENDING_WRITES = 2


class EpochWriter:
    """Writes epochs and ``meta.json`` on one background thread (inline with ``background=False``)."""

    def __init__(
        self,
        store: TraceWriter,
        *,
        background: bool = True,
        record_weights: bool = True,
        max_pending: int = MAX_PENDING_WRITES,
        write_checkpoint: Callable[[int, dict[str, Any]], None] | None = None,
        write_probe: Callable[[int, Any, tuple[str, ...]], None] | None = None,
    ) -> None:
        self.store = store
        self.record_weights = record_weights
        self.max_pending = max_pending
        self._write_checkpoint = write_checkpoint
        self._write_probe = write_probe
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nn_staining") if background else None
        self._jobs: list[Future] = []
        self._previous_weights: dict[str, np.ndarray] = {}
        self.committed: list[int] = []  # epochs on disk (for error messages)

    def set_previous_weights(self, weights: dict[str, np.ndarray]) -> None:
        """The weights ``weight_delta_norm`` of the next epoch is taken against (after a resume)."""
        self.flush()
        self._previous_weights = dict(weights)

    def submit_epoch(self, record: EpochRecord) -> None:
        """Queue ``record`` for writing, first waiting while ``max_pending`` epochs are in flight."""
        while len(self._jobs) >= self.max_pending:  # back-pressure: memory stays flat
            self._jobs.pop(0).result()
        self._jobs.append(self._run(self._write_epoch, record))

    def submit_metrics(self, key: str, values: dict[str, Any]) -> None:
        """Queue ``log_metrics`` values (appended to the metrics log after the epochs already queued)."""
        self._jobs.append(self._run(self.store.append_metrics, key, values))

    def wait(self) -> None:
        """Wait until the queued writes are done, without raising their errors (they are raised as
        before, by :meth:`raise_finished_errors`, :meth:`flush` or :meth:`close`)."""
        futures_wait(self._jobs)

    def raise_finished_errors(self) -> None:
        """Re-raise the error of a write that has already failed (without waiting for running ones)."""
        while self._jobs and self._jobs[0].done():
            self._jobs.pop(0).result()

    def flush(self) -> None:
        """Wait until every queued write is on disk; re-raises an error met while writing."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def close(self) -> None:
        """Flush, then stop the writer thread."""
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def _run(self, fn: Callable[..., None], *args: Any) -> Future:
        """Run ``fn`` on the writer thread (inline, raising at once, without one)."""
        if self._executor is None:
            fn(*args)
            future: Future = Future()
            future.set_result(None)
            return future
        return self._executor.submit(fn, *args)

    def _write_epoch(self, record: EpochRecord) -> None:
        """Write the epoch's parts (and checkpoint, probe) and ``meta.json`` if it changed, then
        commit it; on failure remove what was written and raise an error that says what is intact."""
        written: list[tuple[str, dict[str, int]]] = []
        neurons: list[Any] = []
        phase = record.phases[0].phase
        try:
            deltas = weight_delta_norms(record.weights, self._previous_weights)
            self._previous_weights = {}  # all they were kept for: at width as large as this epoch's
            for phase_record in record.phases:
                phase = phase_record.phase
                tables = epoch_tables(
                    phase_record,
                    record.layers,
                    record.weights,
                    deltas,
                    record.num_classes,
                    self.record_weights,
                )
                written.append((phase, self.store.write_epoch(record.epoch, phase, tables)))
                source = tables.get("neurons")
                neurons.append(None if source is None else source.built)  # kept only when one slice
            if record.checkpoint is not None and self._write_checkpoint is not None:
                self._write_checkpoint(record.epoch, record.checkpoint)
            if record.probe is not None and self._write_probe is not None:
                self._write_probe(record.epoch, record.probe, record.layers)
            self.store.write_meta(record.meta)
            for (phase, rows), layout in zip(written, record.layouts):
                self.store.commit(Commit(record.epoch, phase, layout, rows))
        except BaseException as exc:
            for done, _ in written:
                self.store.remove_parts(record.epoch, done)
            self.store.remove_extras(record.epoch)
            raise epoch_write_error(self.store.root, record.epoch, phase, exc, self.committed) from exc
        self.committed.append(record.epoch)
        self._previous_weights = {k: w.weights for k, w in record.weights.items() if w.weights is not None}
        for (phase, rows), layout, table in zip(written, record.layouts, neurons):
            try:
                self.store.index_committed(Commit(record.epoch, phase, layout, rows), table)
            except Exception as exc:  # the index is a derived copy: the epoch is committed either way
                log.warning(
                    "history index of %s not updated at epoch %d: %s", self.store.root, record.epoch, exc
                )


class NoWriter:
    """The writer of a rank that does not write (ranks other than 0 under ``torch.distributed``)."""

    def submit_epoch(self, record: EpochRecord) -> None:
        """Drop ``record``: rank 0 writes the merged epoch."""

    def submit_metrics(self, key: str, values: dict[str, Any]) -> None:
        """Drop the metrics: rank 0 keeps them."""

    def wait(self) -> None:
        """Nothing to wait for."""

    def raise_finished_errors(self) -> None:
        """Nothing is written here, so nothing can fail."""

    def flush(self) -> None:
        """Nothing to wait for."""

    def close(self) -> None:
        """Nothing to stop."""
