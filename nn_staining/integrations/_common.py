"""What the trainer callbacks share: labels found in a batch and handed to the trace at the right
forward pass, the epoch's last gradients kept until ``end_epoch``, logged metrics as JSON numbers."""

from __future__ import annotations

import contextlib
import logging
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from ..layers import NO_NEURON_WEIGHTS, select_layers

log = logging.getLogger(__name__)

#: Keys of a dict batch that the default extractor reads labels from, in this order.
LABEL_KEYS = ("labels", "label", "y", "targets", "target")
#: What a labels tensor gives: one class per sample, one label per position, or multi-label rows.
SAMPLE, TOKEN, MULTI = "sample", "token", "multi"


def missing_framework(module: str, framework: str, install: str, error: ImportError) -> ImportError:
    """The ImportError an integration raises when its framework is not installed."""
    return ImportError(
        f"{module} needs {framework}, which is not installed ({error}); install it with: pip install {install}"
    )


def default_labels(batch: Any) -> Tensor | None:
    """Labels of a batch: the second item of an ``(x, y, ...)`` tuple or list, or a dict's
    ``labels`` / ``label`` / ``y`` / ``targets`` / ``target`` tensor; None when there is none."""
    if isinstance(batch, Mapping):
        for key in LABEL_KEYS:
            value = batch.get(key)
            if isinstance(value, Tensor):
                return value
        return None
    if isinstance(batch, Sequence) and not isinstance(batch, str) and len(batch) >= 2:
        return batch[1] if isinstance(batch[1], Tensor) else None
    return None


def default_mask(batch: Any) -> Tensor | None:
    """A dict batch's ``attention_mask`` (1 where a position is real, 0 where it is padding), else None."""
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"]
    return None


def label_kind(labels: Tensor, integer_rows_are_tokens: bool) -> str:
    """``"sample"`` for one class per sample ((batch,), (batch, 1), one-hot rows), ``"token"`` for
    one label per position ((batch, seq) integers), ``"multi"`` for multi-hot or soft rows."""
    if labels.dim() <= 1 or (labels.dim() == 2 and labels.shape[1] == 1):
        return SAMPLE
    if labels.dim() > 2:
        return TOKEN
    integral = not labels.is_floating_point()
    if integral and integer_rows_are_tokens:
        return TOKEN
    one_hot = bool(((labels == 0) | (labels == 1)).all()) and bool((labels.sum(1) == 1).all())
    if one_hot:
        return SAMPLE
    return TOKEN if integral else MULTI


class TargetFeeder:
    """Hands a forward pass's labels (and attention mask) to the trace as that pass starts.

    A forward pre-hook on the traced module, run before the recorder's own, calls
    ``trace.set_targets`` at every entry of the module, right before the recorder starts that
    pass, so the labels reach the pass whose layers produce the activations even when a wrapper
    enters the module twice per step (Lightning's DDP forward redirection). ``source(args, kwargs)``
    gives ``(labels, mask)`` for the pass; :attr:`entries` counts the entries.
    """

    def __init__(
        self,
        trace: Any,
        module: nn.Module,
        source: Callable[[tuple, dict], tuple[Tensor | None, Tensor | None]],
        *,
        integer_rows_are_tokens: bool,
        framework: str,
    ) -> None:
        self.trace = trace
        self.source = source
        self.integer_rows_are_tokens = integer_rows_are_tokens
        self.framework = framework
        self.kind: str | None = None
        self.entries = 0
        self._handle = module.register_forward_pre_hook(self._on_forward, with_kwargs=True, prepend=True)

    def remove(self) -> None:
        """Remove the pre-hook."""
        self._handle.remove()

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.entries += 1
        labels, mask = self.source(args, kwargs)
        self.feed(labels, mask)

    def feed(self, labels: Tensor | None, mask: Tensor | None) -> None:
        """Give the next pass's labels and mask to the trace (dropped when they are not per sample)."""
        if labels is not None:
            labels = self._per_sample(labels)
        if labels is not None or mask is not None:
            self.trace.set_targets(labels, mask=mask)

    def _per_sample(self, labels: Tensor) -> Tensor | None:
        """The labels when they give one class per sample; other kinds are decided once and dropped."""
        if self.kind is None:
            self.kind = label_kind(labels, self.integer_rows_are_tokens)
            if self.kind == TOKEN:
                log.warning(
                    "%s labels of shape %s give one label per position (token classification or language "
                    "modelling), not one class per sample; the trace is recorded without per-class "
                    "statistics. Pass label_fn= returning one label per sample to get them.",
                    self.framework,
                    tuple(labels.shape),
                )
            elif self.kind == MULTI:
                log.warning(
                    "%s labels of shape %s are multi-label or soft rows, not one class per sample; the trace "
                    "is recorded without per-class statistics. Pass label_fn= returning one class per sample.",
                    self.framework,
                    tuple(labels.shape),
                )
        return labels if self.kind == SAMPLE else None


