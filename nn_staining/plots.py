"""Figures of a trace: each ``plot_x(trace, ...)`` returns a matplotlib ``Figure`` and shows or saves nothing.

Statistics come from :mod:`nn_staining.staining` (or straight from the trace's tables); this module
only lays them out. Figures are built with ``matplotlib.figure.Figure`` directly, so no pyplot
state is touched and any backend (Agg included) works: ``fig.savefig("x.png")``.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from . import staining
from .trace import Trace

#: Colour of unstained neurons and of input features.
UNSTAINED_COLOUR = "#c8c8c8"
INPUT_COLOUR = "white"
#: Colour of the × marking a dead neuron.
DEAD_COLOUR = "#3a3a3a"
#: Selectivity at and above which a stained node is drawn in its class's full colour.
FULL_SELECTIVITY = 0.5
#: Palest tint of a stained node (at the selectivity threshold): this fraction of the class colour.
MIN_TINT = 0.3
#: The staining graph draws at most this many nodes per column; wider layers are sampled.
MAX_NODES = 96
#: Bias trajectories drawn per layer at most (an even sample in stain order beyond).
MAX_LINES = 128

_DISTINCT = [
    "#1f77b4",  # blue
    "#ff7f0e",  # orange
    "#2ca02c",  # green
    "#d62728",  # red
    "#9467bd",  # purple
    "#8c564b",  # brown
    "#e377c2",  # pink
    "#bcbd22",  # olive
    "#17becf",  # cyan
    "#393b79",  # indigo (replaces tab10's grey, which would read as unstained)
]


#: Colours of layers (lines of per-layer figures): tab10, then tab20's light shades, then spaced hues.
_LAYER_COLOURS = [mpl.colormaps["tab10"](i)[:3] for i in range(10)] + [
    mpl.colormaps["tab20"](2 * i + 1)[:3] for i in range(10)
]
#: Markers cycled with the layer colours, so that lines stay apart in grey print too.
LAYER_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def layer_palette(num_layers: int) -> list[tuple[float, float, float]]:
    """One distinct colour per layer: the 10 tab10 colours, then tab20's 10 light ones, then spaced hues."""
    extra = max(num_layers - len(_LAYER_COLOURS), 0)
    hues = [
        tuple(float(v) for v in mpl.colors.hsv_to_rgb((i / max(extra, 1), 0.6, 0.6))) for i in range(extra)
    ]
    return ([tuple(float(v) for v in c) for c in _LAYER_COLOURS] + hues)[:num_layers]


@dataclass
class ColourScale:
    """Limits of a heatmap's colour scale: sequential from 0 for non-negative data, otherwise centred
    on 0; ``clipped`` when some values lie beyond the limits (the ``percentile``-th of |values|)."""

    vmin: float
    vmax: float
    sequential: bool
    clipped: bool
    percentile: float

    def describe(self) -> str:
        """Where the colours clip, e.g. ``±0.83 (99th percentile of |values|)``."""
        bound = f"{self.vmax:.3g}" if self.sequential else f"±{self.vmax:.3g}"
        return f"{bound} ({self.percentile:g}th percentile of {'values' if self.sequential else '|values|'})"

    def norm(self) -> mpl.colors.Normalize:
        """A matplotlib norm for these limits."""
        if self.sequential:
            return mpl.colors.Normalize(self.vmin, self.vmax)
        return mpl.colors.TwoSlopeNorm(0.0, self.vmin, self.vmax)

    @property
    def cmap(self) -> str:
        """``viridis`` for non-negative data, ``RdBu_r`` (red positive, blue negative) otherwise."""
        return "viridis" if self.sequential else "RdBu_r"

    @property
    def extend(self) -> str:
        """The colour bar's ``extend``: arrows on the clipped ends."""
        if not self.clipped:
            return "neither"
        return "max" if self.sequential else "both"


def colour_scale(values: np.ndarray, percentile: float = 99.0) -> ColourScale:
    """The colour scale of a heatmap of ``values``: sequential when none is negative, centred on 0
    otherwise; limits at the ``percentile``-th percentile of |values|, so that outliers saturate."""
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    magnitude = np.abs(finite)
    limit = max(float(np.percentile(magnitude, percentile)) if finite.size else 1.0, 1e-6)
    sequential = bool(finite.size) and bool((finite >= 0).all())
    clipped = bool((magnitude > limit).any())
    return ColourScale(0.0 if sequential else -limit, limit, sequential, clipped, percentile)


def class_palette(num_classes: int) -> list[tuple[float, float, float]]:
    """One distinct, non-grey colour per class: tab10 (indigo for its grey) up to 10, then spaced hues."""
    extra = max(num_classes - len(_DISTINCT), 0)
    hues = [mpl.colors.hsv_to_rgb((i / max(extra, 1), 0.75, 0.8)) for i in range(extra)]
    return ([to_rgb(c) for c in _DISTINCT] + [tuple(float(v) for v in h) for h in hues])[:num_classes]


def stain_colours(
    stain: np.ndarray, selectivity: np.ndarray, palette: Sequence[tuple[float, float, float]]
) -> np.ndarray:
    """RGB per neuron: its class colour tinted towards white as selectivity falls; grey when unstained."""
    stain = np.asarray(stain)
    out = np.tile(np.array(to_rgb(UNSTAINED_COLOUR)), (len(stain), 1))
    lo = staining.SELECTIVITY_THRESHOLD
    strength = np.clip((np.nan_to_num(np.asarray(selectivity, float)) - lo) / (FULL_SELECTIVITY - lo), 0, 1)
    tint = MIN_TINT + (1 - MIN_TINT) * strength
    for i in np.flatnonzero(stain >= 0):
        out[i] = 1 - tint[i] * (1 - np.array(palette[stain[i]]))
    return out


def neuron_order(frame: pd.DataFrame) -> np.ndarray:
    """Neuron ids of one layer's selectivity rows sorted by stain (classes, then unstained, then dead),
    then by decreasing selectivity."""
    stain = frame["stain"].to_numpy()
    group = np.where(frame["dead"].to_numpy(), 2 * 10**6, np.where(stain < 0, 10**6, stain))
    order = np.lexsort((-np.nan_to_num(frame["selectivity"].to_numpy(), nan=-1), group))
    return frame.index.get_level_values("neuron").to_numpy()[order]


def _run(trace: Trace) -> str:
    return trace.path.name


def _epoch_span(trace: Trace) -> str:
    epochs = trace.epochs
    return f"epoch {epochs[0]}" if len(epochs) == 1 else f"epochs {epochs[0]}–{epochs[-1]}"


def _class_label(trace: Trace, c: int) -> str:
    names = trace.class_names
    name = names[c] if c < len(names) else str(c)
    return f"{c}: {name}" if name != str(c) else f"class {c}"


def _stain_legend(trace: Trace, palette, dead: bool = True, tint: bool = True) -> list:
    handles = [Patch(facecolor=palette[c], label=_class_label(trace, c)) for c in range(len(palette))]
    handles.append(Patch(facecolor=UNSTAINED_COLOUR, label="unstained"))
    if dead:
        handles.append(
            Line2D(
                [], [], marker="x", color=DEAD_COLOUR, linestyle="", markersize=7, label="dead (never > 0)"
            )
        )
    if tint:
        lo = staining.SELECTIVITY_THRESHOLD
        for s in (lo, (lo + FULL_SELECTIVITY) / 2, FULL_SELECTIVITY):
            colour = stain_colours(np.array([0]), np.array([s]), palette)[0]
            label = f"{_class_label(trace, 0)} at selectivity {s:.2f}" + (
                "+" if s == FULL_SELECTIVITY else ""
            )
            handles.append(Patch(facecolor=colour, label=label))
    return handles


def _selection(trace: Trace, epoch: int, stains: pd.DataFrame | None) -> pd.DataFrame:
    """The selectivity rows of one epoch, indexed by (layer, neuron)."""
    frame = staining.selectivity(trace, epoch) if stains is None else stains
    return frame.xs(epoch, level="epoch") if "epoch" in frame.index.names else frame


# -- large models: blocks summarised, the head in detail ---------------------------------------------
#: The staining graph draws at most this many layer columns; a model with more has its blocks summarised.
MAX_GRAPH_LAYERS = 16
#: The head (the classifier's Linear chain and the layer feeding it) is drawn in detail up to this many layers.
MAX_HEAD_LAYERS = 5


@dataclass
class Block:
    """Consecutive layers that a figure summarises as one: ``name`` is their module-name prefix
    (``layer1.0``, ``bert.encoder.layer.3``; empty for top-level modules), ``label`` what the figure calls it."""

    name: str
    label: str
    layers: list[str]


@dataclass
class LayerSummary:
    """What a figure draws of a model's layers, in model order: ``items`` are layer keys (drawn in
    detail) or :class:`Block` s (summarised); ``note`` says what was summarised ("" when nothing was)."""

    items: list[str | Block]
    note: str

    @property
    def blocks(self) -> list[Block]:
        """The summarised blocks, in model order."""
        return [item for item in self.items if isinstance(item, Block)]

    @property
    def detailed(self) -> list[str]:
        """The layers drawn neuron by neuron, in model order."""
        return [item for item in self.items if isinstance(item, str)]


def _module_name(layer: str) -> str:
    """``L_layer1.0.relu:2`` → ``layer1.0.relu`` (the module's qualified name)."""
    name = layer[2:] if layer.startswith("L_") else layer
    return name.split(":", 1)[0]


def block_name(layer: str) -> str:
    """The block a layer belongs to: its module name up to the first numbered module (``layer1.0``,
    ``bert.encoder.layer.3``), else its parent module's name (``bert.embeddings``; ``""`` at top level)."""
    parts = _module_name(layer).split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1])


def head_layers(trace: Trace, limit: int = MAX_HEAD_LAYERS) -> list[str]:
    """The model's last layers, drawn in detail: from the layer feeding the classifier's Linear chain
    (:func:`staining.linear_chain`) to the end, at most ``limit``; the last two without a chain."""
    layers = trace.layers
    try:
        start = max(layers.index(staining.linear_chain(trace)[0]) - 1, 0)
    except ValueError:
        start = len(layers) - 2
    return layers[max(start, len(layers) - limit, 0) :]


def _span_label(first: str, last: str) -> str:
    """``bert.encoder.layer.0`` … ``bert.encoder.layer.3`` → ``bert.encoder.layer.0–3``."""
    if first == last:
        return first
    a, b = first.split("."), last.split(".")
    common = 0
    while common < min(len(a), len(b)) - 1 and a[common] == b[common]:
        common += 1
    return ".".join(a[:common] + [".".join(a[common:]) + "–" + ".".join(b[common:])])


def _block(layers: list[str], names: list[str]) -> Block:
    first, last = names[0], names[-1]
    if first == last and first:
        label = first
    elif first == last:  # top-level modules
        label = _span_label(_module_name(layers[0]), _module_name(layers[-1]))
    else:
        label = _span_label(first or _module_name(layers[0]), last or _module_name(layers[-1]))
    return Block(first if first == last else label, label, layers)


def layer_summary(
    trace: Trace, max_items: int, max_blocks: int | None = None, head: int = MAX_HEAD_LAYERS
) -> LayerSummary:
    """Every layer in detail when there are at most ``max_items``; otherwise the head
    (:func:`head_layers`) in detail and the layers before it in blocks of consecutive layers sharing
    :func:`block_name` (a block per layer when they fit), adjacent blocks merged evenly until there are
    at most ``max_blocks`` (default: as many as fit beside the head in ``max_items``)."""
    layers = trace.layers
    if len(layers) <= max_items:
        return LayerSummary(list(layers), "")
    detailed = head_layers(trace, min(head, max_items - 1))
    max_blocks = max_items - len(detailed) if max_blocks is None else max_blocks
    body = layers[: len(layers) - len(detailed)]
    runs: list[tuple[str, list[str]]] = []
    for layer in body:  # a block per layer where they all fit
        name = block_name(layer) if len(body) > max_blocks else _module_name(layer)
        if runs and runs[-1][0] == name:
            runs[-1][1].append(layer)
        else:
            runs.append((name, [layer]))
    groups = np.array_split(np.arange(len(runs)), min(len(runs), max(max_blocks, 1)))
    blocks = [_block([k for i in group for k in runs[i][1]], [runs[i][0] for i in group]) for group in groups]
    shown = ", ".join(detailed) if len(detailed) <= 2 else f"{detailed[0]} … {detailed[-1]}"
    note = (
        f"{len(body)} layers in {len(blocks)} block{'s' * (len(blocks) > 1)} summarised "
        f"({'grouped by module name' if len(blocks) < len(body) else 'one per layer'}); "
        f"head ({len(detailed)} layers: {shown}) shown neuron by neuron"
    )
    return LayerSummary([*blocks, *detailed], note)


def block_stains(frame: pd.DataFrame, block: Block, num_classes: int) -> pd.Series:
    """Share of a block's units per stain at one epoch (a selectivity frame indexed by (layer, neuron)):
    one entry per class, then ``unstained`` and ``dead``; they sum to 1."""
    rows = frame[frame.index.get_level_values("layer").isin(block.layers)]
    stain, dead = rows["stain"].to_numpy(), rows["dead"].to_numpy(bool)
    counts = [int(((stain == c) & ~dead).sum()) for c in range(num_classes)]
    counts += [int(((stain < 0) & ~dead).sum()), int(dead.sum())]
    index = [*range(num_classes), "unstained", "dead"]
    return pd.Series(np.array(counts, float) / max(len(rows), 1), index=index, name=block.label)


