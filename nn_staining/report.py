"""The interactive report of a run: one self-contained HTML file (plotly.js and the data embedded).

``write_report(run)`` writes ``<run>/report.html``; it opens from disk, offline, with no server. Its
charts are Plotly figures: hover and zoom, the staining graph's epoch slider and the legends come
from plotly.js, and the page adds one small script of its own that shows a clicked neuron's history.
Statistics come from :mod:`nn_staining.staining` and the trace; layouts from :mod:`nn_staining.plots`,
which also decides what a large model's sections summarise (:func:`plots.layer_summary`: blocks of layers,
the head in detail), so the page and the figures draw the same thing.
"""

from __future__ import annotations

import html
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__, plots, staining
from .trace import Trace, load_trace

log = logging.getLogger(__name__)

#: The staining graph's slider shows at most this many epochs (evenly spaced, the first and last kept).
MAX_SLIDER_EPOCHS = 40
#: Brain-scan heatmaps show at most this many neurons per layer (an even sample in stain order beyond).
MAX_SCAN_NEURONS = 256
#: Neuron histories keep at most this many epochs (evenly spaced, the last kept).
MAX_HISTORY_EPOCHS = 200
#: Width and height of the staining graph in pixels (fixed, so that an input pixel grid stays square).
GRAPH_WIDTH, GRAPH_HEIGHT = 1240, 720
#: Significant digits of the numbers embedded in the page (float32 data needs 7).
DIGITS = 7
#: The intervention section puts at most this many layer panels side by side (more go on more rows).
MAX_EFFECT_COLUMNS = 3
#: The id of the staining graph's element, of the clicked neuron's history chart and of its table.
GRAPH_ID, HISTORY_ID, HISTORY_TABLE_ID = "staining-graph", "neuron-history", "history-table"


def write_report(
    run: str | os.PathLike | Trace,
    path: str | os.PathLike | None = None,
    *,
    top_k: int | None = None,
    max_nodes: int = plots.MAX_NODES,
    max_epochs: int = MAX_SLIDER_EPOCHS,
) -> Path:
    """Write the run's interactive report (default ``<run>/report.html``); returns its path."""
    trace = run if isinstance(run, Trace) else load_trace(run)
    path = Path(path) if path is not None else trace.path / "report.html"
    page = build_report(trace, top_k=top_k, max_nodes=max_nodes, max_epochs=max_epochs)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    log.info("report written to %s (%.1f MB)", path, path.stat().st_size / 1e6)
    return path


def build_report(
    trace: Trace,
    *,
    top_k: int | None = None,
    max_nodes: int = plots.MAX_NODES,
    max_epochs: int = MAX_SLIDER_EPOCHS,
) -> str:
    """The report's HTML text: summary, training curves, staining graph with an epoch slider and
    neuron histories, brain scans, and the representation and intervention views the run has."""
    import plotly.offline

    if not trace.epochs:
        raise ValueError(f"trace {trace.path} has no recorded epochs: nothing to report")
    sections: list[Section] = [Section("summary", "Run summary", _summary_html(trace))]
    if not trace.metrics.empty:
        sections.append(
            Section("training", "Training curves", _figure_html(_training_figure(trace), "training-curves"))
        )
    history: dict[str, Any] = {}
    if trace.num_classes:
        stains = staining.selectivity(trace)
        graph, history, note = _graph_section(trace, stains, top_k, max_nodes, max_epochs)
        sections.append(Section("graph", "Staining graph over training", graph, note))
        sections.append(Section("scan", "Brain scan", *_scan_html(trace, stains)))
    else:
        sections.append(
            Section(
                "graph", "Staining graph", "<p>The trace has no per-class statistics: no stains to show.</p>"
            )
        )
    sections += _representation_sections(trace)
    sections += _intervention_sections(trace)
    return _page(trace, sections, plotly.offline.get_plotlyjs(), history)


@dataclass
class Section:
    """One part of the page: an anchor, a heading, its HTML and an optional note under the heading."""

    key: str
    title: str
    body: str
    note: str = ""


# -- summary and training ---------------------------------------------------------------------------
def _summary_html(trace: Trace) -> str:
    meta = trace.meta
    pipeline = meta.get("config", {}).get("pipeline", {})
    epochs = trace.epochs
    metrics = trace.metrics
    rows = [
        ("run", str(trace.path)),
        ("model", meta.get("model", {}).get("class", "?")),
        ("data set", pipeline.get("dataset", "(not recorded)")),
        ("recorded epochs", f"{len(epochs)} ({epochs[0]}–{epochs[-1]})"),
        ("classes", ", ".join(plots._class_label(trace, c) for c in range(trace.num_classes or 0)) or "none"),
        ("neurons", f"{meta.get('num_neurons', '?')} in {len(trace.layers)} layers"),
        ("trace size", f"{trace.size_bytes() / 1e6:.2f} MB"),
    ]
    for column, label in (
        ("train_acc", "training accuracy"),
        ("test_acc", "held-out accuracy"),
        ("loss", "loss"),
    ):
        if column in metrics and len(metrics[column].dropna()):
            rows.append((f"final {label}", f"{metrics[column].dropna().iloc[-1]:.4g}"))
    table = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    head = '<table class="layers"><tr><th>layer</th><th>module</th><th>activation</th><th>neurons</th></tr>'
    layers = "".join(_layer_row(trace, k) for k in trace.layers)
    summary = plots.layer_summary(trace, plots.MAX_GRAPH_LAYERS)
    if not summary.blocks:
        return f'<table class="summary">{table}</table><h3>Layers</h3>{head}{layers}</table>'
    items = "".join(
        _block_row(trace, item) if isinstance(item, plots.Block) else _layer_row(trace, item)
        for item in summary.items
    )
    return (
        f'<table class="summary">{table}</table><h3>Layers</h3>'
        f'<p class="note">{html.escape(summary.note[0].upper() + summary.note[1:])}.</p>{head}{items}</table>'
        f"<details><summary>All {len(trace.layers)} layers</summary>{head}{layers}</table></details>"
    )


