"""Analytics on a loaded trace: class selectivity and stains, pathways, stain evolution, unit health.

Every function takes a :class:`~nn_staining.trace.Trace` and returns DataFrames; nothing here
imports torch, so traces can be analysed where they are read.

**Selectivity.** For neuron ``n`` with class-conditional mean activations ``μ_c`` (the ``classes``
table) the stain is the class with the highest mean and the selectivity index is that of
Morcos et al. 2018, computed on the means shifted by the neuron's floor ``f``::

    f = min(0, max(act_min, act_mean − 3·act_std))            (this epoch's statistics)
    μ'_c = max(μ_c − f, 0)
    selectivity = (μ'_max − μ'_rest) / (μ'_max + μ'_rest)
    μ'_rest = the mean of μ'_c over the other classes

For non-negative activations (ReLU outputs, ``act_min ≥ 0``) ``f = 0`` and this is exactly Morcos'
index. For signed activations (pre-activations, tanh) it is Morcos' index of the activation moved up
until its floor is 0, as if a ReLU sat at the neuron's lowest value; the floor is the minimum but
no lower than 3 standard deviations below the mean, so that one outlying sample (standardised
breast-cancer features reach 10 σ) does not flatten every neuron's contrast. The index stays in
[0, 1], is invariant to scaling a neuron by ``a > 0`` and, for signed neurons, to adding a constant
to it (``μ_c``, ``act_min`` and ``act_mean`` move together), and is continuous where the floor
crosses 0. The alternative ``(μmax − μrest)/(|μmax| + |μrest|)`` was rejected: it is not
shift-invariant and jumps to 1 whenever the two means straddle 0, however close they are. Compare
selectivities within a layer rather than as absolute numbers: a pre-activation's floor sits
further below its class means than a ReLU's zero does.

``stain_margin = (μ_max − μ_second) / act_std``: how far the stain class leads the runner-up, in the
neuron's standard deviations. A neuron is *unstained* (``stain = -1``) when it is dead, its
statistics are not finite, ``selectivity < SELECTIVITY_THRESHOLD`` (0.1: class-blind), or its lead
is not clear: ``stain_margin < max(MARGIN_THRESHOLD, MARGIN_Z·sqrt(1/n_max + 1/n_second))``, i.e.
below 0.1 std or within two standard errors of the difference of the two class means (``n_c``:
the class's sample count), so that stains reflect the data, not sampling noise.

**Dead** means never positive after its activation: ``act_max <= 0`` or ``act_active_frac == 0``.
It is judged only where "never positive" means the unit is silenced, read from the layer graph the
recorder learnt from the forward pass (``inputs_from`` / ``input_ops`` in ``meta.json``): on a ReLU or
ReLU6 layer, and on a layer whose output really feeds one, through a recorded ReLU/ReLU6 module or
a functional ``relu``, with nothing in between but dropout, copies or a recorded ``Dropout`` /
``Identity``. Everything else is signed and never dead: an LSTM's output, a dropout output that
feeds a residual sum, pre-activations before a tanh, GELU or normalisation, the logits.

A trace recorded before the graph existed (no layer has ``inputs_from``) keeps the old rule, by
model order: judged on ReLU outputs and on a layer without a recorded activation, except the last
layer, one followed by a normalisation layer, or one followed by a non-ReLU activation of its width.

**Pathways.** For ``nn.Linear`` layers chained along the layer graph the mean contribution of input
``k`` to neuron ``j`` for class ``c`` is ``C[c,j,k] = W[j,k]·E[x_k | c]`` (the ``inputs`` table); with
the bias these sum exactly to the neuron's class-conditional mean pre-activation when the weights did
not change during the epoch. An edge's weight is its share ``C[c,j,k] / Σ_k' |C[c,j,k']|`` and a
path's score is the product of its edges' shares (signed: two inhibitions make an excitation). Layer
A precedes Linear B in the chain only when B's one input is A's output, directly or through
elementwise activations (recorded modules that act elementwise, or functional ``relu``, ``gelu``,
dropout…), and A is an ``nn.Linear`` with as many neurons as B has inputs: layers whose widths
merely match (BERT's query, key and value) never chain. A trace without the graph chains
consecutive Linear layers of matching widths, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from .trace import Trace

log = logging.getLogger(__name__)

#: A neuron whose selectivity index is below this is unstained.
SELECTIVITY_THRESHOLD = 0.1
#: A neuron whose stain class leads the runner-up by less than this many standard deviations is unstained.
MARGIN_THRESHOLD = 0.1
#: … or by less than this many standard errors of the difference of the two class means.
MARGIN_Z = 2.0
#: The floor of a signed neuron is no lower than this many standard deviations below its mean.
FLOOR_STDS = 3.0
#: A tanh (or rescaled sigmoid) unit is saturated when E[y²] >= SATURATION_LEVEL², y its output in [-1, 1].
SATURATION_LEVEL = 0.95
#: Bounded activations, mapped onto [-1, 1] by (scale, offset): y = (a - offset) / scale.
BOUNDED_ACTIVATIONS = {"tanh": (1.0, 0.0), "hardtanh": (1.0, 0.0), "sigmoid": (0.5, 0.5)}
#: The stain of an unstained (or dead) neuron.
UNSTAINED = -1

#: Candidate partial paths scored at once by the pathway search (bounds its memory).
_CANDIDATES_PER_STEP = 2**22

_NEURON_COLUMNS = ["act_mean", "act_std", "act_min", "act_max", "act_active_frac", "act_nan_count"]
#: Activations whose "never positive" output is a silenced unit.
RELU_ACTIVATIONS = frozenset({"relu", "relu6"})
#: Functional operations (the layer graph's ``input_ops``) after which a unit is silenced when never positive.
RELU_OPS = frozenset({"relu"})
#: Operations that keep a value's sign (dropout's mask and scale, copies): they may sit before the ReLU.
SIGN_KEEPING_OPS = frozenset({"native_dropout", "mul", "div", "clone", "to_copy"})
#: Recorded modules a unit passes through on its way to a ReLU, keeping its sign.
SIGN_KEEPING_TYPES = frozenset({"Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Identity"})


# -- epochs and layers ---------------------------------------------------------------------------
def resolve_epoch(trace: Trace, epoch: int) -> int:
    """A recorded epoch: ``epoch`` itself, or counted from the end when negative (-1 is the last)."""
    epochs = trace.epochs
    if not epochs:
        raise KeyError(f"trace {trace.path} has no recorded epochs")
    if epoch < 0:
        if -epoch > len(epochs):
            raise KeyError(f"epoch {epoch} out of range; recorded epochs: {epochs}")
        return epochs[epoch]
    if epoch not in epochs:
        raise KeyError(f"epoch {epoch} not in trace; recorded epochs: {epochs}")
    return epoch


def _epoch_signature(trace: Trace, epoch: int | None) -> str:
    return "E_*/L_*" if epoch is None else f"E_{resolve_epoch(trace, epoch)}/L_*"


def _layer_infos(trace: Trace) -> dict[str, dict[str, Any]]:
    return {k: trace.layer_info(k) for k in trace.layers}


def has_layer_graph(trace: Trace) -> bool:
    """Whether the trace holds the layer graph learnt from the forward pass (``inputs_from`` in meta.json)."""
    return any("inputs_from" in info for info in _layer_infos(trace).values())


def _judged_dead_by_sign(trace: Trace) -> dict[str, bool]:
    """Per layer: whether 'never positive' means dead (see the module docstring)."""
    infos = _layer_infos(trace)
    if any("inputs_from" in info for info in infos.values()):
        return _judged_dead_by_graph(infos)
    return _judged_dead_by_order(trace)


def _judged_dead_by_graph(infos: dict[str, dict[str, Any]]) -> dict[str, bool]:
    """Per layer: a ReLU-like layer, or one whose output feeds a ReLU through sign-keeping steps only."""
    consumers: dict[str, list[tuple[str, list[str]]]] = {}
    for key, info in infos.items():
        for source, ops in zip(info.get("inputs_from", []), info.get("input_ops", [])):
            consumers.setdefault(source, []).append((key, list(ops)))

    def feeds_relu(layer: str, seen: set[str]) -> bool:
        for target, ops in consumers.get(layer, []):
            for op in ops:
                if op in RELU_OPS:
                    return True
                if op not in SIGN_KEEPING_OPS:
                    break
            else:
                info = infos[target]
                if info.get("activation") in RELU_ACTIVATIONS:
                    return True
                keeps_sign = info.get("type") in SIGN_KEEPING_TYPES and target not in seen
                if keeps_sign and feeds_relu(target, seen | {target}):
                    return True
        return False

    return {k: info.get("activation") in RELU_ACTIVATIONS or feeds_relu(k, {k}) for k, info in infos.items()}


def _judged_dead_by_order(trace: Trace) -> dict[str, bool]:
    """The rule of traces without the layer graph: judged unless the next layer in model order says not."""
    layers = trace.layers
    out = {}
    for i, layer in enumerate(layers):
        info = trace.layer_info(layer)
        act = info.get("activation")
        if act is not None:
            out[layer] = act == "relu"
            continue
        nxt = trace.layer_info(layers[i + 1]) if i + 1 < len(layers) else None
        if nxt is None:
            out[layer] = False  # the logits
        elif "Norm" in str(nxt.get("type")):
            out[layer] = False  # re-centred by the normalisation that follows
        else:
            nxt_act = nxt.get("activation")
            follows = nxt_act is not None and nxt["neurons"] == info["neurons"]
            out[layer] = not follows or nxt_act == "relu"
    return out


def _require_classes(trace: Trace) -> int:
    if not trace.num_classes:
        raise ValueError(
            f"trace {trace.path} has no per-class statistics; record with num_classes= and set_targets(y)"
        )
    return int(trace.num_classes)


def _class_frame(trace: Trace, signature: str, index: pd.MultiIndex, column: str) -> np.ndarray:
    """A column of the classes table as a (rows of ``index``, classes) matrix."""
    classes = trace.classes(signature, columns=[column])[column]
    wide = classes.unstack("class")
    wide = wide.reindex(index=index, columns=range(_require_classes(trace)))
    return wide.to_numpy(dtype=np.float64)


# -- selectivity ---------------------------------------------------------------------------------
def neuron_floor(act_min: np.ndarray, act_mean: np.ndarray, act_std: np.ndarray) -> np.ndarray:
    """The shift of the selectivity index: ``min(0, max(act_min, act_mean − 3·act_std))``."""
    robust = np.fmax(act_min, act_mean - FLOOR_STDS * act_std)
    return np.minimum(robust, 0.0)


def selectivity_index(class_means: np.ndarray, floor: np.ndarray | float = 0.0) -> np.ndarray:
    """Morcos' index of ``class_means`` (rows, classes) less ``floor``: (μ'max − μ'rest)/(μ'max + μ'rest).

    ``μ'_c = max(μ_c − floor, 0)``; classes without data (NaN) are left out of μ'rest.
    """
    means = np.asarray(class_means, dtype=np.float64)
    floors = np.asarray(floor, dtype=np.float64).reshape(-1, 1)
    # an exploding unit's class means may be -inf, like its floor: -inf - -inf is NaN, without a warning
    with np.errstate(invalid="ignore", divide="ignore"):
        shifted = np.clip(means - floors, 0.0, None)
        top = np.nanmax(np.where(np.isnan(shifted), -np.inf, shifted), axis=1)
        seen = (~np.isnan(shifted)).sum(axis=1)
        rest = (np.nansum(shifted, axis=1) - top) / (seen - 1)
        index = (top - rest) / (top + rest)
    index = np.where((top + rest) == 0, 0.0, index)
    return np.where((seen >= 2) & np.isfinite(top), index, np.nan)


def selectivity(
    trace: Trace,
    epoch: int | None = None,
    *,
    threshold: float = SELECTIVITY_THRESHOLD,
    min_margin: float = MARGIN_THRESHOLD,
    margin_z: float = MARGIN_Z,
) -> pd.DataFrame:
    """Stain, selectivity and stain margin of every neuron, indexed by (epoch, layer, neuron).

    ``selectivity = (μ'max − μ'rest)/(μ'max + μ'rest)``, ``μ'_c = μ_c − min(0, max(act_min, mean − 3 std))``
    (Morcos et al. 2018 for non-negative activations); ``stain_margin = (μmax − μsecond)/act_std``.
    ``stain`` is the top class, or -1 when dead, non-finite, ``selectivity < threshold`` or
    ``stain_margin < max(min_margin, margin_z·sqrt(1/n_max + 1/n_second))``; ``top_class`` is the top
    class regardless. ``epoch=None``: every recorded epoch; an int: that epoch (-1 the last).
    """
    _require_classes(trace)
    signature = _epoch_signature(trace, epoch)
    neurons = trace.query(signature, columns=_NEURON_COLUMNS)
    means = _class_frame(trace, signature, neurons.index, "act_mean")
    counts = _class_frame(trace, signature, neurons.index, "act_count")
    act_min = neurons["act_min"].to_numpy(np.float64)
    act_std = neurons["act_std"].to_numpy(np.float64)
    index = selectivity_index(means, neuron_floor(act_min, neurons["act_mean"].to_numpy(np.float64), act_std))

    finite = np.isfinite(means).any(axis=1)
    safe = np.where(np.isnan(means), -np.inf, means)
    order = np.argsort(-safe, axis=1, kind="stable")
    top_class = np.where(finite, order[:, 0], UNSTAINED)
    rows = np.arange(len(means))
    if means.shape[1] > 1:
        with np.errstate(invalid="ignore", divide="ignore"):
            gap = safe[rows, order[:, 0]] - safe[rows, order[:, 1]]
            noise = margin_z * np.sqrt(1 / counts[rows, order[:, 0]] + 1 / counts[rows, order[:, 1]])
    else:
        gap, noise = np.zeros(len(means)), np.zeros(len(means))
    with np.errstate(invalid="ignore", divide="ignore"):
        margin = np.where(act_std > 0, gap / act_std, 0.0)
    margin = np.where(np.isfinite(margin), margin, np.nan)
    needed = np.fmax(min_margin, noise)

    dead = _dead(trace, neurons)
    valid = finite & np.isfinite(index) & np.isfinite(act_min) & (neurons["act_nan_count"].to_numpy() == 0)
    stained = valid & ~dead & (index >= threshold) & (np.nan_to_num(margin) >= needed)
    return pd.DataFrame(
        {
            "stain": np.where(stained, top_class, UNSTAINED).astype(np.int64),
            "selectivity": index,
            "stain_margin": margin,
            "top_class": top_class.astype(np.int64),
            "dead": dead,
        },
        index=neurons.index,
    )


def _dead(trace: Trace, neurons: pd.DataFrame) -> np.ndarray:
    """Never positive after the activation (see the module docstring), per row of a neurons frame."""
    judged = _judged_dead_by_sign(trace)
    layer_judged = neurons.index.get_level_values("layer").map(judged).to_numpy(dtype=bool)
    never = (neurons["act_max"].to_numpy() <= 0) | (neurons["act_active_frac"].to_numpy() == 0)
    return layer_judged & never & (neurons["act_nan_count"].to_numpy() == 0)


# -- stain evolution -----------------------------------------------------------------------------
@dataclass
class StainEvolution:
    """How stains change over training.

    ``stains``: stain per neuron (rows (layer, neuron)) at each recorded epoch (columns);
    ``neurons``: per neuron its ``final_stain``, ``settling_epoch`` (the first epoch from which its stain
    never changes again) and ``changes`` (how often it changed); ``layers``: per (epoch, layer) the
    ``stained_frac`` and ``dead_frac`` of its neurons.
    """

    stains: pd.DataFrame
    neurons: pd.DataFrame
    layers: pd.DataFrame


def settling_epochs(stains: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """Per row of ``stains`` (neurons, epochs): the first epoch from which the value never changes again."""
    stains = np.asarray(stains)
    epochs = np.asarray(epochs)
    if stains.shape[1] < 2:
        return np.full(stains.shape[0], epochs[0] if len(epochs) else -1)
    changed = stains[:, 1:] != stains[:, :-1]
    last_change = np.where(changed.any(axis=1), changed.shape[1] - np.argmax(changed[:, ::-1], axis=1), 0)
    return epochs[last_change]


def stain_evolution(trace: Trace, stains: pd.DataFrame | None = None) -> StainEvolution:
    """Each neuron's stain at every recorded epoch, its settling epoch, and per-layer stained fractions.

    ``stains`` is a precomputed ``selectivity(trace)`` (every epoch) to reuse.
    """
    frame = selectivity(trace) if stains is None else stains
    wide = frame["stain"].unstack("epoch")
    order = pd.MultiIndex.from_frame(frame.index.to_frame(index=False)[["layer", "neuron"]].drop_duplicates())
    wide = wide.reindex(order).sort_index(axis=1)
    epochs = wide.columns.to_numpy()
    values = wide.to_numpy()
    neurons = pd.DataFrame(
        {
            "final_stain": values[:, -1].astype(np.int64),
            "settling_epoch": settling_epochs(values, epochs).astype(np.int64),
            "changes": (values[:, 1:] != values[:, :-1]).sum(axis=1).astype(np.int64),
        },
        index=wide.index,
    )
    grouped = frame.assign(stained=frame["stain"] >= 0).groupby(level=["epoch", "layer"], sort=False)
    layers = pd.DataFrame({"stained_frac": grouped["stained"].mean(), "dead_frac": grouped["dead"].mean()})
    layers = layers.reindex(
        pd.MultiIndex.from_product([epochs, [k for k in trace.layers if k in set(order.get_level_values(0))]])
    )
    layers.index.names = ["epoch", "layer"]
    return StainEvolution(stains=wide, neurons=neurons, layers=layers)


# -- pathways ------------------------------------------------------------------------------------
def linear_chain(trace: Trace, end_layer: str | None = None) -> list[str]:
    """The chained ``nn.Linear`` layers ending at ``end_layer`` (default: the last layer), first to last.

    A Linear precedes the next when the layer graph shows its output is the next one's only input,
    directly or through elementwise activations, with matching widths (see the module docstring); why
    the chain stops is logged at INFO. Without the graph (older traces), layer i precedes layer i+1
    when i+1's ``in_features`` equals i's neuron count. Only layers whose inputs were recorded count.
    """
    linear = [
        k
        for k in trace.layers
        if trace.layer_info(k).get("type") == "Linear" and trace.layer_info(k).get("input_offset") is not None
    ]
    end = trace.layer_info(end_layer if end_layer is not None else trace.layers[-1])["key"]
    if end not in linear:
        raise ValueError(
            f"pathways need an nn.Linear end layer with recorded inputs; {end!r} is not one "
            f"(such layers: {', '.join(linear) or 'none'})"
        )
    infos = _layer_infos(trace)
    if any("inputs_from" in info for info in infos.values()):
        return _graph_chain(infos, linear, end)
    chain = [end]
    for key in reversed(linear[: linear.index(end)]):
        if trace.layer_info(key)["neurons"] != trace.layer_info(chain[0])["in_features"]:
            break
        chain.insert(0, key)
    return chain


def _graph_chain(infos: dict[str, dict[str, Any]], linear: list[str], end: str) -> list[str]:
    """The Linear chain into ``end`` along the layer graph's edges; logs why it stops."""
    chain = [end]
    while True:
        source, why = _linear_source(infos, chain[0])
        if source is not None and source not in linear:
            source, why = None, f"its input comes from {source}, an nn.Linear whose inputs were not recorded"
        elif source is not None and source in chain:
            source, why = None, f"its input comes from {source}, already in the chain"
        elif source is not None and infos[source]["neurons"] != infos[chain[0]]["in_features"]:
            source, why = None, f"its input comes from {source}, whose width differs"
        if source is None:
            log.info("pathways into %s: the chain starts at %s: %s", end, chain[0], why)
            return chain
        chain.insert(0, source)