# -- staining graph ------------------------------------------------------------------------------
#: Nodes named per column at most: those carrying the most path score (a column's input features included).
MAX_LABELS = 10
#: The staining graph is at most this wide, in inches: 16 in at the figures' 120 dpi is 1920 px, one screen.
MAX_GRAPH_WIDTH = 16.0
#: Height of the staining graph, in inches.
GRAPH_HEIGHT = 8.5
#: Room kept on the right of the staining graph for its legend, in inches (so it covers no data).
LEGEND_WIDTH = 3.6
#: Line style of an inhibitory edge (its mean contribution for the class is negative).
INHIBITORY_STYLE = (0, (3, 2))
#: Markers for the evidence of an input on a path: high values (class mean above 0) or low values.
HIGH_MARK, LOW_MARK = "▲", "▼"


@dataclass
class GraphLayout:
    """Where the staining graph puts its nodes and edges at one epoch; the figure, the animation and
    the HTML report all draw from it.

    ``nodes``: one row per drawn node, indexed by (layer, neuron) where the input features' layer is
    ``"x"``: ``column``, ``x``, ``y``, ``stain``, ``selectivity``, ``dead``, ``colour`` (RGB) and
    ``path_score`` (summed score of the drawn paths through it). ``edges``: one row per (class,
    edge) of the drawn paths: ``target_class``, ``source``, ``target`` (signatures), ``score``
    (summed path score), ``sign`` (+1 excitatory, -1 inhibitory: the sign of the edge's mean
    contribution ``W[j,k]·E[x_k|c]`` for that class) and ``xs``, ``ys`` (its drawn points).
    ``evidence``: per (target_class, input neuron) on a path, +1 when the class's mean of that input
    is above 0 (high values are the evidence), -1 below (low values are). ``blocks``: per summarised
    column (large models, see :func:`layer_summary`) its :class:`Block` and :func:`block_stains`;
    ``note`` says what was summarised.
    """

    epoch: int
    columns: list[str]
    column_labels: list[str]
    widths: dict[str, int]
    notes: dict[str, str]
    nodes: pd.DataFrame
    edges: pd.DataFrame
    evidence: pd.Series
    image_shape: tuple[int, int] | None
    x_column: str | None
    chain: list[str]
    top_k: int
    blocks: dict[str, tuple[Block, pd.Series]] = field(default_factory=dict)
    note: str = ""


def default_top_k(num_classes: int) -> int:
    """Paths drawn per output neuron: 5 for up to 3 classes, 3 beyond (10 classes × 5 paths is spaghetti)."""
    return 5 if num_classes <= 3 else 3


def graph_layout(
    trace: Trace,
    epoch: int = -1,
    *,
    top_k: int | None = None,
    max_nodes: int = MAX_NODES,
    stains: pd.DataFrame | None = None,
    order: pd.DataFrame | None = None,
    keep: dict[str, set[int]] | None = None,
    aspect: float = 0.3,
    paths: GraphPaths | None = None,
    summary: LayerSummary | None = None,
) -> GraphLayout:
    """The staining graph's nodes (sorted by stain, wide layers sampled) and the edges of the ``top_k``
    pathways into each output neuron, with their signs.

    ``order`` (a selectivity frame) fixes the node order, e.g. to the last epoch's so that nodes stay in
    place across epochs; ``keep`` names nodes a sample must keep; ``aspect`` is a column's width over
    the plot's height (it makes an input pixel grid square); ``paths`` reuses a :func:`graph_paths`;
    ``summary`` (:func:`layer_summary`) draws its blocks as one column each, and the paths within its
    detailed layers only (default: every layer in detail).
    """
    epoch = staining.resolve_epoch(trace, epoch)
    frame = _selection(trace, epoch, stains)
    ordering = frame if order is None else _selection(trace, _frame_epoch(order, epoch), order)
    palette = class_palette(trace.num_classes or 0)
    summary = LayerSummary(list(trace.layers), "") if summary is None else summary
    if paths is None:
        paths = graph_paths(trace, epoch, top_k, layers=summary.detailed if summary.blocks else None)
    chain, x_column, edges, evidence = paths.chain, paths.x_column, paths.edges, paths.evidence
    blocks = {
        f"block:{i}:{item.label}": item for i, item in enumerate(summary.items) if isinstance(item, Block)
    }
    ids = {id(block): column for column, block in blocks.items()}
    columns = (["x"] if x_column == "x" else []) + [
        ids[id(item)] if isinstance(item, Block) else item for item in summary.items
    ]
    image_shape = _image_shape(trace, chain) if x_column == "x" else None
    forced = _edge_nodes(edges)
    for layer, ids in (keep or {}).items():
        forced.setdefault(layer, set()).update(ids)

    rows, widths, notes = [], {}, {}
    for col, layer in enumerate(columns):
        if layer in blocks:
            widths[layer] = sum(trace.layer_info(k)["neurons"] for k in blocks[layer].layers)
            continue
        if layer == "x":
            width = trace.layer_info(chain[0])["in_features"]
            shown = np.arange(width)
            if image_shape is None:
                shown = _sample(shown, forced.get("x", set()), max_nodes)
        else:
            width = trace.layer_info(layer)["neurons"]
            shown = _sample(
                neuron_order(ordering.xs(layer, level="layer")), forced.get(layer, set()), max_nodes
            )
        widths[layer] = width
        if len(shown) < width:
            notes[layer] = (
                f"showing {len(shown)} of {width}\n(even sample in stain order;\npath neurons kept)"
            )
        if layer == "x" and image_shape is not None:
            h, w = image_shape
            dx = min(0.8 / w, 0.5 / h / aspect)  # the grid fills the column's width, half its height at most
            dy = dx * aspect
            r, c = np.divmod(shown, w)
            xs, ys = col + (c - (w - 1) / 2) * dx, 0.5 + ((h - 1) / 2 - r) * dy
        else:
            xs, ys = np.full(len(shown), float(col)), 1 - (np.arange(len(shown)) + 0.5) / len(shown)
        if layer == "x":
            stain, sel, dead = (
                np.full(len(shown), UNSTAINED_INPUT),
                np.full(len(shown), np.nan),
                np.zeros(len(shown), bool),
            )
            colour = [to_rgb(INPUT_COLOUR)] * len(shown)
        else:
            at = frame.xs(layer, level="layer").loc[shown]
            stain, sel, dead = at["stain"].to_numpy(), at["selectivity"].to_numpy(), at["dead"].to_numpy()
            colour = [tuple(c) for c in stain_colours(stain, sel, palette)]
        rows.append(
            pd.DataFrame(
                {
                    "layer": layer,
                    "neuron": shown.astype(np.int64),
                    "column": col,
                    "x": xs,
                    "y": ys,
                    "stain": stain.astype(np.int64),
                    "selectivity": sel,
                    "dead": dead.astype(bool),
                    "colour": colour,
                }
            )
        )
    nodes = pd.concat(rows, ignore_index=True).set_index(["layer", "neuron"])
    nodes["path_score"] = _node_scores(edges).reindex(nodes.index).fillna(0.0).to_numpy()
    if image_shape is not None:  # a pixel on a path takes the colour of the class of its strongest path
        nodes["evidence"] = 0
        starts = edges[edges["source"].str.startswith("x/")].sort_values("score", kind="stable")
        for c, source in zip(starts["target_class"], starts["source"]):
            nodes.at[("x", _split(source)[1]), "colour"] = tuple(palette[c])
            nodes.at[("x", _split(source)[1]), "evidence"] = evidence.get((c, _split(source)[1]), 1)
    edges = _place_edges(edges, nodes, columns, widths)
    stained = {column: (b, block_stains(frame, b, len(palette))) for column, b in blocks.items()}
    chars = _label_chars(len(columns)) if blocks else 0  # long module names broken after dots
    labels = [
        _block_label(trace, *stained[layer], chars or 99)
        if layer in stained
        else _column_label(trace, layer, chain, len(columns) > 6, chars)
        for layer in columns
    ]
    return GraphLayout(
        epoch,
        columns,
        labels,
        widths,
        notes,
        nodes,
        edges,
        evidence,
        image_shape,
        x_column,
        chain,
        paths.top_k,
        stained,
        summary.note,
    )


@dataclass
class GraphPaths:
    """The staining graph's pathways at one epoch: the Linear ``chain``, the column of its inputs
    (``"x"``, the layer before the chain, or None), the signed ``edges`` and the inputs' ``evidence``
    (see :class:`GraphLayout`)."""

    chain: list[str]
    x_column: str | None
    edges: pd.DataFrame
    evidence: pd.Series
    top_k: int


def graph_paths(
    trace: Trace, epoch: int = -1, top_k: int | None = None, layers: Sequence[str] | None = None
) -> GraphPaths:
    """The ``top_k`` pathways into each output neuron (:func:`staining.pathways`) as signed edges per
    class; with ``layers`` (the detailed layers of a large model), only the part of the chain among them."""
    epoch = staining.resolve_epoch(trace, epoch)
    top_k = default_top_k(trace.num_classes or 0) if top_k is None else top_k
    chain, paths, x_column, shares = _graph_paths(trace, epoch, top_k, layers)
    edges, evidence = _graph_edges(trace, epoch, chain, paths, shares, x_column)
    return GraphPaths(chain, x_column, edges, evidence, top_k)


#: ``stain`` of an input-feature node (input features are not stained).
UNSTAINED_INPUT = -2


def _frame_epoch(frame: pd.DataFrame, default: int) -> int:
    if "epoch" in frame.index.names:
        return int(frame.index.get_level_values("epoch").max())
    return default


def _image_shape(trace: Trace, chain: list[str]) -> tuple[int, int] | None:
    """(height, width) of the model's single-channel image inputs when the recording says so
    (``config={"image_shape": [1, 8, 8]}``, as ``main.py`` does) and they feed the chain's first layer."""
    shape = trace.meta.get("config", {}).get("image_shape")
    if not shape or len(shape) < 2:
        return None
    h, w = int(shape[-2]), int(shape[-1])
    channels = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    return (h, w) if channels == 1 and h * w == trace.layer_info(chain[0])["in_features"] else None


def _graph_edges(
    trace: Trace,
    epoch: int,
    chain: list[str],
    paths: list[tuple[int, np.ndarray, list]],
    shares: dict,
    x_column: str | None,
) -> tuple[pd.DataFrame, pd.Series]:
    """The edges of the drawn paths per class (summed score, sign) and the evidence sign of their inputs."""
    columns = ["target_class", "source", "target", "score", "sign"]
    if not paths:
        return pd.DataFrame(columns=columns), pd.Series(dtype=np.int64)
    means = trace.inputs(f"E_{epoch}/{chain[0]}")["mean"]
    means = means.droplevel(["epoch", "layer"])
    rows: dict[tuple[int, str, str], list[float]] = {}
    evidence: dict[tuple[int, int], int] = {}
    names = ["x" if x_column in ("x", None) else x_column, *chain]
    for c, scores, nodes in paths:
        for score, ids in zip(scores, nodes):
            if not score > 0:
                continue
            k = ids[0]
            evidence[(c, k)] = 1 if means.get((k, c), np.nan) > 0 else -1
            for i in range(1, len(ids)):
                if i == 1 and x_column is None:
                    continue
                sign = 1 if shares[chain[i - 1]][c, ids[i], ids[i - 1]] >= 0 else -1
                key = (c, f"{names[i - 1]}/n_{ids[i - 1]}", f"{names[i]}/n_{ids[i]}")
                entry = rows.setdefault(key, [0.0, sign])
                entry[0] += float(score)
    edges = pd.DataFrame([(*k, v[0], v[1]) for k, v in rows.items()], columns=columns)
    index = pd.MultiIndex.from_tuples(list(evidence), names=["target_class", "neuron"])
    return edges, pd.Series(list(evidence.values()), index=index, name="evidence", dtype=np.int64)


def _edge_nodes(edges: pd.DataFrame) -> dict[str, set[int]]:
    nodes: dict[str, set[int]] = {}
    for sig in pd.concat([edges["source"], edges["target"]]):
        layer, neuron = sig.rsplit("/n_", 1)
        nodes.setdefault(layer, set()).add(int(neuron))
    return nodes


def _node_scores(edges: pd.DataFrame) -> pd.Series:
    """Per (layer, neuron): the summed score of the edges into it (out of it, for the inputs)."""
    if edges.empty:
        return pd.Series(dtype=float)
    into = edges.groupby("target")["score"].sum()
    out_of = edges.groupby("source")["score"].sum()
    first = {s for s in out_of.index if s not in set(into.index)}
    scores = pd.concat([into, out_of[sorted(first)]])
    index = pd.MultiIndex.from_tuples(
        [(s.rsplit("/n_", 1)[0], int(s.rsplit("/n_", 1)[1])) for s in scores.index], names=["layer", "neuron"]
    )
    return pd.Series(scores.to_numpy(), index=index)


