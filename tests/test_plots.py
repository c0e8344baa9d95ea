"""nn_staining.plots and figures: every figure function returns a labelled Figure and saves as PNG."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

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
