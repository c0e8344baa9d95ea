"""``StainingTrainerCallback``: record a :class:`~nn_staining.NetworkTrace` while a Hugging Face
``Trainer`` trains a model.

::

    from nn_staining.integrations.transformers import StainingTrainerCallback

    trainer = Trainer(model, args, train_dataset=train, eval_dataset=val,
                      callbacks=[StainingTrainerCallback("results/run", record_eval=True)])
    trainer.train()

No ``TrainerCallback`` event sees a batch, so the callback reads the ``labels`` and
``attention_mask`` keyword arguments of every forward pass with a forward pre-hook on the model.
Sequence labels ``(batch,)`` give per-class statistics (``-100``, the ``ignore_index``, counts as
unlabelled); token labels ``(batch, seq)`` (token classification, language modelling) are not one
class per sample, so the trace is then recorded without per-class statistics (with a warning),
unless ``label_fn`` derives one label per sample. Masked (padding) positions are not observations.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..recorder import NetworkTrace
from ._common import (
    GradSnapshot,
    TargetFeeder,
    jsonable_metrics,
    missing_framework,
    neuron_weight_params,
)

try:
    import transformers
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ImportError as _transformers_error:
    raise missing_framework(
        "nn_staining.integrations.transformers",
        "Hugging Face transformers",
        "transformers accelerate",
        _transformers_error,
    ) from None

log = logging.getLogger(__name__)

__all__ = ["StainingTrainerCallback"]

KwargsFn = Callable[[dict], "Tensor | None"]
#: Model classes whose ``labels`` are one class per sample, numbered by ``config.num_labels``.
PER_SAMPLE_HEADS = ("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")
#: A key of the final log, which sums up the run as a whole.
RUN_SUMMARY_KEY = "train_runtime"


def forward_labels(kwargs: dict) -> Tensor | None:
    """The ``labels`` keyword argument of a forward pass, as ``Trainer`` passes it."""
    value = kwargs.get("labels")
    return value if isinstance(value, Tensor) else None


def forward_mask(kwargs: dict) -> Tensor | None:
    """The ``attention_mask`` keyword argument of a forward pass (0 marks padding)."""
    value = kwargs.get("attention_mask")
    return value if isinstance(value, Tensor) else None


class StainingTrainerCallback(TrainerCallback):
    """Drive a :class:`~nn_staining.NetworkTrace` from ``Trainer``'s events.

    ``store``, ``num_classes``, ``layers``, ``epoch_intervals``, ``record_eval``, ``drop_batches``,
    ``overwrite`` and ``trace_options`` (``record_weights``, ``record_checkpoints``, ``probe``,
    ``class_names``, ``background``, ``config``) go to ``NetworkTrace``. For a
    ``*ForSequenceClassification`` model ``num_classes`` and ``class_names`` default to its
    ``config.num_labels`` / ``id2label``. ``label_fn`` / ``mask_fn`` take the forward pass's
    keyword arguments.
    """

    def __init__(
        self,
        store: str | os.PathLike = "results/run",
        *,
        label_fn: KwargsFn | None = forward_labels,
        mask_fn: KwargsFn | None = forward_mask,
        num_classes: int | None = None,
        layers: Sequence[str] | str | None = None,
        epoch_intervals: int | Sequence[int] | None = None,
        record_eval: bool = False,
        drop_batches: bool = True,
        overwrite: bool = False,
        log_metrics: bool = True,
        **trace_options: Any,
    ) -> None:
        self.store = os.fspath(store)
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
        self._feeder: TargetFeeder | None = None
        self._grads: GradSnapshot | None = None
        self._open: int | None = None
        self._ended: int | None = None
        self._end_after_eval = False
        self._copy_grads = True  # until the first step shows Trainer sets gradients to None
        self._checked_references = False

    # -- setting up and tearing down ----------------------------------------------------------------
    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module = None,
        **kwargs,
    ) -> None:
        """Build the trace on the model Trainer trains; continue it when training resumes."""
        if self.trace is not None:
            self._close()
        if model is None:
            raise ValueError("StainingTrainerCallback needs the model: Trainer passes it to on_train_begin")
        resume = state.global_step > 0 and os.path.exists(os.path.join(self.store, "meta.json"))
        options = dict(self.trace_options)
        options.setdefault("class_names", self._class_names(model))
        config = {
            "trainer": "transformers",
            "transformers_version": transformers.__version__,
            **(options.pop("config", None) or {}),
        }
        self.trace = NetworkTrace(
            model,
            self.store,
            self.epoch_intervals,
            self.drop_batches,
            self.layers,
            self.num_classes if self.num_classes is not None else self._head_classes(model),
            total_epochs=math.ceil(state.num_train_epochs) if state.num_train_epochs else None,
            record_eval=self.record_eval,
            overwrite=self.overwrite and not resume,
            resume=resume,
            config=config,
            **options,
        )
        self._feeder = TargetFeeder(
            self.trace,
            model,
            self._targets_of,
            integer_rows_are_tokens=True,
            framework="Hugging Face",
        )
        self._grads = GradSnapshot(neuron_weight_params(model, self.layers))
        log.info("recording %s into %s (resume=%s)", type(model).__name__, self.store, resume)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """End an epoch left open and close the trace (its hooks are removed)."""
        self._end_epoch()
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
    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        if self.trace is None:
            return
        self._end_epoch()  # an epoch kept open for an evaluation that did not come
        epoch = math.floor(state.epoch + 1e-6) if state.epoch else 0
        self.trace.start_epoch(epoch)
        self._open = epoch
        self._grads.clear()

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """End the epoch, or keep it open for the evaluation Trainer runs right after this event."""
        if self.record_eval and control.should_evaluate:
            self._end_after_eval = True
        else:
            self._end_epoch(flush=control.should_save)

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, metrics=None, **kwargs
    ) -> None:
        if self._end_after_eval:
            self._end_epoch(flush=control.should_save)

    def _end_epoch(self, flush: bool = False) -> None:
        self._end_after_eval = False
        if self.trace is None or self._open is None:
            return
        epoch, self._open = self._open, None
        with self._grads.installed():
            self.trace.end_epoch()
        self._grads.clear()
        self._ended = epoch
        if flush:  # a checkpoint follows: the trace on disk keeps up with it
            self.trace.flush()

    # -- steps ----------------------------------------------------------------------------------
    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        """Keep this step's gradients (after Trainer's clipping): the epoch's last step gives ``grad_norm``."""
        if self._open is not None and self.trace.is_recorded(self._open):
            self._grads.take(copy=self._copy_grads, watch=not self._checked_references)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs
    ) -> None:
        if not self._checked_references and self._grads is not None and self._grads.grads:
            # Trainer calls model.zero_grad() before this event: gradients set to None leave the
            # tensors kept by reference intact, so later steps need no copy
            self._checked_references = True
            self._copy_grads = not self._grads.references_survive()

    # -- metrics --------------------------------------------------------------------------------
    def on_log(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, logs=None, **kwargs
    ) -> None:
        """File Trainer's logs under the epoch they describe (its ``epoch`` key becomes ``hf_epoch``);
        the final summary (``train_runtime`` …) under the run."""
        if not self.log_metrics or self.trace is None or not logs:
            return
        values = jsonable_metrics(logs, rename={"epoch": "hf_epoch"})
        if RUN_SUMMARY_KEY in values:
            self.trace.log_metrics(None, **values)
            return
        epoch = self._open if self._open is not None else self._ended
        if epoch is not None and values:
            self.trace.log_metrics(epoch, **values)

    # -- helpers --------------------------------------------------------------------------------
    def _targets_of(self, args: tuple, kwargs: dict) -> tuple[Tensor | None, Tensor | None]:
        labels = self.label_fn(kwargs) if self.label_fn is not None else None
        mask = self.mask_fn(kwargs) if self.mask_fn is not None else None
        return labels, mask

    @staticmethod
    def _head_classes(model: nn.Module) -> int | None:
        """``config.num_labels`` of a model whose labels are one class per sample, else None."""
        config = getattr(model, "config", None)
        if config is not None and type(model).__name__.endswith(PER_SAMPLE_HEADS):
            return getattr(config, "num_labels", None)
        return None

    def _class_names(self, model: nn.Module) -> list[str] | None:
        """``config.id2label`` when it names the classes (not Hugging Face's default ``LABEL_i``)."""
        if self.num_classes is not None or self._head_classes(model) is None:
            return None
        id2label = getattr(model.config, "id2label", None) or {}
        names = [str(id2label.get(i, "")) for i in range(model.config.num_labels)]
        return None if all(n in ("", f"LABEL_{i}") for i, n in enumerate(names)) else names