def _layer_row(trace: Trace, layer: str) -> str:
    info = trace.layer_info(layer)
    return (
        f"<tr><td>{html.escape(layer)}</td><td>{html.escape(str(info.get('type')))}</td>"
        f"<td>{html.escape(str(info.get('activation') or ''))}</td><td>{info['neurons']}</td></tr>"
    )


def _block_row(trace: Trace, block: plots.Block) -> str:
    """A summarised block's row: its label and layer count, its modules' types (with counts), its units."""
    infos = [trace.layer_info(k) for k in block.layers]
    types = pd.Series([str(info.get("type")) for info in infos]).value_counts(sort=False)
    activations = dict.fromkeys(str(info["activation"]) for info in infos if info.get("activation"))
    return (
        f'<tr class="block"><td>{html.escape(block.label)} (block of {len(block.layers)} layers)</td>'
        f"<td>{html.escape(', '.join(f'{t} ×{n}' for t, n in types.items()))}</td>"
        f"<td>{html.escape(', '.join(activations))}</td><td>{sum(info['neurons'] for info in infos)}</td></tr>"
    )


def _training_figure(trace: Trace):
    from plotly.subplots import make_subplots

    metrics = trace.metrics
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    for col, names in (
        (1, [("loss", "training loss"), ("test_loss", "held-out loss")]),
        (2, [("train_acc", "training accuracy"), ("test_acc", "held-out accuracy")]),
    ):
        for i, (column, label) in enumerate(names):
            if column in metrics:
                fig.add_scatter(
                    x=metrics.index.to_numpy(),
                    y=metrics[column].to_numpy(dtype=float),
                    name=label,
                    mode="lines+markers",
                    line={"dash": "solid" if i == 0 else "dash"},
                    row=1,
                    col=col,
                )
    fig.update_xaxes(title_text="epoch")
    fig.update_yaxes(title_text="cross-entropy loss", col=1)
    fig.update_yaxes(title_text="accuracy", col=2)
    fig.update_layout(height=360, margin={"t": 40, "b": 40}, legend={"orientation": "h", "y": -0.25})
    return fig


# -- staining graph ----------------------------------------------------------------------------------
def slider_epochs(epochs: list[int], limit: int = MAX_SLIDER_EPOCHS) -> list[int]:
    """``epochs`` itself, or ``limit`` of them evenly spaced with the first and the last."""
    if len(epochs) <= limit:
        return list(epochs)
    picks = np.unique(np.linspace(0, len(epochs) - 1, max(limit, 2)).round().astype(int))
    return [epochs[i] for i in picks]


def _graph_section(
    trace: Trace, stains: pd.DataFrame, top_k: int | None, max_nodes: int, max_epochs: int
) -> tuple[str, dict[str, Any], str]:
    """The staining graph with one frame per slider epoch (nodes fixed in the last epoch's stain order),
    the histories of its neurons, and a note on what was sampled."""
    epochs = slider_epochs(trace.epochs, max_epochs)
    last = epochs[-1]
    order = stains.xs(last, level="epoch")
    summary = plots.layer_summary(trace, plots.MAX_GRAPH_LAYERS)  # large models: blocks, the head in detail
    detailed = summary.detailed if summary.blocks else None
    paths = {e: plots.graph_paths(trace, e, top_k, layers=detailed) for e in epochs}
    keep: dict[str, set[int]] = {}
    for p in paths.values():
        for layer, ids in plots._edge_nodes(p.edges).items():
            keep.setdefault(layer, set()).update(ids)
    columns = len(summary.items) + 1
    aspect = ((GRAPH_WIDTH - 40) / columns) / ((GRAPH_HEIGHT - 240) / 1.19)  # px per x unit / px per y unit
    layouts = {
        e: plots.graph_layout(
            trace,
            e,
            stains=stains.xs(e, level="epoch"),
            order=order,
            keep=keep,
            aspect=aspect,
            max_nodes=max_nodes,
            paths=paths[e],
            summary=summary,
        )
        for e in epochs
    }
    fig, n_edges = _graph_figure(trace, layouts, epochs)
    history = _histories(trace, layouts[last].nodes)
    notes = []
    if summary.blocks:
        notes.append(
            f"{summary.note[0].upper()}{summary.note[1:]}. A block's bar: the share of its units stained for each "
            "class at the slider's epoch (from the top), then unstained (grey) and dead (dark); hover it for its "
            "layers and shares."
        )
    if len(epochs) < len(trace.epochs):
        notes.append(
            f"The slider shows {len(epochs)} of the {len(trace.epochs)} recorded epochs (evenly spaced)."
        )
    sampled = {k: v.split("\n")[0] for k, v in layouts[last].notes.items()}
    if sampled:
        notes.append(
            "Wide layers are sampled evenly in stain order, keeping every neuron on a drawn path: "
            + "; ".join(f"{k}: {v}" for k, v in sampled.items())
            + "."
        )
    intro = (
        f"<p>Each column is a layer{' (or a block of layers, see the note)' * bool(summary.blocks)}, each dot a "
        "neuron coloured by its stain at the slider's epoch (the class with "
        "the highest mean activation; paler = less selective, grey = unstained, a crossed circle = dead). Lines are "
        f"the top {layouts[last].top_k} pathways into each output neuron in its class colour, width ∝ path score; "
        "dashed edges inhibit (their mean contribution for the class is negative). ▲/▼ near an input: its high/low "
        "values are the class's evidence. Nodes stay where the last epoch's stains put them, so colours can be "
        "followed over training. <b>Hover</b> a neuron for its signature, stain, selectivity and class means; "
        "<b>click</b> it for its history below.</p>"
    )
    body = (
        intro
        + _figure_html(fig, GRAPH_ID, responsive=False)
        + f'<h3 id="history-title">Neuron history: click a neuron in the graph</h3>'
        f'<div id="{HISTORY_ID}" class="history"></div><div class="tablewrap"><table id="{HISTORY_TABLE_ID}">'
        "</table></div>"
    )
    log.debug("staining graph: %d frames, %d edge traces", len(epochs), n_edges)
    return body, history, " ".join(notes)