def _place_edges(
    edges: pd.DataFrame, nodes: pd.DataFrame, columns: list[str], widths: dict[str, int]
) -> pd.DataFrame:
    """Each edge's drawn points: from its source through the same neuron of any equal-width elementwise
    layer between (the ReLU module after a Linear) to its target."""
    index = {layer: i for i, layer in enumerate(columns)}
    xs_all, ys_all = [], []
    for source, target in zip(edges["source"], edges["target"]):
        (a, i), (b, j) = (_split(s) for s in (source, target))
        xs = [nodes.at[(a, i), "x"]]
        ys = [nodes.at[(a, i), "y"]]
        for col in range(index[a] + 1, index[b]):
            between = columns[col]
            if widths[between] == widths[a] and (between, i) in nodes.index:
                xs.append(nodes.at[(between, i), "x"])
                ys.append(nodes.at[(between, i), "y"])
        xs.append(nodes.at[(b, j), "x"])
        ys.append(nodes.at[(b, j), "y"])
        xs_all.append(xs)
        ys_all.append(ys)
    return edges.assign(xs=xs_all, ys=ys_all)


def _split(signature: str) -> tuple[str, int]:
    layer, neuron = signature.rsplit("/n_", 1)
    return layer, int(neuron)


def graph_size(n_columns: int) -> tuple[float, float]:
    """(width, height) in inches of a staining graph with ``n_columns`` columns: at most one screen wide."""
    return min(2.3 * n_columns + LEGEND_WIDTH + 0.8, MAX_GRAPH_WIDTH), GRAPH_HEIGHT


def _aspect(n_columns: int) -> float:
    """One column's width over the plot's height, in inches (for square input pixels)."""
    width, height = graph_size(n_columns)
    return (width - LEGEND_WIDTH - 0.8) / max(n_columns, 1) / (height - 2.2)


def plot_staining_graph(
    trace: Trace,
    epoch: int = -1,
    top_k: int | None = None,
    max_nodes: int = MAX_NODES,
    stains: pd.DataFrame | None = None,
    neuron_rings: pd.Series | None = None,
) -> Figure:
    """The network layer by layer, each neuron a node coloured by its stain (paler = less selective,
    grey = unstained, × = dead), with the ``top_k`` pathways into each output neuron in its class colour
    (solid edges excite, dashed inhibit). ``neuron_rings``: non-negative values indexed by (layer,
    neuron), e.g. a causal effect size, drawn as rings whose width grows with the value."""
    rings = _check_rings(trace, neuron_rings)
    keep = (
        {layer: set(group.index.get_level_values("neuron")) for layer, group in rings.groupby(level="layer")}
        if rings is not None
        else None
    )
    summary = layer_summary(trace, MAX_GRAPH_LAYERS)
    n_columns = len(summary.items) + 1
    layout = graph_layout(
        trace, epoch, top_k=top_k, max_nodes=max_nodes, stains=stains, keep=keep, aspect=_aspect(n_columns),
        summary=summary,
    )  # fmt: skip
    fig = Figure(figsize=graph_size(len(layout.columns)), layout="constrained")
    draw_staining_graph(fig, trace, layout, rings)
    return fig


def _check_rings(trace: Trace, rings: pd.Series | None) -> pd.Series | None:
    """``neuron_rings`` as a Series indexed by (layer, neuron), or a clear error."""
    if rings is None:
        return None
    if not isinstance(rings, pd.Series) or rings.index.nlevels != 2:
        raise ValueError("neuron_rings must be a pandas Series indexed by (layer, neuron)")
    rings = rings.copy()
    rings.index = rings.index.set_names(["layer", "neuron"])
    unknown = sorted(set(rings.index.get_level_values("layer")) - set(trace.layers))
    if unknown:
        raise KeyError(
            f"neuron_rings names layers not in the trace: {unknown}; layers: {', '.join(trace.layers)}"
        )
    values = rings.to_numpy(dtype=np.float64)
    bad = rings[~(values >= 0)]
    if len(bad):
        raise ValueError(f"neuron_rings must be non-negative (and not NaN); got {bad.head(5).to_dict()}")
    return rings


def draw_staining_graph(
    fig: Figure, trace: Trace, layout: GraphLayout, rings: pd.Series | None = None
) -> None:
    """Draw ``layout`` into ``fig`` (one axes, legend on the right): what ``plot_staining_graph`` and the
    animation show."""
    ax = fig.add_subplot()
    palette = class_palette(trace.num_classes or 0)
    nodes = layout.nodes
    n_columns = len(layout.columns)
    for col, layer in enumerate(layout.columns):
        if layer in layout.blocks:
            _draw_block(ax, col, *layout.blocks[layer], palette)
            continue
        group = nodes.xs(layer, level="layer")
        count = len(group)
        if layer == "x" and layout.image_shape is not None:
            _draw_pixel_grid(ax, group, layout, palette, n_columns)
        else:
            size = float(np.clip(2200 / max(count, 1), 6, 140))
            ax.scatter(
                group["x"],
                group["y"],
                s=size,
                color=np.array(group["colour"].tolist()),
                edgecolor="#555555",
                lw=0.6 if layer == "x" else 0.4,
                zorder=3,
                gid=f"nodes:{layer}",
            )
            dead = group["dead"].to_numpy()
            if dead.any():
                ax.scatter(
                    group["x"][dead],
                    group["y"][dead],
                    s=size,
                    marker="x",
                    color=DEAD_COLOUR,
                    lw=1.2,
                    zorder=4,
                    gid=f"dead:{layer}",
                )
        if layer in layout.notes:
            ax.text(col, -0.035, layout.notes[layer], ha="center", va="top", fontsize=7, color="#444444")
        if not (layer == "x" and layout.image_shape is not None):
            _label_nodes(ax, trace, layer, group, layout)
    top = _draw_edges(ax, layout, palette)
    if rings is not None:
        _draw_rings(ax, nodes, rings, n_columns)
    if layout.chain and layout.x_column not in ("x", None):
        ax.text(
            layout.columns.index(layout.x_column),
            1.02,
            f"paths start at the inputs of {layout.chain[0]}",
            ha="center",
            va="bottom",
            fontsize=7,
            color="#444444",
        )
    ax.set_xticks(range(n_columns))
    ax.set_xticklabels(layout.column_labels, fontsize=9 if n_columns <= 6 else 7)
    ax.set_xlim(-0.9 if layout.x_column == "x" and trace.feature_names else -0.6, n_columns - 0.4)
    ax.set_ylim(-0.13 if layout.notes else -0.03, 1.03)
    ax.set_yticks([])
    ax.set_xlabel(
        "layer (model order" + ("; input features x/n_k on the left)" if layout.x_column == "x" else ")")
    )
    ax.set_ylabel("neurons, sorted by stain then selectivity (top to bottom)")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.legend(
        handles=_graph_legend(trace, layout, palette, top, rings),
        loc="outside right upper",
        fontsize=8,
        title="stain (class)",
        title_fontsize=9,
    )
    if layout.edges.empty:
        path_note = "no pathways drawn: they need a chain of nn.Linear layers with recorded inputs"
    else:
        path_note = (
            f"lines: the top {layout.top_k} pathways into each output neuron, in its class colour, width ∝ path score\n"
            f"solid edge = excitatory, dashed = inhibitory (sign of its mean contribution for that class); "
            f"{HIGH_MARK}/{LOW_MARK} at an input: its high/low values are the class's evidence"
        )
    ax.set_title(
        "node colour = stain (the class with the highest mean activation); paler = less selective, "
        f"grey = unstained, × = dead\n{path_note}",
        fontsize=9,
    )
    fig.suptitle(f"Staining graph — run '{_run(trace)}', epoch {layout.epoch}", fontsize=12)
    if layout.blocks:
        fig.supxlabel(
            f"{layout.note}\na summarised block's bar: the share of its units stained for each class "
            "(top), unstained (grey) and dead (dark)",
            fontsize=8,
            color="#333333",
        )


#: Width of a summarised block's bar in the staining graph, in columns.
BLOCK_WIDTH = 0.36


def _draw_block(ax, col: int, block: Block, shares: pd.Series, palette) -> None:
    """A summarised block as one stacked bar from the top: each class's share of its units in the class
    colour, then unstained (grey) and dead (dark)."""
    colours = [*palette, to_rgb(UNSTAINED_COLOUR), to_rgb(DEAD_COLOUR)]
    top = 1.0
    for (key, share), colour in zip(shares.items(), colours):
        if share <= 0:
            continue
        ax.add_patch(
            Rectangle(
                (col - BLOCK_WIDTH / 2, top - share), BLOCK_WIDTH, share, facecolor=colour,
                edgecolor="white", lw=0.5, zorder=3, gid=f"block:{block.label}:{key}",
            )
        )  # fmt: skip
        top -= share
    ax.add_patch(
        Rectangle(
            (col - BLOCK_WIDTH / 2, 0), BLOCK_WIDTH, 1, fill=False, edgecolor="#555555", lw=0.6, zorder=4
        )
    )


def _draw_pixel_grid(ax, group: pd.DataFrame, layout: GraphLayout, palette, n_columns: int) -> None:
    """Input features on their image grid: a square per pixel, in the colour of the class whose
    strongest path starts there (white otherwise), marked with the evidence (high or low values)."""
    h, w = layout.image_shape
    colours = np.array(group["colour"].tolist())
    marks = {k: HIGH_MARK if e > 0 else LOW_MARK for k, e in group["evidence"].items() if e != 0}
    width_in = graph_size(n_columns)[0]
    pitch = abs(group["x"].iloc[1] - group["x"].iloc[0]) if len(group) > 1 else 0.1
    points = pitch * (width_in - LEGEND_WIDTH - 0.8) / n_columns * 72  # one cell's side, in points
    ax.scatter(
        group["x"],
        group["y"],
        s=(0.92 * points) ** 2,
        marker="s",
        color=colours,
        edgecolor="#777777",
        lw=0.4,
        zorder=3,
        gid="nodes:x",
    )
    for k, mark in marks.items():
        ax.text(
            group.at[k, "x"],
            group.at[k, "y"],
            mark,
            ha="center",
            va="center",
            fontsize=max(4.0, 0.4 * points),
            color="black",
            zorder=5,
        )
    spread = group["y"].max() - group["y"].min()
    top = group["y"].max() + spread / (2 * max(h - 1, 1))
    ax.text(group["x"].mean(), top + 0.01, f"input pixels ({h}×{w})", ha="center", va="bottom", fontsize=7)


def _label_nodes(ax, trace: Trace, layer: str, group: pd.DataFrame, layout: GraphLayout) -> None:
    """Name the nodes that carry the most path score (at most ``MAX_LABELS`` per column, none overlapping):
    ``n_7``, with the feature's name for inputs (left of them)."""
    candidates = group[group["path_score"] > 0].sort_values("path_score", ascending=False)
    gap = 0.022
    placed: list[float] = []
    names = trace.feature_names if layer == "x" else None
    for neuron, row in candidates.iterrows():
        if len(placed) >= MAX_LABELS:
            break
        if any(abs(row["y"] - y) < gap for y in placed):
            continue
        placed.append(row["y"])
        label = f"n_{neuron}"
        if names is not None and neuron < len(names):
            label += f" {names[neuron]}"
        left = layer == "x"  # the inputs' labels go left, clear of their edges' evidence marks
        ax.text(
            row["x"] + (-0.07 if left else 0.07), row["y"], label, fontsize=6.5, va="center",
            ha="right" if left else "left", color="#222222", zorder=5,
        )  # fmt: skip


def _draw_edges(ax, layout: GraphLayout, palette) -> float:
    """Each class's path edges (width ∝ summed path score; dashed when inhibitory); returns the top score."""
    edges = layout.edges
    if edges.empty:
        return 0.0
    top = float(edges["score"].max())
    inputs = "x" if layout.x_column == "x" else layout.x_column
    for row in edges.sort_values("score").itertuples():
        if layout.image_shape is None and _split(row.source)[0] == inputs:  # the evidence, near the input
            x0, y0, x1, y1 = row.xs[0], row.ys[0], row.xs[1], row.ys[1]
            high = layout.evidence.get((row.target_class, _split(row.source)[1]), 1) > 0
            ax.scatter(
                x0 + 0.14 * (x1 - x0),
                y0 + 0.14 * (y1 - y0),
                s=30,
                marker="^" if high else "v",
                color=palette[row.target_class],
                edgecolor="black",
                lw=0.4,
                zorder=5,
                gid=f"evidence:{row.target_class}:{row.source}",
            )
        ax.plot(
            row.xs,
            row.ys,
            color=palette[row.target_class],
            lw=0.6 + 4.4 * row.score / top,
            alpha=0.75,
            zorder=2,
            ls="-" if row.sign > 0 else INHIBITORY_STYLE,
            gid=f"edge:{row.target_class}:{row.source}->{row.target}",
        )
    return top


def _draw_rings(ax, nodes: pd.DataFrame, rings: pd.Series, n_columns: int) -> None:
    """A black ring around each drawn node with a positive ring value, its line width ∝ the value."""
    shown = rings[rings.index.isin(nodes.index) & (rings > 0)]
    if shown.empty:
        return
    top = float(shown.max())
    at = nodes.loc[shown.index]
    counts = nodes.groupby(level="layer").size()
    sizes = [
        float(np.clip(2200 / counts[layer], 6, 140)) * 2.6 for layer in at.index.get_level_values("layer")
    ]
    ax.scatter(
        at["x"],
        at["y"],
        s=sizes,
        facecolors="none",
        edgecolors=RING_COLOUR,
        linewidths=_ring_width(shown.to_numpy(), top),
        zorder=6,
        gid="rings",
    )


#: Colour of the rings of ``neuron_rings``.
RING_COLOUR = "black"


