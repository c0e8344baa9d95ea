"""``NetworkTrace``: records what happens inside an unmodified PyTorch model while it trains.

A thin facade that wires four parts, each with one job: the epoch schedule
(:mod:`~nn_staining.schedule`: which epochs, in what order), the hook tap
(:mod:`~nn_staining.tap`: hooks and per-batch bookkeeping), the on-device statistics
(:mod:`~nn_staining.stats`) and the epoch writer (:mod:`~nn_staining.writer`: Parquet parts and
``meta.json`` on a writer thread). Data flows one way: hooks → statistics → an
:class:`~nn_staining.records.EpochRecord` → the writer.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .catalog import FORMAT_NAME, FORMAT_VERSION, new_run_id, read_commits, read_meta
from .distributed import RankGroup, merge_epoch
from .kernels import describe as describe_reduction
from .layers import select_layers, snapshot_weights
from .records import EpochRecord, PhaseRecord
from .rows import assign_offsets
from .schedule import EpochIntervals, EpochSchedule, epoch_rule, jsonable_intervals
from .stats import ChunkPool, LabelFaults, PhaseStats, checked_on_the_host
from .store import ROW_GROUP_ROWS, TraceWriter
from .tap import HookTap
from .writer import MAX_PENDING_WRITES, EpochWriter, NoWriter

if TYPE_CHECKING:
    from .trace import Trace

log = logging.getLogger(__name__)

#: An epoch whose running sums take this many bytes waits, at ``end_epoch``, for the writer to finish
#: the epochs before it before it is copied to the host: a wide model then holds one epoch's host
#: copy at a time instead of up to three (about 64 MiB is 100,000 neurons of 80 classes).
LARGE_EPOCH_BYTES = 64 * 2**20

__all__ = ["MAX_PENDING_WRITES", "NetworkTrace", "Network_Trace", "epoch_rule"]


class NetworkTrace:
    """Record per-epoch, per-layer, per-neuron statistics of ``model`` into a Parquet store.

    Use as a context manager; call :meth:`start_epoch` / :meth:`end_epoch` around each epoch
    (or ``with trace.epoch(e):``) and, optionally, :meth:`set_targets` before each forward pass
    for per-class statistics. Nothing in the model has to change.
    """

    def __init__(
        self,
        model: nn.Module,
        store: str | os.PathLike = "results/run",
        epoch_intervals: EpochIntervals = None,
        drop_batches: bool = True,
        layers: Sequence[str] | str | None = None,
        num_classes: int | None = None,
        *,
        total_epochs: int | None = None,
        record_eval: bool = False,
        record_weights: bool = True,
        record_checkpoints: bool = False,
        probe: Any = None,
        class_names: Sequence[str] | None = None,
        overwrite: bool = False,
        resume: bool = False,
        background: bool = True,
        config: dict[str, Any] | None = None,
        batch_dim: int | None = None,
    ) -> None:
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0
        ):
            raise ValueError(
                f"batch_dim={batch_dim!r} must be None (known from the modules and the batch's size), 0 "
                "(batch-major) or 1 (time-major: (steps, batch, …) outputs)"
            )
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
            raise ValueError(f"num_classes={num_classes!r} must be a positive int or None")
        if overwrite and resume:
            raise ValueError(
                "pass overwrite=True (replace the stored trace) or resume=True (continue it), not both"
            )
        self.store = os.fspath(store)
        self._schedule = EpochSchedule(epoch_intervals, total_epochs)
        self.drop_batches = drop_batches
        self.record_eval = record_eval
        self.record_weights = record_weights
        self.record_checkpoints = record_checkpoints
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.config = {str(k): _jsonable(v) for k, v in (config or {}).items()}
        try:
            json.dumps(self.config)
        except TypeError as exc:
            raise TypeError(f"config values must be JSON-serialisable: {exc}") from None
        self._layer_patterns = layers
        self._probe = _probe_set(probe)
        self._group = RankGroup.current()
        if self._group is not None and not drop_batches:
            raise ValueError(
                "drop_batches=False is not supported under torch.distributed (per-batch rows are per rank); "
                "record with the default drop_batches=True"
            )
        self.model = unwrap_model(model)
        _check_unsharded(self.model, record_weights)
        self._sharded = is_sharded(self.model)
        if self._sharded and self._probe is not None:
            raise ValueError(
                "probe= is not supported on an FSDP-sharded model: only rank 0 runs the probe set, and a "
                "sharded forward needs every rank"
            )
        self._tap = HookTap(self.model, select_layers(self.model, layers), batch_dim)
        self._recorded: dict[str, list[int]] = {"train": [], "eval": []}
        self._row_layouts: list[dict[str, list[str]]] = []
        self._run_id = new_run_id()
        self._created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._resumed: dict[str, Any] | None = None  # the stored meta.json until the first new epoch
        self._stored_layers: list[dict[str, Any]] | None = None
        if resume and os.path.exists(os.path.join(self.store, "meta.json")):
            self._continue(read_meta(self.store))
        store_writer = self._open_store(overwrite, resume)
        if store_writer is None:
            self._writer: EpochWriter | NoWriter = NoWriter()
        else:
            self._writer = EpochWriter(
                store_writer,
                background=background,
                record_weights=record_weights,
                write_checkpoint=_checkpoint_writer(self.store) if record_checkpoints else None,
                write_probe=_probe_writer(self.store) if self._probe is not None else None,
            )
        self._phases: dict[str, PhaseStats] = {}
        self._pool = ChunkPool()
        # an empty but valid trace from the start: a crash before the first epoch leaves a store
        # that loads (no epochs) and that overwrite=True may replace
        if store_writer is not None and self._resumed is None:
            store_writer.write_meta(self._meta())

    def _open_store(self, overwrite: bool, resume: bool) -> TraceWriter | None:
        """Create, replace or continue the store; under torch.distributed only rank 0 touches it,
        and its error, if any, is raised on every rank."""
        if self._group is None:
            return TraceWriter(self.store, overwrite=overwrite, resume=resume)
        writer, error = None, None
        if self._group.is_writer:
            try:
                writer = TraceWriter(self.store, overwrite=overwrite, resume=resume)
            except (OSError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
        self._group.broadcast_error(error, self.store)
        return writer

    # -- resume --------------------------------------------------------------------------------
    def _continue(self, stored: dict[str, Any]) -> None:
        """Take over a stored trace (``resume=True``): its epochs, metrics and classes; the model
        must have the stored layers."""
        stored_classes = stored.get("num_classes")
        if self.num_classes is not None and stored_classes is not None and self.num_classes != stored_classes:
            raise ValueError(
                f"resume=True: {self.store!r} was recorded with num_classes={stored_classes}, "
                f"not {self.num_classes}"
            )
        self.num_classes = self.num_classes or stored_classes
        missing = [
            info["key"]
            for info in stored["layers"]
            if info.get("first_call", info["key"]) not in self._tap.modules
        ]
        if missing:
            raise ValueError(
                f"resume=True: the stored trace {self.store!r} has layers this model does not record: "
                f"{', '.join(missing)}; layers now: {', '.join(self._tap.modules)}"
            )
        self.class_names = self.class_names or stored.get("class_names")
        commits = read_commits(self.store, stored)
        self._recorded = {phase: sorted(commits.get(phase, {})) for phase in self._recorded}
        self._row_layouts = [dict(layout) for layout in stored["layouts"]]
        self._run_id = stored["run_id"]
        self._created = stored.get("created", self._created)
        self._stored_layers = list(stored["layers"])
        self._resumed = stored

    def _truncate_resumed(self, first: int) -> None:
        """Keep the stored epochs below ``first``, the first epoch recorded now: the logs stop listing
        the others first, then their parts are deleted, so a reader never sees a listed epoch without
        its parts. ``weight_delta_norm`` of ``first`` is taken against the last kept epoch's stored
        weights."""
        stored, self._resumed = self._resumed, None
        self._recorded = {phase: [e for e in epochs if e < first] for phase, epochs in self._recorded.items()}
        if not isinstance(self._writer, EpochWriter):
            return
        self._writer.store.drop_epochs(first)
        kept = self._recorded["train"]
        self._writer.committed = sorted(set(kept) | set(self._recorded["eval"]))
        if kept and stored["config"].get("record_weights", True):
            from .trace import load_trace

            t = load_trace(self.store)
            self._writer.set_previous_weights(
                {
                    info["key"]: t.weights(kept[-1], info["key"])
                    for info in stored["layers"]
                    if info.get("has_weights")
                }
            )

    # -- configuration -------------------------------------------------------------------------
    @property
    def epoch_intervals(self) -> EpochIntervals:
        return self._schedule.epoch_intervals

    @property
    def total_epochs(self) -> int | None:
        return self._schedule.total_epochs

    @property
    def layers(self) -> list[str]:
        """The keys of the layers selected for recording."""
        return list(self._tap.modules)

    def is_recorded(self, epoch: int) -> bool:
        """Whether ``epoch`` is recorded under ``epoch_intervals``."""
        return self._schedule.is_recorded(epoch)

    # -- context management --------------------------------------------------------------------
    def __enter__(self) -> NetworkTrace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and finish writing; an epoch left open is discarded (never half-written)."""
        self._tap.detach()
        if self._schedule.current is not None:
            log.warning("epoch %d was started but not ended; it is not written", self._schedule.current)
            self._schedule.close()
        self._phases = {}
        self._pool = ChunkPool()  # free the device buffers
        self._writer.close()

    def flush(self) -> None:
        """Wait until every ended epoch is on disk; re-raises an error met while writing one."""
        self._writer.flush()

    # -- training events -----------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch``: attach the hooks if it is recorded (a non-recorded epoch costs nothing)."""
        if self._resumed is not None:
            self._truncate_resumed(int(epoch) if isinstance(epoch, (int, np.integer)) else epoch)
        epoch, recorded = self._schedule.open(epoch, self.store)
        self._tap.targets = None
        if not recorded:
            return
        phases = ("train", "eval") if self.record_eval else ("train",)
        keep = not self.drop_batches
        self._phases = {p: PhaseStats(self.num_classes or 0, keep, self._pool, phase=p) for p in phases}
        self._tap.attach(self._phases)

    @contextlib.contextmanager
    def epoch(self, epoch: int) -> Iterator[NetworkTrace]:
        """``with trace.epoch(e):`` — start_epoch on entry, end_epoch on a clean exit."""
        self.start_epoch(epoch)
        try:
            yield self
        except BaseException:
            self._tap.detach()
            self._schedule.close()
            self._phases = {}
            raise
        self.end_epoch()

    def set_targets(self, targets: Tensor | None, mask: Tensor | None = None) -> None:
        """Give the class labels of the next forward pass's batch (enables per-class statistics).

        Accepts (batch,) integer labels or floats that are exactly integral (0/1), (batch, 1), or
        one-hot / probability (batch, classes) rows; fractional, NaN or infinite float labels are a
        ``ValueError`` (at once for CPU labels; labels on an accelerator are checked there and
        refused at ``end_epoch``). Negative labels (``ignore_index``) count as unlabelled; labels
        ``>= num_classes`` are counted on the device and reported at ``end_epoch``. The labels serve
        the calling thread's next forward pass only; a second call before it is a ``RuntimeError``,
        and labels no pass used are dropped with a warning at ``end_epoch``. ``mask``
        ((batch,) or (batch, positions), nonzero = keep, e.g. an attention mask or a padding
        mask for duplicated samples) excludes masked samples / positions from every statistic.
        """
        if not self._phases:  # not a recorded epoch: nothing to do
            return
        if targets is not None:
            targets = normalise_targets(targets, self._tap.label_faults)
            if self.num_classes is None:
                self.num_classes = max(2, int(targets.max()) + 1) if targets.numel() else 2
                log.info(
                    "num_classes inferred from the first labels: %d (pass num_classes= to fix it)",
                    self.num_classes,
                )
                for stats in self._phases.values():
                    stats.set_num_classes(self.num_classes)
        if mask is not None:
            mask = normalise_mask(mask, None if targets is None else targets.shape[0])
            if not self.drop_batches:
                raise ValueError("set_targets(mask=...) is not supported with drop_batches=False")
        self._tap.give_labels(targets, mask)

    def end_epoch(self) -> None:
        """Reduce the epoch, snapshot weights and biases, and hand the epoch to the writer.

        The statistics reach the host here, once. Labels outside ``num_classes`` raise ``ValueError``
        after the epoch is handed to the writer. Building the tables and writing Parquet runs on a
        worker thread (no tensor work there); :meth:`flush` or :meth:`close` waits for it.
        """
        epoch = self._schedule.close()
        all_phases, self._phases = self._phases, {}
        self._tap.detach(epoch)
        if self._group is not None:
            merge_epoch(self._group, epoch, bool(all_phases), all_phases, self.num_classes or 0)
        phases = [s for s in all_phases.values() if s.has_rows]
        if all_phases:
            self._tap.report(epoch, written=bool(phases))
        if not phases:
            self._writer.raise_finished_errors()
            return
        for stats in phases:
            stats.reduce_pending()  # buffered batches count towards the epoch's size
        large = sum(stats.nbytes() for stats in phases) >= LARGE_EPOCH_BYTES
        if large:
            self._writer.wait()  # one large epoch in memory at a time: the last is written first
        records = tuple(r for r in (stats.finish(in_place=large) for stats in phases) if r.outputs)
        if records and self._stored_layers is not None:
            self._check_resumed_layers()
        if records:
            for record in records:
                self._recorded[record.phase].append(epoch)
            layouts = tuple(self._layout_index(record) for record in records)
            if self._group is None or self._group.is_writer:
                self._writer.submit_epoch(
                    EpochRecord(
                        epoch=epoch,
                        phases=records,
                        weights={}
                        if self._sharded
                        else snapshot_weights(self._tap.modules, self._tap.layouts),
                        layers=tuple(self._tap.ordered_layers()),
                        num_classes=self.num_classes or 0,
                        meta=self._meta(),
                        layouts=layouts,
                        checkpoint=_state_copy(self.model) if self.record_checkpoints else None,
                        probe=self._run_probe(),
                    )
                )
        self._writer.raise_finished_errors()
        self._tap.label_faults.raise_any(epoch)
        for stats in phases:
            labels = stats.label_summary()
            if labels is not None and labels.out_of_range:
                raise ValueError(
                    f"epoch {epoch} ({stats.phase}): {labels.out_of_range} labels given to set_targets lie "
                    f"outside the classes 0..{self.num_classes - 1} (num_classes={self.num_classes}; labels "
                    f"seen from {labels.low} to {labels.high}); those samples are missing from the per-class "
                    "statistics. The epoch was still written; pass the right num_classes="
                )

    def _layout_index(self, record: PhaseRecord) -> int:
        """The index in ``meta["layouts"]`` of the layers this phase's parts hold (added when new)."""
        layers = self._tap.ordered_layers()
        layout = {
            "neurons": [k for k in layers if k in record.outputs],
            "inputs": [k for k in layers if k in record.inputs],
        }
        if layout not in self._row_layouts:
            self._row_layouts.append(layout)
        return self._row_layouts.index(layout)

    def _check_resumed_layers(self) -> None:
        """After a resume, the layers seen now must be the stored ones (names, neurons, kind)."""
        stored, self._stored_layers = self._stored_layers, None
        fields = ("key", "neurons", "kind", "type", "in_features")
        now = [
            {f: d.get(f) for f in fields}
            for d in (self._tap.descriptions[k] for k in self._tap.ordered_layers())
        ]
        before = [{f: d.get(f) for f in fields} for d in stored]
        if now != before:
            diff = next(
                (f"{a} recorded now, {b} stored" for a, b in zip(now, before) if a != b),
                f"{len(now)} layers recorded now, {len(before)} stored",
            )
            raise ValueError(f"resume=True: the model does not match the stored trace {self.store!r}: {diff}")

    def _run_probe(self) -> Any:
        """The probe set's representations at this epoch's end (hooks already removed), or None."""
        if self._probe is None:
            return None
        from .probes import run_probe

        known = {**self._tap.declared, **self._tap.batch_dims}  # declared per module, learnt per layer
        return run_probe(self.model, self._tap.modules, self._probe, known, self._tap.input_batch_dim())

    def log_metrics(self, epoch: int | None = None, **values: Any) -> None:
        """Keep training metrics (loss, accuracy, a confusion matrix…) in ``meta.json`` beside the trace.

        ``epoch=None`` files them under the run as a whole; values must be JSON-serialisable.
        """
        key = "run" if epoch is None else str(int(epoch))
        converted = {k: _jsonable(v) for k, v in values.items()}
        try:
            json.dumps(converted)
        except TypeError as exc:
            raise TypeError(f"log_metrics values must be JSON-serialisable: {exc}") from None
        self._writer.submit_metrics(key, converted)

    # -- meta.json -----------------------------------------------------------------------------
    def _meta(self) -> dict[str, Any]:
        """A snapshot of ``meta.json`` (taken on the training thread, written by the writer)."""
        if self._stored_layers is not None:  # resumed, and this run's layers are not known yet
            layers = self._stored_layers
        else:
            layers = assign_offsets([self._tap.layer_entry(k) for k in self._tap.ordered_layers()])
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "run_id": self._run_id,
            "created": self._created,
            "model": {"class": type(self.model).__name__, "repr": repr(self.model)[:4000]},
            "layers": layers,
            "num_neurons": sum(info["neurons"] for info in layers),
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "layouts": [dict(layout) for layout in self._row_layouts],
            "row_group_size": ROW_GROUP_ROWS,
            "probe": _probe_meta(self._probe),
            "config": {
                "epoch_intervals": jsonable_intervals(self.epoch_intervals),
                "total_epochs": self.total_epochs,
                "drop_batches": self.drop_batches,
                "record_eval": self.record_eval,
                "record_weights": self.record_weights,
                "record_checkpoints": self.record_checkpoints,
                "layers": self._layer_patterns,
                **self.config,
            },
            "reduction": describe_reduction(),
            "versions": {
                "nn_staining": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }

    # -- reading back --------------------------------------------------------------------------
    def load(self) -> Trace:
        """The trace written so far (the completed epochs), as :func:`nn_staining.load_trace` gives it."""
        from .trace import load_trace

        self.flush()
        return load_trace(self.store)

    def __getitem__(self, signature: str) -> Any:
        """Answer a signature from the completed epochs, e.g. ``trace["E_0/L_hidden_1/n_20"]``."""
        return self.load()[signature]