def _graph_figure(trace: Trace, layouts: dict[int, plots.GraphLayout], epochs: list[int]):
    """Plotly figure: node traces per column, a fixed pool of edge traces and evidence markers, a stacked
    bar per summarised block (large models), and one frame per epoch that restyles them; the slider starts
    at the last epoch."""
    last = layouts[epochs[-1]]
    palette = plots.class_palette(trace.num_classes or 0)
    n_edges = max(len(layout.edges) for layout in layouts.values())
    class_means = trace.classes("E_*/L_*", columns=["act_mean"])["act_mean"]

    def node_traces(layout: plots.GraphLayout) -> list[dict[str, Any]]:
        out = []
        for layer in layout.columns:
            if layer in layout.blocks:
                continue
            group = layout.nodes.xs(layer, level="layer")
            if layer == "x":
                text = [_input_text(trace, k) for k in group.index]
                symbols = "square" if layout.image_shape is not None else "circle"
            else:
                means = class_means.xs((layout.epoch, layer), level=["epoch", "layer"]).unstack("class")
                text = [_node_text(trace, layout.epoch, layer, k, row, means) for k, row in group.iterrows()]
                symbols = ["circle-x" if d else "circle" for d in group["dead"]]
            out.append(
                {
                    "marker": {
                        "color": [_rgb(c) for c in group["colour"]],
                        "symbol": symbols,
                        "size": _node_size(len(group), layout, layer),
                        "line": {"color": "#555555", "width": 0.7},
                    },
                    "hovertext": text,
                }
            )
        return out

    def edge_traces(layout: plots.GraphLayout) -> list[dict[str, Any]]:
        edges = layout.edges.sort_values("score")
        top = float(edges["score"].max()) if len(edges) else 1.0
        out = []
        for row in edges.itertuples():
            kind = "excitatory" if row.sign > 0 else "inhibitory"
            text = (
                f"{plots._class_label(trace, row.target_class)} pathway edge<br>{row.source} → {row.target}<br>"
                f"{kind}; summed path score {row.score:.3g}"
            )
            out.append(
                {
                    "x": list(row.xs),
                    "y": list(row.ys),
                    "line": {
                        "color": _rgb(palette[row.target_class], 0.75),
                        "width": 0.8 + 5 * row.score / top,
                        "dash": "solid" if row.sign > 0 else "dash",
                    },
                    "hovertext": text,
                }
            )
        out += [{"x": [], "y": [], "hovertext": ""}] * (n_edges - len(out))
        return out

    def evidence_trace(layout: plots.GraphLayout) -> dict[str, Any]:
        xs, ys, symbols, colours, text = [], [], [], [], []
        inputs = "x" if layout.x_column == "x" else layout.x_column
        for row in layout.edges.itertuples():
            layer, k = plots._split(row.source)
            if layer != inputs:
                continue
            high = layout.evidence.get((row.target_class, k), 1) > 0
            share = 0.0 if layout.image_shape is not None else 0.14  # on the pixel, or near the input
            xs.append(row.xs[0] + share * (row.xs[1] - row.xs[0]))
            ys.append(row.ys[0] + share * (row.ys[1] - row.ys[0]))
            symbols.append("triangle-up" if high else "triangle-down")
            colours.append(_rgb(palette[row.target_class]))
            text.append(
                f"{row.source}: {'high' if high else 'low'} values are evidence for "
                f"{plots._class_label(trace, row.target_class)}"
            )
        return {
            "x": xs,
            "y": ys,
            "marker": {
                "symbol": symbols,
                "color": colours,
                "size": 9,
                "line": {"color": "black", "width": 0.6},
            },
            "hovertext": text,
        }

    data: list[dict[str, Any]] = []
    for _ in range(n_edges):
        data.append(
            {"type": "scatter", "mode": "lines", "hoverinfo": "text", "showlegend": False, "name": "edge"}
        )
    for col, layer in enumerate(last.columns):
        if layer in last.blocks:
            continue
        group = last.nodes.xs(layer, level="layer")
        data.append(
            {
                "type": "scatter",
                "uid": f"nodes{col}",  # its SVG group is g.tracenodes<col>
                "x": _numbers(group["x"]),
                "y": _numbers(group["y"]),
                "mode": "markers",
                "hoverinfo": "text",
                "showlegend": False,
                "name": f"nodes:{layer}",
                "customdata": [f"{layer}/n_{k}" for k in group.index],
            }
        )
    data.append(
        {"type": "scatter", "mode": "markers", "hoverinfo": "text", "showlegend": False, "name": "evidence"}
    )
    block_columns = [col for col, layer in enumerate(last.columns) if layer in last.blocks]
    stain_names = [plots._class_label(trace, c) for c in range(len(palette))] + ["unstained", "dead"]
    stain_colours = [_rgb(c) for c in palette] + [plots.UNSTAINED_COLOUR, plots.DEAD_COLOUR]
    if block_columns:  # one bar trace per stain, stacked from the top by their bases
        for name, colour in zip(stain_names, stain_colours):
            data.append(
                {"type": "bar", "x": block_columns, "width": plots.BLOCK_WIDTH, "hoverinfo": "text",
                 "showlegend": False, "name": f"blocks:{name}", "marker": {"color": colour, "line": {"color": "white", "width": 0.5}}}
            )  # fmt: skip
    dynamic = list(range(len(data)))

    def block_traces(layout: plots.GraphLayout) -> list[dict[str, Any]]:
        blocks = [layout.blocks[layout.columns[col]] for col in block_columns]
        text = [_block_text(trace, layout.epoch, block, shares) for block, shares in blocks]
        tops = np.ones(len(blocks))
        out = []
        for i in range(len(stain_names)):
            values = np.array([shares.iloc[i] for _, shares in blocks], dtype=float)
            out.append({"y": _numbers(values), "base": _numbers(tops - values), "hovertext": text})
            tops = tops - values
        return out

    def restyle(layout: plots.GraphLayout) -> list[dict[str, Any]]:
        bars = block_traces(layout) if block_columns else []
        return [*edge_traces(layout), *node_traces(layout), evidence_trace(layout), *bars]

    for trace_dict, update in zip(data, restyle(last)):
        trace_dict.update(update)
    frames = [{"name": str(e), "data": restyle(layouts[e]), "traces": dynamic} for e in epochs]
    if block_columns:  # the blocks' labels give their stained share at the frame's epoch
        for frame, e in zip(frames, epochs):
            frame["layout"] = {
                "xaxis": {"ticktext": [t.replace("\n", "<br>") for t in layouts[e].column_labels]}
            }

    def add_scatter(**kwargs: Any) -> None:
        data.append({"type": "scatter", **kwargs})

    for c in range(trace.num_classes or 0):
        add_scatter(
            x=[None], y=[None], mode="markers", name=plots._class_label(trace, c),
            marker={"color": _rgb(palette[c]), "size": 10},
        )  # fmt: skip
    for name, colour, symbol in (
        ("unstained", plots.UNSTAINED_COLOUR, "circle"),
        ("dead", plots.UNSTAINED_COLOUR, "circle-x"),
        ("input feature", plots.INPUT_COLOUR, "square" if last.image_shape is not None else "circle"),
    ):
        add_scatter(
            x=[None], y=[None], mode="markers", name=name,
            marker={"color": colour, "symbol": symbol, "size": 10, "line": {"color": "#555555", "width": 0.7}},
        )  # fmt: skip
    if block_columns:
        add_scatter(
            x=[None], y=[None], mode="markers", name="dead (a block's share)",
            marker={"color": plots.DEAD_COLOUR, "symbol": "square", "size": 10},
        )  # fmt: skip
    for name, dash in (("excitatory edge", "solid"), ("inhibitory edge", "dash")):
        add_scatter(x=[None], y=[None], mode="lines", name=name, line={"color": "#555555", "dash": dash})
    steps = [
        {
            "label": str(e),
            "method": "animate",
            "args": [[str(e)], {"mode": "immediate", "frame": {"duration": 0, "redraw": True}, "transition": {"duration": 0}}],
        }
        for e in epochs
    ]  # fmt: skip
    annotations = [
        {"x": last.columns.index(layer), "y": -0.04, "text": note.replace("\n", "<br>"), "showarrow": False,
         "yanchor": "top", "font": {"size": 10, "color": "#444444"}}
        for layer, note in last.notes.items()
    ]  # fmt: skip
    layout = dict(
        width=GRAPH_WIDTH,
        height=GRAPH_HEIGHT,
        hovermode="closest",
        plot_bgcolor="white",
        margin={"l": 20, "r": 20, "t": 90, "b": 150},
        xaxis={
            "tickvals": list(range(len(last.columns))),
            "ticktext": [label.replace("\n", "<br>") for label in last.column_labels],
            "range": [-0.6, len(last.columns) - 0.4],
            "showgrid": False,
            "zeroline": False,
        },
        yaxis={"range": [-0.16 if last.notes else -0.03, 1.03], "visible": False},
        legend={
            "x": 0.0,
            "xanchor": "left",
            "y": 1.02,
            "yanchor": "bottom",
            "orientation": "h",
            "font": {"size": 11},
        },
        annotations=annotations,
        sliders=[
            {
                "active": len(epochs) - 1,
                "currentvalue": {"prefix": "epoch "},
                "pad": {"t": 60},
                "steps": steps,
            }
        ],
    )
    if block_columns:
        half = plots.BLOCK_WIDTH / 2
        lines = max(label.count("\n") + 1 for e in epochs for label in layouts[e].column_labels)
        extra = 16 * max(
            lines - 3, 0
        )  # block labels of more lines push the slider down, the plot keeps its size
        layout["height"] += extra
        layout["margin"]["b"] += extra
        layout["sliders"][0]["pad"]["t"] += extra
        layout["barmode"] = "overlay"
        layout["shapes"] = [
            {"type": "rect", "x0": c - half, "x1": c + half, "y0": 0, "y1": 1, "line": {"color": "#555555", "width": 0.7}}
            for c in block_columns
        ]  # fmt: skip
    return {"data": data, "layout": layout, "frames": frames}, n_edges


