"""nn_staining.plots and figures: every figure function returns a labelled Figure and saves as PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib as mpl  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import nn  # noqa: E402

from nn_staining import (  # noqa: E402
    NetworkTrace,
    figures,  # noqa: E402
    load_trace,
    plots,
)
from nn_staining import staining as st  # noqa: E402
from nn_staining.figures import save_figures  # noqa: E402
from nn_staining.models import SimpleNN  # noqa: E402


def record_run(store, classes: int, hidden: int = 8, epochs: int = 3):
    """Train a small SimpleNN on Gaussian blobs for a few epochs, logging metrics and a confusion matrix."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    y = torch.arange(40 * classes) % classes
    x = torch.randn(len(y), 5, generator=g)
    x[torch.arange(len(y)), y % 5] += 2.0 * (1 + y // 5)
    model = SimpleNN(5, hidden, classes)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    names = [f"c{c}" for c in range(classes)]
    with NetworkTrace(model, store, num_classes=classes, class_names=names) as trace:
        for epoch in range(epochs):
            trace.start_epoch(epoch)
            for start in range(0, len(x), 40):
                xb, yb = x[start : start + 40], y[start : start + 40]
                trace.set_targets(yb)
                loss = nn.functional.cross_entropy(model(xb), yb)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            trace.end_epoch()
            with torch.no_grad():
                predictions = model(x).argmax(1)
            accuracy = float((predictions == y).float().mean())
            trace.log_metrics(
                epoch, loss=loss.item(), train_acc=accuracy, test_loss=loss.item(), test_acc=accuracy
            )
        confusion = np.zeros((classes, classes), dtype=int)
        np.add.at(confusion, (y.numpy(), predictions.numpy()), 1)
        trace.log_metrics(None, test_confusion=confusion)
    return load_trace(store)


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return record_run(tmp_path_factory.mktemp("plots") / "tiny", classes=3)


def titles(fig: Figure) -> str:
    text = [fig._suptitle.get_text()] if fig._suptitle else []
    return " ".join(text + [ax.get_title() for ax in fig.axes])


def assert_labelled(fig: Figure, run: str) -> None:
    assert isinstance(fig, Figure)
    assert run in fig._suptitle.get_text() and "epoch" in fig._suptitle.get_text()
    for ax in fig.axes:
        if (
            ax.get_visible()
            and ax.axison
            and ax.get_label() != "<colorbar>"
            and ax.get_images() + ax.get_lines()
        ):
            assert ax.get_xlabel() and ax.get_ylabel(), ax.get_title()


def assert_saves(fig: Figure, path) -> None:
    fig.savefig(path, dpi=50)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def legend_labels(fig: Figure) -> list[str]:
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return [t.get_text() for legend in legends for t in legend.get_texts()]


def test_staining_graph(trace, tmp_path):
    fig = plots.plot_staining_graph(trace, epoch=-1, top_k=3)
    assert_labelled(fig, "tiny")
    assert "epoch 2" in fig._suptitle.get_text()
    ax = fig.axes[0]
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["x (inputs)", *trace.layers]
    labels = legend_labels(fig)
    assert {"0: c0", "1: c1", "2: c2", "unstained"} <= set(labels)
    assert any("dead" in label for label in labels)
    assert len(ax.get_lines()) >= 3  # paths drawn
    assert_saves(fig, tmp_path / "graph.png")


def test_staining_graph_samples_wide_layers_and_says_so(trace):
    fig = plots.plot_staining_graph(trace, max_nodes=4, top_k=1)
    notes = [t.get_text() for t in fig.axes[0].texts if t.get_text().startswith("showing")]
    assert [n.split("\n")[0] for n in notes] == ["showing 4 of 5", "showing 4 of 8", "showing 4 of 8"]


def test_brain_scan(trace, tmp_path):
    fig = plots.plot_brain_scan(trace, epoch=1)
    assert_labelled(fig, "tiny")
    assert "class panels at epoch 1" in fig._suptitle.get_text()
    images = [ax for ax in fig.axes if ax.get_images() and ax.get_ylabel() in ("epoch", "class")]
    assert len(images) == 2 * len(trace.layers)
    assert {ax.get_ylabel() for ax in images} == {"epoch", "class"}
    assert all(ax.get_xlabel() == "neuron (ordered by final stain)" for ax in images)
    assert {"0: c0", "unstained", "dead"} <= set(legend_labels(fig))
    assert_saves(fig, tmp_path / "scan.png")


def test_stain_evolution(trace, tmp_path):
    fig = plots.plot_stain_evolution(trace)
    assert_labelled(fig, "tiny")
    left, right = fig.axes
    assert left.get_xlabel() == "epoch" and "fraction" in left.get_ylabel()
    assert "settling epoch" in right.get_xlabel()
    assert legend_labels(fig)[: len(trace.layers)] == trace.layers  # outside the axes, on the right
    assert not any(ax.get_legend() for ax in fig.axes)
    assert_saves(fig, tmp_path / "evolution.png")


def test_weight_drift(trace, tmp_path):
    fig = plots.plot_weight_drift(trace)
    assert_labelled(fig, "tiny")
    assert "‖Δw‖" in fig.axes[0].get_ylabel()
    assert [ax.get_ylabel() for ax in fig.axes[1:]] == ["bias"] * 3
    assert "0: c0" in legend_labels(fig)
    assert_saves(fig, tmp_path / "drift.png")


def test_training_curves_and_confusion(trace, tmp_path):
    fig = plots.plot_training_curves(trace)
    assert_labelled(fig, "tiny")
    assert [ax.get_ylabel() for ax in fig.axes] == ["cross-entropy loss", "accuracy"]
    assert legend_labels(fig)[:2] == ["training", "held-out"]
    assert_saves(fig, tmp_path / "curves.png")
    fig = plots.plot_confusion(trace)
    assert_labelled(fig, "tiny")
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0: c0", "1: c1", "2: c2"]
    assert_saves(fig, tmp_path / "confusion.png")


def test_unit_health(trace, tmp_path):
    fig = plots.plot_unit_health(trace)
    assert_labelled(fig, "tiny")
    assert "dead" in titles(fig) and "saturated" in titles(fig) and "exploding" in titles(fig)
    assert_saves(fig, tmp_path / "health.png")


def test_save_figures_writes_every_png_and_leaves_no_pyplot_state(trace, tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "DPI", 40)
    paths = save_figures(trace, tmp_path / "figures")
    assert [p.name for p in paths] == [
        "staining_graph.png",
        "brain_scan.png",
        "class_means.png",
        "stain_evolution.png",
        "weight_drift.png",
        "unit_health.png",
        "training_curves.png",
        "confusion.png",
        "staining_graph_animation.gif",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths[:-1])
    assert paths[-1].read_bytes()[:6] == b"GIF89a"
    assert plt.get_fignums() == []


def test_ten_classes_get_ten_distinct_colours(tmp_path):
    palette = plots.class_palette(10)
    assert len(set(palette)) == 10
    assert to_rgb(plots.UNSTAINED_COLOUR) not in palette
    assert all(max(c) - min(c) > 0.15 for c in palette)  # no greys
    assert len(set(plots.class_palette(25))) == 25
    trace = record_run(tmp_path / "ten", classes=10, hidden=12, epochs=2)
    stains = st.selectivity(trace, epoch=-1)
    assert stains["stain"].max() <= 9
    fig = plots.plot_staining_graph(trace, top_k=1, stains=stains)
    labels = legend_labels(fig)
    assert [f"{c}: c{c}" for c in range(10)] == labels[:10]
    assert_saves(fig, tmp_path / "ten.png")


def expected_order(sel) -> list[int]:
    """Neuron ids of one layer's selectivity rows in the graph's order, computed with plain Python:
    classes ascending, then unstained, then dead; within a group by decreasing selectivity."""
    rows = sel.reset_index()
    group = [2e6 if d else (1e6 if s < 0 else s) for s, d in zip(rows["stain"], rows["dead"])]
    keys = sorted(zip(group, [-np.nan_to_num(v, nan=-1) for v in rows["selectivity"]], range(len(rows))))
    return [int(rows["neuron"][i]) for _, _, i in keys]


def gid_artist(fig: Figure, gid: str):
    found = [a for ax in fig.axes for a in ax.get_children() if a.get_gid() == gid]
    assert len(found) == 1, (gid, len(found))
    return found[0]


def test_neuron_rings_circle_the_named_neurons_with_width_growing_with_the_value(trace):
    sel = st.selectivity(trace, epoch=-1).xs(trace.epochs[-1], level="epoch")
    order = expected_order(sel.xs("L_hidden_1", level="layer"))
    rings = pd.Series(
        [0.4, 0.1, 0.0],
        index=pd.MultiIndex.from_tuples(
            [("L_hidden_1", order[2]), ("L_hidden_1", order[5]), ("L_output", 1)]
        ),
        name="accuracy drop",
    )
    fig = plots.plot_staining_graph(trace, neuron_rings=rings)
    ring = gid_artist(fig, "rings")
    column = trace.layers.index("L_hidden_1") + 1
    n = trace.layer_info("L_hidden_1")["neurons"]
    expected = [[column, 1 - (2 + 0.5) / n], [column, 1 - (5 + 0.5) / n]]
    np.testing.assert_allclose(ring.get_offsets(), expected)  # the zero-valued ring is not drawn
    np.testing.assert_allclose(ring.get_linewidths(), [0.5 + 3.5, 0.5 + 3.5 * 0.1 / 0.4])
    assert ring.get_facecolors().size == 0 or ring.get_facecolors()[:, 3].max() == 0
    assert "ring: accuracy drop = 0.4" in legend_labels(fig)
    with pytest.raises(ValueError, match="non-negative"):
        plots.plot_staining_graph(trace, neuron_rings=rings * -1)
    with pytest.raises(KeyError, match="L_nope"):
        plots.plot_staining_graph(
            trace, neuron_rings=pd.Series([1.0], index=pd.MultiIndex.from_tuples([("L_nope", 0)]))
        )


# -- what is drawn equals what is computed, independently of plots.py ------------------------------
def expected_node_colours(sel, classes: int) -> np.ndarray:
    """The stain colours of selectivity rows, by the README's rule: the class colour tinted towards white
    from selectivity 0.5 (full) down to the 0.1 threshold (30% of the colour); grey when unstained."""
    palette = np.array(plots.class_palette(classes))
    strength = np.clip((np.nan_to_num(sel["selectivity"].to_numpy()) - 0.1) / 0.4, 0, 1)
    tint = 0.3 + 0.7 * strength
    out = np.tile(np.array(to_rgb(plots.UNSTAINED_COLOUR)), (len(sel), 1))
    stained = sel["stain"].to_numpy() >= 0
    out[stained] = 1 - tint[stained, None] * (1 - palette[sel["stain"].to_numpy()[stained]])
    return out


def test_graph_nodes_are_sorted_by_stain_and_coloured_by_it(trace):
    fig = plots.plot_staining_graph(trace)
    sel = st.selectivity(trace, epoch=-1).xs(trace.epochs[-1], level="epoch")
    for column, layer in enumerate(trace.layers, start=1):
        rows = sel.xs(layer, level="layer")
        order = expected_order(rows)
        nodes = gid_artist(fig, f"nodes:{layer}")
        offsets = nodes.get_offsets()
        assert (offsets[:, 0] == column).all()
        np.testing.assert_allclose(offsets[:, 1], 1 - (np.arange(len(order)) + 0.5) / len(order))
        np.testing.assert_allclose(nodes.get_facecolors()[:, :3], expected_node_colours(rows.loc[order], 3))
        dead = rows.loc[order, "dead"].to_numpy()
        if dead.any():
            np.testing.assert_allclose(gid_artist(fig, f"dead:{layer}").get_offsets()[:, 1], offsets[dead, 1])
    assert len({tuple(c) for c in gid_artist(fig, "nodes:L_hidden_1").get_facecolors()[:, :3].round(3)}) > 1


def brute_force_paths(trace, top_k: int) -> dict[tuple[int, str, str], int]:
    """Every path x → L_input → L_hidden_1 → L_output/n_c scored by numpy (product of the edges' shares
    W[j,k]·E[x_k|c] / Σ_k |W[j,k]·E[x_k|c]|); the edges of each class's top_k positive paths, with their signs."""
    epoch = trace.epochs[-1]
    shares = []
    for layer in ("L_input", "L_hidden_1", "L_output"):
        weights = trace.weights(epoch, layer).astype(float)
        means = (
            trace.inputs(f"E_{epoch}/{layer}")["mean"]
            .droplevel(["epoch", "layer"])
            .unstack("class")
            .to_numpy()
        )
        contrib = weights[None] * means.T[:, None, :]
        shares.append(contrib / np.abs(contrib).sum(-1, keepdims=True))
    edges = {}
    for c in range(trace.num_classes):
        s0, s1, s2 = shares[0][c], shares[1][c], shares[2][c][c]
        scores = s0.T[:, :, None] * s1.T[None, :, :] * s2[None, None, :]  # (x, input neuron, hidden neuron)
        flat = np.argsort(-scores, axis=None)[:top_k]
        for k, i, j in zip(*np.unravel_index(flat, scores.shape)):
            if scores[k, i, j] <= 0:
                continue
            for key, share in (
                ((c, f"x/n_{k}", f"L_input/n_{i}"), s0[i, k]),
                ((c, f"L_input/n_{i}", f"L_hidden_1/n_{j}"), s1[j, i]),
                ((c, f"L_hidden_1/n_{j}", f"L_output/n_{c}"), s2[j]),
            ):
                edges[key] = 1 if share >= 0 else -1
    return edges


def test_graph_edges_are_the_top_paths_with_their_signs(trace):
    fig = plots.plot_staining_graph(trace, top_k=4)
    drawn = {}
    for line in fig.axes[0].get_lines():
        gid = line.get_gid() or ""
        if gid.startswith("edge:"):
            _, c, edge = gid.split(":", 2)
            source, target = edge.split("->")
            drawn[(int(c), source, target)] = -1 if line.get_linestyle() == "--" else 1
            assert to_rgb(line.get_color()) == plots.class_palette(3)[int(c)]
    expected = brute_force_paths(trace, 4)
    assert drawn == expected
    assert -1 in expected.values() and 1 in expected.values()  # both kinds are drawn, differently
    labels = legend_labels(fig)
    assert "excitatory edge (mean contribution > 0)" in labels and "inhibitory edge (< 0)" in labels


def test_evidence_marks_say_whether_high_or_low_inputs_are_the_evidence(trace):
    fig = plots.plot_staining_graph(trace, top_k=4)
    epoch = trace.epochs[-1]
    means = trace.inputs(f"E_{epoch}/L_input")["mean"].droplevel(["epoch", "layer"])
    marks = [a for a in fig.axes[0].collections if (a.get_gid() or "").startswith("evidence:")]
    assert marks
    for mark in marks:
        _, c, source = mark.get_gid().split(":", 2)
        k = int(source.rsplit("_", 1)[1])
        high = means[(k, int(c))] > 0
        path = mark.get_paths()[0].vertices
        style = mpl.markers.MarkerStyle("^" if high else "v")
        expected_marker = style.get_path().transformed(style.get_transform()).vertices
        np.testing.assert_allclose(path / np.abs(path).max(), expected_marker / np.abs(expected_marker).max())


def image_run(store):
    """A 2×2-pixel 'image' data set (2 classes: bright top row or bright bottom row) on SimpleNN, with the
    image shape in the trace's config, as main.py records it."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    y = torch.arange(80) % 2
    x = torch.randn(80, 4, generator=g) * 0.3
    x[y == 0, :2] += 1.5
    x[y == 1, 2:] += 1.5
    model = SimpleNN(4, 6, 2)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    config = {
        "image_shape": [1, 2, 2],
        "feature_names": [f"pixel ({r},{c})" for r in range(2) for c in range(2)],
    }
    with NetworkTrace(model, store, num_classes=2, config=config) as t:
        for epoch in range(2):
            t.start_epoch(epoch)
            t.set_targets(y)
            loss = nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            t.end_epoch()
    return load_trace(store)


def test_image_inputs_are_drawn_on_their_pixel_grid(tmp_path):
    trace = image_run(tmp_path / "pixels")
    fig = plots.plot_staining_graph(trace, top_k=2)
    grid = gid_artist(fig, "nodes:x")
    xy = grid.get_offsets()
    assert len(np.unique(xy[:, 0].round(6))) == 2 and len(np.unique(xy[:, 1].round(6))) == 2
    assert xy[0, 1] > xy[2, 1] and xy[0, 0] < xy[1, 0]  # pixel (0,0) top left, (1,0) below it
    layout = plots.graph_layout(trace, top_k=2)
    starts = layout.edges[layout.edges["source"].str.startswith("x/")]
    strongest = starts.sort_values("score").groupby("source").tail(1)
    expected = np.tile(np.array(to_rgb("white")), (4, 1))
    for c, source in zip(strongest["target_class"], strongest["source"]):
        expected[int(source.rsplit("_", 1)[1])] = plots.class_palette(2)[c]
    np.testing.assert_allclose(grid.get_facecolors()[:, :3], expected)
    assert not (expected == 1).all()
    marks = [t for t in fig.axes[0].texts if t.get_text() in (plots.HIGH_MARK, plots.LOW_MARK)]
    assert len(marks) == len(strongest)
    assert any(t.get_text() == "input pixels (2×2)" for t in fig.axes[0].texts)


def test_colour_scales_are_sequential_for_non_negative_data_and_show_clipping():
    values = np.arange(1001.0)
    scale = plots.colour_scale(values)
    assert scale.sequential and scale.vmin == 0 and scale.vmax == pytest.approx(np.percentile(values, 99))
    assert scale.clipped and scale.extend == "max" and scale.cmap == "viridis"
    assert "99th percentile" in scale.describe() and "±" not in scale.describe()
    signed = plots.colour_scale(np.array([-3.0, 1.0, 2.0]), percentile=100)
    assert not signed.sequential and (signed.vmin, signed.vmax) == (-3.0, 3.0) and not signed.clipped
    assert signed.extend == "neither" and signed.cmap == "RdBu_r"
    empty = plots.colour_scale(np.array([np.nan, np.inf]))  # nothing finite: a unit scale, not a crash
    assert (empty.vmin, empty.vmax, empty.sequential, empty.clipped) == (-1.0, 1.0, False, False)
    assert plots.colour_scale(np.array([0, 1, 2], dtype=np.int64)).vmax == pytest.approx(
        np.percentile([0, 1, 2], 99)
    )


def test_brain_scan_images_are_the_trace_in_stain_order(trace):
    fig = plots.plot_brain_scan(trace, epoch=1)
    sel = st.selectivity(trace, epoch=-1).xs(trace.epochs[-1], level="epoch")
    images = [ax for ax in fig.axes if ax.get_images() and ax.get_ylabel() in ("epoch", "class")]
    means = trace.query("E_*/L_*", columns=["act_mean"])["act_mean"]
    classes = trace.classes("E_1/L_*", columns=["act_mean"])["act_mean"]
    for i, layer in enumerate(trace.layers):
        order = expected_order(sel.xs(layer, level="layer"))
        history = means.xs(layer, level="layer").unstack("neuron")[order].to_numpy()
        per_class = classes.xs((1, layer), level=["epoch", "layer"]).unstack("neuron")[order].to_numpy()
        left, right = images[2 * i], images[2 * i + 1]
        np.testing.assert_allclose(left.get_images()[0].get_array(), history, rtol=1e-6)
        np.testing.assert_allclose(right.get_images()[0].get_array(), per_class, rtol=1e-6)
        for ax, data in ((left, history), (right, per_class)):
            image = ax.get_images()[0]
            nonneg = (data >= 0).all()
            assert (image.get_cmap().name == "viridis") == nonneg
            bar = image.colorbar
            assert bar.extend == plots.colour_scale(data).extend
            assert ("clipped at" in bar.ax.get_ylabel()) == plots.colour_scale(data).clipped
        strip = [a for a in left.child_axes][0].get_images()[0].get_array()[0]
        np.testing.assert_allclose(strip[~sel.xs(layer, level="layer").loc[order, "dead"].to_numpy()],
                                   expected_node_colours(sel.xs(layer, level="layer").loc[order], 3)[
                                       ~sel.xs(layer, level="layer").loc[order, "dead"].to_numpy()])  # fmt: skip


def test_confusion_matrix_rows_are_true_classes_and_columns_predictions(trace):
    matrix = np.array([[5, 1, 0], [2, 7, 3], [0, 4, 9]])
    fig = plots.plot_confusion(trace, matrix=matrix)
    ax = fig.axes[0]
    mesh = ax.collections[0]
    np.testing.assert_array_equal(np.asarray(mesh.get_array()).reshape(3, 3), matrix)
    cells = {
        (round(t.get_position()[1] - 0.5), round(t.get_position()[0] - 0.5)): t.get_text() for t in ax.texts
    }
    assert cells == {(i, j): str(matrix[i, j]) for i in range(3) for j in range(3)}
    assert ax.get_ylabel() == "true class" and ax.get_xlabel() == "predicted class"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0: c0", "1: c1", "2: c2"]
    assert ax.yaxis_inverted()  # row 0 on top
    assert "accuracy 0.677 on 31 samples" in fig._suptitle.get_text()


def test_line_figures_draw_the_computed_series(trace):
    evolution = st.stain_evolution(trace)
    fig = plots.plot_stain_evolution(trace, evolution)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for layer in trace.layers:
        np.testing.assert_allclose(
            lines[layer].get_ydata(), evolution.layers.xs(layer, level="layer")["stained_frac"]
        )
    drift = st.weight_drift(trace)
    fig = plots.plot_weight_drift(trace)
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for layer in trace.layers:
        np.testing.assert_allclose(lines[layer].get_ydata(), drift.xs(layer, level="layer")["median"])
    fig = plots.plot_training_curves(trace)
    for ax, columns in zip(fig.axes, (["loss", "test_loss"], ["train_acc", "test_acc"])):
        for line, column in zip(ax.get_lines(), columns):
            np.testing.assert_allclose(line.get_ydata(), trace.metrics[column])


def test_paths_per_class_fall_from_five_to_three_beyond_three_classes(trace):
    assert [plots.default_top_k(c) for c in (1, 2, 3, 4, 10)] == [5, 5, 5, 3, 3]
    assert plots.graph_layout(trace).top_k == 5


def test_layer_palette_tells_twelve_layers_apart():
    palette = np.array(plots.layer_palette(12))
    distances = np.sqrt(((palette[:, None] - palette[None]) ** 2).sum(-1))
    assert distances[np.triu_indices(12, 1)].min() > 0.12
    assert len({tuple(c) for c in plots.layer_palette(30)}) == 30
    beyond = plots.layer_palette(22)[20:]  # past the 20 listed colours: hues spaced evenly from red
    np.testing.assert_allclose(beyond, [mpl.colors.hsv_to_rgb((h, 0.6, 0.6)) for h in (0.0, 0.5)])
    assert plots.layer_palette(12) == plots.layer_palette(30)[:12]
    assert plots.graph_size(13)[0] <= 16.0  # a 12-layer staining graph fits one screen at 120 dpi


def test_unit_health_says_why_a_panel_is_empty(trace):
    fig = plots.plot_unit_health(trace)
    dead_ax, saturated_ax, exploding_ax = fig.axes
    assert saturated_ax.get_lines() == [] and exploding_ax.get_lines() == []
    assert "no tanh or sigmoid layers" in " ".join(t.get_text() for t in saturated_ax.texts)
    assert "no NaN or Inf" in " ".join(t.get_text() for t in exploding_ax.texts)
    health = st.unit_health(trace)
    for line in dead_ax.get_lines():
        np.testing.assert_allclose(
            line.get_ydata(), health.layers.xs(line.get_label(), level="layer")["dead_frac"]
        )
        assert line.get_ydata().max() > 0


def test_class_means_map_rows_are_z_scored_profiles_of_the_named_neurons(trace):
    fig = plots.plot_class_means(trace, -1, layers=["L_hidden_1"])
    ax = next(a for a in fig.axes if a.get_xlabel() == "class")
    drawn = np.asarray(ax.collections[0].get_array()).reshape(8, 3)
    neurons = [int(t.get_text()[2:]) for t in ax.get_yticklabels()]
    means = trace.classes(f"E_{trace.epochs[-1]}/L_hidden_1", columns=["act_mean"])["act_mean"].unstack(
        "class"
    )
    profiles = means.droplevel(["epoch", "layer"]).loc[neurons].to_numpy(dtype=np.float64)
    z = (profiles - profiles.mean(1, keepdims=True)) / profiles.std(1, keepdims=True)
    np.testing.assert_allclose(drawn, z, rtol=1e-6, atol=1e-9)
    assert sorted(neurons) == list(range(8))


def test_animation_has_one_frame_per_epoch(trace, tmp_path):
    from PIL import Image

    path = plots.save_staining_animation(trace, tmp_path / "graph.gif", dpi=30)
    with Image.open(path) as gif:
        assert gif.n_frames == len(trace.epochs)
        frames = []
        for i in range(gif.n_frames):
            gif.seek(i)
            frames.append(np.asarray(gif.convert("RGB")))
    assert not np.array_equal(frames[0], frames[-1])  # stains change over training
    assert plt.get_fignums() == []


def test_class_means_colour_bar_is_right_of_every_map_and_strip(trace):
    """Attached to the maps, the colour bar landed between the first map and its stain strip."""
    fig = plots.plot_class_means(trace, -1)
    fig.canvas.draw()
    bar = next(a for a in fig.axes if a.get_ylabel() == "class mean, z-scored per neuron")
    panels = [a for a in fig.axes if a is not bar]
    assert len(panels) == 3 * len([k for k in trace.layers if trace.layer_info(k)["neurons"] >= 2])
    right = max(a.get_position().x1 for a in panels)
    assert bar.get_position().x0 >= right
    for ax in (a for a in panels if a.get_xlabel() == "class"):
        assert all(t.get_rotation() == 0 for t in ax.get_yticklabels())