def neuron_weight_params(model: nn.Module, layers: Sequence[str] | str | None) -> list[nn.Parameter]:
    """The ``weight`` parameters of the layers the trace records (whose gradients give ``grad_norm``)."""
    params = []
    for module in select_layers(model, layers).values():
        if isinstance(module, NO_NEURON_WEIGHTS):
            continue
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and weight.requires_grad:
            params.append(weight)
    return params


class GradSnapshot:
    """The recorded layers' weight gradients of one optimizer step, kept until ``end_epoch``.

    Trainers clear gradients before an epoch ends (Hugging Face after every step), so the trace
    would find none. :meth:`take` keeps them at the step (a copy, or a reference when the trainer
    sets gradients to None instead of zeroing them in place); :meth:`installed` puts them back
    as ``.grad`` while ``end_epoch`` reads them, then restores what was there.
    """

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.grads: dict[nn.Parameter, Tensor] = {}
        self._live: dict[nn.Parameter, Tensor] = {}

    def take(self, copy: bool = True, watch: bool = False) -> None:
        """Keep the current gradients (``copy=False`` keeps references: no memory, no time);
        ``watch`` also remembers the live tensors for :meth:`references_survive`."""
        live = {p: p.grad for p in self.params if p.grad is not None}
        self.grads = {p: g.detach().clone() for p, g in live.items()} if copy else live
        self._live = live if watch or not copy else {}

    def references_survive(self) -> bool:
        """Call after the trainer cleared the gradients of the step last taken: True when it set them
        to None (references kept by ``take(copy=False)`` stay intact), False when it zeroed them in
        place (or kept them)."""
        return not any(p.grad is g for p, g in self._live.items())

    def clear(self) -> None:
        self.grads, self._live = {}, {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Put the kept gradients in ``.grad`` for the duration of the block."""
        saved = {p: p.grad for p in self.grads}
        try:
            for p, grad in self.grads.items():
                p.grad = grad
            yield
        finally:
            for p, grad in saved.items():
                p.grad = grad


def jsonable_metrics(values: Mapping[str, Any], rename: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Logged metrics as JSON numbers: one-element tensors and numpy scalars become floats, other
    tensors lists; keys in ``rename`` are renamed; values JSON cannot hold are left out (logged)."""
    rename = rename or {}
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = rename.get(str(key), str(key))
        if isinstance(value, Tensor):
            value = value.detach().cpu()
            value = value.item() if value.numel() == 1 else value.tolist()
        elif hasattr(value, "item") and getattr(value, "size", 2) == 1:
            value = value.item()
        if isinstance(value, bool) or value is None or isinstance(value, str):
            out[key] = value
        elif isinstance(value, numbers.Real):
            out[key] = float(value) if not isinstance(value, numbers.Integral) else int(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Real) for v in value):
            out[key] = list(value)
        else:
            log.debug("metric %r (%s) is not a number; not kept in the trace", key, type(value).__name__)
    return out