def _linear_source(infos: dict[str, dict[str, Any]], key: str) -> tuple[str | None, str]:
    """The nn.Linear whose output is layer ``key``'s one input through elementwise layers, or (None, why)."""
    sources = infos[key].get("inputs_from")
    if sources is None:
        return None, "its inputs were not seen while the layer graph was learnt"
    seen = {key}
    while True:
        if not sources:
            return (
                None,
                "its input is no recorded layer's output (the model's input, or a tensor computed "
                "outside recorded modules)",
            )
        if len(sources) > 1:
            return None, f"it reads several recorded layers ({', '.join(sources)})"
        source = sources[0]
        info = infos[source]
        if info.get("type") == "Linear":
            return source, ""
        if not info.get("elementwise") or source in seen:
            return (
                None,
                f"its input comes from {source} ({info.get('type')}), not from an nn.Linear through "
                "elementwise activations",
            )
        seen.add(source)
        sources = info.get("inputs_from")
        if sources is None:
            return None, f"the inputs of {source} were not seen while the layer graph was learnt"


def contributions(trace: Trace, layer: str, epoch: int = -1) -> np.ndarray:
    """Mean contributions ``C[c, j, k] = W[j, k]·E[x_k | c]`` of a Linear layer: (classes, neurons, inputs).

    ``C.sum(-1) + bias`` is neuron j's class-conditional mean pre-activation (exact with frozen weights).
    """
    classes = _require_classes(trace)
    epoch = resolve_epoch(trace, epoch)
    info = trace.layer_info(layer)
    weights = trace.weights(epoch, info.get("first_call") or info["key"]).astype(np.float64)  # stored once
    means = trace.inputs(f"E_{epoch}/{info['key']}")["mean"]
    means = means.droplevel(["epoch", "layer"]).unstack("class")
    means = means.reindex(index=range(weights.shape[1]), columns=range(classes)).to_numpy(np.float64)
    return weights[None, :, :] * np.nan_to_num(means).T[:, None, :]