#: Layer names listed in a block's hover text at most.
MAX_BLOCK_NAMES = 24


def _block_text(trace: Trace, epoch: int, block: plots.Block, shares: pd.Series) -> str:
    """Hover text of a summarised block: its label, size, share of units per stain at ``epoch``, its layers."""
    units = sum(trace.layer_info(k)["neurons"] for k in block.layers)
    lines = [
        f"<b>{html.escape(block.label)}</b>: {len(block.layers)} layers, {units} units",
        f"epoch {epoch}:",
    ]
    for key, share in shares.items():
        name = key if isinstance(key, str) else plots._class_label(trace, int(key))
        lines.append(f"  {html.escape(name)}: {share:.1%} ({int(round(share * units))} units)")
    return "<br>".join([*lines, "layers:", _layer_list(block.layers)])


def _node_size(count: int, layout: plots.GraphLayout, layer: str) -> float:
    if layer == "x" and layout.image_shape is not None:  # square pixels that tile the grid
        xs = np.unique(layout.nodes.xs("x", level="layer")["x"].round(9))
        pitch = float(np.diff(xs).min()) if len(xs) > 1 else 0.1
        return 0.9 * pitch * (GRAPH_WIDTH - 40) / len(layout.columns)
    return float(np.clip(260 / max(count, 1), 5, 18))


def _node_text(trace: Trace, epoch: int, layer: str, neuron: int, row: pd.Series, means: pd.DataFrame) -> str:
    """Hover text of a neuron: signature, stain, selectivity and class means at ``epoch``."""
    stain = int(row["stain"])
    if row["dead"]:
        what = "dead (never > 0)"
    elif stain < 0:
        what = "unstained"
    else:
        what = plots._class_label(trace, stain)
    values = means.loc[neuron] if neuron in means.index else pd.Series(dtype=float)
    class_text = "<br>".join(f"  {plots._class_label(trace, int(c))}: {v:.4g}" for c, v in values.items())
    return (
        f"<b>E_{epoch}/{layer}/n_{neuron}</b><br>stain: {what}<br>selectivity: {row['selectivity']:.3f}<br>"
        f"class means:<br>{class_text}"
    )


