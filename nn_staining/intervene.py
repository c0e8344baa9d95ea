"""Interventions: restore checkpoints, ablate neurons and edges, and check causally what stains claim.

A stain says a neuron's mean activation is highest for class c; it does not say the network uses
the neuron for class c (Morcos et al. 2018 found selectivity a poor predictor of a unit's
importance). This module is the one place that changes what a model computes, always inside a
``with`` block whose exit restores the model bit-exactly:

- :func:`load_checkpoint` restores an epoch's ``state_dict`` (``record_checkpoints=True``).
- :func:`ablate` replaces neurons' outputs (zero, or their recorded ``act_mean``) with forward hooks.
- :func:`ablate_edges` zeroes weights ``W[j, k]`` (pathway edges) and writes them back.
- :func:`stain_effects` ablates each layer's neurons stained c (and each class's top pathways) and
  measures every class's held-out accuracy and true-class logit against a same-sized control;
  :func:`specificity` condenses it per layer; :func:`neuron_effects` ablates neurons one by one.
- :func:`conductance_correlation` compares stains with Captum's layer conductance (optional).

A layer is one call of a module, as the recorder keys it: ``L_x`` is module x's first call in each
forward pass of the model, ``L_x:n`` its n-th; interventions count each module's calls per pass and
change only the call they name.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import numbers
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from . import staining
from .checkpoints import checkpoint_epochs, checkpoint_path, read_checkpoint
from .layers import output_layout
from .signature import call_key, is_glob, layer_key, match_layers, parse_signature
from .trace import Trace, load_trace

log = logging.getLogger(__name__)

#: Ablation modes: replace a neuron's output with 0, or with its recorded mean activation.
MODES = ("zero", "mean")
#: How :func:`stain_effects` picks its control neurons (see there).
CONTROLS = ("unstained", "random")
#: Columns of the tidy frame :func:`stain_effects` returns, in order.
EFFECT_COLUMNS = [
    "unit",
    "epoch",
    "layer",
    "stain_class",
    "eval_class",
    "n_ablated",
    "n_control",
    "n_eval",
    "acc_base",
    "logit_base",
    "acc_change",
    "logit_change",
    "control_acc_change",
    "control_logit_change",
]
#: The ``layer`` value of pathway (edge ablation) rows.
PATHWAYS = "pathways"
#: Where effects are stored: ``<run>/interventions/<name>.parquet``.
INTERVENTIONS = "interventions"


# -- layers of a model ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Layer:
    """A layer: one call of a module (``call`` 1 is ``module_key`` itself, the n-th ``module_key:n``)."""

    module: nn.Module
    channels: bool | None  # None: decided from the output's shape (no trace)
    neurons: int | None
    module_key: str = ""
    call: int = 1


def _as_trace(trace: Trace | str | os.PathLike | None) -> Trace | None:
    return load_trace(trace) if isinstance(trace, (str, os.PathLike)) else trace


def _model_layers(model: nn.Module, trace: Trace | None) -> dict[str, _Layer]:
    """Layer key → module call: the trace's layers when given (a module called n times in a pass has n
    layers), else the first call of every named module of ``model`` whose name a signature can address."""
    modules = dict(model.named_modules())
    if trace is None:
        named = {}
        for name, m in modules.items():
            key = _addressable_key(name) if name else None
            if key is not None:
                named[key] = _Layer(m, None, None, key)
        return named or {"L_model": _Layer(model, None, None, "L_model")}
    out = {}
    for key in trace.layers:
        info = trace.layer_info(key)
        candidates = [info.get("module"), key, key[2:]]
        name = next((c for c in candidates if c is not None and c in modules), None)
        if name is None:
            raise KeyError(
                f"trace layer {key!r} (module {info.get('module')!r}) is not a module of this model; "
                f"its modules: {', '.join(n for n in modules if n) or '(none)'}. Does the model match the trace?"
            )
        call = int(info.get("call", 1))
        module_key = str(info.get("first_call", key)) if call > 1 else key
        out[key] = _Layer(
            modules[name], info.get("kind") == "channels", int(info["neurons"]), module_key, call
        )
    return out


def _addressable_key(name: str) -> str | None:
    """The module's layer key, or None when no signature can address its name (``/``, whitespace)."""
    try:
        return layer_key(name)
    except ValueError:
        return None


def _split_call(key: str) -> tuple[str, int] | None:
    """``("L_x", n)`` for a call key ``L_x:n`` (n ≥ 2), else None."""
    base, colon, call = key.rpartition(":")
    if colon and base and call.isascii() and call.isdigit() and int(call) >= 2:
        return base, int(call)
    return None


def _calls_of(module_key: str, layers: Mapping[str, _Layer]) -> list[str]:
    return [k for k, spec in layers.items() if spec.module_key == module_key]


def _match_layers(pattern: str, layers: dict[str, _Layer], traced: bool = True) -> list[str]:
    """Layer keys named by ``pattern`` (an exact key first, else a glob); ``KeyError`` listing them otherwise.

    ``L_x:n`` names call n of module x: a ``ValueError`` listing x's calls when the trace has no such call;
    without a trace (``traced=False``) it is added to ``layers``, and checked when the model runs."""
    key = pattern if pattern.startswith("L_") else f"L_{pattern}"
    hits = match_layers(key, layers)
    if hits:
        return hits
    split = _split_call(key)
    if split is not None and split[0] in layers and layers[split[0]].call == 1:
        base, call = split
        if traced:
            calls = _calls_of(base, layers)
            raise ValueError(
                f"layer {pattern!r} names call {call} of module {layers[base].module_key[2:]!r}, but the trace "
                f"has {len(calls)} call{'s' if len(calls) > 1 else ''} of it per forward pass; its layers: "
                f"{', '.join(calls)}"
            )
        layers[key] = _Layer(layers[base].module, None, None, base, call)
        return [key]
    raise KeyError(f"layer {pattern!r} matches no layer; layers: {', '.join(layers)}")