Network_Trace = NetworkTrace


def normalise_targets(targets: Tensor, faults: LabelFaults | None = None) -> Tensor:
    """Labels as a (batch,) int64 tensor: from integers, exactly integral floats, (batch, 1) or
    one-hot / probability rows. Fractional, NaN or infinite float labels (NaN or infinite rows) are a
    ``ValueError``; with ``faults``, labels on an accelerator are counted there instead, left
    unlabelled (-1), and refused at ``end_epoch``."""
    if not isinstance(targets, Tensor):
        targets = torch.as_tensor(targets)
    targets = targets.detach()
    if targets.dim() == 2 and targets.shape[1] == 1:
        targets = targets[:, 0]
    rows = targets.dim() == 2  # one-hot (F.one_hot gives int64) or class probabilities
    if targets.dim() != 1 and not rows:
        raise ValueError(
            f"set_targets expects one label per sample, (batch,) or one-hot (batch, classes); "
            f"got shape {tuple(targets.shape)} of {targets.dtype}"
        )
    bad = None
    if targets.is_floating_point():
        bad = (faults or LabelFaults()).check(targets, rows=rows, defer=faults is not None)
        if not rows:  # beyond int64: out of range, or ignored when negative, as integers would be
            targets = targets.clamp(-1, 2**31)
    if rows and not targets.is_floating_point() and checked_on_the_host(targets):
        one_hot = bool(((targets == 0) | (targets == 1)).all() and (targets.sum(1) == 1).all())
        if not one_hot:
            raise ValueError(
                f"set_targets got integer labels of shape {tuple(targets.shape)} that are not one-hot rows "
                f"(e.g. row 0: {targets[0, :8].tolist()}): per-position labels or token ids are not one label "
                "per sample; give (batch,) class labels (or one-hot rows), and a mask for padded positions"
            )
    if rows:
        targets = targets.argmax(1)
    targets = targets if targets.dtype == torch.int64 else targets.to(torch.int64)
    return targets if bad is None else targets.masked_fill(bad, -1)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that computes: inside ``DistributedDataParallel`` / ``DataParallel`` (``.module``)
    and ``torch.compile`` (``._orig_mod``) wrappers, so layer names do not depend on the wrapper."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """Whether the model is wrapped by FSDP (its parameters hold each rank's shard only)."""
    if "torch.distributed.fsdp" not in sys.modules:  # nothing was sharded, and importing it costs seconds
        return False
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return False
    return any(isinstance(m, (FSDPModule, FullyShardedDataParallel)) for m in model.modules())


def _check_unsharded(model: nn.Module, record_weights: bool) -> None:
    """Per-neuron weights of a sharded model cannot be snapshot without gathering every rank's
    shard, so recording them is refused with a clear error; ``record_weights=False`` records the
    activation statistics (merged across ranks as under DDP) and leaves the weight columns null."""
    if record_weights and is_sharded(model):
        raise ValueError(
            "the model is sharded by FSDP: nn_staining cannot snapshot per-neuron weights of a shard. "
            "Pass record_weights=False to record activation statistics (merged across ranks as under "
            "DDP); the weight, bias and gradient columns are then null"
        )


def normalise_mask(mask: Tensor, labels: int | None) -> Tensor:
    """A (batch, …) bool keep-mask; its batch must match the labels given with it."""
    if not isinstance(mask, Tensor):
        mask = torch.as_tensor(mask)
    if mask.dim() == 0 or (labels is not None and mask.shape[0] != labels):
        raise ValueError(
            f"set_targets mask of shape {tuple(mask.shape)} does not match the batch"
            + (f" of {labels} labels" if labels is not None else "")
            + "; give (batch,) or (batch, positions) with nonzero = keep"
        )
    return mask.detach() != 0


def _state_copy(model: nn.Module) -> dict[str, Tensor]:
    """Contiguous CPU copies of the model's ``state_dict`` that later steps cannot change."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}


def _probe_set(probe: Any) -> Any:
    """``probe=`` validated as a :class:`~nn_staining.probes.ProbeSet` (None without one)."""
    if probe is None:
        return None
    from .probes import ProbeSet

    return ProbeSet.from_arg(probe)


def _probe_meta(probe: Any) -> dict[str, Any] | None:
    if probe is None:
        return None
    from .probes import probe_meta

    return probe_meta(probe)


def _probe_writer(store: str):
    from .probes import write_probe

    return lambda epoch, record, layers: write_probe(store, epoch, record, layers)


def _checkpoint_writer(store: str):
    from .checkpoints import write_checkpoint

    return lambda epoch, tensors: write_checkpoint(store, epoch, tensors)


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values (also inside lists and dicts) as plain Python numbers and lists."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