def _input_text(trace: Trace, k: int) -> str:
    names = trace.feature_names
    return f"<b>x/n_{k}</b>" + (f" {html.escape(names[k])}" if names and k < len(names) else "")


def _histories(trace: Trace, nodes: pd.DataFrame) -> dict[str, Any]:
    """Per drawn neuron: its mean, per-class means and bias at each recorded epoch (for the click view)."""
    epochs = slider_epochs(trace.epochs, MAX_HISTORY_EPOCHS)
    selected = f"E_{','.join(map(str, epochs))}/L_*" if len(epochs) > 1 else f"E_{epochs[0]}/L_*"
    neurons = trace.query(selected, columns=["act_mean", "bias"])
    classes = trace.classes(selected, columns=["act_mean"])["act_mean"].unstack("class")
    drawn = [(layer, int(n)) for layer, n in nodes.index if layer != "x"]
    wanted = pd.MultiIndex.from_tuples(drawn, names=["layer", "neuron"])
    neurons = neurons[neurons.index.droplevel("epoch").isin(wanted)]
    classes = classes[classes.index.droplevel("epoch").isin(wanted)]
    out: dict[str, Any] = {}
    for (layer, neuron), rows in neurons.groupby(level=["layer", "neuron"], sort=False):
        per_class = classes.xs((layer, neuron), level=["layer", "neuron"]).reindex(
            rows.index.get_level_values("epoch")
        )
        out[f"{layer}/n_{neuron}"] = {
            "epoch": [int(e) for e in rows.index.get_level_values("epoch")],
            "act_mean": _numbers(rows["act_mean"]),
            "bias": _numbers(rows["bias"]),
            "class_means": [_numbers(per_class[c]) for c in per_class.columns],
        }
    return out


def _numbers(values) -> list[float | None]:
    """Floats rounded to ``DIGITS`` significant digits for JSON (None for NaN or missing)."""
    array = np.asarray(values, dtype=np.float64)
    return [float(f"{v:.{DIGITS}g}") if np.isfinite(v) else None for v in array]


# -- brain scan -------------------------------------------------------------------------------------
def _scan_html(trace: Trace, stains: pd.DataFrame) -> tuple[str, str]:
    """One heatmap pair per layer: mean activation per epoch × neuron, and per class × neuron at the last
    epoch; of a large model (:func:`plots.layer_summary` as in ``plots.plot_brain_scan``) one pair for its
    blocks' shares of units per stain, then the head's layers. Returns the HTML and the note on what was summarised."""
    last = trace.epochs[-1]
    final = stains.xs(last, level="epoch")
    summary = plots.layer_summary(trace, plots.MAX_SCAN_LAYERS, plots.MAX_BLOCK_ROWS)
    means = trace.query("E_*/L_*", columns=["act_mean"])["act_mean"]
    class_means = trace.classes(f"E_{last}/L_*", columns=["act_mean"])["act_mean"]
    parts = [
        "<p>Per layer, neurons in the order of their final stain (the strip on top). Left: mean activation per epoch; "
        f"right: mean activation per class at epoch {last}. Signed layers use a diverging scale centred on 0, "
        "non-negative layers (after a ReLU) a sequential one; colours clip at the 99th percentile (the colour bar "
        "says where); hover shows the exact value.</p>"
    ]
    if summary.blocks:
        parts.append(
            "<p>Blocks: each row is a summarised block. Left: the share of its units stained (for any class) per "
            f"epoch; right: the share of its units per stain at epoch {last}. Hover a row for its layers.</p>"
        )
        parts.append(_figure_html(_scan_blocks_figure(trace, stains, summary.blocks, last), "scan-blocks"))
    for layer in summary.detailed:
        rows = final.xs(layer, level="layer")
        order = plots.neuron_order(rows)
        shown = plots._sample(order, set(), MAX_SCAN_NEURONS)
        history = means.xs(layer, level="layer").unstack("neuron").reindex(columns=shown)
        per_class = (
            class_means.xs((last, layer), level=["epoch", "layer"]).unstack("neuron").reindex(columns=shown)
        )
        note = (
            f"showing {len(shown)} of {len(order)} neurons (an even sample in stain order)"
            if len(shown) < len(order)
            else f"{len(order)} neurons"
        )
        fig = _scan_figure(trace, layer, history, per_class, rows.loc[shown], note)
        parts.append(_figure_html(fig, f"scan-{layer}"))
    note = f"{summary.note[0].upper()}{summary.note[1:]}." if summary.blocks else ""
    return "".join(parts), note