class _CallCounter:
    """Counts each module's calls in the current forward pass of ``model`` (per thread), so that an
    intervention on ``L_x:n`` acts on the n-th call alone. A module called on its own, outside a pass of
    the whole model, makes call 1 each time (as the recorder counts)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.local = threading.local()
        self.seen: dict[str, int] = {}  # per module key: the most calls one pass made

    def attach(self, handles: list) -> None:
        """Hook the model's pass boundaries (the handles go to ``handles``)."""
        handles.append(self.model.register_forward_pre_hook(self._start))
        handles.append(self.model.register_forward_hook(self._end, always_call=True))

    def _start(self, module: nn.Module, args: Any) -> None:
        self.local.calls = {}

    def _end(self, module: nn.Module, args: Any, output: Any) -> None:
        self.local.calls = None

    def next_call(self, module_key: str) -> int:
        """The number of the call ``module_key`` is making now."""
        calls = getattr(self.local, "calls", None)
        if calls is None:
            call = 1
        else:
            call = calls[module_key] = calls.get(module_key, 0) + 1
        self.seen[module_key] = max(self.seen.get(module_key, 0), call)
        return call

    def check_reached(self, named: Iterable[tuple[str, str, int]]) -> None:
        """After the block: a ``ValueError`` for a call (``key``, module key, call) no pass made, where the
        module ran (only without a trace are calls not known beforehand)."""
        for key, module_key, call in named:
            made = self.seen.get(module_key, 0)
            if 0 < made < call:
                calls = ", ".join(call_key(module_key, n) for n in range(1, made + 1))
                raise ValueError(
                    f"layer {key!r} names call {call} of module {module_key[2:]!r}, which the forward passes "
                    f"called at most {made} time{'s' if made > 1 else ''}; its layers: {calls}"
                )


# -- checkpoints ---------------------------------------------------------------------------------
def load_checkpoint(model: nn.Module, t: Trace | str | os.PathLike, epoch: int = -1) -> int:
    """Restore epoch ``epoch``'s recorded ``state_dict`` into ``model`` (-1: the last checkpoint); returns
    the epoch. A ``ValueError`` names missing and unexpected keys and shape differences."""
    state = read_checkpoint(t, epoch)
    resolved = epoch if epoch >= 0 else checkpoint_epochs(t)[epoch]
    current = model.state_dict()
    missing = [k for k in current if k not in state]
    unexpected = [k for k in state if k not in current]
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)}, model {tuple(current[k].shape)}"
        for k in current
        if k in state and tuple(state[k].shape) != tuple(current[k].shape)
    ]
    if missing or unexpected or shapes:
        problems = []
        if missing:
            problems.append(f"missing from the checkpoint: {', '.join(missing)}")
        if unexpected:
            problems.append(f"not in the model: {', '.join(unexpected)}")
        if shapes:
            problems.append(f"shape differences: {'; '.join(shapes)}")
        raise ValueError(
            f"checkpoint {str(checkpoint_path(t, resolved))!r} does not match the model ({type(model).__name__}): "
            + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)
    return resolved


@contextlib.contextmanager
def _model_at(model: nn.Module, t: Trace, epoch: int) -> Iterator[None]:
    """The model in eval mode with epoch ``epoch``'s weights (its checkpoint; or, with none, the model
    as it is when ``epoch`` is the last recorded one); state and mode restored bit-exactly on exit."""
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {m: m.training for m in model.modules()}
    try:
        if epoch in checkpoint_epochs(t):
            load_checkpoint(model, t, epoch)
        elif epoch != t.epochs[-1]:
            have = ", ".join(map(str, checkpoint_epochs(t))) or "none"
            raise KeyError(
                f"epoch {epoch} has no checkpoint in {str(t.path)!r} (epochs with checkpoints: {have}); "
                "record with NetworkTrace(..., record_checkpoints=True), or use the last epoch with the trained model"
            )
        else:
            log.info("no checkpoint of epoch %d: using the model as it is (the last recorded epoch)", epoch)
        model.eval()
        yield
    finally:
        model.load_state_dict(saved)
        for module, training in modes.items():
            module.training = training


# -- neuron ablation -----------------------------------------------------------------------------
Selection = str | pd.DataFrame | pd.Series | Mapping[str, Iterable[int]] | Iterable[tuple[str, int]]


def neuron_selection(
    selection: Selection, model: nn.Module, trace: Trace | None = None
) -> tuple[dict[str, list[int] | None], int | None]:
    """The (layer → neuron ids, None for all) a selection names, and the one epoch it names if any.

    ``selection``: a signature (``"L_hidden_1/n_3,7"``, ``"E_5/L_hidden_*"``, globs allowed), a frame
    or series indexed by (layer, neuron) or (epoch, layer, neuron), a mapping or (layer, neuron) pairs.
    A layer is one call of a module: ``L_x`` its first call in a forward pass, ``L_x:n`` its n-th.
    """
    chosen, epoch, _ = _select(selection, _model_layers(model, trace), trace is not None)
    return chosen, epoch


