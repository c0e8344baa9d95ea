"""Figures of a trace: each ``plot_x(trace, ...)`` returns a matplotlib ``Figure`` and shows or saves nothing.

Statistics come from :mod:`nn_staining.staining` (or straight from the trace's tables); this module
only lays them out. Figures are built with ``matplotlib.figure.Figure`` directly, so no pyplot
state is touched and any backend (Agg included) works: ``fig.savefig("x.png")``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

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


# -- staining graph ------------------------------------------------------------------------------
def plot_staining_graph(
    trace: Trace,
    epoch: int = -1,
    top_k: int = 5,
    max_nodes: int = MAX_NODES,
    stains: pd.DataFrame | None = None,
) -> Figure:
    """The network layer by layer, each neuron a node coloured by its stain (paler = less selective,
    grey = unstained, × = dead), with the ``top_k`` pathways into each output neuron in its class colour."""
    epoch = staining.resolve_epoch(trace, epoch)
    frame = _selection(trace, epoch, stains)
    palette = class_palette(trace.num_classes or 0)
    chain, paths, x_column = _graph_paths(trace, epoch, top_k)
    columns = (["x"] if x_column == "x" else []) + trace.layers
    keep_nodes = _path_nodes(paths)

    fig = Figure(figsize=(2.3 * len(columns) + 3.2, 8.5), layout="constrained")
    ax = fig.add_subplot()
    positions: dict[str, dict[int, float]] = {}
    widths: dict[str, int] = {}
    for col, layer in enumerate(columns):
        if layer == "x":
            width = trace.layer_info(chain[0])["in_features"]
            order = np.arange(width)
        else:
            width = trace.layer_info(layer)["neurons"]
            order = neuron_order(frame.xs(layer, level="layer"))
        widths[layer] = width
        shown = _sample(order, keep_nodes.get(layer, set()), max_nodes)
        y = 1 - (np.arange(len(shown)) + 0.5) / len(shown)
        positions[layer] = dict(zip(shown.tolist(), y))
        size = float(np.clip(2200 / len(shown), 6, 140))
        if layer == "x":
            ax.scatter(  # input features are not stained: white, unlike grey "unstained" neurons
                np.full(len(shown), col), y, s=size, color=INPUT_COLOUR, edgecolor="#555555", lw=0.6, zorder=3
            )
        else:
            rows = frame.xs(layer, level="layer").loc[shown]
            colours = stain_colours(rows["stain"].to_numpy(), rows["selectivity"].to_numpy(), palette)
            ax.scatter(
                np.full(len(shown), col), y, s=size, color=colours, edgecolor="#555555", lw=0.4, zorder=3
            )
            dead = rows["dead"].to_numpy()
            ax.scatter(
                np.full(dead.sum(), col), y[dead], s=size, marker="x", color=DEAD_COLOUR, lw=1.2, zorder=4
            )
        if len(shown) < width:
            note = f"showing {len(shown)} of {width}\n(even sample in stain order;\npath neurons kept)"
            ax.text(col, -0.035, note, ha="center", va="top", fontsize=7, color="#444444")
        names = trace.feature_names if layer == "x" else None
        _label_path_nodes(ax, col, layer, positions[layer], keep_nodes.get(layer, set()), names)
    top = _draw_paths(ax, paths, columns, positions, widths, palette)
    if chain and x_column not in ("x", None):
        ax.text(
            columns.index(x_column),
            1.02,
            f"paths start at the inputs of {chain[0]}",
            ha="center",
            va="bottom",
            fontsize=7,
            color="#444444",
        )

    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels([_column_label(trace, layer, chain) for layer in columns], fontsize=9)
    ax.set_xlim(-0.6, len(columns) - 0.4)
    ax.set_ylim(-0.13 if any("showing" in t.get_text() for t in ax.texts) else -0.03, 1.03)
    ax.set_yticks([])
    ax.set_xlabel("layer (model order" + ("; input features x/n_k on the left)" if x_column == "x" else ")"))
    ax.set_ylabel("neurons, sorted by stain then selectivity (top to bottom)")
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    handles = _stain_legend(trace, palette)
    if x_column == "x":
        handles.append(
            Line2D(
                [],
                [],
                marker="o",
                ls="",
                markerfacecolor=INPUT_COLOUR,
                markeredgecolor="#555555",
                label="input feature",
            )
        )
    if top > 0:
        handles += [
            Line2D([], [], color="#555555", lw=0.6 + 0.44, label=f"path, score {0.1 * top:.2g}"),
            Line2D([], [], color="#555555", lw=5.0, label=f"path, score {top:.2g}"),
        ]
    fig.legend(
        handles=handles, loc="outside right upper", fontsize=8, title="stain (class)", title_fontsize=9
    )
    path_note = (
        f"lines: the top {top_k} pathways into each output neuron, in its class colour, width ∝ path score"
        if paths
        else "no pathways drawn: they need a chain of nn.Linear layers with recorded inputs"
    )
    ax.set_title(
        "node colour = stain (the class with the highest mean activation); paler = less selective, "
        f"grey = unstained, × = dead\n{path_note}",
        fontsize=9,
    )
    fig.suptitle(f"Staining graph — run '{_run(trace)}', epoch {epoch}", fontsize=12)
    return fig


def _graph_paths(
    trace: Trace, epoch: int, top_k: int
) -> tuple[list[str], list[tuple[int, pd.DataFrame]], str | None]:
    """The Linear chain, each class's top pathways and the column of their input features.

    The inputs ``x/n_k`` get their own column when the chain starts at the model's first layer; they
    are drawn on the recorded layer just before the chain when it has as many neurons (a Flatten
    before a CNN's classifier), and left out otherwise.
    """
    try:
        chain = staining.linear_chain(trace)
    except ValueError:
        return [], [], None
    if trace.layer_info(chain[-1])["neurons"] < (trace.num_classes or 0):
        return [], [], None
    first = trace.layers.index(chain[0])
    if first == 0:
        x_column = "x"
    elif trace.layer_info(trace.layers[first - 1])["neurons"] == trace.layer_info(chain[0])["in_features"]:
        x_column = trace.layers[first - 1]
    else:
        x_column = None
    paths = []
    for c in range(trace.num_classes or 0):
        frame = staining.pathways(trace, c, epoch, top_k)
        if x_column != "x":
            frame = frame.assign(path=[_rename_inputs(p, x_column) for p in frame["path"]])
        paths.append((c, frame))
    return chain, paths, x_column


def _rename_inputs(path: tuple[str, ...], column: str | None) -> tuple[str, ...]:
    """``x/n_k`` as ``<column>/n_k``, or dropped when the inputs have no column."""
    if column is None:
        return path[1:]
    return (f"{column}/n_{path[0].rsplit('/n_', 1)[1]}", *path[1:])


def _path_nodes(paths: list[tuple[int, pd.DataFrame]]) -> dict[str, set[int]]:
    nodes: dict[str, set[int]] = {}
    for _, frame in paths:
        for path in frame.loc[frame["score"] > 0, "path"]:
            for sig in path:
                layer, neuron = sig.rsplit("/n_", 1)
                nodes.setdefault(layer, set()).add(int(neuron))
    return nodes


def _sample(order: np.ndarray, keep: set[int], limit: int) -> np.ndarray:
    """``order`` itself, or ``limit`` of its items evenly spaced, always including ``keep``."""
    if len(order) <= limit:
        return order
    forced = [n for n in order if n in keep]
    rest = [n for n in order if n not in keep]
    picks = np.linspace(0, len(rest) - 1, max(limit - len(forced), 0)).round().astype(int)
    chosen = set(forced) | {rest[i] for i in picks}
    return np.array([n for n in order if n in chosen])


def _label_path_nodes(
    ax, col: int, layer: str, pos: dict[int, float], nodes: set[int], names: list[str] | None = None
) -> None:
    """Name the neurons on drawn paths (``n_7``, or ``n_7 mean radius`` for a named input feature),
    when few enough to stay legible."""
    if not nodes or len(nodes) > 14:
        return
    for n in nodes:
        if n in pos:
            label = f"n_{n} {names[n]}" if names is not None and n < len(names) else f"n_{n}"
            ax.text(
                col + 0.07, pos[n], label, fontsize=6.5, va="center", ha="left", color="#222222", zorder=5
            )


def _draw_paths(ax, paths, columns: list[str], positions, widths: dict[str, int], palette) -> float:
    """Draw each class's paths (width ∝ score); returns the largest score drawn."""
    scores = [s for _, f in paths for s in f["score"] if s > 0]
    if not scores:
        return 0.0
    top = max(scores)
    for c, frame in paths:
        for score, path in zip(frame["score"], frame["path"]):
            if score > 0:
                xs, ys = _path_points(path, columns, positions, widths)
                ax.plot(xs, ys, color=palette[c], lw=0.6 + 4.4 * score / top, alpha=0.75, zorder=2)
    return top


def _path_points(path, columns: list[str], positions, widths: dict[str, int]) -> tuple[list, list]:
    """The (column, height) points of a path; between two of its layers it passes through the same
    neuron of any elementwise layer of equal width (the ReLU module after a Linear)."""
    index = {layer: i for i, layer in enumerate(columns)}
    xs: list[int] = []
    ys: list[float] = []
    previous = -1
    for sig in path:
        layer, text = sig.rsplit("/n_", 1)
        neuron = int(text)
        if layer not in index or neuron not in positions[layer]:
            continue
        if xs:
            source = xs[-1]
            for col in range(source + 1, index[layer]):
                between = positions[columns[col]]
                if widths[columns[col]] == widths[columns[source]] and previous in between:
                    xs.append(col)
                    ys.append(between[previous])
        xs.append(index[layer])
        ys.append(positions[layer][neuron])
        previous = neuron
    return xs, ys


def _column_label(trace: Trace, layer: str, chain: list[str]) -> str:
    if layer == "x":
        return f"x (inputs)\n{trace.layer_info(chain[0])['in_features']} features"
    info = trace.layer_info(layer)
    kind = info.get("activation") or info.get("type", "")
    return f"{layer}\n{kind}, {info['neurons']} neurons"


# -- brain scan ------------------------------------------------------------------------------------
def plot_brain_scan(
    trace: Trace, epoch: int = -1, layers: Sequence[str] | None = None, stains: pd.DataFrame | None = None
) -> Figure:
    """Per layer: mean activation per epoch × neuron, and per class × neuron at ``epoch``; neurons in the
    order of their final stain (strip above each panel)."""
    epoch = staining.resolve_epoch(trace, epoch)
    last = trace.epochs[-1]
    final = _selection(trace, last, stains)
    layers = list(layers) if layers is not None else trace.layers
    palette = class_palette(trace.num_classes or 0)
    means = trace.query("E_*/L_*", columns=["act_mean"])["act_mean"]
    class_means = trace.classes(f"E_{epoch}/L_*", columns=["act_mean"])["act_mean"]

    fig = Figure(figsize=(13, 2.6 * len(layers) + 1.3), layout="constrained")
    grid = fig.add_gridspec(len(layers), 2, width_ratios=[3, 2])
    for row, layer in enumerate(layers):
        rows = final.xs(layer, level="layer")
        order = neuron_order(rows)
        history = means.xs(layer, level="layer").unstack("neuron").reindex(columns=order)
        per_class = (
            class_means.xs((epoch, layer), level=["epoch", "layer"]).unstack("neuron").reindex(columns=order)
        )
        left, right = fig.add_subplot(grid[row, 0]), fig.add_subplot(grid[row, 1])
        for ax, data in ((left, history), (right, per_class)):
            values = data.to_numpy()
            norm = _centred_norm(values)
            image = ax.imshow(values, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest")
            fig.colorbar(image, ax=ax, label="mean activation", fraction=0.05, pad=0.01)
        _epoch_ticks(left, history.index.to_numpy())
        left.set_ylabel("epoch")
        left.set_title(f"{layer}: mean activation per epoch", fontsize=9, loc="left")
        right.set_yticks(range(len(per_class.index)))
        right.set_yticklabels([_class_label(trace, int(c)) for c in per_class.index], fontsize=7)
        right.set_ylabel("class")
        right.set_title(f"{layer}: mean activation per class, epoch {epoch}", fontsize=9, loc="left")
        sel = rows.loc[order]
        strip = stain_colours(sel["stain"].to_numpy(), sel["selectivity"].to_numpy(), palette)
        strip[sel["dead"].to_numpy()] = to_rgb(DEAD_COLOUR)
        for ax in (left, right):
            _neuron_ticks(ax, order)
            ax.set_xlabel("neuron (ordered by final stain)", fontsize=8)
            band = ax.inset_axes((0, 1.0, 1, 0.07), sharex=ax)
            band.imshow(strip[None, :, :], aspect="auto", interpolation="nearest")
            band.set_axis_off()
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
        f"neurons ordered by their stain at epoch {last}",
        fontsize=11,
    )
    return fig


def _centred_norm(values: np.ndarray) -> mpl.colors.Normalize:
    """A colour scale centred on 0 that spans the 99th percentile of |values| (outliers saturate)."""
    finite = np.abs(values[np.isfinite(values)])
    limit = max(float(np.percentile(finite, 99)) if finite.size else 1.0, 1e-6)
    return mpl.colors.TwoSlopeNorm(0.0, -limit, limit)


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
def plot_stain_evolution(trace: Trace, evolution: staining.StainEvolution | None = None) -> Figure:
    """The fraction of stained (and dead) neurons per layer over epochs; a histogram of settling epochs."""
    evolution = staining.stain_evolution(trace) if evolution is None else evolution
    layers = [k for k in trace.layers if k in set(evolution.layers.index.get_level_values("layer"))]
    colours = mpl.colormaps["Dark2"].colors
    fig = Figure(figsize=(13, 4.8), layout="constrained")
    left, right = fig.subplots(1, 2)
    for i, layer in enumerate(layers):
        data = evolution.layers.xs(layer, level="layer")
        colour = colours[i % len(colours)]
        left.plot(data.index, data["stained_frac"], marker="o", ms=3, color=colour, label=f"{layer} stained")
        if data["dead_frac"].fillna(0).any():
            left.plot(data.index, data["dead_frac"], ls="--", color=colour, label=f"{layer} dead")
    left.set_ylim(-0.02, 1.02)
    left.set_xlabel("epoch")
    left.set_ylabel("fraction of the layer's neurons")
    left.set_title("stained neurons per layer (dashed: dead)", fontsize=10)
    left.legend(fontsize=8)
    left.grid(alpha=0.3)

    epochs = np.asarray(evolution.stains.columns)
    stained = evolution.neurons[evolution.neurons["final_stain"] >= 0]
    edges = np.append(epochs, epochs[-1] + (epochs[-1] - epochs[-2] if len(epochs) > 1 else 1)) - 0.5
    data = [stained.xs(k, level="layer")["settling_epoch"].to_numpy() for k in layers]
    right.hist(
        data,
        bins=edges,
        stacked=True,
        label=layers,
        color=[colours[i % len(colours)] for i in range(len(layers))],
    )
    right.set_xlabel("settling epoch (stain never changes after it)")
    right.set_ylabel("neurons stained at the last epoch")
    right.set_title(f"settling epochs ({len(stained)} neurons stained at epoch {epochs[-1]})", fontsize=10)
    right.legend(fontsize=8, title="layer", title_fontsize=8)
    fig.suptitle(f"Stain evolution — run '{_run(trace)}', {_epoch_span(trace)}", fontsize=11)
    return fig


# -- weight and bias drift -------------------------------------------------------------------------
def plot_weight_drift(trace: Trace, stains: pd.DataFrame | None = None, max_lines: int = MAX_LINES) -> Figure:
    """Median (and 25–75th percentile) weight change per layer over epochs, and each neuron's bias
    trajectory coloured by its final stain."""
    drift = staining.weight_drift(trace)
    last = trace.epochs[-1]
    final = _selection(trace, last, stains)
    palette = class_palette(trace.num_classes or 0)
    biases = trace.query("E_*/L_*", columns=["bias"])["bias"].dropna()
    with_bias = [k for k in trace.layers if k in set(biases.index.get_level_values("layer"))]
    layers = [k for k in trace.layers if k in set(drift.index.get_level_values("layer"))]
    colours = mpl.colormaps["Dark2"].colors

    fig = Figure(figsize=(max(12, 4 * len(with_bias)), 8), layout="constrained")
    grid = fig.add_gridspec(2, max(len(with_bias), 1))
    top = fig.add_subplot(grid[0, :])
    for i, layer in enumerate(layers):
        data = drift.xs(layer, level="layer")
        colour = colours[i % len(colours)]
        top.plot(data.index, data["median"], marker="o", ms=3, color=colour, label=f"{layer} median")
        top.fill_between(data.index, data["q25"], data["q75"], color=colour, alpha=0.2, lw=0)
    if layers:
        top.set_yscale("log")
        top.fill_between([], [], [], color="#888888", alpha=0.3, label="25–75th percentile of neurons")
        top.legend(fontsize=8, ncol=2)
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
    top.set_title("weight drift per layer", fontsize=10)
    top.grid(alpha=0.3)

    for i, layer in enumerate(with_bias):
        ax = fig.add_subplot(grid[1, i])
        wide = biases.xs(layer, level="layer").unstack("neuron")
        rows = final.xs(layer, level="layer")
        order = _sample(neuron_order(rows), set(), max_lines)
        sel = rows.loc[order]
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
    fig.suptitle(f"Weight and bias drift — run '{_run(trace)}', {_epoch_span(trace)}", fontsize=11)
    return fig


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
            ax.legend(fontsize=9)
    left.set_title("loss", fontsize=10)
    right.set_title("accuracy", fontsize=10)
    span = f"epochs {metrics.index[0]}–{metrics.index[-1]}" if len(metrics) else "no metrics logged"
    fig.suptitle(f"Training curves — run '{_run(trace)}', {span}", fontsize=11)
    return fig


def plot_confusion(trace: Trace, matrix: np.ndarray | None = None) -> Figure:
    """The held-out confusion matrix after the last epoch (``trace.run_metrics["test_confusion"]``)."""
    matrix = np.asarray(trace.run_metrics["test_confusion"] if matrix is None else matrix)
    n = matrix.shape[0]
    labels = [_class_label(trace, c) for c in range(n)]
    size = min(max(4.5, 0.55 * n + 3), 11)
    fig = Figure(figsize=(size + 1.2, size), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(matrix, cmap="Blues")
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            fontsize=8 if n > 6 else 11,
            color="white" if value > threshold else "black",
        )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(labels, rotation=45 if n > 4 else 0, ha="right" if n > 4 else "center", fontsize=8)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    fig.colorbar(image, ax=ax, label="held-out samples", shrink=0.8)
    accuracy = np.trace(matrix) / max(matrix.sum(), 1)
    last = trace.epochs[-1] if trace.epochs else "?"
    fig.suptitle(
        f"Confusion matrix (held-out split) — run '{_run(trace)}', after epoch {last}\n"
        f"accuracy {accuracy:.3f} on {matrix.sum()} samples",
        fontsize=10,
    )
    return fig


# -- unit health -------------------------------------------------------------------------------
def plot_unit_health(trace: Trace, health: staining.UnitHealth | None = None) -> Figure:
    """Fractions of dead, saturated and exploding units per layer over epochs."""
    health = staining.unit_health(trace) if health is None else health
    layers = [k for k in trace.layers if k in set(health.layers.index.get_level_values("layer"))]
    colours = mpl.colormaps["Dark2"].colors
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (column, title) in zip(
        axes,
        [
            ("dead_frac", "dead (never > 0 after a ReLU; logits not judged)"),
            ("saturated_frac", "saturated (tanh/sigmoid near ±1)"),
            ("exploding_frac", "exploding (NaN/Inf seen)"),
        ],
    ):
        for i, layer in enumerate(layers):
            data = health.layers.xs(layer, level="layer")
            ax.plot(data.index, data[column], marker="o", ms=3, color=colours[i % len(colours)], label=layer)
        if not (health.layers[column] > 0).any():  # overlapping zero lines hide each other: say it
            ax.text(
                0.5, 0.5, "none in any layer, any epoch", transform=ax.transAxes, ha="center", color="#555555"
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_ylabel("fraction of the layer's neurons")
    axes[-1].legend(fontsize=8, title="layer", title_fontsize=8)
    fig.suptitle(f"Unit health — run '{_run(trace)}', {_epoch_span(trace)}", fontsize=11)
    return fig