def _scan_blocks_figure(trace: Trace, stains: pd.DataFrame, blocks: list[plots.Block], epoch: int):
    """Per block (a row): the stained share of its units per epoch, and its share of units per stain at ``epoch``
    (``plots.block_stained_frac``, ``plots.block_stains``)."""
    from plotly.subplots import make_subplots

    n = trace.num_classes or 0
    history = plots.block_stained_frac(stains, blocks)
    shares = pd.DataFrame([plots.block_stains(stains.xs(epoch, level="epoch"), b, n) for b in blocks])
    names = [f"{b.label} ({len(b.layers)} layer{'s' * (len(b.layers) > 1)})" for b in blocks]
    layers = [_layer_list(b.layers) for b in blocks]
    stains_x = [plots._class_label(trace, c) for c in range(n)] + ["unstained", "dead"]
    fig = make_subplots(
        rows=1, cols=2, column_widths=[0.58, 0.42], horizontal_spacing=0.14,
        subplot_titles=("blocks: stained share of units per epoch", f"blocks: share of units per stain, epoch {epoch}"),
    )  # fmt: skip
    for col, data, xlabels, xtitle in (
        (1, history, [str(e) for e in history.columns], "epoch"),
        (2, shares, stains_x, "stain"),
    ):
        values = data.to_numpy(dtype=float)
        fig.add_heatmap(
            z=values, x=xlabels, y=names, row=1, col=col, colorscale="Greys", zmin=0, zmax=1,
            showscale=col == 2, colorbar={"title": {"text": "share of the block's units", "side": "right"}},
            text=[[f"{v:.0%}" for v in row] for row in values], texttemplate="%{text}" if values.size <= 240 else None,
            customdata=[[text] * values.shape[1] for text in layers],
            hovertemplate="%{y}, " + xtitle + " %{x}: %{z:.1%}<br>%{customdata}<extra></extra>",
        )  # fmt: skip
        fig.update_xaxes(title_text=xtitle, row=1, col=col, type="category")
        fig.update_yaxes(row=1, col=col, type="category", autorange="reversed", showticklabels=col == 1)
    colours = [_rgb(c) for c in plots.class_palette(n)]  # class names in their colours, as in the figure
    ticks = [
        f'<span style="color:{c}">{html.escape(plots._class_label(trace, k))}</span>'
        for k, c in enumerate(colours)
    ]
    fig.update_xaxes(tickvals=stains_x, ticktext=[*ticks, "unstained", "dead"], row=1, col=2)
    fig.update_layout(height=max(300, 160 + 28 * len(blocks)), margin={"t": 50, "b": 40})
    return fig


def _layer_list(layers: list[str]) -> str:
    """Hover lines naming ``layers``: three a line, at most ``MAX_BLOCK_NAMES``."""
    names = [html.escape(k) for k in layers[:MAX_BLOCK_NAMES]]
    if len(layers) > MAX_BLOCK_NAMES:
        names.append(f"… {len(layers) - MAX_BLOCK_NAMES} more, to {html.escape(layers[-1])}")
    return "<br>".join(", ".join(names[i : i + 3]) for i in range(0, len(names), 3))


def _scan_figure(
    trace: Trace, layer: str, history: pd.DataFrame, per_class: pd.DataFrame, sel: pd.DataFrame, note: str
):
    from plotly.subplots import make_subplots

    palette = plots.class_palette(trace.num_classes or 0)
    strip = plots.stain_colours(sel["stain"].to_numpy(), sel["selectivity"].to_numpy(), palette)
    labels = [f"n_{n}" for n in history.columns]
    fig = make_subplots(
        rows=2, cols=2, row_heights=[0.08, 0.92], column_widths=[0.58, 0.42], vertical_spacing=0.02,
        horizontal_spacing=0.1, shared_xaxes=True,
        subplot_titles=(f"{layer}: mean activation per epoch ({note})", "per class, last epoch", "", ""),
    )  # fmt: skip
    values = np.concatenate([history.to_numpy(dtype=float).ravel(), per_class.to_numpy(dtype=float).ravel()])
    scale = plots.colour_scale(values)
    colours = "Viridis" if scale.sequential else "RdBu"
    for col, data, ylabels, ytitle in (
        (1, history, [str(e) for e in history.index], "epoch"),
        (2, per_class, [plots._class_label(trace, int(c)) for c in per_class.index], "class"),
    ):
        fig.add_heatmap(
            z=data.to_numpy(dtype=float), x=labels, y=ylabels, row=2, col=col, colorscale=colours,
            reversescale=not scale.sequential, zmin=scale.vmin, zmax=scale.vmax, zmid=None if scale.sequential else 0,
            showscale=col == 2,
            colorbar={"title": {"text": "mean activation" + (f"<br>clipped at {scale.describe()}" if scale.clipped else ""),
                                "side": "right"}, "len": 0.9, "y": 0.45},
            hovertemplate="%{x}, " + ytitle + " %{y}: %{z:.4g}<extra></extra>",
        )  # fmt: skip
        fig.add_bar(
            x=labels, y=[1] * len(labels), marker={"color": [_rgb(c) for c in strip], "line": {"width": 0}},
            row=1, col=col, hovertext=[f"final stain: {_stain_name(trace, s, d)}" for s, d in zip(sel["stain"], sel["dead"])],
            hoverinfo="text", showlegend=False,
        )  # fmt: skip
        fig.update_yaxes(title_text=ytitle, row=2, col=col, type="category")
        fig.update_yaxes(visible=False, row=1, col=col)
        fig.update_xaxes(
            title_text="neuron (ordered by final stain)",
            row=2,
            col=col,
            type="category",
            showticklabels=len(labels) <= 64,
        )
    fig.update_layout(
        height=max(300, 140 + 16 * max(len(history), len(per_class))), margin={"t": 50, "b": 40}, bargap=0
    )
    return fig


def _stain_name(trace: Trace, stain: int, dead: bool) -> str:
    if dead:
        return "dead"
    return "unstained" if stain < 0 else plots._class_label(trace, int(stain))


# -- representations and interventions --------------------------------------------------------------
def _has_module(name: str) -> bool:
    return importlib.util.find_spec(f"nn_staining.{name}") is not None


