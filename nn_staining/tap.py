"""The hook tap: forward hooks that copy each recorded layer's output into the phase statistics.

A pre-hook on the model marks the start of a batch (its phase is the model's mode) and hands it
the labels given by ``set_targets``; each layer's hook copies its output (and an ``nn.Linear``'s
input, for pathways) into :class:`~nn_staining.stats.PhaseStats` buffers. A module called on its
own, outside a forward of the whole model, starts its own batch. Hooks exist only while a
recorded epoch is open.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .layers import OutputLayout, describe_layer, output_layout
from .stats import PhaseStats

log = logging.getLogger(__name__)
_NO_PASS = object()  # no forward of the whole model is running


class HookTap:
    """Owns the hooks, the per-batch bookkeeping and what was learnt about each layer's output."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        self.model = model
        self.modules = modules
        self.layouts: dict[str, OutputLayout] = {}
        self.descriptions: dict[str, dict[str, Any]] = {}
        self.targets: Tensor | None = None
        self.mask: Tensor | None = None
        self._phases: dict[str, PhaseStats] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._current: PhaseStats | None | object = _NO_PASS
        self._fired: set[str] = set()
        self._last_output: tuple[weakref.ref, str] | None = None
        self._width_warned: set[str] = set()

    def ordered_layers(self) -> list[str]:
        """The layers that produced an output so far, in model order."""
        return [k for k in self.modules if k in self.layouts]

    def attach(self, phases: dict[str, PhaseStats]) -> None:
        """Hook the model for an epoch whose statistics go to ``phases`` (by phase name)."""
        self._phases = phases
        if self._handles:
            return
        self._current, self._fired = _NO_PASS, set()
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward_start))
        for key, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(key)))
        # after the layers' hooks: when the model itself is a layer, its hook still sees the pass
        self._handles.append(self.model.register_forward_hook(self._on_forward_end))

    def detach(self) -> None:
        """Remove every hook; labels not yet used are dropped."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._phases = {}
        self._last_output = None
        self.targets = self.mask = None

    def _phase_stats(self, module: nn.Module) -> PhaseStats | None:
        """The statistics of the phase ``module``'s mode selects (None when it is not recorded)."""
        return self._phases.get("train" if module.training else "eval")

    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        """A new batch: its phase is the model's mode (a frozen submodule in eval mode stays in the
        training record); the labels given by set_targets serve this one pass."""
        stats = self._phase_stats(module)
        self._current, self._fired = stats, set()
        if stats is not None:
            stats.start_batch(self.targets, self.mask)
        self.targets = self.mask = None
        self._last_output = None

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        """The model's pass is over: modules called on their own from now on make their own batches."""
        self._current, self._fired = _NO_PASS, set()

    def _make_hook(self, key: str) -> Callable[[nn.Module, tuple, Any], None]:
        """The forward hook of layer ``key``: copy its output (and a Linear's input) into the buffers."""
        linear = isinstance(self.modules[key], nn.Linear)
        layouts = self.layouts

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if _recomputing_in_backward():  # activation checkpointing replays the forward: seen once
                return
            stats = self._current
            direct = stats is _NO_PASS
            if direct:  # a module called outside a forward of the whole model
                stats = self._phase_stats(module)
            if stats is None:
                return
            if direct and (not self._fired or key in self._fired):  # a new call of the submodules
                stats.start_batch(self.targets, self.mask)
                self.targets, self.mask, self._fired = None, None, set()
            raw = output if isinstance(output, Tensor) else _first_tensor(output)
            if raw is None or not raw.is_floating_point() or raw.dim() == 0:
                return
            out = raw.detach()
            layout = layouts.get(key) or self._discover(key, module, out)
            if layout.width(out) != layout.neurons:
                self._warn_width(key, layout, out)
                return
            samples = layout.samples(out)
            if stats.pending_labels() is not None:
                self._check_batch(key, stats, samples)
            if layout.channel_first:
                stats.add_mean(key, out, layout.spatial_dims(out))
            else:
                stats.add(key, layout.rows(out), samples)
            if linear and stats.num_classes and args and isinstance(args[0], Tensor):
                inputs = args[0].detach()  # laid out like the layer's own output rows
                stats.add(key, layout.rows(inputs, inputs.shape[-1]), samples, inputs=True)
            self._last_output = (weakref.ref(raw), key)
            self._fired.add(key)

        return hook

    def _warn_width(self, key: str, layout: OutputLayout, out: Tensor) -> None:
        if key not in self._width_warned:
            self._width_warned.add(key)
            log.warning(
                "%s produced %d neurons where its first output had %d (a module called at several widths); "
                "only calls of the first width are recorded",
                key,
                layout.width(out),
                layout.neurons,
            )

    def _check_batch(self, key: str, stats: PhaseStats, batch: int) -> None:
        """The first layer of a pass must see as many samples as set_targets gave labels."""
        labels = stats.pending_labels()
        if batch != labels:
            self.targets = None
            stats.drop_labels()
            raise ValueError(
                f"set_targets got {labels} labels but layer {key!r} saw a batch of {batch} samples; "
                "call set_targets(y) with the labels of the batch passed to the model"
            )

    def _discover(self, key: str, module: nn.Module, out: Tensor) -> OutputLayout:
        """Learn a layer's layout from its first output (and the output recorded just before it)."""
        previous = previous_shape = None
        if self._last_output is not None:
            ref, prev_key = self._last_output
            prev = ref()
            if prev is not None:
                previous, previous_shape = self.layouts[prev_key], tuple(prev.shape)
        layout = self.layouts[key] = output_layout(module, out, previous, previous_shape)
        self.descriptions[key] = describe_layer(key, module, layout)
        return layout


def _recomputing_in_backward() -> bool:
    """Whether autograd's engine is running (a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def _first_tensor(output: Any) -> Tensor | None:
    """The first tensor of a tuple output (LSTM, attention), else None."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None