def edge_shares(contrib: np.ndarray) -> np.ndarray:
    """Each contribution's share of the total absolute contribution into its neuron: C / Σ_k |C| (or 0)."""
    total = np.abs(contrib).sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, contrib / total, 0.0)


def pathways(
    trace: Trace, target_class: int, epoch: int | None = None, top_k: int = 10, end_layer: str | None = None
) -> pd.DataFrame:
    """The ``top_k`` highest-scoring paths from the input features to neuron ``target_class``.

    Score = product along the path of each edge's share ``W[j,k]·E[x_k|c] / Σ_k' |W[j,k']·E[x_k'|c]|``
    for ``c = target_class`` (signed). One row per path, best first: ``score``, ``path`` (signatures
    from ``x/n_<k>`` to ``<end_layer>/n_<target_class>``), ``epoch``, ``target_class``. ``epoch=None``
    is the last recorded epoch. The search keeps, per node, the k largest and k smallest partial
    products, so it is exact.
    """
    classes = _require_classes(trace)
    if not 0 <= target_class < classes:
        raise KeyError(f"target_class {target_class} not in the trace's classes 0..{classes - 1}")
    epoch = resolve_epoch(trace, -1 if epoch is None else epoch)
    chain = linear_chain(trace, end_layer)
    if target_class >= trace.layer_info(chain[-1])["neurons"]:
        raise KeyError(f"layer {chain[-1]!r} has no neuron {target_class}")
    shares = [edge_shares(contributions(trace, layer, epoch)[target_class]) for layer in chain]
    scores, nodes = top_paths(shares, target_class, top_k)
    names = ["x"] + chain
    paths = [tuple(f"{names[i]}/n_{n}" for i, n in enumerate(p)) for p in nodes]
    frame = pd.DataFrame(
        {"score": scores, "path": paths, "epoch": epoch, "target_class": target_class},
        index=pd.RangeIndex(len(scores), name="rank"),
    )
    return frame