def _select(
    selection: Selection, layers: dict[str, _Layer], traced: bool
) -> tuple[dict[str, list[int] | None], int | None, list[tuple[str, list[int] | None]]]:
    """:func:`neuron_selection` on ``layers``, and, without a trace, the signature's glob with its neurons
    (it also names the later calls it matches, which only the forward pass reveals)."""
    chosen: dict[str, set[int] | None] = {}
    epoch: int | None = None
    globs: list[tuple[str, list[int] | None]] = []
    if isinstance(selection, str):
        text = selection.strip()
        sig = parse_signature(text if text.startswith("E_") else f"E_*/{text}")
        if sig.layer is None:
            raise ValueError(f"selection {selection!r} names no layer: expected L_<name>[/n_<sel>]")
        epoch = sig.epochs.values[0] if sig.epochs.is_single else None
        if not traced and is_glob(sig.layer):
            globs.append((sig.layer, _glob_neurons(sig)))
        for key in (
            _glob_first_calls(sig.layer, layers) if globs else _match_layers(sig.layer, layers, traced)
        ):
            width = layers[key].neurons
            if sig.neurons is None or sig.neurons.is_all:
                chosen[key] = None
                continue
            if sig.neurons.values is not None:
                neurons = set(sig.neurons.values)
            else:
                neurons = set(range(sig.neurons.start, sig.neurons.stop))
            if width is not None and is_glob(sig.layer):  # a glob keeps the neurons each layer has
                neurons = {n for n in neurons if n < width}
            chosen[key] = neurons
    elif isinstance(selection, (pd.DataFrame, pd.Series)):
        names = list(selection.index.names)
        if "layer" not in names or "neuron" not in names:
            raise ValueError(
                f"a selection frame must be indexed by (layer, neuron) or (epoch, layer, neuron); its index: {names}"
            )
        if "epoch" in names:
            epochs = selection.index.get_level_values("epoch").unique()
            epoch = int(epochs[0]) if len(epochs) == 1 else None
        pairs = zip(selection.index.get_level_values("layer"), selection.index.get_level_values("neuron"))
        for layer, neuron in pairs:
            chosen.setdefault(_match_layers(str(layer), layers, traced)[0], set()).add(int(neuron))
    elif isinstance(selection, Mapping):
        for layer, neurons in selection.items():
            key = _match_layers(str(layer), layers, traced)[0]
            chosen.setdefault(key, set()).update(int(n) for n in neurons)
    else:
        for item in selection:
            layer, neuron = item
            chosen.setdefault(_match_layers(str(layer), layers, traced)[0], set()).add(int(neuron))
    out: dict[str, list[int] | None] = {}
    for key, neurons in chosen.items():
        width = layers[key].neurons
        if neurons is None:
            out[key] = None if width is None else list(range(width))
            continue
        bad = sorted(n for n in neurons if n < 0 or (width is not None and n >= width))
        if bad:
            raise KeyError(f"layer {key!r} has no neuron {bad[0]}; its neurons: 0..{width - 1}")
        if neurons:
            out[key] = sorted(neurons)
    if (not out or all(v == [] for v in out.values())) and not globs:
        raise ValueError(f"selection {_describe(selection)} names no neuron")
    return out, epoch, globs


def _glob_neurons(sig: Any) -> list[int] | None:
    if sig.neurons is None or sig.neurons.is_all:
        return None
    if sig.neurons.values is not None:
        return sorted(set(sig.neurons.values))
    return list(range(sig.neurons.start, sig.neurons.stop))


def _glob_first_calls(pattern: str, layers: dict[str, _Layer]) -> list[str]:
    """Without a trace: the modules' first calls a glob matches; a ``KeyError`` when it can match no call of
    any module (neither ``L_x`` nor, for a glob with a ``:``, ``L_x:<n>``)."""
    key = pattern if pattern.startswith("L_") else f"L_{pattern}"
    base = key.rpartition(":")[0]
    hits = [k for k in layers if fnmatch.fnmatchcase(k, key)]
    if not hits and not (base and any(fnmatch.fnmatchcase(k, base) for k in layers)):
        raise KeyError(f"layer {pattern!r} matches no layer; layers: {', '.join(layers)}")
    return hits


def _describe(selection: Any) -> str:
    return repr(selection) if isinstance(selection, str) else f"of {type(selection).__name__}"


def _replace(
    output: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor | None
) -> torch.Tensor:
    """``output`` with the neurons ``index`` along ``dim`` set to ``values`` (zeros when None)."""
    if output.dim() == 0:
        output = output.reshape(1)
    width = output.shape[dim]
    if int(index.max()) >= width:
        raise ValueError(f"neuron {int(index.max())} is beyond this output's {width} neurons")
    index = index.to(output.device)
    mask = torch.zeros(width, dtype=torch.bool, device=output.device)
    mask[index] = True
    fill = torch.zeros(width, dtype=output.dtype, device=output.device)
    if values is not None:
        fill[index] = values.to(device=output.device, dtype=output.dtype)
    shape = [1] * output.dim()
    shape[dim] = width
    return torch.where(mask.view(shape), fill.view(shape), output)


Change = Callable[[nn.Module, Any], Any]