def _ring_width(values: np.ndarray, top: float) -> np.ndarray:
    """Line width (points) of a ring: 0.5 at 0 up to 4 at the largest value."""
    return 0.5 + 3.5 * np.asarray(values, float) / top if top > 0 else np.full(len(values), 0.5)


def _graph_legend(trace: Trace, layout: GraphLayout, palette, top: float, rings: pd.Series | None) -> list:
    handles = _stain_legend(trace, palette)
    if layout.x_column == "x":
        marker = "s" if layout.image_shape is not None else "o"
        handles.append(
            Line2D(
                [],
                [],
                marker=marker,
                ls="",
                markerfacecolor=INPUT_COLOUR,
                markeredgecolor="#555555",
                label="input feature" + (" (pixel)" if marker == "s" else ""),
            )
        )
    if top > 0:
        handles += [
            Line2D([], [], color="#555555", lw=0.6 + 0.44, label=f"path, score {0.1 * top:.2g}"),
            Line2D([], [], color="#555555", lw=5.0, label=f"path, score {top:.2g}"),
            Line2D([], [], color="#555555", lw=1.5, label="excitatory edge (mean contribution > 0)"),
            Line2D([], [], color="#555555", lw=1.5, ls=INHIBITORY_STYLE, label="inhibitory edge (< 0)"),
            Line2D(
                [],
                [],
                ls="",
                marker="^",
                color="#888888",
                mec="black",
                mew=0.4,
                label="input's high values are the evidence",
            ),
            Line2D(
                [],
                [],
                ls="",
                marker="v",
                color="#888888",
                mec="black",
                mew=0.4,
                label="input's low values are the evidence",
            ),
        ]
    if rings is not None and (rings > 0).any():
        name = rings.name or "effect size"
        high = float(rings.max())
        for value in (high / 2, high):
            handles.append(
                Line2D(
                    [],
                    [],
                    ls="",
                    marker="o",
                    markersize=10,
                    markerfacecolor="none",
                    markeredgecolor=RING_COLOUR,
                    markeredgewidth=float(_ring_width(np.array([value]), high)[0]),
                    label=f"ring: {name} = {value:.3g}",
                )
            )
    return handles


def _graph_paths(
    trace: Trace, epoch: int, top_k: int, layers: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[int, np.ndarray, list]], str | None, dict]:
    """The Linear chain, each class's top pathways (node ids from the input feature to the output neuron,
    as :func:`staining.pathways` finds them), the column of their input features, and the edge shares.

    The inputs ``x/n_k`` get their own column when the chain starts at the model's first layer; they
    are drawn on the recorded layer just before the chain when it has as many neurons (a Flatten
    before a CNN's classifier), and left out otherwise. Each layer's shares are computed once for
    every class (``staining.pathways`` would read the weights once per class).
    """
    try:
        chain = staining.linear_chain(trace)
    except ValueError:
        return [], [], None, {}
    chain = chain if layers is None else [k for k in chain if k in set(layers)]
    if not chain:
        return [], [], None, {}
    classes = trace.num_classes or 0
    if trace.layer_info(chain[-1])["neurons"] < classes:
        return [], [], None, {}
    first = trace.layers.index(chain[0])
    if first == 0:
        x_column = "x"
    elif trace.layer_info(trace.layers[first - 1])["neurons"] == trace.layer_info(chain[0])["in_features"]:
        x_column = trace.layers[first - 1]
    else:
        x_column = None
    shares = {layer: staining.edge_shares(staining.contributions(trace, layer, epoch)) for layer in chain}
    paths = []
    for c in range(classes):
        scores, nodes = staining.top_paths([shares[layer][c] for layer in chain], c, top_k)
        paths.append((c, scores, nodes))
    return chain, paths, x_column, shares


def _sample(order: np.ndarray, keep: set[int], limit: int) -> np.ndarray:
    """``order`` itself, or ``limit`` of its items evenly spaced, always including ``keep``."""
    if len(order) <= limit:
        return order
    forced = [n for n in order if n in keep]
    rest = [n for n in order if n not in keep]
    picks = np.linspace(0, len(rest) - 1, max(limit - len(forced), 0)).round().astype(int)
    chosen = set(forced) | {rest[i] for i in picks}
    return np.array([n for n in order if n in chosen])


def _wrap(name: str, chars: int) -> str:
    """``name`` broken after dots into lines of at most ``chars`` characters (where it can be)."""
    lines = [""]
    for token in name.replace(".", ".\0").split("\0"):
        if lines[-1] and len(lines[-1]) + len(token) > chars:
            lines.append("")
        lines[-1] += token
    return "\n".join(lines)


def _label_chars(n_columns: int) -> int:
    """Characters of a 7-point column label that fit a staining graph's column."""
    width = graph_size(n_columns)[0] - LEGEND_WIDTH - 0.8
    return max(int(width / n_columns * 72 / (7 * 0.62)), 6)


def _block_label(trace: Trace, block: Block, shares: pd.Series, chars: int) -> str:
    """``layer1.0`` / ``6 layers`` / ``48 units`` / ``4% stained``: a summarised column's label."""
    units = sum(trace.layer_info(k)["neurons"] for k in block.layers)
    stained = 1 - shares["unstained"] - shares["dead"]
    return f"{_wrap(block.label, chars)}\n{len(block.layers)} layers\n{units} units\n{stained:.0%} stained"


def _column_label(trace: Trace, layer: str, chain: list[str], narrow: bool = False, chars: int = 0) -> str:
    """``L_hidden_1`` / ``Linear, 64 neurons``; on three lines when columns are narrow (many layers), the
    name broken after dots when longer than ``chars``."""
    if layer == "x":
        return f"x (inputs)\n{trace.layer_info(chain[0])['in_features']} features"
    info = trace.layer_info(layer)
    kind = info.get("activation") or info.get("type", "")
    name = _wrap(layer, chars) if chars else layer
    return f"{name}\n{kind}{chr(10) if narrow else ', '}{info['neurons']} neurons"


# -- brain scan ------------------------------------------------------------------------------------
#: The brain scan draws at most this many layer rows (2.6 in each: 7 rows are about 20 in, 2,400 px at 120
#: dpi); a model with more layers has its blocks summarised in one panel and its head drawn in detail.
MAX_SCAN_LAYERS = 7
#: A figure fits one screen: at most this many inches in each dimension (2,400 px at the saved 120 dpi).
MAX_FIGURE_INCHES = 20.0
#: Blocks of a summarised panel (one row each) at most.
MAX_BLOCK_ROWS = 16


def plot_brain_scan(
    trace: Trace, epoch: int = -1, layers: Sequence[str] | None = None, stains: pd.DataFrame | None = None
) -> Figure:
    """Per layer: mean activation per epoch × neuron, and per class × neuron at ``epoch``; neurons in the
    order of their final stain (strip above each panel). Non-negative panels use a sequential colour map,
    signed ones a diverging map centred on 0; colours clip at the 99th percentile (the colour bar's arrows
    and label say so). With more than ``MAX_SCAN_LAYERS`` layers (and ``layers`` not given), the blocks
    of :func:`layer_summary` share one panel (stained share per epoch and per class) above the head's rows."""
    epoch = staining.resolve_epoch(trace, epoch)
    last = trace.epochs[-1]
    final = _selection(trace, last, stains)
    summary = (
        layer_summary(trace, MAX_SCAN_LAYERS, MAX_BLOCK_ROWS)
        if layers is None
        else LayerSummary(list(layers), "")
    )
    layers = summary.detailed
    blocks = summary.blocks
    palette = class_palette(trace.num_classes or 0)
    means = trace.query("E_*/L_*", columns=["act_mean"])["act_mean"]
    class_means = trace.classes(f"E_{epoch}/L_*", columns=["act_mean"])["act_mean"]

    row_height = 2.6
    heights = [row_height] * len(layers)
    if blocks:
        heights.insert(0, 1.4 + 0.3 * len(blocks))
        row_height = min(row_height, (MAX_FIGURE_INCHES - 2.4 - heights[0]) / max(len(layers), 1))
        heights[1:] = [row_height] * len(layers)
    fig = Figure(figsize=(13, sum(heights) + 1.3 + (1.0 if blocks else 0.0)), layout="constrained")
    grid = fig.add_gridspec(len(heights), 2, width_ratios=[3, 2], height_ratios=heights)
    if blocks:
        _scan_blocks(fig, grid, trace, blocks, epoch, stains, palette)
    for row, layer in enumerate(layers, start=1 if blocks else 0):
        _scan_layer(fig, grid, row, trace, layer, epoch, final, means, class_means, palette, bool(blocks))
    handles = _stain_legend(trace, palette, dead=False, tint=False)
    handles.append(Patch(facecolor=DEAD_COLOUR, label="dead"))
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=min(len(handles), 7),
        fontsize=8,
        title="stain strip above each panel: final stain (class with the highest mean activation)",
        title_fontsize=8,
    )
    fig.suptitle(
        f"Brain scan — run '{_run(trace)}', {_epoch_span(trace)}; class panels at epoch {epoch}; "
        f"neurons ordered by their stain at epoch {last}" + (f"\n{summary.note}" if blocks else ""),
        fontsize=11,
    )
    return fig


def _scan_layer(
    fig: Figure,
    grid,
    row: int,
    trace: Trace,
    layer: str,
    epoch: int,
    final,
    means,
    class_means,
    palette,
    short: bool = False,
) -> None:
    """One layer's row of the brain scan: mean activation per epoch × neuron, per class × neuron; ``short``
    names the layer on the left panel only (long module names of large models)."""
    rows = final.xs(layer, level="layer")
    order = neuron_order(rows)
    history = means.xs(layer, level="layer").unstack("neuron").reindex(columns=order)
    per_class = (
        class_means.xs((epoch, layer), level=["epoch", "layer"]).unstack("neuron").reindex(columns=order)
    )
    left, right = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
    for ax, data in ((left, history), (right, per_class)):
        values = data.to_numpy(dtype=np.float64)
        scale = colour_scale(values)
        image = ax.imshow(values, aspect="auto", cmap=scale.cmap, norm=scale.norm(), interpolation="nearest")
        label = "mean activation" + (f"\nclipped at {scale.describe()}" if scale.clipped else "")
        bar = fig.colorbar(image, ax=ax, fraction=0.05, pad=0.01, extend=scale.extend)
        bar.set_label(label, fontsize=7)
    _epoch_ticks(left, history.index.to_numpy())
    left.set_ylabel("epoch")
    left.set_title(f"{layer}: mean activation per epoch", fontsize=9, loc="left")
    right.set_yticks(range(len(per_class.index)))
    right.set_yticklabels([_class_label(trace, int(c)) for c in per_class.index], fontsize=7)
    right.set_ylabel("class")
    right.set_title(
        f"{'' if short else f'{layer}: '}mean activation per class, epoch {epoch}", fontsize=9, loc="left"
    )
    sel = rows.loc[order]
    strip = stain_colours(sel["stain"].to_numpy(), sel["selectivity"].to_numpy(), palette)
    strip[sel["dead"].to_numpy()] = to_rgb(DEAD_COLOUR)
    for ax in (left, right):
        _neuron_ticks(ax, order)
        ax.set_xlabel("neuron (ordered by final stain)", fontsize=8)
        band = ax.inset_axes((0, 1.0, 1, 0.07), sharex=ax)
        band.imshow(strip[None, :, :], aspect="auto", interpolation="nearest")
        band.set_axis_off()


def block_stained_frac(frame: pd.DataFrame, blocks: Sequence[Block]) -> pd.DataFrame:
    """Stained share of each block's units (not dead, stain ≥ 0) per epoch: rows blocks (labels),
    columns epochs, from a selectivity frame indexed by (epoch, layer, neuron)."""
    stained = (frame["stain"].to_numpy() >= 0) & ~frame["dead"].to_numpy(bool)
    series = pd.Series(stained, index=frame.index)
    layer_of = series.index.get_level_values("layer")
    rows = {}
    for block in blocks:
        part = series[layer_of.isin(block.layers)]
        rows[block.label] = part.groupby(level="epoch").mean()
    return pd.DataFrame(rows).T


def _scan_blocks(fig: Figure, grid, trace: Trace, blocks: list[Block], epoch: int, stains, palette) -> None:
    """The brain scan's summary of a large model's blocks: stained share of each block's units per epoch
    (left), and per class at ``epoch`` (right, unstained and dead last)."""
    every = staining.selectivity(trace) if stains is None or "epoch" not in stains.index.names else stains
    if set(every.index.get_level_values("epoch")) != set(trace.epochs):
        every = staining.selectivity(trace)
    history = block_stained_frac(every, blocks)
    shares = pd.DataFrame([block_stains(_selection(trace, epoch, every), b, len(palette)) for b in blocks])
    left, right = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    names = [f"{_wrap(b.label, 28)} ({len(b.layers)} layer{'s' * (len(b.layers) > 1)})" for b in blocks]
    columns = [_class_label(trace, c) for c in range(len(palette))] + ["unstained", "dead"]
    for ax, data, xlabels, title in (
        (left, history, [str(e) for e in history.columns], "stained share of units per epoch"),
        (right, shares, columns, f"share of units per stain, epoch {epoch}"),
    ):
        image = ax.imshow(
            data.to_numpy(float), aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
            gid="scan:blocks",
        )  # fmt: skip
        ax.set_yticks(range(len(names)), names, fontsize=7)
        step = max(1, int(np.ceil(len(xlabels) / 12)))
        ax.set_xticks(range(0, len(xlabels), step), xlabels[::step], fontsize=7)
        ax.set_title(f"blocks: {title}", fontsize=9, loc="left")
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.01).set_label(
            "share of the block's units", fontsize=7
        )
        values = data.to_numpy(float)
        if values.size <= 240:
            for (i, j), value in np.ndenumerate(values):
                colour = "white" if value > 0.5 else "black"
                ax.text(j, i, f"{value:.0%}", ha="center", va="center", fontsize=6.5, color=colour)
    left.set_xlabel("epoch", fontsize=8)
    right.tick_params(axis="x", labelrotation=45)
    for i, label in enumerate(right.get_xticklabels()[: len(palette)]):
        label.set_color(palette[i])