def top_paths(shares: list[np.ndarray], target: int, top_k: int) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """The ``top_k`` largest products of edge weights along paths from level 0 to ``target`` (last level).

    ``shares[i]`` is the (n_{i+1}, n_i) edge-weight matrix from level i to level i+1. Dynamic
    programming from the target back: each node keeps the union of its k largest and k smallest
    partial products (a negative edge turns the smallest into the largest), which is exact.
    """
    k = max(int(top_k), 1)
    values = np.array([[1.0]])
    pointers: list[np.ndarray] = []
    last = shares[-1][target : target + 1]
    for matrix in reversed([*shares[:-1], last]):
        rows = max(1, _CANDIDATES_PER_STEP // max(values.size, 1))
        parts = [_extend(matrix.T[i : i + rows], values, k) for i in range(0, matrix.shape[1], rows)]
        values = np.concatenate([v for v, _ in parts])
        pointers.append(np.concatenate([p for _, p in parts]))
    width = values.shape[1]
    ranked = np.where(np.isnan(values), -np.inf, values).ravel()
    best = np.argsort(-ranked, kind="stable")[: min(k, int(np.isfinite(ranked).sum()))]
    scores = ranked[best]
    paths = []
    for flat_index in best:
        node, slot = divmod(int(flat_index), width)
        path = [node]
        for level in range(len(pointers) - 1, 0, -1):
            node, slot = divmod(int(pointers[level][node, slot]), pointers[level - 1].shape[1])
            path.append(node)
        path.append(target)
        paths.append(tuple(path))
    return scores, paths


def _extend(edges: np.ndarray, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """One step back: for each lower node (rows of ``edges``, its weights to the upper nodes), the kept
    partial products through every (upper node, slot) of ``values``, and pointers to them (-1: none)."""
    flat = (edges[:, :, None] * values[None, :, :]).reshape(edges.shape[0], -1)
    keep, order = _extremes(flat, k)
    kept = np.take_along_axis(flat, order, axis=1)
    kept[~keep] = np.nan
    return kept, np.where(keep, order, -1)


def _extremes(flat: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the columns of the k largest and k smallest finite values (none twice): (mask, columns)."""
    rows, cols = flat.shape
    ordered = np.argsort(np.where(np.isnan(flat), np.inf, flat), axis=1, kind="stable")
    finite = np.isfinite(np.take_along_axis(flat, ordered, axis=1)).sum(axis=1)
    if cols <= 2 * k:
        keep = np.arange(cols)[None, :] < finite[:, None]
        return keep, ordered
    low = ordered[:, :k]
    idx = np.clip(finite[:, None] - k + np.arange(k)[None, :], 0, cols - 1)
    high = np.take_along_axis(ordered, idx, axis=1)
    order = np.concatenate([low, high], axis=1)
    position = np.concatenate([np.arange(k)[None, :].repeat(rows, 0), idx], axis=1)
    keep = position < finite[:, None]
    keep[:, k:] &= idx >= k  # the high half overlaps the low half when fewer than 2k are finite
    return keep, order


# -- unit health ---------------------------------------------------------------------------------
@dataclass
class UnitHealth:
    """Per (epoch, layer, neuron) ``dead``, ``saturated`` and ``exploding`` flags (``neurons``) and
    their per-(epoch, layer) fractions (``layers``: ``dead_frac``, ``saturated_frac``, ``exploding_frac``)."""

    neurons: pd.DataFrame
    layers: pd.DataFrame


def unit_health(trace: Trace, epoch: int | None = None, *, level: float = SATURATION_LEVEL) -> UnitHealth:
    """Dead, saturated and exploding units at every recorded epoch (or one ``epoch``).

    dead: never positive where a ReLU really follows (``act_max <= 0`` or ``act_active_frac == 0``; the
    module docstring says where it is judged);
    saturated: a tanh/sigmoid unit whose output rescaled to y ∈ [-1, 1] has ``E[y²] = std² + mean² >= level²``
    (so by Markov's inequality most samples lie near ±1); exploding: a NaN or ±Inf was seen.
    """
    columns = ["act_mean", "act_std", "act_min", "act_max", "act_active_frac", "act_nan_count"]
    neurons = trace.query(_epoch_signature(trace, epoch), columns=columns)
    layer = neurons.index.get_level_values("layer")
    activation = layer.map({k: trace.layer_info(k).get("activation") for k in trace.layers})
    scale = activation.map(lambda a: BOUNDED_ACTIVATIONS.get(a, (np.nan, np.nan))[0]).to_numpy(np.float64)
    offset = activation.map(lambda a: BOUNDED_ACTIVATIONS.get(a, (np.nan, np.nan))[1]).to_numpy(np.float64)
    mean = (neurons["act_mean"].to_numpy(np.float64) - offset) / scale
    std = neurons["act_std"].to_numpy(np.float64) / scale
    second_moment = mean**2 + std**2
    stats = neurons[["act_mean", "act_std", "act_min", "act_max"]].to_numpy(np.float64)
    exploding = (neurons["act_nan_count"].to_numpy() > 0) | ~np.isfinite(stats).all(axis=1)
    flags = pd.DataFrame(
        {
            "dead": _dead(trace, neurons) & ~exploding,
            "saturated": np.nan_to_num(second_moment, nan=0.0) >= level**2,
            "exploding": exploding,
        },
        index=neurons.index,
    )
    grouped = flags.groupby(level=["epoch", "layer"], sort=False).mean()
    grouped.columns = [f"{c}_frac" for c in grouped.columns]
    return UnitHealth(neurons=flags, layers=grouped)


# -- weight drift --------------------------------------------------------------------------------
def weight_drift(trace: Trace) -> pd.DataFrame:
    """Per (epoch, layer): median, 25th and 75th percentile of ``weight_delta_norm`` over the layer's neurons.

    ``weight_delta_norm`` is ‖w_n(e) − w_n(e_prev)‖ for the previous recorded epoch (NaN at the first).
    """
    frame = trace.query("E_*/L_*", columns=["weight_delta_norm"])["weight_delta_norm"]
    frame = frame.dropna()
    grouped = frame.groupby(level=["epoch", "layer"], sort=False)
    return pd.DataFrame(
        {"median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75)}
    )