def _ablation(layer: str, spec: _Layer, neurons: list[int] | None, values: np.ndarray | None) -> Change:
    """``(module, output) -> output`` with the neurons of ``layer`` replaced by 0 or ``values``."""
    index = None if neurons is None else torch.as_tensor(neurons, dtype=torch.long)
    vals = None if values is None else torch.as_tensor(values)

    def change(module: nn.Module, output: Any) -> Any:
        first = output[0] if isinstance(output, tuple) else output
        if not isinstance(first, torch.Tensor):
            raise TypeError(
                f"layer {layer!r} returned {type(first).__name__}, not a tensor: cannot ablate it"
            )
        channels = spec.channels
        if channels is None:
            channels = output_layout(module, first).channel_first
        dim = 1 if channels and first.dim() >= 2 else max(first.dim() - 1, 0)
        idx = torch.arange(first.shape[dim] if first.dim() else 1) if index is None else index
        new = _replace(first, dim, idx, vals).reshape(first.shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    return change


def _call_hook(
    module_key: str,
    counter: _CallCounter,
    by_call: Mapping[int, list[Change]],
    globs: list[tuple[str, Change]],
) -> Callable[[nn.Module, Any, Any], Any]:
    """The forward hook of a module: at its n-th call in a pass, the changes of layer ``L_x:n`` (and of
    the globs that match that key, for n ≥ 2; a glob's first calls are in ``by_call``)."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        call = counter.next_call(module_key)
        changes = list(by_call.get(call, ()))
        if call > 1 and globs:
            layer = call_key(module_key, call)
            changes += [change for pattern, change in globs if fnmatch.fnmatchcase(layer, pattern)]
        if not changes:
            return None
        for change in changes:
            output = change(module, output)
        return output

    return hook


@contextlib.contextmanager
def ablate(
    model: nn.Module,
    selection: Selection,
    mode: str = "zero",
    *,
    trace: Trace | str | os.PathLike | None = None,
    epoch: int | None = None,
) -> Iterator[dict[str, list[int] | None]]:
    """Within the block, the selected neurons output 0 (``mode="zero"``) or their recorded ``act_mean``
    at ``epoch`` (``"mean"``; default: the selection's one epoch, else the last). Yields layer → neurons.

    Forward hooks return the modified output (linear-like: neuron = last dimension; channels: dimension
    1) of the call each layer names (``L_x:2``: module x's second call in each pass); they are removed on
    exit, even on an exception, so the model then computes exactly as before. Without a trace, a call no
    pass reached is a ``ValueError`` at the end of the block.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of: {', '.join(MODES)}")
    trace = _as_trace(trace)
    layers = _model_layers(model, trace)
    chosen, named_epoch, globs = _select(selection, layers, trace is not None)
    values: dict[str, np.ndarray] = {}
    if mode == "mean":
        if trace is None:
            raise ValueError("mode='mean' replaces outputs with recorded means: pass trace=")
        if epoch is None:
            epoch = named_epoch if named_epoch is not None else -1
        at = staining.resolve_epoch(trace, epoch)
        for key, neurons in chosen.items():
            means = trace.query(f"E_{at}/{key}", columns=["act_mean"])["act_mean"]
            means = means.droplevel(["epoch", "layer"]).reindex(neurons).to_numpy(np.float64)
            values[key] = means
    by_module: dict[str, dict[int, list[Change]]] = {}
    modules = {spec.module_key: spec.module for spec in layers.values()}
    for key, neurons in chosen.items():
        spec = layers[key]
        change = _ablation(key, spec, neurons, values.get(key))
        by_module.setdefault(spec.module_key, {}).setdefault(spec.call, []).append(change)
    glob_changes: dict[str, list[tuple[str, Change]]] = {}
    for pattern, neurons in globs:  # without a trace: the later calls a glob matches, as the passes make them
        key = pattern if pattern.startswith("L_") else f"L_{pattern}"
        base = key.rpartition(":")[0]
        for name, spec in list(layers.items()):
            if spec.call == 1 and (
                fnmatch.fnmatchcase(name, key) or (base and fnmatch.fnmatchcase(name, base))
            ):
                glob_changes.setdefault(name, []).append((key, _ablation(key, spec, neurons, None)))
                by_module.setdefault(name, {})
    counter = _CallCounter(model)
    handles: list[Any] = []
    try:
        counter.attach(handles)
        for module_key, by_call in by_module.items():
            hook = _call_hook(module_key, counter, by_call, glob_changes.get(module_key, []))
            handles.append(modules[module_key].register_forward_hook(hook))
        yield chosen
        if trace is None:
            counter.check_reached((k, layers[k].module_key, layers[k].call) for k in chosen)
    finally:
        for handle in handles:
            handle.remove()


# -- edge ablation -------------------------------------------------------------------------------
Edge = tuple[str, int, int]


def pathway_edges(paths: pd.DataFrame | Iterable[Sequence[str]]) -> list[Edge]:
    """The edges ``(layer, j, k)`` (weight ``W[j, k]`` of ``layer``) along pathways, without repeats.

    ``paths``: ``staining.pathways`` output or paths such as ``("x/n_4", "L_input/n_7", "L_output/n_1")``."""
    if isinstance(paths, pd.DataFrame):
        paths = paths["path"]
    edges: dict[Edge, None] = {}
    for path in paths:
        nodes = [_path_node(node) for node in path]
        for (_, k), (layer, j) in zip(nodes[:-1], nodes[1:]):
            edges[(layer, j, k)] = None
    return list(edges)


def _path_node(node: str) -> tuple[str, int]:
    layer, sep, neuron = str(node).rpartition("/n_")
    if not sep or not neuron.isdigit():
        raise ValueError(f"path node {node!r} is not of the form <layer>/n_<neuron>")
    return layer, int(neuron)


def _edge_list(edges: Any) -> list[Edge]:
    if isinstance(edges, pd.DataFrame):
        return pathway_edges(edges)
    out: list[Edge] = []
    for item in edges:
        if (
            len(item) == 3
            and isinstance(item[0], str)
            and all(isinstance(v, numbers.Integral) for v in item[1:])
        ):
            out.append((item[0], int(item[1]), int(item[2])))
        else:
            out.extend(pathway_edges([item]))
    return out


@contextlib.contextmanager
def ablate_edges(
    model: nn.Module, edges: Any, *, trace: Trace | str | os.PathLike | None = None
) -> Iterator[list[Edge]]:
    """Within the block, the weights ``W[j, k]`` of the listed edges ``(layer, j, k)`` (or of pathways:
    a ``staining.pathways`` frame or paths) are 0; on exit they are written back bit-exactly.

    An edge of ``L_x`` is cut in module x's first call of each forward pass, one of ``L_x:n`` in its n-th
    call: the first call's cut is in place throughout the block, and a pre-hook writes another call's
    weights just before it runs (its forward hook writes the first call's back)."""
    trace = _as_trace(trace)
    layers = _model_layers(model, trace)
    edge_list = _edge_list(edges)
    grouped: dict[str, list[tuple[int, int]]] = {}
    for layer, j, k in edge_list:
        grouped.setdefault(_match_layers(layer, layers, trace is not None)[0], []).append((j, k))
    cuts: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # module key -> call -> (j, k)
    weights: dict[str, torch.Tensor] = {}
    for key, pairs in grouped.items():
        spec = layers[key]
        weight = getattr(spec.module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
            raise ValueError(f"layer {key!r} has no (out, in) weight matrix to cut edges from")
        j = torch.as_tensor([p[0] for p in pairs], dtype=torch.long, device=weight.device)
        k = torch.as_tensor([p[1] for p in pairs], dtype=torch.long, device=weight.device)
        if int(j.max()) >= weight.shape[0] or int(k.max()) >= weight.shape[1] or min(j.min(), k.min()) < 0:
            raise KeyError(
                f"edge out of range for layer {key!r}: its weight is {tuple(weight.shape[:2])} (out, in)"
            )
        weights[spec.module_key] = weight
        cuts.setdefault(spec.module_key, {})[spec.call] = (j, k)
    counter = _CallCounter(model)
    handles: list[Any] = []
    cutter = {key: _EdgeCuts(weights[key], calls) for key, calls in cuts.items()}
    try:
        for edge_cuts in cutter.values():
            edge_cuts.cut(1)
        counter.attach(handles)
        modules = {spec.module_key: spec.module for spec in layers.values()}
        for key, edge_cuts in cutter.items():
            module = modules[key]
            handles.append(module.register_forward_pre_hook(edge_cuts.pre_hook(key, counter)))
            handles.append(module.register_forward_hook(edge_cuts.hook, always_call=True))
        yield edge_list
        if trace is None:
            counter.check_reached((k, layers[k].module_key, layers[k].call) for k in grouped)
    finally:
        for handle in handles:
            handle.remove()
        for edge_cuts in cutter.values():
            edge_cuts.restore()


class _EdgeCuts:
    """One module's cut edges per call: the original values of every cut weight, and which call's cut the
    weight holds (the first call's between calls)."""

    def __init__(self, weight: torch.Tensor, calls: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.weight, self.calls = weight, calls
        j = torch.cat([jk[0] for jk in calls.values()])
        k = torch.cat([jk[1] for jk in calls.values()])
        self.all = (j, k)
        self.original = weight.detach()[j, k].clone()
        self.holding: int | None = None  # None: the original weights
        self.stack: list[bool] = []

    def cut(self, call: int) -> None:
        """The weights with call ``call``'s edges cut (the original weights when it has none)."""
        want = call if call in self.calls else None
        if want == self.holding:
            return
        with torch.no_grad():
            self.weight[self.all] = self.original
            if want is not None:
                self.weight[self.calls[want]] = 0
        self.holding = want

    def restore(self) -> None:
        """The original weights, bit-exactly."""
        with torch.no_grad():
            self.weight[self.all] = self.original
        self.holding = None

    def pre_hook(self, module_key: str, counter: _CallCounter) -> Callable[[nn.Module, Any], None]:
        def pre_hook(module: nn.Module, args: Any) -> None:
            call = counter.next_call(module_key)
            self.stack.append(call != 1)
            self.cut(call)

        return pre_hook

    def hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack.pop():
            self.cut(1)


# -- measuring -----------------------------------------------------------------------------------
def _logits(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(model.parameters(), torch.empty(0)).device
    with torch.no_grad():
        parts = []
        for start in range(0, len(x), batch_size):
            out = model(x[start : start + batch_size].to(device))
            parts.append((out[0] if isinstance(out, tuple) else out).float().cpu())
    logits = torch.cat(parts)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(
            f"the model must return (samples, classes ≥ 2) logits; it returned {tuple(logits.shape)}"
        )
    return logits


def class_scores(logits: torch.Tensor, y: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class c: the accuracy on samples of class c and their mean class-c logit (NaN without samples)."""
    logits = logits.numpy().astype(np.float64)
    correct = logits.argmax(1) == y
    true_logit = logits[np.arange(len(y)), y]
    count = np.bincount(y, minlength=classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        acc = np.bincount(y, weights=correct, minlength=classes) / count
        logit = np.bincount(y, weights=true_logit, minlength=classes) / count
    return acc, logit


class _Evaluator:
    """Held-out data and the unablated scores of one model state."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: Any, classes: int, batch_size: int) -> None:
        self.model, self.x, self.batch_size, self.classes = model, x, batch_size, classes
        self.y = np.asarray(torch.as_tensor(y).cpu().numpy(), dtype=np.int64).reshape(-1)
        if len(self.y) != len(x):
            raise ValueError(f"x has {len(x)} samples but y has {len(self.y)} labels")
        bad = self.y[(self.y < 0) | (self.y >= classes)]
        if len(bad):
            raise ValueError(f"label {int(bad[0])} is not a class of the trace (0..{classes - 1})")
        self.count = np.bincount(self.y, minlength=classes)
        self.acc, self.logit = self.scores()

    def scores(self) -> tuple[np.ndarray, np.ndarray]:
        return class_scores(_logits(self.model, self.x, self.batch_size), self.y, self.classes)

    def change(self) -> tuple[np.ndarray, np.ndarray]:
        acc, logit = self.scores()
        return acc - self.acc, logit - self.logit


def _resolve_epochs(t: Trace, epoch: int | Sequence[int] | str) -> list[int]:
    if isinstance(epoch, str):
        if epoch != "all":
            raise ValueError(f"epoch {epoch!r} must be an int, a list of ints or 'all'")
        epochs = [e for e in checkpoint_epochs(t) if e in set(t.epochs)]
        if not epochs:
            raise KeyError(
                f"epoch='all' needs checkpoints; {str(t.path)!r} has none for its recorded epochs "
                "(record with NetworkTrace(..., record_checkpoints=True))"
            )
        return epochs
    if isinstance(epoch, int):
        return [staining.resolve_epoch(t, epoch)]
    return [staining.resolve_epoch(t, int(e)) for e in epoch]


def _check_layers(t: Trace, layers: Sequence[str] | str | None) -> list[str]:
    if layers is None:
        return list(t.layers)
    patterns = [layers] if isinstance(layers, str) else list(layers)
    spec = {k: _Layer(None, None, None, *_call_of(t, k)) for k in t.layers}  # type: ignore[arg-type]
    keys = [k for p in patterns for k in _match_layers(p, spec)]
    return list(dict.fromkeys(keys))


def _call_of(t: Trace, key: str) -> tuple[str, int]:
    """The (module key, call) of a trace layer: ``L_x:2`` is call 2 of ``L_x``."""
    info = t.layer_info(key)
    call = int(info.get("call", 1))
    return (str(info.get("first_call", key)) if call > 1 else key), call


def _called_once(t: Trace, keys: list[str]) -> list[str]:
    """The layers of modules called once per forward pass; Captum's layer attributions hook a module, not one
    of its calls, so the layers of modules called several times are left out (logged)."""
    calls = [_call_of(t, k) for k in t.layers]
    several = {m for m, call in calls if call > 1}
    left = [k for k in keys if _call_of(t, k)[0] in several]
    if left:
        log.info(
            "conductance: left out %s (their modules run several times per forward pass)", ", ".join(left)
        )
    return [k for k in keys if k not in left]


def _control_neurons(frame: pd.DataFrame, count: int, control: str, rng: np.random.Generator) -> np.ndarray:
    """Up to ``count`` live neurons of one layer's selectivity rows, drawn without replacement: the
    unstained ones (``control="unstained"``) or any (``"random"``)."""
    neurons = frame.index.get_level_values("neuron").to_numpy()
    pool = ~frame["dead"].to_numpy()
    if control == "unstained":
        pool &= frame["stain"].to_numpy() == staining.UNSTAINED
    return np.sort(rng.choice(neurons[pool], size=min(count, int(pool.sum())), replace=False))


def _random_edges(
    model_layers: Mapping[str, _Layer], edges: list[Edge], rng: np.random.Generator
) -> list[Edge]:
    """As many random edges per layer as ``edges`` has there, none of them in ``edges``."""
    out: list[Edge] = []
    per_layer: dict[str, set[int]] = {}
    for layer, j, k in edges:
        cols = int(model_layers[layer].module.weight.shape[1])
        per_layer.setdefault(layer, set()).add(j * cols + k)
    for layer, taken in per_layer.items():
        rows, cols = (int(n) for n in model_layers[layer].module.weight.shape[:2])
        size = min(rows * cols, 2 * len(taken))
        drawn = [int(i) for i in rng.choice(rows * cols, size=size, replace=False) if int(i) not in taken]
        out += [(layer, i // cols, i % cols) for i in drawn[: len(taken)]]
    return out


def class_pathway_edges(t: Trace, epoch: int, top_k: int) -> dict[int, list[Edge]]:
    """Per class c, the edges of its ``top_k`` pathways (``staining.pathways``) at ``epoch``; each layer's
    contributions are read once for all classes. Empty when the trace has no Linear chain to the logits."""
    try:
        chain = staining.linear_chain(t)
    except ValueError as exc:
        log.info("no pathways: %s", exc)
        return {}
    contributions = [staining.contributions(t, layer, epoch) for layer in chain]
    out = {}
    for c in range(min(staining._require_classes(t), t.layer_info(chain[-1])["neurons"])):
        shares = [staining.edge_shares(contrib[c]) for contrib in contributions]
        _, paths = staining.top_paths(shares, c, top_k)
        edges = {(chain[i], path[i + 1], path[i]): None for path in paths for i in range(len(chain))}
        out[c] = list(edges)
    return out


def _rows(
    unit: str,
    epoch: int,
    layer: str,
    stain_class: int,
    n_ablated: int,
    n_control: int,
    ev: _Evaluator,
    change,
    control,
) -> list[dict[str, Any]]:
    acc, logit = change
    c_acc, c_logit = control
    return [
        {
            "unit": unit,
            "epoch": epoch,
            "layer": layer,
            "stain_class": stain_class,
            "eval_class": e,
            "n_ablated": n_ablated,
            "n_control": n_control,
            "n_eval": int(ev.count[e]),
            "acc_base": ev.acc[e],
            "logit_base": ev.logit[e],
            "acc_change": acc[e],
            "logit_change": logit[e],
            "control_acc_change": c_acc[e],
            "control_logit_change": c_logit[e],
        }
        for e in range(ev.classes)
    ]


def _mean_change(changes: list[tuple[np.ndarray, np.ndarray]], classes: int) -> tuple[np.ndarray, np.ndarray]:
    if not changes:
        return np.full(classes, np.nan), np.full(classes, np.nan)
    return np.mean([c[0] for c in changes], axis=0), np.mean([c[1] for c in changes], axis=0)


def stain_effects(
    model: nn.Module,
    t: Trace | str | os.PathLike,
    x: torch.Tensor,
    y: Any,
    epoch: int | Sequence[int] | str = -1,
    *,
    layers: Sequence[str] | str | None = None,
    mode: str = "zero",
    control: str = "unstained",
    controls: int = 5,
    seed: int = 0,
    pathways: bool = True,
    top_k: int = 10,
    batch_size: int = 4096,
) -> pd.DataFrame:
    """Per layer and stain class c, what ablating the neurons stained c does to each class on ``(x, y)``.

    One row per (unit, epoch, layer, stain_class, eval_class): the class's accuracy and mean true-class
    logit change, and the same for a control of as many live neurons of the layer, drawn at random
    (seeded) from its unstained ones (``control="unstained"``; fewer when it has fewer, see
    ``n_control``) or from all (``"random"``), averaged over ``controls`` draws. ``unit="edges"`` rows (``layer="pathways"``) zero the edges
    of class c's ``top_k`` pathways against as many random edges per layer. ``epoch``: an epoch, a list,
    or ``"all"`` (every recorded epoch with a checkpoint); checkpoints are loaded and the model restored.
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is not one of: {', '.join(MODES)}")
    if control not in CONTROLS:
        raise ValueError(f"control {control!r} is not one of: {', '.join(CONTROLS)}")
    t = _as_trace(t)
    classes = staining._require_classes(t)
    keys = _check_layers(t, layers)
    model_layers = _model_layers(model, t)
    rows: list[dict[str, Any]] = []
    epochs = _resolve_epochs(t, epoch)
    every = staining.selectivity(t) if len(epochs) > 1 else None  # one read for all epochs
    for at in epochs:
        stains = (
            staining.selectivity(t, at) if every is None else every.xs(at, level="epoch", drop_level=False)
        )
        stains = stains.droplevel("epoch")
        with _model_at(model, t, at):
            ev = _Evaluator(model, x, y, classes, batch_size)
            for li, key in enumerate(keys):
                frame = stains.xs(key, level="layer", drop_level=False)
                for c in sorted(int(s) for s in frame["stain"].unique() if s >= 0):
                    chosen = frame.index[frame["stain"].to_numpy() == c].get_level_values("neuron").to_list()
                    with ablate(model, {key: chosen}, mode, trace=t, epoch=at):
                        change = ev.change()
                    rng = np.random.default_rng([seed, at, li, c])
                    draws = []
                    n_control = 0
                    for _ in range(controls):
                        picked = _control_neurons(frame, len(chosen), control, rng)
                        n_control = len(picked)
                        if n_control:
                            with ablate(model, {key: picked.tolist()}, mode, trace=t, epoch=at):
                                draws.append(ev.change())
                    rows += _rows(
                        "neurons",
                        at,
                        key,
                        c,
                        len(chosen),
                        n_control,
                        ev,
                        change,
                        _mean_change(draws, classes),
                    )
            if pathways:
                rows += _pathway_rows(model, t, at, ev, model_layers, top_k, controls, seed)
    frame = pd.DataFrame(rows, columns=EFFECT_COLUMNS)
    return frame.astype({"epoch": np.int64, "stain_class": np.int64, "eval_class": np.int64})


def _pathway_rows(
    model: nn.Module,
    t: Trace,
    epoch: int,
    ev: _Evaluator,
    model_layers: Mapping[str, _Layer],
    top_k: int,
    controls: int,
    seed: int,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for c, edges in class_pathway_edges(t, epoch, top_k).items():
        if not edges:
            continue
        with ablate_edges(model, edges, trace=t):
            change = ev.change()
        rng = np.random.default_rng([seed, epoch, 10**6, c])
        draws = []
        for _ in range(controls):
            with ablate_edges(model, _random_edges(model_layers, edges, rng), trace=t):
                draws.append(ev.change())
        rows += _rows(
            "edges", epoch, PATHWAYS, c, len(edges), len(edges), ev, change, _mean_change(draws, ev.classes)
        )
    return rows


def specificity(effects: pd.DataFrame, per_class: bool = False) -> pd.DataFrame:
    """How class-specific an ablation is: the accuracy drop of the stained class minus the mean drop of
    the other classes (``specificity``), per (unit, epoch, layer) averaged over stain classes (or per
    stain class with ``per_class=True``); the same for the control and for the true-class logit."""
    keys = ["unit", "epoch", "layer", "stain_class"]
    own = effects["eval_class"] == effects["stain_class"]
    measures = {
        "specificity": "acc_change",
        "control_specificity": "control_acc_change",
        "logit_specificity": "logit_change",
        "control_logit_specificity": "control_logit_change",
    }
    parts = {}
    for name, column in measures.items():
        drop = -effects[column]
        mine = drop[own].groupby([effects.loc[own, k] for k in keys], sort=False).mean()
        rest = drop[~own].groupby([effects.loc[~own, k] for k in keys], sort=False).mean()
        parts[name] = mine - rest.reindex(mine.index)
    per = pd.DataFrame(parts)
    per["n_ablated"] = (
        effects[own].groupby([effects.loc[own, k] for k in keys], sort=False)["n_ablated"].first()
    )
    per["own_acc_change"] = (
        effects[own].groupby([effects.loc[own, k] for k in keys], sort=False)["acc_change"].first()
    )
    if per_class:
        return per
    grouped = per.groupby(level=["unit", "epoch", "layer"], sort=False)
    out = grouped[list(measures)].mean()
    out["stain_classes"] = grouped.size()
    return out


def neuron_effects(
    model: nn.Module,
    t: Trace | str | os.PathLike,
    x: torch.Tensor,
    y: Any,
    epoch: int = -1,
    *,
    layers: Sequence[str] | str | None = None,
    mode: str = "zero",
    batch_size: int = 4096,
) -> pd.DataFrame:
    """Ablate each neuron alone: per (layer, neuron) its stain, selectivity and ``top_class``, and the
    accuracy and true-class logit change of its top class (``acc_change``, ``logit_change``) and the mean
    logit change of the other classes (``other_logit_change``). ``effect`` = max(0, −logit_change) for
    stained neurons, 0 otherwise: the causal effect on the stain class, as drawn in rings."""
    t = _as_trace(t)
    classes = staining._require_classes(t)
    at = staining.resolve_epoch(t, epoch)
    keys = _check_layers(t, layers)
    stains = staining.selectivity(t, at).droplevel("epoch")
    rows = []
    with _model_at(model, t, at):
        ev = _Evaluator(model, x, y, classes, batch_size)
        for key in keys:
            frame = stains.xs(key, level="layer", drop_level=False)
            for (layer, neuron), info in frame.iterrows():
                with ablate(model, {key: [int(neuron)]}, mode, trace=t, epoch=at):
                    acc, logit = ev.change()
                c = int(info["top_class"])
                others = np.delete(logit, c) if c >= 0 else logit
                rows.append(
                    {
                        "layer": layer,
                        "neuron": int(neuron),
                        "stain": int(info["stain"]),
                        "selectivity": float(info["selectivity"]),
                        "top_class": c,
                        "acc_change": acc[c] if c >= 0 else np.nan,
                        "logit_change": logit[c] if c >= 0 else np.nan,
                        "other_logit_change": float(np.nanmean(others)),
                    }
                )
    out = pd.DataFrame(rows).set_index(["layer", "neuron"])
    drop = (-out["logit_change"]).clip(lower=0).fillna(0.0)
    out["effect"] = np.where(out["stain"] >= 0, drop, 0.0)
    out.insert(0, "epoch", at)
    return out


def causal_rings(t: Trace | str | os.PathLike, neuron_effects: pd.DataFrame) -> pd.Series:
    """``neuron_effects``' ``effect`` (own-class logit drop of a stained neuron ablated alone) as the
    ``plots.plot_staining_graph(neuron_rings=...)`` values; the logits layer is left out, since ablating
    a logit removes its class by construction and its rings would dwarf the hidden layers'."""
    t = _as_trace(t)
    rings = neuron_effects["effect"].astype(np.float64)
    rings = rings[rings.index.get_level_values("layer") != t.layers[-1]]
    return rings.rename("own-class logit drop, ablated alone")


# -- Captum baseline -----------------------------------------------------------------------------
def _captum():
    try:
        from captum.attr import LayerConductance
    except ImportError as exc:  # pragma: no cover - exercised where captum is missing
        raise ImportError(
            "conductance needs the optional package captum: pip install captum (tested with captum 0.9.0)"
        ) from exc
    return LayerConductance


def conductance(
    model: nn.Module,
    t: Trace | str | os.PathLike,
    x: torch.Tensor,
    y: Any,
    epoch: int = -1,
    *,
    layers: Sequence[str] | str | None = None,
    n_steps: int = 50,
    batch_size: int = 512,
) -> pd.DataFrame:
    """Captum's ``LayerConductance`` of every neuron for every class c (target logit c, baseline 0),
    averaged over the held-out samples of class c: a (layer, neuron) × class frame (channels summed
    over their spatial positions). Layers of a module called several times per pass are left out."""
    layer_conductance = _captum()
    t = _as_trace(t)
    classes = staining._require_classes(t)
    at = staining.resolve_epoch(t, epoch)
    keys = _check_layers(t, layers)
    keys = _called_once(t, keys)
    model_layers = _model_layers(model, t)
    labels = np.asarray(torch.as_tensor(y).cpu().numpy(), dtype=np.int64).reshape(-1)
    device = next(model.parameters(), torch.empty(0)).device
    frames = []
    with _model_at(model, t, at):
        for key in keys:
            spec = model_layers[key]
            attribution = layer_conductance(model, spec.module)
            table = np.full((spec.neurons, classes), np.nan)
            for c in range(classes):
                xs = x[torch.as_tensor(labels == c)].to(device)
                if not len(xs):
                    continue
                total = torch.zeros(spec.neurons, dtype=torch.float64)
                for start in range(0, len(xs), batch_size):
                    chunk = xs[start : start + batch_size]
                    attr = attribution.attribute(
                        chunk, baselines=torch.zeros_like(chunk), target=c, n_steps=n_steps
                    )
                    attr = attr[0] if isinstance(attr, tuple) else attr
                    total += _per_neuron(attr.detach(), bool(spec.channels)).double().sum(0).cpu()
                table[:, c] = (total / len(xs)).numpy()
            index = pd.MultiIndex.from_product([[key], range(spec.neurons)], names=["layer", "neuron"])
            frames.append(pd.DataFrame(table, index=index, columns=pd.Index(range(classes), name="class")))
    if not frames:
        index = pd.MultiIndex.from_arrays([[], []], names=["layer", "neuron"])
        return pd.DataFrame(index=index, columns=pd.Index(range(classes), name="class"), dtype=np.float64)
    return pd.concat(frames)


def _per_neuron(attr: torch.Tensor, channels: bool) -> torch.Tensor:
    """(samples, neurons) from a layer attribution: channels summed over space, middle positions summed."""
    if attr.dim() <= 2:
        return attr.reshape(len(attr), -1)
    if channels:
        return attr.sum(dim=tuple(range(2, attr.dim())))
    return attr.reshape(len(attr), -1, attr.shape[-1]).sum(1)


def rank_correlation(a: Any, b: Any) -> float:
    """Spearman's ρ (Pearson correlation of average ranks); NaN with fewer than 3 finite pairs or a constant side."""
    a = pd.Series(np.asarray(a, dtype=np.float64))
    b = pd.Series(np.asarray(b, dtype=np.float64))
    keep = a.notna() & b.notna()
    ra, rb = a[keep].rank(), b[keep].rank()
    if keep.sum() < 3 or ra.nunique() < 2 or rb.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def conductance_correlation(
    model: nn.Module,
    t: Trace | str | os.PathLike,
    x: torch.Tensor,
    y: Any,
    epoch: int = -1,
    *,
    layers: Sequence[str] | str | None = None,
    n_steps: int = 50,
    conductances: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Per layer: Spearman's ρ between the selectivity of each stained neuron and its conductance
    (:func:`conductance`) for its stain class; ``n_stained``, and ``positive_frac``: the fraction of
    stained neurons whose conductance for their stain class is positive."""
    t = _as_trace(t)
    at = staining.resolve_epoch(t, epoch)
    keys = _called_once(t, _check_layers(t, layers))
    table = (
        conductances
        if conductances is not None
        else conductance(model, t, x, y, at, layers=keys, n_steps=n_steps)
    )
    stains = staining.selectivity(t, at).droplevel("epoch")
    rows = []
    for key in keys:
        frame = stains.xs(key, level="layer", drop_level=False)
        frame = frame[frame["stain"] >= 0]
        values = table.reindex(frame.index).to_numpy()
        own = values[np.arange(len(frame)), frame["stain"].to_numpy()] if len(frame) else np.array([])
        rows.append(
            {
                "epoch": at,
                "layer": key,
                "n_stained": len(frame),
                "spearman": rank_correlation(frame["selectivity"], own),
                "positive_frac": float(np.mean(own > 0)) if len(own) else np.nan,
            }
        )
    return pd.DataFrame(rows).set_index("layer")


# -- persistence ---------------------------------------------------------------------------------
def effects_path(run_path: str | os.PathLike | Trace, name: str = "effects") -> Path:
    """``<run>/interventions/<name>.parquet``."""
    return Path(getattr(run_path, "path", run_path)) / INTERVENTIONS / f"{name}.parquet"


def save_effects(run_path: str | os.PathLike | Trace, frame: pd.DataFrame, name: str = "effects") -> Path:
    """Store ``frame`` (``stain_effects`` or ``neuron_effects`` output) as Parquet, atomically; returns the path."""
    path = effects_path(run_path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        frame.to_parquet(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_effects(run_path: str | os.PathLike | Trace, name: str = "effects") -> pd.DataFrame | None:
    """The stored effects frame of a run, or None when it has none."""
    path = effects_path(run_path, name)
    return pd.read_parquet(path) if path.is_file() else None
