"""The hook tap: forward hooks that copy each recorded layer's output into the phase statistics.

A pre-hook on the model marks the start of a batch (its phase is the model's mode) and hands it
the labels given by ``set_targets``; each layer's hook copies its output (and an ``nn.Linear``'s
input, for pathways) into :class:`~nn_staining.stats.PhaseStats` buffers. A module called on its
own, outside a forward of the whole model, starts its own batch. Hooks exist only while a
recorded epoch is open.

Each thread keeps its own pass: labels given by ``set_targets`` in a thread serve that thread's
next pass, and passes of a thread pool calling one model are recorded as separate batches (a lock
serialises the appends). ``nn.DataParallel`` replicas are refused; a copy of the model (which
carries the hooks along) is not recorded.

**Calls.** A module called several times in one forward pass records each call as its own layer,
numbered in the order of the pass: the first call under the module's key (``L_relu``), the n-th
under ``L_relu:n``. A module called k times in one pass and m in another records calls 1..max(k, m);
call n's statistics cover the passes that made an n-th call.

**The layer graph.** In the first :data:`GRAPH_PASSES` recorded passes (and the pass after a layer
first appears), each layer's hook also notes which recorded layer's output its tensor arguments
are, as a pre-hook saw them before the module ran (an in-place module changes them): the same
tensor object, not changed in place since, or that output passed through one-input elementwise
operations (:data:`ELEMENTWISE_OPS`, followed back through the autograd graph), so
``torch.relu(fc(x))`` feeding the next ``nn.Linear`` is an edge while a residual sum (``out +=
identity`` included) or a reshape is none. It also notes whether the layer itself acts elementwise.
The pre-hooks exist only while the graph is learnt. ``meta.json`` keeps both (``inputs_from``,
``input_ops``, ``elementwise``) for staining's pathways and dead units.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import conv_means
from .layers import (
    AMBIGUOUS,
    ELEMENTWISE_TYPES,
    OutputLayout,
    declared_batch_dims,
    describe_layer,
    find_batch_dim,
    known_width,
    output_layout,
    own_batch_dim,
    unrecordable_reason,
)
from .signature import call_key
from .stats import Batch, LabelFaults, Moments, PhaseStats

log = logging.getLogger(__name__)
_NO_PASS = object()  # no forward of the whole model is running
_RECORDABLE = (
    "a layer's output must be a floating-point tensor with at least one neuron, or a tuple whose "
    "first item is one"
)
#: Recorded forward passes in which the layer graph is learnt (afterwards the hooks skip it).
GRAPH_PASSES = 2
#: At most this many elementwise operations between one layer's output and another's input.
MAX_GRAPH_OPS = 8
#: One-input autograd operations that map unit k to unit k (``ReluBackward0`` is ``relu``); ``mul`` and
#: ``div`` count only with one tensor that requires grad (a scale or dropout's mask).
ELEMENTWISE_OPS = frozenset(
    {
        "relu",
        "gelu",
        "tanh",
        "sigmoid",
        "silu",
        "elu",
        "leaky_relu",
        "hardtanh",
        "hardswish",
        "hardsigmoid",
        "mish",
        "softplus",
        "log_sigmoid",
        "native_dropout",
        "mul",
        "div",
        "clone",
        "to_copy",
    }
)


#: The key prefix under which the model's own tensor arguments stand in the layer graph while it is learnt.
INPUT_PREFIX = "<input "
#: Operations whose output keeps the dimensions of their tensor inputs (the batch where it was).
KEEPS_DIMS_OPS = ELEMENTWISE_OPS | {
    "add",
    "sub",
    "native_layer_norm",
    "layer_norm",
    "native_batch_norm",
    "expand",
    "cat",
}
#: At most this many autograd nodes are visited to tell whether a layer's input depends on a recorded one.
MAX_ANCESTRY_NODES = 512
#: At most this many autograd nodes are visited looking for where a layer's input came from.
MAX_TRACE_NODES = 32


@dataclass(frozen=True)
class _Arg:
    """A tensor argument as a module received it (taken by a pre-hook, before an in-place module changes
    it): its autograd node and version counter."""

    node: Any
    version: int | None


@dataclass(frozen=True)
class _Deferred:
    """A layer's output (and a Linear's input) waiting for the end of its pass to learn its batch."""

    layer: str
    layout: OutputLayout
    out: Tensor
    inputs: Tensor | None
    batch: Batch
    stats: PhaseStats
    means: Tensor | None = None  # a convolution's spatial means, computed from its input


@dataclass(frozen=True)
class _Plan:
    """How the general path recorded a first call of a layer in a phase: a batch-first
    ``(batch, …, neurons)`` output of a labelled, unmasked pass, folded straight from the hook
    into ``moments`` (and a Linear's input into ``input_moments`` when classes are recorded). Later
    calls of the layer in that phase that match it take the short path
    (:meth:`HookTap._record_planned`); any other call takes the general one. The widths are the
    running sums' (``num_features``)."""

    moments: Moments  # the layer's running sums in the phase
    input_moments: Moments | None  # its input's; None: the general path records no input for it


@dataclass
class _ThreadPass:
    """One thread's bookkeeping: the phase of the model pass it is in (``_NO_PASS`` between passes),
    that pass's batch, the layers that fired in it, and the labels given for its next pass."""

    stats: Any = _NO_PASS
    batch: Batch | None = None
    direct: PhaseStats | None = None  # the phase of a run of modules called on their own
    fired: set[str] = field(default_factory=set)
    matched: bool = False  # whether a layer of this pass had a dimension of the labels' sample count
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # layer -> output shape (learning)
    unmatched: dict[str, tuple[int, ...]] = field(default_factory=dict)  # layers without the labels' samples
    deferred: list[_Deferred] = field(default_factory=list)  # outputs whose batch dimension is not known yet
    compiled_last: str | None = None  # in a compiled pass: the layer recorded last (stands in for the graph)
    targets: Tensor | None = None
    mask: Tensor | None = None
    calls: dict[str, int] = field(default_factory=dict)  # per module key: its calls so far in this pass
    learn: bool = False  # whether this pass learns the layer graph
    outputs: dict[int, tuple[weakref.ref, str, int | None]] = field(default_factory=dict)  # id -> layer
    nodes: dict[Any, str] = field(default_factory=dict)  # output's autograd node -> layer
    inputs: dict[str, list[list[_Arg]]] = field(default_factory=dict)  # per module key: args as called


class HookTap:
    """Owns the hooks, the per-batch bookkeeping and what was learnt about each layer's output."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], batch_dim: int | None = None) -> None:
        zero = {key: "0 neurons" for key, m in modules.items() if known_width(m) == 0}
        if len(zero) == len(modules):
            raise ValueError(_no_recordable_layer(zero))
        self.model = model
        self.modules = modules
        self.layouts: dict[str, OutputLayout] = {}
        names = {id(m): name for name, m in model.named_modules()}
        self.names = {key: names.get(id(m), "") for key, m in modules.items()}  # key -> qualified name
        self.declared = declared_batch_dims(model, modules)  # module key -> batch_first of it or its block
        self.stated_batch_dim = batch_dim
        self.model_batch_dim = batch_dim if batch_dim is not None else model_batch_dim(model)
        self.batch_dims: dict[str, int] = {}  # layer -> its output's batch dimension, once known
        self.derived: dict[str, bool] = {}  # layer -> whether the model's input or a layer flows into it
        # layer -> its output's shape, and the layers (or model inputs) its first argument comes from with theirs
        self.continues: dict[str, tuple[tuple[int, ...], list[tuple[str, tuple[int, ...]]]]] = {}
        self._ambiguous_warned: set[str] = set()
        self.descriptions: dict[str, dict[str, Any]] = {}
        self.skipped: dict[str, str] = {}  # layers whose output could not be recorded, and why
        self.label_faults = LabelFaults()
        self._phases: dict[str, PhaseStats] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._threads: dict[threading.Thread, _ThreadPass] = {}
        self._lock = threading.Lock()
        self._passes = {"train": 0, "eval": 0}
        self._width_warned: set[str] = set()
        self._reported: set[str] = set()
        self.calls: dict[str, list[str]] = {}  # module key -> the keys of its later calls (L_x:2, …)
        self.graph: dict[str, dict[str, tuple[str, ...]]] = {}  # layer -> {source layer: ops between}
        self.elementwise: dict[str, bool] = {}
        self._graph_passes_left = GRAPH_PASSES
        self._pre_handles: list[torch.utils.hooks.RemovableHandle] = []  # only while the graph is learnt
        self._window_means: set[str] = set()  # convolutions whose spatial means may come from their input
        self._compiled_calls: list[tuple[str, Tensor | None, Any]] = []  # kept by hooks inside torch.compile
        self._plans: dict[tuple[Any, str], _Plan] = {}  # (phase statistics, layer) -> its short path

    def __deepcopy__(self, memo: dict) -> HookTap:
        """A deep copy of the hooked model keeps hooks bound to this tap, which ignores its modules."""
        return self

    # -- labels --------------------------------------------------------------------------------
    def _thread(self) -> _ThreadPass:
        thread = threading.current_thread()
        state = self._threads.get(thread)
        if state is None:
            state = self._threads[thread] = _ThreadPass()
        return state

    @property
    def targets(self) -> Tensor | None:
        """The labels given for this thread's next pass."""
        return self._thread().targets

    @targets.setter
    def targets(self, targets: Tensor | None) -> None:
        self._thread().targets = targets

    def give_labels(self, targets: Tensor | None, mask: Tensor | None) -> None:
        """Hand labels (and a mask) to this thread's next forward pass; a second call before that
        pass is a ``RuntimeError``."""
        state = self._thread()
        if state.targets is not None or state.mask is not None:
            raise RuntimeError(
                "set_targets() called twice before a forward pass: the labels of the first call were not "
                "used yet. Call set_targets(y) once right before each model(x)"
            )
        state.targets, state.mask = targets, mask

    def ordered_layers(self) -> list[str]:
        """The layers that produced an output so far, in model order (a module's later calls after it)."""
        return [k for k in self._keys() if k in self.layouts]

    def _keys(self) -> list[str]:
        return [k for base in self.modules for k in (base, *self.calls.get(base, ()))]

    def layer_entry(self, key: str) -> dict[str, Any]:
        """The layer's ``meta.json`` entry: its description and, once learnt, the recorded layers its
        inputs come from (``inputs_from``), the elementwise operations between (``input_ops``, one list
        per source) and whether it acts elementwise itself."""
        entry = dict(self.descriptions[key])
        sources = self.graph.get(key)
        if sources is not None:
            entry["inputs_from"] = list(sources)
            entry["input_ops"] = [list(ops) for ops in sources.values()]
            entry["elementwise"] = self.elementwise.get(key, False)
        return entry

    # -- attaching -----------------------------------------------------------------------------
    def attach(self, phases: dict[str, PhaseStats]) -> None:
        """Hook the model for an epoch whose statistics go to ``phases`` (by phase name)."""
        self._phases = phases
        self.label_faults = LabelFaults()
        self._passes = {"train": 0, "eval": 0}
        if self._handles:
            return
        self._threads = {}
        # the model's own hooks run outside a compiled region (one graph break at the start of its forward)
        start, end = (
            torch.compiler.disable(self._on_forward_start),
            torch.compiler.disable(self._on_forward_end),
        )
        self._handles.append(self.model.register_forward_pre_hook(start, with_kwargs=True))
        for key, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(key)))
        # after the layers' hooks: when the model itself is a layer, its hook still sees the pass
        self._handles.append(self.model.register_forward_hook(end))

    def detach(self, epoch: int | None = None) -> None:
        """Remove every hook; labels not yet used are dropped (with a warning naming ``epoch``).

        All under the lock: a hook of another thread's pass that is already running finishes first,
        and one that runs later (it was dispatched before its handle went) finds no pass and no plan,
        so nothing folds into the epoch's statistics once they are being finished."""
        with self._lock:
            self._record_compiled_calls()  # a compiled submodule called on its own
            for handle in self._handles:
                handle.remove()
            self._remove_pre_hooks()
            unused = sum(s.targets is not None or s.mask is not None for s in self._threads.values())
            self._handles = []
            self._phases = {}
            self._threads = {}
            self._plans = {}  # they hold the epoch's statistics
        if unused and epoch is not None:
            log.warning(
                "epoch %d: labels given to set_targets were never used (no forward pass of the model "
                "followed them%s); they are dropped",
                epoch,
                f", in {unused} threads" if unused > 1 else "",
            )

    def report(self, epoch: int, written: bool) -> None:
        """At the end of a recorded epoch: one warning that lists modules skipped for the first time
        (their output cannot be recorded), a ``ValueError`` when no layer's output could be recorded,
        and a warning when the epoch recorded nothing."""
        if self.skipped and not self.layouts:
            raise ValueError(_no_recordable_layer(self.skipped))
        new = [
            k for k in self._keys() if k in self.skipped and k not in self.layouts and k not in self._reported
        ]
        if new:
            self._reported.update(new)
            log.warning(
                "not recorded, their output cannot be: %s (%s)",
                ", ".join(f"{k} ({self.skipped[k]})" for k in new),
                _RECORDABLE,
            )
        if not written:
            if self._passes["eval"] and not self._passes["train"]:
                why = (
                    f"its {self._passes['eval']} forward passes ran in eval mode, which are recorded "
                    "only with record_eval=True"
                )
            elif not any(self._passes.values()):
                why = "no forward pass of the model ran between start_epoch and end_epoch"
            else:
                why = "no recorded layer produced an output"
            log.warning("epoch %d recorded nothing and is not written: %s", epoch, why)

    # -- hooks ---------------------------------------------------------------------------------
    def _phase_stats(self, module: nn.Module) -> PhaseStats | None:
        """The statistics of the phase ``module``'s mode selects (None when it is not recorded)."""
        return self._phases.get("train" if module.training else "eval")

    def _on_forward_start(self, module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        """A new batch: its phase is the model's mode (a frozen submodule in eval mode stays in the
        training record); the labels given by set_targets serve this one pass."""
        if module is not self.model:
            _refuse_replica(module)
            return
        with self._lock:
            state = self._thread()
            stats = self._phase_stats(module)
            self._passes["train" if module.training else "eval"] += 1
            state.stats, state.fired, state.direct, state.matched = stats, set(), None, False
            state.unmatched, state.deferred = {}, []  # a pass that raised leaves nothing behind
            state.compiled_last = None
            state.batch = None if stats is None else stats.start_batch(state.targets, state.mask)
            state.targets = state.mask = None
            state.calls = {}
            self._start_graph(state, stats is not None)
            if state.learn:  # the model's tensor arguments: where its first layers' batch comes from
                named = [*((str(i), a) for i, a in enumerate(args)), *kwargs.items()]
                for name, arg in named:
                    if isinstance(arg, Tensor):
                        key = f"{INPUT_PREFIX}{name}>"
                        state.outputs[id(arg)] = (weakref.ref(arg), key, _version(arg))
                        state.shapes[key] = tuple(arg.shape)
                        if arg.grad_fn is not None:
                            state.nodes[arg.grad_fn] = key

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        """The model's pass is over: modules called on their own from now on make their own batches."""
        if module is not self.model:
            return
        with self._lock:
            self._record_compiled_calls()
            state = self._thread()
            self._settle(state)
            batch = state.batch
            unmatched = batch is not None and state.fired and not state.matched and _given(batch) is not None
            state.stats, state.fired, state.batch = _NO_PASS, set(), None
            state.calls = {}
            shapes, state.unmatched = state.unmatched, {}
            self._start_graph(state, False)
            if not self._graph_passes_left and not any(s.learn for s in self._threads.values()):
                self._remove_pre_hooks()
            if unmatched:
                _refuse_label_count(batch, shapes)

    def _start_graph(self, state: _ThreadPass, recorded: bool) -> None:
        """A new batch: it learns the layer graph while learning passes are left (with pre-hooks that
        see each module's arguments before it runs)."""
        state.outputs, state.nodes, state.inputs, state.shapes = {}, {}, {}, {}
        state.learn = recorded and self._graph_passes_left > 0
        if state.learn:
            self._graph_passes_left -= 1
            if not self._pre_handles:
                self._pre_handles = [
                    module.register_forward_pre_hook(self._make_pre_hook(key, module))
                    for key, module in self.modules.items()
                ]

    def _remove_pre_hooks(self) -> None:
        for handle in self._pre_handles:
            handle.remove()
        self._pre_handles = []

    def _make_pre_hook(self, key: str, own: nn.Module) -> Callable[[nn.Module, tuple], None]:
        """While the graph is learnt: keep module ``key``'s tensor arguments as it receives them."""

        def pre_hook(module: nn.Module, args: tuple) -> None:
            if torch.compiler.is_compiling() or module is not own or _recomputing_in_backward():
                return
            with self._lock:
                state = self._thread()
                if state.learn:
                    taken = [_Arg(a.grad_fn, _version(a)) for a in args if isinstance(a, Tensor)]
                    state.inputs.setdefault(key, []).append(taken)

        return pre_hook

    def _make_hook(self, key: str) -> Callable[[nn.Module, tuple, Any], None]:
        """The forward hook of layer ``key``: copy its output (and a Linear's input) into the buffers."""
        own = self.modules[key]
        linear = isinstance(own, nn.Linear)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if torch.compiler.is_compiling():  # traced by torch.compile: kept for the end of the pass
                first = args[0].detach().clone() if linear and args and isinstance(args[0], Tensor) else None
                raw = output if isinstance(output, Tensor) else _first_tensor(output)
                kept = raw.detach().clone() if isinstance(raw, Tensor) else output  # later in-place ops
                self._compiled_calls.append((key, first, kept))
                return
            if _recomputing_in_backward():  # activation checkpointing replays the forward: seen once
                return
            if module is not own:  # a replica or a copy of the model
                _refuse_replica(module)
                return
            with self._lock:
                state = self._thread()
                plan = self._plans.get((state.stats, key))
                if plan is None or not self._record_planned(key, plan, state, args, output):
                    self._record(key, module, linear, args, output)

        return hook

    def _record_planned(self, key: str, plan: _Plan, state: _ThreadPass, args: tuple, output: Any) -> bool:
        """Fold a call of ``key`` as its plan says when the call matches it, doing what :meth:`_record`
        does for such a call; returns False, with nothing done, for any other call. A call matches
        when it is the layer's first in a labelled pass that learns nothing, its output a float32 CPU
        tensor of the plan's width whose first dimension, the layer's known batch dimension, holds
        the samples of the pass's labels, with at least one row, the pass unmasked and folded by the
        kernel from the hook, and the Linear's input given positionally, float32, of the plan's
        width. The hot path of a recorded epoch: each check is made once, in one frame."""
        batch = state.batch
        labels = batch.labels
        if state.learn or labels is None or key in state.calls or not isinstance(output, Tensor):
            return False
        shape, moments = output.shape, plan.moments
        if (
            len(shape) < 2
            or shape[-1] != moments.num_features
            or shape[0] != labels.shape[0]
            or self.batch_dims.get(key) != 0
        ):
            return False
        stats = state.stats
        ops = stats.hook_kernel(output, batch)
        if ops is None:  # not CPU float32, or a mask or per-batch rows: the chunk takes the pass
            return False
        rows = output.detach().reshape(-1, shape[-1])
        if not rows.shape[0]:  # the general path notes an empty batch
            return False
        inputs, input_rows = plan.input_moments, None
        if inputs is not None:
            first = args[0] if args else None
            if not (
                isinstance(first, Tensor)
                and first.dtype == torch.float32
                and first.shape[-1] == inputs.num_features
            ):
                return False
            input_rows = first.detach().reshape(-1, inputs.num_features)
        state.calls[key] = 1
        state.matched = True
        stats.fold_into(moments, rows, shape[0], batch, ops)
        if input_rows is not None:
            stats.fold_into(inputs, input_rows, shape[0], batch, ops)
        state.fired.add(key)
        return True

    def _record_compiled_calls(self) -> None:
        """Record the layer outputs a compiled forward kept (in the order of the pass), eagerly: the
        layer graph is not learnt from them (a compiled graph's autograd nodes are not the layers')."""
        calls, self._compiled_calls = self._compiled_calls, []
        if calls:
            self._graph_passes_left = 0
        for key, first, output in calls:
            module = self.modules[key]
            args = () if first is None else (first,)
            self._record(key, module, isinstance(module, nn.Linear), args, output, compiled=True)

    def _record(
        self, key: str, module: nn.Module, linear: bool, args: tuple, output: Any, compiled: bool = False
    ) -> None:
        state = self._thread()
        stats = state.stats
        direct = stats is _NO_PASS
        if direct:  # a module called outside a forward of the whole model
            stats = self._phase_stats(module)
        if stats is None:
            return
        if direct and (not state.fired or key in state.fired or state.direct is not stats):
            state.batch = stats.start_batch(state.targets, state.mask)  # a new call of the submodules
            state.targets = state.mask = None
            state.fired, state.direct, state.matched, state.unmatched = set(), stats, False, {}
            self._start_graph(state, True)
        call = 1 if direct else state.calls.get(key, 0) + 1  # on its own, each call is a batch
        module_key = layer = key
        if call > 1:
            state.calls[key], layer = call, call_key(key, call)
            if layer not in self.calls.setdefault(key, []):
                self.calls[key].append(layer)
        elif not direct:
            state.calls[key] = 1
        raw = output if isinstance(output, Tensor) else _first_tensor(output)
        if raw is None or not raw.is_floating_point() or raw.dim() == 0:
            if layer not in self.skipped:
                self.skipped[layer] = unrecordable_reason(output) or type(output).__name__
            return
        out = raw.detach()
        learn = state.learn and not compiled
        sources = self._sources(module_key, args, raw, state) if learn else None
        previous = state.compiled_last if compiled else None
        layout = self.layouts.get(layer) or self._discover(
            layer, module, out, state, call, key, sources, previous
        )
        if layout is None:
            return
        if layout.width(out) != layout.neurons:
            self._warn_width(layer, layout, out)
            return
        key, batch = layer, state.batch
        given = _given(batch)
        batch_dim, why = (0, "") if given is None else self._batch_dim(key, module_key, layout, out, given)
        if given is not None:
            if batch_dim is not None or why == AMBIGUOUS:
                state.matched = True
            elif not state.matched:
                state.unmatched.setdefault(key, tuple(out.shape))  # for the error if no layer matches
            if direct and not state.matched and not batch.placed:
                _refuse_label_count(batch, {key: tuple(out.shape)})
        inputs = means = None
        if linear and stats.num_classes and args and isinstance(args[0], Tensor) and args[0].shape[-1]:
            inputs = args[0].detach()  # laid out like the layer's own output rows
        elif key in self._window_means and args and conv_means.cheaper_from_input(module, args[0], out):
            with torch.no_grad():
                means = conv_means.spatial_means(module, args[0].detach(), tuple(out.shape))
        if why == AMBIGUOUS and not direct:  # a later layer of this pass may tell (see _settle)
            state.deferred.append(_Deferred(key, layout, out, inputs, batch, stats))
        else:
            self._add(_Deferred(key, layout, out, inputs, batch, stats, means), batch_dim, why)
            if call == 1 and not (direct or learn or compiled) and batch_dim == 0 and why == "":
                self._plan(key, linear, layout, out, means, batch, stats)
        if learn:
            self._learn(key, module, args, raw, state, sources)
        elif compiled:
            state.compiled_last = key
            state.shapes[key] = tuple(raw.shape)
        state.fired.add(key)

    def _plan(
        self,
        key: str,
        linear: bool,
        layout: OutputLayout,
        out: Tensor,
        means: Tensor | None,
        batch: Batch,
        stats: PhaseStats,
    ) -> None:
        """After the general path recorded a first call of ``key`` in a pass of ``stats`` with its
        batch in dimension 0: keep a :class:`_Plan` for the layer in that phase when its output was
        folded at once as rows (a row layout, no spatial means from the input, a batch the kernel
        folds from the hook) and, for a Linear whose input the general path records, its input
        was too. What else a call must be, :meth:`_record_planned` checks on each one."""
        if means is not None or layout.channel_first or stats.hook_kernel(out, batch) is None:
            return
        moments, input_moments = stats.layer_moments().get(key), stats.layer_moments(inputs=True).get(key)
        records_input = linear and bool(stats.num_classes)
        if moments is None or (records_input and input_moments is None):
            return
        self._plans[(stats, key)] = _Plan(moments, input_moments if records_input else None)

    def _add(self, item: _Deferred, batch_dim: int | None, why: str) -> None:
        """Buffer one output (and a Linear's input) with the batch in ``batch_dim``; without one (an
        output shared by the batch, or one whose batch is unknown) its rows carry no labels, and an
        unknown batch with a mask leaves the output out of this pass."""
        if batch_dim is None and why == AMBIGUOUS:
            self._warn_ambiguous(item.layer, item.out, _given(item.batch))
            if item.batch.mask is not None and self.derived.get(item.layer, True):
                return  # a mask cannot be placed on rows whose samples are unknown
        samples = -1 if batch_dim is None or _given(item.batch) is None else item.out.shape[batch_dim]
        batch_dim = batch_dim or 0
        layout, stats = item.layout, item.stats
        if item.means is not None:  # batch first, as in its output
            stats.add(item.layer, item.means, samples, batch=item.batch)
        elif layout.channel_first:
            stats.add_mean(
                item.layer, item.out, layout.spatial_dims(item.out), batch=item.batch
            )  # batch first
        else:
            stats.add(item.layer, layout.rows(item.out, batch_dim=batch_dim), samples, batch=item.batch)
        if item.inputs is not None:
            rows = layout.rows(item.inputs, item.inputs.shape[-1], batch_dim=batch_dim)
            stats.add(item.layer, rows, samples, inputs=True, batch=item.batch)

    def _settle(self, state: _ThreadPass) -> None:
        """At the end of a pass: outputs whose batch dimension was ambiguous take it from a layer of
        the pass that continues them (a ``batch_first=False`` LSTM fed by a Linear), repeatedly, then
        are buffered; those still undecided carry no labels."""
        deferred, state.deferred = state.deferred, []
        progress = True
        while deferred and progress:
            progress, left = False, []
            for item in deferred:
                dim = self._from_consumers(item.layer, tuple(item.out.shape), _given(item.batch))
                if dim is None:
                    left.append(item)
                    continue
                self._add(item, dim, "")
                progress = True
            deferred = left
        for item in deferred:
            self._add(item, None, AMBIGUOUS)

    def _from_consumers(self, layer: str, shape: tuple[int, ...], samples: int) -> int | None:
        """The batch dimension of a later layer whose first argument came from ``layer`` and keeps its
        dimensions up to the batch, when it has that size in ``layer``'s output too."""
        for consumer, (consumer_shape, origins) in self.continues.items():
            dim = self.batch_dims.get(consumer)
            if dim is None or not any(origin == layer for origin, _ in origins):
                continue
            source_shape = next(s for origin, s in origins if origin == layer)
            keeps = dim < len(shape) - 1 and consumer_shape[: dim + 1] == source_shape[: dim + 1]
            if keeps and shape[dim] == samples:
                if samples > 1:
                    self.batch_dims[layer] = dim
                return dim
        return None

    def _batch_dim(
        self, layer: str, module_key: str, layout: OutputLayout, out: Tensor, samples: int
    ) -> tuple[int | None, str]:
        """The dimension of ``out`` that holds the pass's ``samples`` (see :func:`find_batch_dim`),
        kept once a pass of more than one sample decided it; a layer whose output has several
        dimensions of that size and nothing to choose between them is warned about once."""
        shape = tuple(out.shape)
        known = self.batch_dims.get(layer)
        if known is not None and known < len(shape) and shape[known] == samples:
            return known, ""
        model = self.model_batch_dim if self.derived.get(layer, True) else None
        hints = (self.declared.get(module_key), self._inherited(layer), model)
        dim, why = find_batch_dim(shape, samples, layout.channel_first, hints)
        if dim is not None and samples > 1:
            self.batch_dims[layer] = dim
        return dim, why

    def _warn_ambiguous(self, layer: str, out: Tensor, samples: int | None) -> None:
        """Once per layer: its batch dimension is unknown, so its rows carry no labels."""
        shape = tuple(out.shape)
        if layer not in self._ambiguous_warned:
            self._ambiguous_warned.add(layer)
            sizes = [d for d in range(len(shape) - 1) if shape[d] == samples]
            log.warning(
                "%s: its output %s has %s dimensions of the batch's %d samples and nothing tells which is the "
                "batch (no batch_first on the module or its block, no earlier layer with a known batch whose "
                "leading dimensions it keeps); per-class statistics are not recorded for it in such passes "
                "(and with set_targets(mask=) its passes are left out). Pass NetworkTrace(batch_dim=1) for "
                "a time-major (steps, batch, …) model, or batch_dim=0",
                layer,
                tuple(shape),
                " and ".join(map(str, sizes)),
                samples,
            )

    def _inherited(self, layer: str) -> int | None:
        """The batch dimension of the layer (or model input) ``layer``'s first argument came from, when
        ``layer``'s output keeps its dimensions up to that one (a Linear, an embedding, a norm)."""
        shape, origins = self.continues.get(layer, ((), []))
        for source, source_shape in origins:
            dim = self.model_batch_dim if source.startswith(INPUT_PREFIX) else self.batch_dims.get(source)
            if dim is not None and dim < len(shape) - 1 and shape[: dim + 1] == source_shape[: dim + 1]:
                return dim
        return None

    def input_batch_dim(self) -> int:
        """The batch dimension of the model's first tensor argument: the user's ``batch_dim``, else
        that of a layer whose output continues it (a ``(steps, batch, features)`` input fed to a
        Linear before a time-major GRU), else 0."""
        if self.stated_batch_dim is not None:
            return self.stated_batch_dim
        first = f"{INPUT_PREFIX}0>"
        for layer, (shape, origins) in self.continues.items():
            dim = self.batch_dims.get(layer)
            for origin, origin_shape in origins:
                if origin == first and dim is not None and shape[: dim + 1] == origin_shape[: dim + 1]:
                    return dim
        return 0

    def _sources(self, module_key: str, args: tuple, raw: Tensor, state: _ThreadPass) -> list:
        """Per tensor argument of this call, the recorded layer (and elementwise operations between)
        whose output it is in this pass, or None: as the argument was when the module received it
        (its pre-hook's view), else as it is now."""
        pending = state.inputs.get(module_key)
        taken = pending.pop() if pending else None
        tensors = [a for a in args if isinstance(a, Tensor)]
        if taken is None or len(taken) != len(tensors):
            taken = [_Arg(None if a is raw else a.grad_fn, None) for a in tensors]
        return [(arg, seen, _source(arg, seen, state)) for arg, seen in zip(tensors, taken)]

    def _learn(
        self, key: str, module: nn.Module, args: tuple, raw: Tensor, state: _ThreadPass, sources
    ) -> None:
        """Note where layer ``key``'s tensor arguments come from, whether it acts elementwise, and its
        output (for the layers after it in this pass)."""
        edges = self.graph.setdefault(key, {})
        for _, _, found in sources:
            if found is not None and found[0] != key and not found[0].startswith(INPUT_PREFIX):
                edges.setdefault(*found)
        if key not in self.elementwise:
            self.elementwise[key] = _acts_elementwise(module, args, raw, [seen for _, seen, _ in sources])
        state.outputs[id(raw)] = (weakref.ref(raw), key, _version(raw))
        state.shapes[key] = tuple(raw.shape)
        if raw.grad_fn is not None:
            state.nodes[raw.grad_fn] = key

    def _warn_width(self, key: str, layout: OutputLayout, out: Tensor) -> None:
        if key not in self._width_warned:
            self._width_warned.add(key)
            log.warning(
                "%s produced %d neurons where its first output had %d (the same call of a module at several "
                "widths in different passes); only outputs of the first width are recorded",
                key,
                layout.width(out),
                layout.neurons,
            )

    def _discover(
        self,
        key: str,
        module: nn.Module,
        out: Tensor,
        state: _ThreadPass,
        call: int,
        first_call: str,
        sources: list | None,
        previous: str | None = None,
    ) -> OutputLayout | None:
        """Learn a layer's layout from its first output and the layer its first tensor argument comes
        from (known in a graph-learning pass); None for an output of width 0, which is skipped. A layer
        that first appears outside a graph-learning pass makes the next pass learn the graph."""
        if not state.learn:
            self._graph_passes_left = max(self._graph_passes_left, 1)
        found = sources[0][2] if sources else None
        origins = (
            [found[0]] if found is not None else _trace_back(sources[0][1].node, state) if sources else []
        )
        if previous is not None:  # a compiled pass: the layer recorded just before, in call order
            origins = [previous]
        known = [
            (self.layouts[o], state.shapes[o]) for o in origins if o in self.layouts and o in state.shapes
        ]
        layout = output_layout(module, out, origins=known)
        if layout.neurons == 0:
            self.skipped.setdefault(key, "0 neurons")
            return None
        if origins or torch.is_grad_enabled():  # a pass without autograd cannot tell
            self.derived[key] = bool(origins) or any(
                _reaches_recorded(seen.node, state) for _, seen, _ in sources or ()
            )
        if not layout.channel_first and out.dim() >= 3:
            known = [(origin, state.shapes[origin]) for origin in origins if origin in state.shapes]
            self.continues[key] = (tuple(out.shape), known)
        if conv_means.supported(module) and call == 1 and layout.channel_first:
            self._window_means.add(key)
        self.layouts[key] = layout
        self.descriptions[key] = describe_layer(
            key, module, layout, call, first_call, self.names.get(first_call)
        )
        return layout


def _no_recordable_layer(skipped: dict[str, str]) -> str:
    listed = ", ".join(f"{key} ({why})" for key, why in skipped.items())
    return (
        f"no layer of the model gives a recordable output: {listed}; {_RECORDABLE}. "
        "Choose the modules to record with layers="
    )


def model_batch_dim(model: nn.Module) -> int | None:
    """The batch dimension of a model's (…, features) tensors when nothing else tells: 0 (the
    DataLoader's batch-first convention) when no module declares ``batch_first``; None when some
    does, since such a module may see its input transposed (a time-major module's own layers, and
    those its output continues or that feed it, are known from it)."""
    return 0 if all(own_batch_dim(m) is None for m in model.modules()) else None


def _trace_back(node: Any, state: _ThreadPass) -> list[str]:
    """The recorded layers (and model inputs) found walking back from autograd ``node`` through
    operations that keep a tensor's dimensions (:data:`KEEPS_DIMS_OPS`, e.g. a residual sum or a
    functional layer norm), nearest first, visiting at most :data:`MAX_TRACE_NODES` nodes."""
    queue, seen, found = [node], set(), []
    while queue and len(seen) < MAX_TRACE_NODES:
        node = queue.pop(0)
        if node is None or node in seen:
            continue
        seen.add(node)
        layer = state.nodes.get(node)
        if layer is not None:
            found.append(layer)
        elif _op_name(node) in KEEPS_DIMS_OPS:
            queue.extend(n for n, _ in node.next_functions if n is not None)
    return found


def _reaches_recorded(node: Any, state: _ThreadPass) -> bool:
    """Whether a recorded layer's output (or a model input with a graph) is among the autograd
    ancestors of ``node``, through any operations (at most :data:`MAX_ANCESTRY_NODES` visited): an
    output that no sample-dependent value flows into (a relative position bias) is not per sample
    by convention."""
    queue, seen = [node], set()
    while queue and len(seen) < MAX_ANCESTRY_NODES:
        node = queue.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in state.nodes:
            return True
        queue.extend(n for n, _ in node.next_functions if n is not None)
    return False


def _given(batch: Batch | None) -> int | None:
    """The number of samples the pass's labels (else its mask) give, or None without either."""
    if batch is None:
        return None
    if batch.labels is not None:
        return batch.labels.shape[0]
    return None if batch.mask is None else batch.mask.shape[0]


def _refuse_label_count(batch: Batch, shapes: dict[str, tuple[int, ...]]) -> None:
    """No recorded layer of the pass has a dimension of the labels' (or mask's) sample count."""
    samples = _given(batch)
    batch.labels = batch.mask = None
    seen = ", ".join(f"{key} {shape}" for key, shape in list(shapes.items())[:4])
    raise ValueError(
        f"set_targets got {samples} labels (or mask rows) but no recorded layer's output has a dimension "
        f"of {samples} samples{f' ({seen})' if seen else ''}; call set_targets(y) with the labels of the "
        "batch passed to the model"
    )


def _refuse_replica(module: nn.Module) -> None:
    """Hooks fired by a module that is not the hooked one: a copy of the model is ignored, an
    ``nn.DataParallel`` replica is refused (it runs on another device, with part of the batch)."""
    if getattr(module, "_is_replica", False):
        raise RuntimeError(
            "nn.DataParallel runs replicas of the model on several devices in threads; nn_staining does "
            "not record them (a batch's labels cannot follow its scattered parts). Train with "
            "DistributedDataParallel (each rank records and end_epoch merges them), or call the model "
            "without DataParallel"
        )


def _recomputing_in_backward() -> bool:
    """Whether autograd's engine is running (a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def _op_name(node: Any) -> str:
    """An autograd node's operation in snake case: ``ReluBackward0`` is ``relu``."""
    name = re.sub(r"Backward\d*$", "", type(node).__name__)
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _elementwise_input(node: Any) -> Any:
    """The autograd input of a one-input elementwise node (:data:`ELEMENTWISE_OPS`), else None."""
    if _op_name(node) not in ELEMENTWISE_OPS:
        return None
    inputs = [n for n, _ in node.next_functions if n is not None]
    return inputs[0] if len(inputs) == 1 else None


def _version(tensor: Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place change), None where it has none."""
    try:
        return tensor._version
    except RuntimeError:  # an inference-mode tensor keeps no version counter
        return None


def _source(arg: Tensor, seen: _Arg, state: _ThreadPass) -> tuple[str, tuple[str, ...]] | None:
    """The recorded layer whose output ``arg`` is in this pass, directly or through elementwise
    operations (named first to last), or None: followed back through the autograd graph from the node
    ``arg`` had when the module received it, else by tensor identity, unless it was changed in place
    since that layer returned it (its version counter moved)."""
    node = seen.node
    if node is not None:
        ops = []
        for _ in range(MAX_GRAPH_OPS + 1):
            layer = state.nodes.get(node)
            if layer is not None:
                return layer, tuple(reversed(ops))
            previous = _elementwise_input(node)
            if previous is None:
                return None
            ops.append(_op_name(node))
            node = previous
        return None
    entry = state.outputs.get(id(arg))
    if entry is None or entry[0]() is not arg:
        return None
    changed = entry[2] is not None and seen.version is not None and seen.version != entry[2]
    return None if changed else (entry[1], ())


def _acts_elementwise(module: nn.Module, args: tuple, output: Tensor, taken: list[_Arg]) -> bool:
    """Whether unit k of the module's output is a function of unit k of its input alone: an activation,
    dropout or identity type, or a parameter-free module of one same-shape tensor argument that returns
    it unchanged, whose autograd graph from it holds only elementwise operations, or that is named
    ``…Activation`` (Hugging Face's ``GELUActivation``, ``NewGELUActivation``, …)."""
    if isinstance(module, ELEMENTWISE_TYPES):
        return True
    tensors = [a for a in args if isinstance(a, Tensor)]
    if len(tensors) != 1 or tensors[0].shape != output.shape or next(module.parameters(), None) is not None:
        return False
    arg = tensors[0]
    node, target = output.grad_fn, taken[0].node
    if arg is output and (node is None or node is target):  # returned unchanged (Identity, eval Dropout)
        return True
    for _ in range(MAX_GRAPH_OPS):
        node = None if node is None or target is None else _elementwise_input(node)
        if node is None:
            break
        if node is target:
            return True
    return type(module).__name__.endswith("Activation")


def _first_tensor(output: Any) -> Tensor | None:
    """The first tensor of a tuple output (LSTM, attention), else None."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None