def _representation_sections(trace: Trace) -> list[Section]:
    """CKA between layers, linear-probe accuracy, PCA spectra and an embedding, when the trace has a probe set."""
    if not trace.meta.get("probe") or not _has_module("representations"):
        return []
    import plotly.express as px
    from plotly.subplots import make_subplots

    from . import representations as rep

    last = trace.epochs[-1]
    parts = []
    probed = rep.probe_layers(trace)  # a large model: its blocks' outputs and head, as the figures draw it
    cka_layers, _, cka_note = plots.representative_layers(trace, probed, plots.MAX_CKA_LAYERS)
    line_layers, _, line_note = plots.representative_layers(trace, probed, plots.MAX_LINE_LAYERS)
    frame = rep.cka(trace, epoch=last, layers=cka_layers if cka_note else None)
    names = list(dict.fromkeys(frame.index.get_level_values("layer_a")))  # model order
    cka = frame["cka"].droplevel("epoch").unstack("layer_b").reindex(index=names, columns=names)
    fig = px.imshow(
        cka.to_numpy(), x=names, y=names, zmin=0, zmax=1, color_continuous_scale="Viridis",
        labels={"color": "linear CKA"}, title=f"Linear CKA between layers, epoch {last}",
    )  # fmt: skip
    fig.update_layout(height=420 + 12 * len(names))
    parts.append(_figure_html(fig, "cka"))
    probe = rep.linear_probe(trace, layers=line_layers if line_note else None).reset_index()
    colours = plots.layer_palette(len(line_layers) if line_note else len(names) or 1)
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=(
            "linear-probe accuracy (held-out half of the probe set)",
            "PCA: explained variance, last epoch",
        ),
    )
    for i, (layer, rows) in enumerate(probe.groupby("layer", sort=False)):
        colour = _rgb(colours[i % len(colours)])
        fig.add_scatter(
            x=rows["epoch"],
            y=rows["accuracy"],
            name=layer,
            mode="lines+markers",
            line={"color": colour},
            row=1,
            col=1,
            legendgroup=layer,
        )
    if len(probe):
        fig.add_scatter(
            x=[probe["epoch"].min(), probe["epoch"].max()],
            y=[probe["chance"].iloc[0]] * 2,
            name="chance",
            mode="lines",
            line={"color": "#888888", "dash": "dot"},
            row=1,
            col=1,
        )
    spectrum = rep.pca_spectrum(trace, epochs=[last], layers=line_layers if line_note else None).reset_index()
    for i, (layer, rows) in enumerate(spectrum.groupby("layer", sort=False)):
        colour = _rgb(colours[i % len(colours)])
        rows = rows.head(20)
        fig.add_scatter(
            x=rows["component"] + 1,
            y=rows["cumulative"],
            name=layer,
            mode="lines+markers",
            line={"color": colour},
            row=1,
            col=2,
            legendgroup=layer,
            showlegend=False,
        )
    fig.update_xaxes(title_text="epoch", row=1, col=1)
    fig.update_xaxes(title_text="principal components", row=1, col=2)
    fig.update_yaxes(title_text="accuracy", row=1, col=1)
    fig.update_yaxes(title_text="cumulative explained variance", row=1, col=2)
    fig.update_layout(height=420)
    parts.append(_figure_html(fig, "probe"))
    layer = names[-1] if names else trace.layers[-1]
    emb = rep.embedding(trace, last, layer)
    palette = plots.class_palette(trace.num_classes or int(emb["label"].max()) + 1)
    fig = px.scatter(
        emb.assign(cls=[plots._class_label(trace, int(c)) for c in emb["label"]]), x="x", y="y", color="cls",
        color_discrete_sequence=[_rgb(c) for c in palette],
        category_orders={"cls": [plots._class_label(trace, c) for c in range(len(palette))]},
        title=f"Probe samples at {layer}, epoch {last}: the top two principal components",
        labels={"cls": "class", "x": "principal component 1", "y": "principal component 2"},
    )  # fmt: skip
    fig.update_layout(height=480)
    parts.append(_figure_html(fig, "embedding"))
    text = (
        "<p>From the probe set recorded with the trace: linear CKA near 1 means two layers represent the probe samples "
        "alike up to rotation and scale; the linear probe says how decodable the classes are at each layer.</p>"
    )
    if cka_note and cka_note == line_note:
        note = f"CKA, probe accuracy and PCA spectra: {cka_note}."
    else:
        note = " ".join(
            [f"CKA: {cka_note}."] * bool(cka_note)
            + [f"Probe accuracy and PCA spectra: {line_note}."] * bool(line_note)
        )
    return [Section("representations", "Representations", text + "".join(parts), note)]