def _epoch_ticks(ax, epochs: np.ndarray) -> None:
    step = max(1, int(np.ceil(len(epochs) / 8)))
    ticks = list(range(0, len(epochs), step))
    ax.set_yticks(ticks)
    ax.set_yticklabels([str(epochs[i]) for i in ticks], fontsize=7)


def _neuron_ticks(ax, order: np.ndarray) -> None:
    step = max(1, int(np.ceil(len(order) / 16)))
    ticks = list(range(0, len(order), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(order[i]) for i in ticks], fontsize=6.5)


# -- stain evolution -------------------------------------------------------------------------------
def _layer_style(i: int, n: int) -> dict:
    """Colour and marker of the i-th of n layers' lines (distinct for ≥ 12 layers)."""
    return {"color": layer_palette(n)[i], "marker": LAYER_MARKERS[i % len(LAYER_MARKERS)]}


def _layer_legend(fig: Figure, handles: list, title: str = "layer") -> None:
    """A legend outside the axes, on the right of the figure, so that it covers no data."""
    if handles:
        fig.legend(
            handles=handles,
            loc="outside right upper",
            fontsize=8,
            title=title,
            title_fontsize=8,
            ncol=1 if len(handles) <= 24 else 2,
        )


#: Lines of a per-layer figure at most (its distinct colours); a model with more has its blocks summarised.
MAX_LINE_LAYERS = 20


def line_groups(trace: Trace) -> tuple[dict[str, str], str]:
    """The line each layer belongs to in a per-layer line figure: itself, or for a model of more than
    ``MAX_LINE_LAYERS`` layers its block's (``layer1.0 (6 layers)``, see :func:`layer_summary`); and the note."""
    summary = layer_summary(trace, MAX_LINE_LAYERS)
    names: dict[str, str] = {}
    for item in summary.items:
        if isinstance(item, Block):
            names.update({k: f"{item.label} ({len(item.layers)} layers)" for k in item.layers})
        else:
            names[item] = item
    return names, summary.note


def regroup_fractions(trace: Trace, frame: pd.DataFrame, names: dict[str, str]) -> pd.DataFrame:
    """Per-(epoch, layer) fractions of a layer's neurons → per (epoch, line) fractions of the line's
    neurons: ``Σ frac_k · neurons_k / Σ neurons_k`` over its layers where the fraction is not NaN."""
    layer = frame.index.get_level_values("layer")
    weights = np.array([trace.layer_info(k)["neurons"] for k in layer], float)
    keys = [frame.index.get_level_values("epoch"), pd.Index([names[k] for k in layer], name="layer")]
    total = frame.mul(weights, axis=0).groupby(keys, sort=False).sum(min_count=1)
    counted = frame.notna().mul(weights, axis=0).groupby(keys, sort=False).sum()
    return total / counted.where(counted > 0)


def _suptitle(fig: Figure, title: str, note: str, line: str = "the share of all its layers' units") -> None:
    """The figure's title, with the note of what was summarised (wrapped) below it."""
    if note:
        note = textwrap.fill(f"{note}; a block's line: {line}", 130)
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=11)


