"""``StainingCallback``: record a :class:`~nn_staining.NetworkTrace` while Lightning trains a model.

::

    from nn_staining.integrations.lightning import StainingCallback

    trainer = lightning.Trainer(max_epochs=10, callbacks=[StainingCallback("results/run", num_classes=10)])
    trainer.fit(module, train_loader, val_loader)

The callback traces the LightningModule (or the submodule named by ``module=``), takes each
batch's labels with ``label_fn`` (``(x, y)`` tuples and ``{"labels": …}`` / ``{"y": …}`` dicts by
default), keeps the gradients of each epoch's last optimizer step for ``grad_norm``, records
validation passes as ``phase="eval"`` with ``record_eval=True``, files Lightning's logged metrics
under each epoch, and continues the trace when training resumes from a Lightning checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..recorder import NetworkTrace
from ._common import (
    GradSnapshot,
    TargetFeeder,
    default_labels,
    default_mask,
    jsonable_metrics,
    missing_framework,
    neuron_weight_params,
)

try:
    import lightning.pytorch as pl
except ImportError as _lightning_error:
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise missing_framework(
            "nn_staining.integrations.lightning", "Lightning", "lightning", _lightning_error
        ) from None

log = logging.getLogger(__name__)

__all__ = ["StainingCallback"]

LabelFn = Callable[[Any], "Tensor | None"]


class StainingCallback(pl.Callback):
    """Drive a :class:`~nn_staining.NetworkTrace` from Lightning's training events.

    ``store``, ``num_classes``, ``layers``, ``epoch_intervals``, ``record_eval``, ``drop_batches``,
    ``overwrite`` and ``trace_options`` (``record_weights``, ``record_checkpoints``, ``probe``,
    ``class_names``, ``background``, ``config``) go to ``NetworkTrace``; the trace is built when
    training starts (``self.trace``) and closed when it ends.
    """

    def __init__(
        self,
        store: str | os.PathLike = "results/run",
        *,
        module: str | nn.Module | None = None,
        label_fn: LabelFn | None = default_labels,
        mask_fn: LabelFn | None = default_mask,
        num_classes: int | None = None,
        layers: Sequence[str] | str | None = None,
        epoch_intervals: int | Sequence[int] | None = None,
        record_eval: bool = False,
        drop_batches: bool = True,
        overwrite: bool = False,
        log_metrics: bool = True,
        **trace_options: Any,
    ) -> None:
        super().__init__()
        self.store = os.fspath(store)
        self.module = module
        self.label_fn = label_fn
        self.mask_fn = mask_fn
        self.num_classes = num_classes
        self.layers = layers
        self.epoch_intervals = epoch_intervals
        self.record_eval = record_eval
        self.drop_batches = drop_batches
        self.overwrite = overwrite
        self.log_metrics = log_metrics
        self.trace_options = trace_options
        self.trace: NetworkTrace | None = None
        self._restored: dict[str, Any] | None = None
        self._feeder: TargetFeeder | None = None
        self._grads: GradSnapshot | None = None
        self._labels: Tensor | None = None
        self._mask: Tensor | None = None
        self._open: int | None = None
        self._ended: int | None = None
        self._no_labels_warned = False
        self._not_entered_warned = False
        self._traced: nn.Module | None = None

    @property
    def state_key(self) -> str:
        """One state per store in a checkpoint (several callbacks may record several stores)."""
        return self._generate_state_key(store=self.store)

    # -- setting up and tearing down ----------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the trace once the model is on its device and any checkpoint is restored."""
        if self.trace is not None:
            return
        model = self._traced = self._traced_module(pl_module)
        resume = self._resuming(trainer)
        options = dict(self.trace_options)
        config = {
            "trainer": "lightning",
            "lightning_version": pl.__version__,
            "traced_module": self.module if isinstance(self.module, str) else type(model).__name__,
            **(options.pop("config", None) or {}),
        }
        max_epochs = trainer.max_epochs
        self.trace = NetworkTrace(
            model,
            self.store,
            self.epoch_intervals,
            self.drop_batches,
            self.layers,
            self.num_classes,
            total_epochs=max_epochs if max_epochs is not None and max_epochs > 0 else None,
            record_eval=self.record_eval,
            overwrite=self.overwrite and not resume,
            resume=resume,
            config=config,
            **options,
        )
        self._feeder = TargetFeeder(
            self.trace,
            model,
            lambda args, kwargs: (self._labels, self._mask),
            integer_rows_are_tokens=False,
            framework="Lightning",
        )
        self._grads = GradSnapshot(neuron_weight_params(model, self.layers))
        log.info("recording %s into %s (resume=%s)", type(model).__name__, self.store, resume)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """End an epoch left open, file the last epoch's metrics and close the trace."""
        if self.trace is None:
            return
        self._end_epoch(trainer)
        self._log_metrics(trainer, self._ended)
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Close the trace: the epochs already ended stay, an epoch left open is not written."""
        self._close()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._feeder is not None:
            self._feeder.remove()
            self._feeder = None
        if self.trace is not None:
            trace, self.trace = self.trace, None
            self._open = None
            trace.close()

    # -- epochs ---------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # metrics logged after this callback's on_train_epoch_end (the module's own) are filed now
        self._log_metrics(trainer, self._ended)
        self._start_epoch(trainer.current_epoch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The validation at an epoch's end is its last event with batches: end the epoch here, before
        ModelCheckpoint (always the last callback) saves the epoch's checkpoint."""
        if not trainer.sanity_checking and trainer.is_last_batch:
            self._end_epoch(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(trainer)
        self._log_metrics(trainer, self._ended)  # with the train epoch's own metrics, now reduced

    def _start_epoch(self, epoch: int) -> None:
        if self.trace is None or self._open is not None:
            return
        self.trace.start_epoch(epoch)
        self._open = epoch
        self._grads.clear()

    def _end_epoch(self, trainer: pl.Trainer) -> None:
        if self.trace is None or self._open is None:
            return
        epoch, self._open = self._open, None
        self._labels = self._mask = None
        with self._grads.installed():
            self.trace.end_epoch()
        self._grads.clear()
        self._ended = epoch
        self._log_metrics(trainer, epoch)

    # -- batches --------------------------------------------------------------------------------
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._open is None:  # a restart from a checkpoint taken in the middle of an epoch
            self._start_epoch(trainer.current_epoch)
        self._set_batch(batch)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        entered = self._feeder is None or self._feeder.entries > 0
        if self._labels is not None and not entered and not self._not_entered_warned:
            self._not_entered_warned = True
            children = ", ".join(name for name, _ in self._traced.named_children()) or "none"
            log.warning(
                "training_step did not call the traced %s itself (it calls its submodules directly), so "
                "the batch's labels reach no forward pass and there are no per-class statistics; pass "
                "StainingCallback(module=...) naming the submodule training_step calls (children: %s)",
                type(self._traced).__name__,
                children,
            )
        self._labels = self._mask = None

    def on_validation_batch_start(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._open is not None and not trainer.sanity_checking:
            self._set_batch(batch)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._labels = self._mask = None

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        """Keep the gradients of the epoch's last step (before clipping) for ``grad_norm``."""
        if self._open is not None and trainer.is_last_batch and self.trace.is_recorded(self._open):
            self._grads.take(copy=True)

    def _set_batch(self, batch: Any) -> None:
        """Labels and mask of the batch about to be run, handed to every pass of the traced module."""
        if self._feeder is None:
            return
        self._feeder.entries = 0
        self._labels = self.label_fn(batch) if self.label_fn is not None else None
        self._mask = self.mask_fn(batch) if self.mask_fn is not None else None
        if self._labels is None and self.label_fn is default_labels and not self._no_labels_warned:
            self._no_labels_warned = True
            log.warning(
                "no labels found in a batch of type %s (the default label_fn reads (x, y) tuples and dicts with "
                "%s); recording without per-class statistics. Pass label_fn=",
                type(batch).__name__,
                "labels/label/y/targets/target",
            )

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the store and the last ended epoch (the trace is flushed
        first, so a checkpoint never runs ahead of the trace on disk)."""
        if self.trace is not None:
            self.trace.flush()
        return {"store": self.store, "last_epoch": self._ended}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restored from a checkpoint: the trace is continued (``resume=True``) when training starts."""
        self._restored = dict(state_dict)
        self._ended = state_dict.get("last_epoch")
        if state_dict.get("store") not in (None, self.store):
            log.warning(
                "the checkpoint's trace was recorded in %r; continuing the trace in %r",
                state_dict["store"],
                self.store,
            )

    # -- helpers --------------------------------------------------------------------------------
    def _resuming(self, trainer: pl.Trainer) -> bool:
        if self._restored is not None:
            return True
        return trainer.ckpt_path is not None and os.path.exists(os.path.join(self.store, "meta.json"))

    def _traced_module(self, pl_module: pl.LightningModule) -> nn.Module:
        if self.module is None:
            return pl_module
        if isinstance(self.module, nn.Module):
            return self.module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            children = ", ".join(name for name, _ in pl_module.named_children()) or "none"
            raise ValueError(
                f"module={self.module!r} names no submodule of {type(pl_module).__name__}; its children: {children}"
            ) from None

    def _log_metrics(self, trainer: pl.Trainer, epoch: int | None) -> None:
        """File Lightning's logged metrics (``trainer.callback_metrics``) under ``epoch``."""
        if not self.log_metrics or self.trace is None or epoch is None:
            return
        values = jsonable_metrics(trainer.callback_metrics, rename={"epoch": "lightning_epoch"})
        if values:
            self.trace.log_metrics(epoch, **values)