def _intervention_sections(trace: Trace) -> list[Section]:
    """Per layer, the accuracy change of each class when a stain's neurons are ablated (``intervene.load_effects``)."""
    if not (trace.path / "interventions").is_dir() or not _has_module("intervene"):
        return []  # (importing intervene imports torch: only when the run has stored effects)
    from . import intervene

    effects = intervene.load_effects(trace.path)
    if effects is None or effects.empty:
        return []
    from plotly.subplots import make_subplots

    effects = effects.reset_index() if "layer" not in effects.columns else effects
    layers = [k for k in trace.layers if k in set(effects["layer"])] or sorted(set(effects["layer"]))
    layers, _, note = plots.representative_layers(trace, layers, plots.MAX_EFFECT_PANELS)  # a large model's
    epoch = int(effects["epoch"].max()) if "epoch" in effects.columns else None
    if epoch is not None:
        effects = effects[effects["epoch"] == epoch]
    limit = float(np.nanmax(np.abs(effects["acc_change"].to_numpy(dtype=float)))) or 1.0
    cols = min(len(layers), MAX_EFFECT_COLUMNS)  # more panels go on more rows
    grid = [(1 + i // cols, 1 + i % cols) for i in range(len(layers))]
    fig = make_subplots(
        rows=grid[-1][0], cols=cols, subplot_titles=layers, horizontal_spacing=0.06,
        **({"vertical_spacing": 0.3 / grid[-1][0]} if grid[-1][0] > 1 else {}),
    )  # fmt: skip
    for i, layer in enumerate(layers, start=1):
        row, col = grid[i - 1]
        rows = effects[effects["layer"] == layer]
        matrix = rows.pivot_table(index="stain_class", columns="eval_class", values="acc_change")
        control = rows.pivot_table(index="stain_class", columns="eval_class", values="control_acc_change")
        control = control.reindex(index=matrix.index, columns=matrix.columns)
        fig.add_heatmap(
            z=matrix.to_numpy(dtype=float), x=[plots._class_label(trace, int(c)) for c in matrix.columns],
            y=[plots._class_label(trace, int(c)) for c in matrix.index], customdata=control.to_numpy(dtype=float),
            colorscale="RdBu", zmid=0, zmin=-limit, zmax=limit, showscale=i == len(layers), row=row, col=col,
            colorbar={"title": {"text": "accuracy change"}},
            hovertemplate="ablate stain %{y}<br>accuracy on %{x}: %{z:+.3f}<br>random control: %{customdata:+.3f}<extra></extra>",
        )  # fmt: skip
        fig.update_xaxes(title_text="evaluated class", row=row, col=col, type="category")
        fig.update_yaxes(title_text="ablated stain" if col == 1 else None, row=row, col=col, type="category")
    fig.update_layout(height=460 * grid[-1][0], width=max(520, 380 * cols))
    text = (
        f"<p>Each cell: the change in a class's held-out accuracy when the neurons stained for a class are ablated"
        f"{f' (epoch {epoch})' if epoch is not None else ''}; hover shows the same change for random neurons of the "
        "same count (the control). A stain is causal when its diagonal drop is larger than the control's.</p>"
    )
    return [
        Section(
            "interventions",
            "Interventions: ablating stains",
            text + _figure_html(fig, "effects", responsive=False),
            f"{note[0].upper()}{note[1:]}." if note else "",
        )
    ]


# -- page ---------------------------------------------------------------------------------------------
def _figure_html(fig, div_id: str, responsive: bool = True) -> str:
    import plotly.io as pio

    return pio.to_html(
        fig,
        full_html=False,
        include_plotlyjs=False,
        div_id=div_id,
        auto_play=False,
        config={"responsive": responsive, "displaylogo": False},
        validate=not isinstance(fig, dict),
    )


def _rgb(colour, alpha: float | None = None) -> str:
    r, g, b = (int(round(255 * float(v))) for v in colour[:3])
    return f"rgb({r},{g},{b})" if alpha is None else f"rgba({r},{g},{b},{alpha})"


def _page(trace: Trace, sections: list[Section], plotly_js: str, history: dict[str, Any]) -> str:
    """The whole page: plotly.js once in the head, the sections, the history data and the click script."""
    palette = [_rgb(c) for c in plots.class_palette(trace.num_classes or 0)]
    data = {
        "history": history,
        "classes": [plots._class_label(trace, c) for c in range(trace.num_classes or 0)],
        "palette": palette,
        "first": next(
            (sig for sig in reversed(list(history)) if sig.startswith(trace.layers[-1] + "/")), None
        ),
    }
    nav = " · ".join(f'<a href="#{s.key}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(
        f'<section id="{s.key}"><h2>{html.escape(s.title)}</h2>'
        + (f'<p class="note">{html.escape(s.note)}</p>' if s.note else "")
        + s.body
        + "</section>"
        for s in sections
    )
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"nn_staining report: {trace.path.name}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_CSS}</style>
<script>window.__nnErrors = []; window.addEventListener("error", e => window.__nnErrors.push(String(e.message)));</script>
<script type="text/javascript">{plotly_js}</script>
</head><body>
<header><h1>{html.escape(title)}</h1><p>nn_staining {__version__}, written {stamp}. {nav}</p></header>
{body}
<script type="application/json" id="nn-data">{_json(data)}</script>
<script>{_SCRIPT}</script>
</body></html>
"""


def _json(value: Any) -> str:
    """JSON safe inside a script element."""
    return json.dumps(value, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")


_CSS = """
body { font-family: system-ui, sans-serif; margin: 0 2em 3em; color: #222; }
header { border-bottom: 1px solid #ccc; margin-bottom: 1em; }
section { margin: 1.5em 0 2.5em; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
table.summary th { background: #f4f4f4; }
.note { color: #7a4b00; background: #fff6e0; padding: 4px 8px; display: inline-block; }
.history { width: 900px; height: 340px; }
.tablewrap { max-height: 320px; overflow: auto; display: inline-block; }
#history-table td { text-align: right; font-variant-numeric: tabular-nums; }
"""

_SCRIPT = (
    """
(function () {
  const data = JSON.parse(document.getElementById("nn-data").textContent);
  function fmt(v) { return v === null ? "–" : Number(v).toPrecision(6); }
  function showHistory(sig) {
    const h = data.history[sig];
    if (!h) { return false; }
    document.getElementById("history-title").textContent = "Neuron history: " + sig;
    const traces = [
      {x: h.epoch, y: h.act_mean, name: "mean activation", mode: "lines+markers", line: {color: "black", width: 3}},
      {x: h.epoch, y: h.bias, name: "bias", mode: "lines", line: {color: "#777777", dash: "dash"}},
    ];
    h.class_means.forEach(function (values, c) {
      traces.push({x: h.epoch, y: values, name: "mean on " + data.classes[c], mode: "lines",
                   line: {color: data.palette[c]}});
    });
    Plotly.react("__HISTORY__", traces, {
      title: {text: sig + ": mean, per-class means and bias over epochs"}, margin: {t: 40},
      xaxis: {title: {text: "epoch"}}, yaxis: {title: {text: "activation / bias"}},
    }, {displaylogo: false});
    const head = "<tr><th>epoch</th><th>mean</th><th>bias</th>" +
      data.classes.map(c => "<th>mean on " + c + "</th>").join("") + "</tr>";
    const rows = h.epoch.map(function (e, i) {
      return "<tr><td>" + e + "</td><td>" + fmt(h.act_mean[i]) + "</td><td>" + fmt(h.bias[i]) + "</td>" +
        h.class_means.map(v => "<td>" + fmt(v[i]) + "</td>").join("") + "</tr>";
    });
    document.getElementById("__TABLE__").innerHTML = head + rows.join("");
    return true;
  }
  window.nnStaining = {showHistory: showHistory, data: data};
  if (data.first) { showHistory(data.first); }
  const graph = document.getElementById("__GRAPH__");
  if (graph && graph.on) {
    graph.on("plotly_click", function (event) {
      const point = event.points && event.points[0];
      if (point && point.customdata) { showHistory(point.customdata); }
    });
  }
})();
""".replace("__HISTORY__", HISTORY_ID)
    .replace("__TABLE__", HISTORY_TABLE_ID)
    .replace("__GRAPH__", GRAPH_ID)
)