def plot_stain_evolution(trace: Trace, evolution: staining.StainEvolution | None = None) -> Figure:
    """The fraction of stained (and dead) neurons per layer over epochs; a histogram of settling epochs.
    A model of more than ``MAX_LINE_LAYERS`` layers has a line per block (:func:`line_groups`)."""
    evolution = staining.stain_evolution(trace) if evolution is None else evolution
    layers = [k for k in trace.layers if k in set(evolution.layers.index.get_level_values("layer"))]
    names, note = line_groups(trace)
    if note:
        neurons = evolution.neurons.rename(index=names, level="layer")
        evolution = staining.StainEvolution(
            evolution.stains, neurons, regroup_fractions(trace, evolution.layers, names)
        )
        layers = list(dict.fromkeys(names[k] for k in layers))
    fig = Figure(figsize=(14, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    handles = []
    any_dead = False
    for i, layer in enumerate(layers):
        data = evolution.layers.xs(layer, level="layer")
        style = _layer_style(i, len(layers))
        (line,) = left.plot(data.index, data["stained_frac"], ms=4, label=layer, **style)
        handles.append(line)
        if data["dead_frac"].fillna(0).any():
            any_dead = True
            left.plot(data.index, data["dead_frac"], ls="--", color=style["color"], label=f"{layer} dead")
    if any_dead:
        handles.append(Line2D([], [], color="#555555", ls="--", label="dashed: dead fraction"))
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("epoch")
    left.set_ylabel("fraction of the layer's neurons")
    left.set_title("stained neurons per layer" + (" (dashed: dead)" if any_dead else ""), fontsize=10)
    left.grid(alpha=0.3)

    epochs = np.asarray(evolution.stains.columns)
    stained = evolution.neurons[evolution.neurons["final_stain"] >= 0]
    edges = np.append(epochs, epochs[-1] + (epochs[-1] - epochs[-2] if len(epochs) > 1 else 1)) - 0.5
    data = [
        stained.xs(k, level="layer")["settling_epoch"].to_numpy() if k in stained.index else []
        for k in layers
    ]
    if len(stained):
        right.hist(
            data,
            bins=edges,
            stacked=True,
            label=layers,
            color=[layer_palette(len(layers))[i] for i in range(len(layers))],
        )
    else:
        right.text(0.5, 0.5, "no neuron is stained at the last epoch", transform=right.transAxes, ha="center")
    right.set_xlabel("settling epoch (stain never changes after it)")
    right.set_ylabel("neurons stained at the last epoch")
    right.set_title(
        f"settling epochs ({len(stained)} neurons stained at epoch {epochs[-1]}; bars stacked by layer)",
        fontsize=10,
    )
    _layer_legend(fig, handles, "layer (line and bar colour)")
    _suptitle(fig, f"Stain evolution — run '{_run(trace)}', {_epoch_span(trace)}", note)
    return fig


# -- weight and bias drift -------------------------------------------------------------------------
def plot_weight_drift(trace: Trace, stains: pd.DataFrame | None = None, max_lines: int = MAX_LINES) -> Figure:
    """Median (and 25–75th percentile) weight change per layer over epochs, and each neuron's bias
    trajectory coloured by its final stain. A model of more than ``MAX_LINE_LAYERS`` layers has a line
    per block (the median over all its units) and bias panels for its head's layers only."""
    names, note = line_groups(trace)
    drift = staining.weight_drift(trace) if not note else _block_drift(trace, names)
    last = trace.epochs[-1]
    final = _selection(trace, last, stains)
    palette = class_palette(trace.num_classes or 0)
    biases = trace.query("E_*/L_*", columns=["bias"])["bias"].dropna()
    with_bias = [k for k in trace.layers if k in set(biases.index.get_level_values("layer"))]
    layers = [k for k in trace.layers if k in set(drift.index.get_level_values("layer"))]
    if note:
        layers = [k for k in dict.fromkeys(names.values()) if k in set(drift.index.get_level_values("layer"))]
        head = [k for k in with_bias if names[k] == k]
        note += f"; bias panels for the head only ({len(head)} of {len(with_bias)} layers with biases)"
        with_bias = head

    columns = min(max(len(with_bias), 1), 4)
    rows = int(np.ceil(len(with_bias) / columns)) if with_bias else 0
    fig = Figure(figsize=(14, 4.2 + 3.2 * rows), layout="constrained")
    grid = fig.add_gridspec(1 + rows, columns, height_ratios=[4.2] + [3.2] * rows)
    top = fig.add_subplot(grid[0, :])
    handles = []
    for i, layer in enumerate(layers):
        data = drift.xs(layer, level="layer")
        style = _layer_style(i, len(layers))
        (line,) = top.plot(data.index, data["median"], ms=4, label=layer, **style)
        top.fill_between(data.index, data["q25"], data["q75"], color=style["color"], alpha=0.15, lw=0)
        handles.append(line)
    if layers:
        top.set_yscale("log")
        handles.append(Patch(facecolor="#888888", alpha=0.3, label="band: 25–75th percentile"))
    else:
        top.text(
            0.5,
            0.5,
            "no weight changes recorded (one epoch, or no weights)",
            ha="center",
            transform=top.transAxes,
        )
    top.set_xlabel("epoch")
    top.set_ylabel("‖Δw‖ per neuron since the previous recorded epoch")
    top.set_title("weight drift per layer: median over the layer's neurons", fontsize=10)
    top.grid(alpha=0.3)
    top.legend(
        handles=handles,
        fontsize=7,
        title="layer",
        title_fontsize=7,
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
    )

    for i, layer in enumerate(with_bias):
        ax = fig.add_subplot(grid[1 + i // columns, i % columns])
        wide = biases.xs(layer, level="layer").unstack("neuron")
        sel_rows = final.xs(layer, level="layer")
        order = _sample(neuron_order(sel_rows), set(), max_lines)
        sel = sel_rows.loc[order]
        colours_n = stain_colours(sel["stain"].to_numpy(), np.ones(len(sel)), palette)
        for n, colour in zip(order[::-1], colours_n[::-1]):
            ax.plot(wide.index, wide[n], color=colour, lw=0.9, alpha=0.9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("bias")
        shown = (
            f"{len(order)} of {wide.shape[1]} neurons"
            if len(order) < wide.shape[1]
            else f"{wide.shape[1]} neurons"
        )
        ax.set_title(f"{layer}: bias per neuron ({shown})", fontsize=9)
        ax.grid(alpha=0.3)
    handles = _stain_legend(trace, palette, dead=False, tint=False)
    fig.legend(
        handles=handles,
        loc="outside right lower",
        fontsize=8,
        title="bias lines: final stain",
        title_fontsize=8,
    )
    _suptitle(
        fig,
        f"Weight and bias drift — run '{_run(trace)}', {_epoch_span(trace)}",
        note,
        "the median over its units",
    )
    return fig


def _block_drift(trace: Trace, names: dict[str, str]) -> pd.DataFrame:
    """:func:`staining.weight_drift` per line of :func:`line_groups`: the median and quartiles of
    ``weight_delta_norm`` over all the units of a block's layers."""
    frame = trace.query("E_*/L_*", columns=["weight_delta_norm"])["weight_delta_norm"].dropna()
    keys = [
        frame.index.get_level_values("epoch"),
        pd.Index([names[k] for k in frame.index.get_level_values("layer")], name="layer"),
    ]
    grouped = frame.groupby(keys, sort=False)
    return pd.DataFrame(
        {"median": grouped.median(), "q25": grouped.quantile(0.25), "q75": grouped.quantile(0.75)}
    )


# -- training ----------------------------------------------------------------------------------
def plot_training_curves(trace: Trace) -> Figure:
    """Loss and accuracy per epoch on the training and held-out splits (``trace.metrics``)."""
    metrics = trace.metrics
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, names, ylabel in (
        (left, [("loss", "training"), ("test_loss", "held-out")], "cross-entropy loss"),
        (right, [("train_acc", "training"), ("test_acc", "held-out")], "accuracy"),
    ):
        for column, label in names:
            if column in metrics:
                ax.plot(metrics.index, metrics[column], marker="o", ms=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize=9, loc="best")
        else:
            ax.text(0.5, 0.5, "no metrics logged", transform=ax.transAxes, ha="center")
    left.set_title("loss", fontsize=10)
    right.set_title("accuracy", fontsize=10)
    span = f"epochs {metrics.index[0]}–{metrics.index[-1]}" if len(metrics) else "no metrics logged"
    fig.suptitle(f"Training curves — run '{_run(trace)}', {span}", fontsize=11)
    return fig


def plot_confusion(trace: Trace, matrix: np.ndarray | None = None) -> Figure:
    """The held-out confusion matrix after the last epoch (``trace.run_metrics["test_confusion"]``):
    rows are the true classes, columns the predicted ones (a seaborn heatmap)."""
    import seaborn as sns

    matrix = np.asarray(trace.run_metrics["test_confusion"] if matrix is None else matrix)
    n = matrix.shape[0]
    labels = [_class_label(trace, c) for c in range(n)]
    size = min(max(4.5, 0.55 * n + 3), 11)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    sns.heatmap(
        matrix,
        ax=ax,
        annot=True,
        fmt="d",
        cmap="Blues",
        square=True,
        linewidths=0.5,
        linecolor="white",
        annot_kws={"fontsize": 8 if n > 6 else 11},
        cbar_kws={"label": "held-out samples", "shrink": 0.8},
        xticklabels=labels,
        yticklabels=labels,
    )
    ax.set_xticklabels(labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
    ax.set_yticklabels(labels, rotation=0, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    last = trace.epochs[-1] if trace.epochs else "?"
    fig.suptitle(
        f"Confusion matrix (held-out split) — run '{_run(trace)}', after epoch {last}\n"
        f"accuracy {accuracy:.3f} on {matrix.sum()} samples (diagonal: correct)",
        fontsize=10,
    )
    return fig


# -- unit health -------------------------------------------------------------------------------
def plot_unit_health(trace: Trace, health: staining.UnitHealth | None = None) -> Figure:
    """Fractions of dead, saturated and exploding units per layer over epochs; a panel with nothing to
    show says why instead of drawing flat lines."""
    health = staining.unit_health(trace) if health is None else health
    layers = [k for k in trace.layers if k in set(health.layers.index.get_level_values("layer"))]
    bounded = [k for k in layers if trace.layer_info(k).get("activation") in staining.BOUNDED_ACTIVATIONS]
    names, note = line_groups(trace)
    if note:  # a block's saturated share is of its tanh/sigmoid units
        fractions = health.layers.copy()
        fractions.loc[~fractions.index.get_level_values("layer").isin(bounded), "saturated_frac"] = np.nan
        health = staining.UnitHealth(health.neurons, regroup_fractions(trace, fractions, names))
        bounded = list(dict.fromkeys(names[k] for k in bounded))
        layers = list(dict.fromkeys(names[k] for k in layers))
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    panels = [
        (
            "dead_frac",
            "dead (never > 0 before a ReLU; logits not judged)",
            layers,
            "no dead units in any layer, any epoch",
        ),
        (
            "saturated_frac",
            "saturated (tanh/sigmoid output near ±1)",
            bounded,
            "none saturated in any tanh or sigmoid layer"
            if bounded
            else "no tanh or sigmoid layers:\nnothing can saturate",
        ),
        ("exploding_frac", "exploding (NaN/Inf seen)", layers, "no NaN or Inf in any layer, any epoch"),
    ]
    handles: dict[str, Line2D] = {}
    for ax, (column, title, judged, empty) in zip(axes, panels):
        values = health.layers[column]
        shown = [k for k in judged if (values.xs(k, level="layer") > 0).any()]
        for layer in shown:
            data = values.xs(layer, level="layer")
            style = _layer_style(layers.index(layer), len(layers))
            (handles[layer],) = ax.plot(data.index, data, ms=4, label=layer, **style)
        if not shown:
            ax.text(
                0.5,
                0.5,
                empty,
                transform=ax.transAxes,
                ha="center",
                va="center",
                color="#555555",
                fontsize=10,
            )
        elif len(shown) < len(judged):
            ax.text(
                0.02, 0.97, f"{len(judged) - len(shown)} other layers: 0 throughout", transform=ax.transAxes,
                va="top", fontsize=7, color="#555555",
            )  # fmt: skip
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_xlim(trace.epochs[0] - 0.5, trace.epochs[-1] + 0.5)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_ylabel("fraction of the layer's neurons")
    _layer_legend(fig, [handles[k] for k in layers if k in handles])
    _suptitle(fig, f"Unit health — run '{_run(trace)}', {_epoch_span(trace)}", note)
    return fig


# -- class means, clustered --------------------------------------------------------------------------
#: Rows of one layer's clustered class-mean map at most (an even sample in stain order beyond).
MAX_CLUSTER_ROWS = 64


def plot_class_means(
    trace: Trace, epoch: int = -1, layers: Sequence[str] | None = None, max_rows: int = MAX_CLUSTER_ROWS
) -> Figure:
    """Per layer, each neuron's class means at ``epoch`` z-scored across classes (seaborn heatmap), rows
    clustered by average-linkage on those profiles (dendrogram on the left), final stain on the right. A
    model with more than ``MAX_CLASS_MEAN_PANELS`` such layers shows its blocks' outputs and its head
    (:func:`representative_layers`)."""
    import seaborn as sns
    from scipy.cluster import hierarchy

    epoch = staining.resolve_epoch(trace, epoch)
    frame = _selection(trace, epoch, None)
    limit = MAX_CLASS_MEAN_PANELS if layers is None else len(layers)  # layers given: all of them
    layers = [k for k in (layers or trace.layers) if trace.layer_info(k)["neurons"] >= 2]
    layers, outputs, summary_note = representative_layers(trace, layers, limit)
    palette = class_palette(trace.num_classes or 0)
    means = trace.classes(f"E_{epoch}/L_*", columns=["act_mean"])["act_mean"]
    columns = min(len(layers), 4) or 1
    rows = int(np.ceil(len(layers) / columns)) or 1
    fig = Figure(figsize=(4.2 * columns + 1.5, 5.2 * rows + 0.8), layout="constrained")
    # the colour bar gets its own grid column, right of every map and its stain strip (attached to the maps,
    # constrained layout put it between the first map and its strip, and collapsed one spanning rows)
    grid = fig.add_gridspec(rows, columns + 1, width_ratios=[1] * columns + [0.06])
    for i, layer in enumerate(layers):
        sel = frame.xs(layer, level="layer")
        shown = _sample(neuron_order(sel), set(), max_rows)
        wide = means.xs((epoch, layer), level=["epoch", "layer"]).unstack("class").reindex(shown)
        values = wide.to_numpy(dtype=np.float64)
        spread = values.std(axis=1, keepdims=True)
        z = np.where(
            spread > 0, (values - values.mean(axis=1, keepdims=True)) / np.where(spread > 0, spread, 1), 0.0
        )
        z = np.nan_to_num(z)
        order = hierarchy.leaves_list(hierarchy.linkage(z, "average")) if len(z) > 1 else np.arange(len(z))
        cell = grid[i // columns, i % columns].subgridspec(1, 3, width_ratios=[0.8, 4, 0.25], wspace=0.02)
        tree, ax, strip_ax = (fig.add_subplot(cell[0, k]) for k in range(3))
        if len(z) > 1:
            hierarchy.dendrogram(
                hierarchy.linkage(z, "average"), ax=tree, orientation="left", no_labels=True,
                color_threshold=0, above_threshold_color="#666666",
            )  # fmt: skip
            tree.invert_yaxis()
        tree.set_axis_off()
        sns.heatmap(
            z[order], ax=ax, cmap="RdBu_r", center=0, vmin=-2.5, vmax=2.5, cbar=False,
            xticklabels=[_class_label(trace, int(c)) for c in wide.columns],
            yticklabels=[f"n_{n}" for n in shown[order]] if len(order) <= 40 else False,
        )  # fmt: skip
        ax.tick_params(axis="x", labelrotation=90, labelsize=7)
        ax.tick_params(axis="y", labelrotation=0, labelsize=6)  # n_4 reads across, not up
        ax.set_xlabel("class")
        ax.set_ylabel("neuron (clustered)" if i % columns == 0 else "")
        note = f", {len(shown)} of {len(sel)}" if len(shown) < len(sel) else ""
        if summary_note:  # a large model's long module names, on two or three lines
            block = f"\n(output of block {outputs[layer].label})" if layer in outputs else ""
            ax.set_title(f"{_wrap(layer, 36)}{note}{block}", fontsize=8)
        else:
            ax.set_title(f"{layer}{note}", fontsize=9)
        picked = sel.loc[shown[order]]
        strip = stain_colours(picked["stain"].to_numpy(), picked["selectivity"].to_numpy(), palette)
        strip[picked["dead"].to_numpy()] = to_rgb(DEAD_COLOUR)
        strip_ax.imshow(strip[:, None, :], aspect="auto", interpolation="nearest")
        strip_ax.set_axis_off()
    maps = [ax for ax in fig.axes if ax.collections and ax.get_xlabel() == "class"]
    if maps:
        fig.colorbar(
            maps[-1].collections[0],
            cax=fig.add_subplot(grid[:, -1]),
            label="class mean, z-scored per neuron",
            extend="both",
            shrink=0.8,
        )
    handles = _stain_legend(trace, palette, dead=False, tint=False) + [
        Patch(facecolor=DEAD_COLOUR, label="dead")
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 7), fontsize=8,
               title="strip right of each map: stain at this epoch", title_fontsize=8)  # fmt: skip
    fig.suptitle(
        f"Class-mean profiles, clustered — run '{_run(trace)}', epoch {epoch}: red = the classes a neuron "
        "responds to most (z-score across classes; colours clip at ±2.5)"
        + (f"\n{textwrap.fill(summary_note, 130)}" if summary_note else ""),
        fontsize=11,
    )
    return fig


#: Panels of the class-mean profiles at most; a model with more layers shows its blocks' outputs and head.
MAX_CLASS_MEAN_PANELS = 12


def block_output(trace: Trace, block: Block) -> str:
    """The layer of ``block`` that a later layer reads (the layer graph's ``inputs_from``; a residual
    block's last ``relu:2``), else its last layer."""
    inside = set(block.layers)
    for later in trace.layers[trace.layers.index(block.layers[-1]) + 1 :]:
        for source in trace.layer_info(later).get("inputs_from") or []:
            if source in inside:
                return source
    return block.layers[-1]


def representative_layers(
    trace: Trace, available: Sequence[str], max_items: int
) -> tuple[list[str], dict[str, Block], str]:
    """``available`` itself when there are at most ``max_items``; otherwise, in model order, each
    block's output (:func:`block_output`, or its last available layer) and the head's available layers
    (:func:`layer_summary`): the layers, the block each stands for, and the note saying so."""
    available = list(available)
    if len(available) <= max_items:
        return available, {}, ""
    summary = layer_summary(trace, max_items)
    have = set(available)
    chosen, stands_for = [], {}
    for item in summary.items:
        if isinstance(item, Block):
            inside = [k for k in item.layers if k in have]
            if inside:
                output = block_output(trace, item)
                chosen.append(output if output in have else inside[-1])
                stands_for[chosen[-1]] = item
        elif item in have:
            chosen.append(item)
    head = summary.note.replace(" shown neuron by neuron", " in full")
    note = f"{head}; a block is drawn by its output (the layer the next one reads)"
    return chosen, stands_for, note


# -- animation -----------------------------------------------------------------------------------------
#: Frames of the staining graph's animation at most (epochs evenly spaced, the first and last kept).
MAX_FRAMES = 8


def save_staining_animation(
    trace: Trace,
    path: str | Path,
    *,
    epochs: Sequence[int] | None = None,
    stains: pd.DataFrame | None = None,
    fps: float = 1.5,
    dpi: int = 60,
    max_frames: int = MAX_FRAMES,
) -> Path:
    """The staining graph at each of ``epochs`` (default: up to ``max_frames`` evenly spaced) as an
    animated GIF (matplotlib's Pillow writer); nodes stay where the last epoch's stains put them."""
    from matplotlib.animation import PillowWriter

    path = Path(path)
    recorded = trace.epochs
    if epochs is None:
        picks = np.unique(
            np.linspace(0, len(recorded) - 1, min(max_frames, len(recorded))).round().astype(int)
        )
        epochs = [recorded[i] for i in picks]
    epochs = [staining.resolve_epoch(trace, e) for e in epochs]
    stains = staining.selectivity(trace) if stains is None else stains
    order = stains.xs(recorded[-1], level="epoch")
    summary = layer_summary(trace, MAX_GRAPH_LAYERS)
    detailed = summary.detailed if summary.blocks else None
    paths = {e: graph_paths(trace, e, layers=detailed) for e in epochs}
    keep: dict[str, set[int]] = {}
    for p in paths.values():
        for layer, ids in _edge_nodes(p.edges).items():
            keep.setdefault(layer, set()).update(ids)
    n_columns = len(summary.items) + 1
    fig = Figure(figsize=graph_size(n_columns), layout="constrained")
    writer = PillowWriter(fps=fps)
    with writer.saving(fig, str(path), dpi):
        for e in epochs:
            fig.clear()
            layout = graph_layout(
                trace, e, stains=stains.xs(e, level="epoch"), order=order, keep=keep,
                aspect=_aspect(n_columns), paths=paths[e], summary=summary,
            )  # fmt: skip
            draw_staining_graph(fig, trace, layout)
            writer.grab_frame()
    return path


# -- interventions -------------------------------------------------------------------------------
def _effects(trace: Trace, effects: pd.DataFrame | None) -> pd.DataFrame:
    """``effects`` or the run's stored ``intervene.stain_effects`` frame; a clear error when it has none."""
    if effects is not None:
        return effects
    from .intervene import load_effects

    stored = load_effects(trace.path)
    if stored is None:
        raise ValueError(
            f"run {str(trace.path)!r} has no stored stain effects: compute them with "
            "intervene.stain_effects(...) and intervene.save_effects(run, frame) (main.py does)"
        )
    return stored


#: Neuron-layer panels of the intervention figures at most: a model with more shows its blocks' outputs and head.
MAX_EFFECT_PANELS = 12


def _effect_panels(
    trace: Trace, frame: pd.DataFrame, limit: int = MAX_EFFECT_PANELS
) -> tuple[list[tuple[str, str]], str]:
    """(unit, layer) of each panel: the neuron layers in model order (at most ``limit`` panels in all,
    see :func:`representative_layers`), then the pathways; and the note of what was left out."""
    neurons = set(frame.loc[frame["unit"] == "neurons", "layer"])
    edges = [("edges", k) for k in sorted(set(frame.loc[frame["unit"] == "edges", "layer"]))]
    other = [("neurons", k) for k in sorted(neurons - set(trace.layers))]
    room = max(limit - len(edges) - len(other), 1)
    layers, _, note = representative_layers(trace, [k for k in trace.layers if k in neurons], room)
    return [("neurons", k) for k in layers] + other + edges, note


def _signed(value: float) -> str:
    """A whole number with its sign, never "-0"."""
    return f"{int(round(value)):+d}"


def _effect_name(unit: str, layer: str) -> str:
    return f"top pathways' edges ({layer})" if unit == "edges" else layer


def plot_effect_matrix(trace: Trace, effects: pd.DataFrame | None = None, epoch: int = -1) -> Figure:
    """Per layer, held-out accuracy change (points) of each class (columns) when the neurons stained each
    class (rows) are ablated, from ``intervene.stain_effects``; a last panel for the top pathways' edges.
    A causal stain darkens the diagonal; the title gives the specificity and its control's."""
    from .intervene import specificity

    effects = _effects(trace, effects)
    epochs = sorted(effects["epoch"].unique())
    if not epochs:
        raise ValueError("the effects frame is empty")
    if epoch < 0:
        epoch = epochs[epoch]
    if epoch not in epochs:
        raise KeyError(
            f"no stain effects at epoch {epoch}; epochs with effects: {', '.join(map(str, epochs))}"
        )
    frame = effects[effects["epoch"] == epoch]
    spec = specificity(frame)
    classes = trace.num_classes or int(frame["eval_class"].max()) + 1
    cell = 0.42 if classes > 4 else 0.9
    side = max(3.2, cell * classes + 1.6)
    most = (2 if classes > 4 else 4) * max(int((MAX_FIGURE_INCHES - 1.0) // side), 1)  # one screen tall
    panels, note = _effect_panels(trace, frame, min(MAX_EFFECT_PANELS, most))
    ncols = min(len(panels), 2 if classes > 4 else 4)
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(side * ncols + 1.2, side * nrows + 1.0), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    cmap = mpl.colormaps["RdBu"].with_extremes(bad="#e6e6e6")
    norm = mpl.colors.Normalize(-100, 100)
    labels = [_class_label(trace, c) for c in range(classes)]
    image = None
    for ax, (unit, layer) in zip(axes, panels):
        part = frame[(frame["unit"] == unit) & (frame["layer"] == layer)]
        matrix = part.pivot_table(
            index="stain_class", columns="eval_class", values="acc_change", aggfunc="first"
        )
        matrix = matrix.reindex(index=range(classes), columns=range(classes)) * 100
        ablated = part.groupby("stain_class")["n_ablated"].first().reindex(range(classes))
        image = ax.imshow(matrix.to_numpy(), cmap=cmap, norm=norm)
        for (i, j), value in np.ndenumerate(matrix.to_numpy()):
            if np.isfinite(value):
                ax.text(
                    j, i, _signed(value), ha="center", va="center", fontsize=6 if classes > 6 else 9,
                    color="white" if abs(value) > 60 else "black",
                )  # fmt: skip
        for c in range(classes):
            ax.add_patch(mpl.patches.Rectangle((c - 0.5, c - 0.5), 1, 1, fill=False, lw=1.2, ec="black"))
        rows = [
            f"{labels[c]} ({int(n)} {'edge' if unit == 'edges' else 'neuron'}{'s' if int(n) != 1 else ''})"
            if np.isfinite(n)
            else f"{labels[c]} (none)"
            for c, n in enumerate(ablated.to_numpy(dtype=float))
        ]
        ax.set_yticks(range(classes), rows, fontsize=7)
        ax.set_xticks(
            range(classes),
            labels,
            fontsize=7,
            rotation=45 if classes > 4 else 0,
            ha="right" if classes > 4 else "center",
        )
        ax.set_xlabel("class evaluated", fontsize=8)
        ax.set_ylabel("stain class ablated" if unit == "neurons" else "pathways of class cut", fontsize=8)
        row = spec.loc[(unit, epoch, layer)]
        control = row["control_specificity"]
        control = "no unstained neurons" if np.isnan(control) else _signed(control * 100)
        ax.set_title(
            f"{_effect_name(unit, layer)}\nspecificity {_signed(row['specificity'] * 100)} points (control: {control})",
            fontsize=9,
        )
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    fig.colorbar(
        image, ax=axes[: len(panels)].tolist(), label="held-out accuracy change (points)", shrink=0.8
    )
    fig.suptitle(
        f"Effect of ablating stained neurons — run '{_run(trace)}', epoch {epoch}, held-out split\n"
        "row: the neurons stained that class are zeroed; column: that class's accuracy change; grey: no neurons"
        + (f"\n{textwrap.fill(note, 110)}" if note else ""),
        fontsize=10,
    )
    return fig


def plot_specificity(trace: Trace, effects: pd.DataFrame | None = None) -> Figure:
    """Specificity of stain ablations over training per layer (solid) against its control (dashed): the
    accuracy drop of the stained class minus the mean drop of the others, and the same for the logit."""
    from .intervene import specificity

    spec = specificity(_effects(trace, effects))
    panels, note = _effect_panels(trace, spec.reset_index())
    colours = mpl.colormaps["Dark2"].colors
    fig = Figure(figsize=(13, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, (column, scale, label) in zip(
        axes,
        [
            ("specificity", 100, "accuracy specificity (points)"),
            ("logit_specificity", 1, "true-class logit specificity"),
        ],
    ):
        for i, (unit, layer) in enumerate(panels):
            data = spec.xs((unit, layer), level=("unit", "layer")).sort_index()
            colour = "black" if unit == "edges" else colours[i % len(colours)]
            ax.plot(
                data.index,
                data[column] * scale,
                marker="o",
                ms=3,
                color=colour,
                label=_effect_name(unit, layer),
            )
            ax.plot(data.index, data[f"control_{column}"] * scale, ls="--", lw=1, color=colour, alpha=0.7)
        ax.axhline(0, color="#888888", lw=0.8)
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    handles, names = axes[0].get_legend_handles_labels()
    handles.append(
        Line2D([], [], color="#555555", ls="--", lw=1, label="control (as many unstained or random)")
    )
    axes[1].legend(handles=handles, fontsize=8, title="ablated", title_fontsize=8)
    axes[0].set_title("accuracy: drop of the stained class − mean drop of the others", fontsize=9)
    axes[1].set_title("logit: drop of the stained class's logit − mean drop of the others'", fontsize=9)
    fig.suptitle(
        f"Are the stains causal? Ablation specificity — run '{_run(trace)}', {_epoch_span(trace)}"
        + (f"\n{textwrap.fill(note, 120)}" if note else ""),
        fontsize=11,
    )
    return fig


# -- representations over training (probe set) ------------------------------------------------------
#: Rows of the embedding grid at most (layers evenly spaced, first and last kept) and its columns (epochs).
MAX_EMBEDDING_LAYERS = 8
MAX_EMBEDDING_EPOCHS = 4
#: Columns (epochs) and rows (samples) of the saliency grid at most.
MAX_SALIENCY_EPOCHS = 5
MAX_SALIENCY_SAMPLES = 10
#: A saliency row's colours saturate at this percentile of its |values| (one outlying pixel does not wash out the rest).
SALIENCY_PERCENTILE = 98.0
#: Inputs (standardised) are drawn from -INPUT_CLIP (white) to +INPUT_CLIP (black).
INPUT_CLIP = 2.0
#: Colour of the breadcrumb trail drawn over the staining graph.
BREADCRUMB_COLOUR = "black"


def _spread(values: Sequence, limit: int) -> list:
    """At most ``limit`` of ``values``, evenly spaced, the first and the last kept."""
    values = list(values)
    if len(values) <= limit:
        return values
    picks = np.unique(np.linspace(0, len(values) - 1, limit).round().astype(int))
    return [values[i] for i in picks]


def _short_layer(layer: str) -> str:
    return layer[2:] if layer.startswith("L_") else layer


#: Layers of the CKA matrix, and panels of CKA across epochs, at most: a larger model shows its blocks' outputs and head.
MAX_CKA_LAYERS = 24
MAX_CKA_PANELS = 16


def plot_cka(trace: Trace, epoch: int = -1, frame: pd.DataFrame | None = None) -> Figure:
    """Linear CKA between every pair of layers at ``epoch`` (from ``representations.cka``): near 1, two
    layers hold the same representation of the probe samples up to a rotation and a scale. Of a model
    with more than ``MAX_CKA_LAYERS`` probed layers, its blocks' outputs and head (:func:`representative_layers`)."""
    from . import representations

    frame = representations.cka(trace, epoch=epoch) if frame is None else frame
    epoch = int(frame.index.get_level_values("epoch")[0])
    layers = list(dict.fromkeys(frame.index.get_level_values("layer_a")))
    layers, _, note = representative_layers(trace, layers, MAX_CKA_LAYERS)
    matrix = frame["cka"].unstack("layer_b").droplevel("epoch").loc[layers, layers].to_numpy()
    size = max(3.2, 2.2 + 0.55 * len(layers))
    fig = Figure(figsize=(size + 1.6, size + 0.8), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis", gid="cka")
    names = [_short_layer(k) for k in layers]
    ax.set_xticks(range(len(layers)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(layers)), names, fontsize=8)
    if len(layers) <= 12:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                colour = "black" if value > 0.6 else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="linear CKA (1 = same up to rotation and scale)", shrink=0.8)
    fig.suptitle(
        f"Layer similarity (linear CKA on the probe set)\nrun '{_run(trace)}', epoch {epoch}"
        + (f"\n{textwrap.fill(note, 90)}" if note else ""),
        fontsize=10,
    )
    return fig


def plot_cka_epochs(trace: Trace, layers: Sequence[str] | None = None) -> Figure:
    """Per layer, linear CKA between every pair of recorded epochs: how fast each layer's representation
    settles (a bright lower-right block = the layer no longer changes)."""
    from . import representations

    note = ""
    if layers is None:
        layers, _, note = representative_layers(trace, representations.probe_layers(trace), MAX_CKA_PANELS)
    else:
        layers = [trace.layer_info(k)["key"] for k in layers]
    cols = min(4, len(layers))
    rows = -(-len(layers) // cols)
    fig = Figure(figsize=(3.1 * cols + 1.2, 3.0 * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    epochs = np.array(trace.epochs)
    frames = {
        layer: representations.cka(trace, layer=layer)["cka"].unstack("epoch_b").droplevel("layer")
        for layer in layers
    }
    lowest = np.nanmin([np.nanmin(f.to_numpy()) for f in frames.values()]) if frames else 0.0
    vmin = float(np.clip(np.floor(lowest * 20) / 20, 0.0, 0.95)) if np.isfinite(lowest) else 0.0
    image = None
    for ax, layer in zip(axes.ravel(), layers):
        matrix = frames[layer].loc[epochs, epochs].to_numpy()
        image = ax.imshow(matrix, vmin=vmin, vmax=1, cmap="viridis", origin="upper", gid=f"cka:{layer}")
        ticks = np.unique(np.linspace(0, len(epochs) - 1, min(len(epochs), 5)).round().astype(int))
        ax.set_xticks(ticks, [str(epochs[i]) for i in ticks], fontsize=7)
        ax.set_yticks(ticks, [str(epochs[i]) for i in ticks], fontsize=7)
        ax.set_title(_short_layer(layer), fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel("epoch", fontsize=8)
    for ax in axes.ravel()[len(layers) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(
            image,
            ax=axes,
            label=f"linear CKA between the two epochs (scale from {vmin:g})",
            shrink=0.8,
            extend="min" if vmin > 0 else "neither",
        )
    fig.suptitle(
        f"How each layer's representation settles: CKA across epochs — run '{_run(trace)}', {_epoch_span(trace)}"
        + (f"\n{textwrap.fill(note, 110)}" if note else ""),
        fontsize=10,
    )
    return fig


def plot_probe_accuracy(
    trace: Trace, probe: pd.DataFrame | None = None, ranks: pd.DataFrame | None = None
) -> Figure:
    """Left: linear-probe accuracy per layer over epochs (held-out half of the probe set; dashed:
    chance). Right: each layer's effective rank (exp of the entropy of its PCA spectrum). Of a model
    with more than ``MAX_LINE_LAYERS`` layers, its blocks' outputs and head (:func:`representative_layers`)."""
    from . import representations

    if probe is None:
        try:
            probe = representations.linear_probe(trace, inputs=True)
        except KeyError:  # the probe inputs did not fit the budget: no baseline
            probe = representations.linear_probe(trace)
    ranks = representations.effective_rank(trace) if ranks is None else ranks
    layers = list(dict.fromkeys(probe.index.get_level_values("layer")))
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    left, right = fig.subplots(1, 2)
    handles = []
    if "x" in layers:  # the probe inputs themselves: the baseline every layer starts from
        layers.remove("x")
        acc = probe.xs("x", level="layer")["accuracy"].sort_index()
        (line,) = left.plot(acc.index, acc.to_numpy(), color="black", ls=":", lw=1.4, gid="probe:x")
        line.set_label("the inputs x")
        handles.append(line)
    layers, _, note = representative_layers(trace, layers, MAX_LINE_LAYERS)  # a large model: block outputs
    colours = layer_palette(len(layers))
    for i, layer in enumerate(layers):
        style = {"color": colours[i], "marker": LAYER_MARKERS[i % len(LAYER_MARKERS)], "ms": 3.5, "lw": 1.4}
        acc = probe.xs(layer, level="layer")["accuracy"].sort_index()
        (line,) = left.plot(
            acc.index, acc.to_numpy(), label=_short_layer(layer), gid=f"probe:{layer}", **style
        )
        handles.append(line)
        if layer in set(ranks.index.get_level_values("layer")):
            rank = ranks.xs(layer, level="layer")["effective_rank"].sort_index()
            right.plot(rank.index, rank.to_numpy(), gid=f"rank:{layer}", **style)
    chance = float(probe["chance"].iloc[0])
    left.axhline(chance, color="#777777", ls="--", lw=1, gid="chance")
    handles.append(Line2D([], [], color="#777777", ls="--", lw=1, label=f"chance ({chance:.2f})"))
    left.set_ylim(min(chance, float(probe["accuracy"].min())) - 0.05, 1.02)
    left.set_ylabel("held-out accuracy of a linear (ridge) probe")
    left.set_title("How linearly decodable the classes are at each layer", fontsize=9)
    right.set_ylabel("effective rank (exp entropy of the PCA spectrum)")
    right.set_title("How many dimensions each layer's representation uses", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _layer_legend(fig, handles)
    n = int(probe["train"].iloc[0] + probe["test"].iloc[0])
    fig.suptitle(
        f"Representations over training ({n} probe samples) — run '{_run(trace)}', {_epoch_span(trace)}"
        + (f"\n{textwrap.fill(note, 120)}" if note else ""),
        fontsize=11,
    )
    return fig


def plot_embeddings(
    trace: Trace,
    layers: Sequence[str] | None = None,
    epochs: Sequence[int] | None = None,
    method: str = "pca",
) -> Figure:
    """A grid of 2-D embeddings of the probe samples (rows: layers, columns: epochs), coloured by class:
    classes separate from layer to layer and from epoch to epoch. ``method``: ``pca`` or ``tsne``."""
    from . import representations

    epochs = (
        _spread(trace.epochs, MAX_EMBEDDING_EPOCHS)
        if epochs is None
        else [staining.resolve_epoch(trace, e) for e in epochs]
    )
    if layers is None:
        layers = _spread(representations.probe_layers(trace), MAX_EMBEDDING_LAYERS)
    else:
        layers = [trace.layer_info(k)["key"] for k in layers]
    accuracy = representations.linear_probe(trace, epochs=epochs, layers=layers)["accuracy"]
    palette = class_palette(max(int(trace.probe_labels.max()) + 1, trace.num_classes or 0))
    fig = Figure(figsize=(2.6 * len(epochs) + 1.8, 2.4 * len(layers) + 0.8), layout="constrained")
    axes = fig.subplots(len(layers), len(epochs), squeeze=False)
    for r, layer in enumerate(layers):
        for c, epoch in enumerate(epochs):
            ax = axes[r, c]
            frame = representations.embedding(trace, epoch, layer, method=method)
            colours = np.array([palette[k] for k in frame["label"]])
            ax.scatter(
                frame["x"], frame["y"], s=7, c=colours, lw=0, alpha=0.85, gid=f"embedding:{layer}:{epoch}"
            )
            outside = _robust_limits(ax, frame[["x", "y"]].to_numpy())
            if outside:
                ax.text(
                    0.98,
                    0.02,
                    f"{outside} outlying sample{'s' if outside > 1 else ''} off view",
                    transform=ax.transAxes,
                    ha="right",
                    va="bottom",
                    fontsize=6.5,
                    color="#777777",
                )
            ax.set_xticks([])
            ax.set_yticks([])
            ax.text(
                0.02,
                0.98,
                f"probe acc {accuracy.loc[(epoch, layer)]:.2f}",
                transform=ax.transAxes,
                va="top",
                fontsize=7,
                color="#333333",
            )
            if r == 0:
                ax.set_title(f"epoch {epoch}", fontsize=9)
            if c == 0:
                ax.set_ylabel(_short_layer(layer), fontsize=9)
    classes = sorted(set(trace.probe_labels.tolist()))
    handles = [
        Line2D([], [], ls="", marker="o", color=palette[k], label=_class_label(trace, k)) for k in classes
    ]
    _layer_legend(fig, handles, title="class")
    name = "PCA (top two components)" if method == "pca" else "t-SNE"
    fig.suptitle(f"Probe samples embedded by {name} per layer and epoch — run '{_run(trace)}'", fontsize=11)
    return fig


def _robust_limits(ax, points: np.ndarray, coverage: float = 99.0) -> int:
    """Axis limits around the central ``coverage`` % of the points on each axis (plus a margin), so that a
    few outlying samples do not squash the rest; returns how many points fall outside."""
    lo = np.percentile(points, (100 - coverage) / 2, axis=0)
    hi = np.percentile(points, 100 - (100 - coverage) / 2, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    lo, hi = lo - 0.15 * span, hi + 0.15 * span
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    return int((((points < lo) | (points > hi)).any(axis=1)).sum())


def plot_breadcrumbs(trace: Trace, sample: int = 0, epoch: int = -1, top_k: int = 3, crumbs=None) -> Figure:
    """One probe sample's breadcrumbs drawn over the staining graph: its ``top_k`` largest-contribution
    paths (black, width ∝ path score) beside the classes' stained pathways, and rings on its most
    active neurons (width ∝ activation); of a large model, within its head (:func:`layer_summary`)."""
    from . import representations

    crumbs = representations.breadcrumbs(trace, sample, epoch, top_k=top_k) if crumbs is None else crumbs
    epoch = crumbs.epoch
    paths = crumbs.paths
    keep: dict[str, set[int]] = {}
    for path in paths["path"]:
        for node in path:
            layer, neuron = _split(node)
            keep.setdefault(layer, set()).add(neuron)
    active = crumbs.active.reset_index()
    active = active[active["activation"] > 0]
    rings = pd.Series(
        active["activation"].to_numpy(),
        index=pd.MultiIndex.from_arrays([active["layer"], active["neuron"]], names=["layer", "neuron"]),
        name=f"sample {crumbs.sample}'s activation (top {top_k} per layer)",
    )
    for layer, neuron in rings.index:
        keep.setdefault(layer, set()).add(int(neuron))
    summary = layer_summary(trace, MAX_GRAPH_LAYERS)  # a large model: its blocks as bars, no rings there
    n_columns = len(summary.items) + 1
    layout = graph_layout(trace, epoch, keep=keep, aspect=_aspect(n_columns), summary=summary)
    width, height = graph_size(len(layout.columns))
    fig = Figure(figsize=(width, height), layout="constrained")
    draw_staining_graph(fig, trace, layout, rings if len(rings) else None)
    ax = fig.axes[0]
    inputs = layout.x_column
    top = float(np.abs(paths["score"]).max()) if len(paths) else 0.0
    labelled: set[tuple[str, int]] = set()
    for rank, (score, path) in enumerate(zip(paths["score"], paths["path"])):
        points, nodes = [], []
        for node in path:
            layer, neuron = _split(node)
            layer = inputs if layer == "x" else layer
            if layer is None or (layer, neuron) not in layout.nodes.index:
                continue
            points.append(layout.nodes.loc[(layer, neuron), ["x", "y"]].to_numpy(dtype=float))
            nodes.append((layer, neuron))
        if len(points) < 2:
            continue
        xs, ys = np.array(points).T
        lw = 1.5 + 3.5 * abs(score) / top if top > 0 else 2.0
        ax.plot(xs, ys, color="white", lw=lw + 2.5, zorder=7, solid_capstyle="round")
        labelled.update(nodes)
        ax.plot(
            xs, ys, color=BREADCRUMB_COLOUR, lw=lw, zorder=8, solid_capstyle="round", gid=f"breadcrumb:{rank}"
        )
    names = trace.feature_names
    for layer, neuron in sorted(labelled):
        if layer == "x" and layout.image_shape is not None:
            continue
        x, y = layout.nodes.loc[(layer, neuron), ["x", "y"]].to_numpy(dtype=float)
        text = names[neuron] if layer == "x" and names and neuron < len(names) else f"n_{neuron}"
        ax.annotate(
            text,
            (x, y),
            xytext=(6, -9),
            textcoords="offset points",
            fontsize=7,
            fontweight="bold",
            zorder=9,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.85},
            gid=f"breadcrumb_label:{layer}:{neuron}",
        )
    label = int(trace.probe_labels[crumbs.sample])
    predicted = None
    try:
        from .probes import read_probe_output

        predicted = int(read_probe_output(trace.path, trace.meta, epoch)[crumbs.sample].argmax())
    except KeyError:
        pass
    shared = int(paths["shared"].sum()) if "shared" in paths else None
    fig.legend(
        handles=[
            Line2D(
                [],
                [],
                color=BREADCRUMB_COLOUR,
                lw=3,
                label=f"sample {crumbs.sample}'s top {len(paths)} paths",
            ),
        ],
        loc="outside right lower",
        fontsize=8,
    )
    text = f"Breadcrumbs of probe sample {crumbs.sample} — run '{_run(trace)}', epoch {epoch}\n"
    text += f"label {_class_label(trace, label)}"
    if predicted is not None:
        text += f", predicted {_class_label(trace, predicted)}"
    text += f"; black: its top {len(paths)} paths into output neuron {crumbs.target_class}"
    if shared is not None:
        text += f"\n({shared} of them among that class's stained pathways)"
    fig.suptitle(text, fontsize=11)
    return fig


def _input_shape(trace: Trace) -> list[int]:
    """The probe's per-sample input shape; a flat input takes the recording's ``image_shape`` when the
    sizes agree (``main.py`` records digits as 64 features and ``image_shape`` [1, 8, 8])."""
    shape = [int(s) for s in trace.meta["probe"]["input_shape"]]
    image = trace.meta.get("config", {}).get("image_shape")
    if len(shape) < 2 and image and int(np.prod(image)) == int(np.prod(shape)):
        return [int(s) for s in image]
    return shape


def _saliency_images(values: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Per-sample images from flattened values: the last two dims of ``shape`` (channels averaged), or a
    one-row strip for 1-D inputs."""
    values = np.asarray(values, dtype=np.float64)
    if len(shape) >= 2:
        full = values.reshape(len(values), *shape)
        return full.reshape(len(values), -1, shape[-2], shape[-1]).mean(1)
    return values.reshape(len(values), 1, -1)


def plot_saliency(
    trace: Trace, samples: Sequence[int] | None = None, epochs: Sequence[int] | None = None
) -> Figure:
    """Saliency over training: input gradient × input of the true class for a few probe samples
    (rows; default one per class) at a few epochs (columns), beside the input itself. Red pixels push
    the true class's output up, blue ones down; each row shares one colour scale."""
    from . import representations

    labels = trace.probe_labels
    if samples is None:
        samples = [int(np.flatnonzero(labels == c)[0]) for c in np.unique(labels)][:MAX_SALIENCY_SAMPLES]
    epochs = (
        _spread(trace.epochs, MAX_SALIENCY_EPOCHS)
        if epochs is None
        else [staining.resolve_epoch(trace, e) for e in epochs]
    )
    frame = representations.saliency(trace, epochs=epochs, samples=samples)
    shape = _input_shape(trace)
    image = len(shape) >= 2
    aspect = "equal" if image else "auto"
    row, width = (1.45, 1.5) if image else (0.7, 2.0)
    height = row * len(samples) + (1.3 if image else 1.9)
    fig = Figure(figsize=(width * (len(epochs) + 1) + 1.8, height), layout="constrained")
    axes = fig.subplots(len(samples), len(epochs) + 1, squeeze=False)
    mappable = None
    for r, sample in enumerate(samples):
        first = frame.xs((epochs[0], sample), level=["epoch", "sample"])["input"].to_numpy()
        axes[r, 0].imshow(
            _saliency_images(first[None, :], shape)[0],
            cmap="gray_r" if image else "PuOr_r",
            vmin=-INPUT_CLIP,
            vmax=INPUT_CLIP,
            aspect=aspect,
            gid=f"input:{sample}",
        )
        axes[r, 0].set_ylabel(
            f"#{sample}: {_class_label(trace, int(labels[sample]))}",
            fontsize=8,
            rotation=90 if image else 0,
            ha="center" if image else "right",
            va="center",
        )
        maps = np.stack(
            [
                _saliency_images(
                    frame.xs((e, sample), level=["epoch", "sample"])["saliency"].to_numpy()[None, :], shape
                )[0]
                for e in epochs
            ]
        )
        limit = float(np.percentile(np.abs(maps), SALIENCY_PERCENTILE)) or 1.0
        for c, epoch in enumerate(epochs):
            ax = axes[r, c + 1]
            mappable = ax.imshow(
                maps[c] / limit,
                cmap="RdBu_r",
                vmin=-1,
                vmax=1,
                aspect=aspect,
                gid=f"saliency:{sample}:{epoch}",
            )
            if r == 0:
                ax.set_title(f"epoch {epoch}", fontsize=9)
        if r == 0:
            axes[r, 0].set_title(f"input (z, ±{INPUT_CLIP:g})", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if mappable is not None:
        fig.colorbar(
            mappable,
            ax=axes,
            shrink=0.6 if image and len(samples) > 2 else 0.5,
            location="right" if image else "bottom",
            extend="both",
            label=f"saliency ÷ row's {SALIENCY_PERCENTILE:g}th pct. of |saliency|",
        )
    fig.suptitle(f"Saliency over training (gradient × input, true class) — run '{_run(trace)}'", fontsize=11)
    return fig
