"""Figures of large models (issue 12): blocks summarised, the head neuron by neuron, one screen per figure.

torchvision's resnet18 (``zoo.resnet18`` at width 8: every module and name, 60 recorded layers) and a
4-layer BERT (53 layers) are recorded for two epochs of synthetic data; the tests check what each figure
draws against stains and fractions computed here from ``staining.selectivity``.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

from nn_staining import NetworkTrace, load_trace, plots  # noqa: E402
from nn_staining import staining as st  # noqa: E402
from tests import zoo  # noqa: E402

#: The figures are saved at 120 dpi; one screen is at most 2,400 px each way.
DPI = 120
SCREEN = 2400
RESNET_BLOCKS = ["conv1–maxpool", "layer1.0", "layer1.1", "layer2.0", "layer2.1"] + [
    "layer3.0", "layer3.1", "layer4.0", "layer4.1",
]  # fmt: skip
BERT_BLOCKS = ["bert.embeddings"] + [f"bert.encoder.layer.{i}" for i in range(4)]
BERT_HEAD = [
    "L_bert.encoder.layer.3.output.dropout",
    "L_bert.pooler.dense",
    "L_bert.pooler.activation",
    "L_dropout",
    "L_classifier",
]


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """zoo.resnet18 at width 8 on 16×16 images whose class shows as a bright square in one channel; 16 of
    them are the probe set."""
    model = zoo.resnet18(num_classes=4, width=8)
    x, y = zoo.square_images(64, 4, 16)
    store = tmp_path_factory.mktemp("large") / "resnet18"
    return zoo.record_training(model, store, x, y, 4, probe=(x[:16], y[:16]))


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A 4-layer BERT for 3 classes; a sequence's class is told by its first tokens."""
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=4, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=32, num_labels=3,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    g = torch.Generator().manual_seed(1)
    y = torch.arange(48) % 3
    ids = torch.randint(10, 50, (48, 8), generator=g)
    ids[:, :3] = (1 + 3 * y)[:, None]
    store = tmp_path_factory.mktemp("large") / "bert"
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    with NetworkTrace(model, store, num_classes=3) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            for start in range(0, 48, 16):
                trace.set_targets(y[start : start + 16])
                loss = model(input_ids=ids[start : start + 16], labels=y[start : start + 16]).loss
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            trace.end_epoch()
    return load_trace(store)


def pixels(fig: Figure) -> np.ndarray:
    return fig.get_size_inches() * DPI


def texts(fig: Figure) -> str:
    """Every text the figure draws: titles, axis labels, tick labels, free text."""
    found = [t.get_text() for t in fig.findobj(matplotlib.text.Text)]
    return "\n".join(found)


def block_shares(trace, layers: list[str], epoch: int) -> np.ndarray:
    """Share of the layers' units per class, unstained, dead: counted here from ``staining.selectivity``."""
    sel = st.selectivity(trace, epoch).xs(epoch, level="epoch")
    rows = sel[sel.index.get_level_values("layer").isin(layers)]
    stain, dead = rows["stain"].to_numpy(), rows["dead"].to_numpy()
    counts = [((stain == c) & ~dead).sum() for c in range(trace.num_classes)]
    counts += [((stain < 0) & ~dead).sum(), dead.sum()]
    units = sum(trace.layer_info(k)["neurons"] for k in layers)
    assert len(rows) == units
    return np.array(counts) / units


def expected_blocks(trace, labels: list[str], head: list[str]) -> dict[str, list[str]]:
    """The layers of each block by its module-name prefix, computed here from the layer names."""
    body = trace.layers[: len(trace.layers) - len(head)]
    blocks: dict[str, list[str]] = {label: [] for label in labels}
    for layer in body:
        name = layer[2:].split(":")[0]
        owner = next((b for b in labels if name.startswith(b + ".")), labels[0])
        blocks[owner].append(layer)
    return blocks


# -- the rule ------------------------------------------------------------------------------------------
def test_blocks_are_module_prefixes_and_the_head_is_the_classifier_chain(resnet, bert):
    summary = plots.layer_summary(resnet, plots.MAX_GRAPH_LAYERS)
    assert [b.label for b in summary.blocks] == RESNET_BLOCKS
    assert summary.detailed == ["L_avgpool", "L_fc"]  # the Linear chain and the layer feeding it
    assert sum(len(b.layers) for b in summary.blocks) + 2 == len(resnet.layers) == 60
    assert summary.blocks[0].layers == ["L_conv1", "L_bn1", "L_relu", "L_maxpool"]
    assert summary.blocks[3].layers == [k for k in resnet.layers if k.startswith("L_layer2.0.")]
    assert "58 layers in 9 blocks summarised" in summary.note and "L_avgpool, L_fc" in summary.note

    summary = plots.layer_summary(bert, plots.MAX_GRAPH_LAYERS)
    assert [b.label for b in summary.blocks] == BERT_BLOCKS
    assert summary.detailed == BERT_HEAD
    # more blocks than fit: neighbours are merged evenly, and the label says which
    merged = plots.layer_summary(bert, 7)
    assert [b.label for b in merged.blocks] == ["bert.embeddings–encoder.layer.1", "bert.encoder.layer.2–3"]
    assert merged.blocks[0].layers == [k for k in bert.layers if k < "L_bert.encoder.layer.2"]
    assert merged.detailed == BERT_HEAD
    assert "(5 layers: L_bert.encoder.layer.3.output.dropout … L_classifier)" in merged.note


def test_small_models_are_not_summarised(resnet):
    summary = plots.layer_summary(resnet, len(resnet.layers))
    assert summary.items == resnet.layers and summary.note == "" and summary.blocks == []


# -- the staining graph ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "labels", "head"),
    [("resnet", RESNET_BLOCKS, ["L_avgpool", "L_fc"]), ("bert", BERT_BLOCKS, BERT_HEAD)],
)
def test_staining_graph_fits_a_screen_with_blocks_as_bars_and_the_head_in_detail(request, name, labels, head):
    trace = request.getfixturevalue(name)
    fig = plots.plot_staining_graph(trace)
    width, height = pixels(fig)
    assert width <= SCREEN and height <= SCREEN
    ax = fig.axes[0]
    assert len(ax.get_xticks()) == len(labels) + len(head)  # one column per block and per head layer
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert [
        t.rsplit(" layers", 1)[0].rsplit("\n", 1)[0].replace("\n", "") for t in ticks[: len(labels)]
    ] == labels
    note = fig._supxlabel.get_text()
    layers = len(trace.layers) - len(head)
    assert f"{layers} layers in {len(labels)} blocks summarised" in note and "neuron by neuron" in note

    epoch = trace.epochs[-1]
    blocks = expected_blocks(trace, labels, head)
    patches = {p.get_gid(): p for p in ax.patches if p.get_gid()}
    palette = plots.class_palette(trace.num_classes)
    keys = [*range(trace.num_classes), "unstained", "dead"]
    for col, (label, layers_in) in enumerate(blocks.items()):
        shares = block_shares(trace, layers_in, epoch)
        assert f"{len(layers_in)} layers" in ticks[col]
        top = 1.0
        for key, share in zip(keys, shares):  # stacked from the top: classes, unstained, dead
            patch = patches.get(f"block:{label}:{key}")
            if share == 0:
                assert patch is None
                continue
            assert patch.get_height() == pytest.approx(share) and patch.get_y() == pytest.approx(top - share)
            assert patch.get_x() + patch.get_width() / 2 == pytest.approx(col)
            colour = (
                palette[key]
                if isinstance(key, int)
                else matplotlib.colors.to_rgb(
                    plots.UNSTAINED_COLOUR if key == "unstained" else plots.DEAD_COLOUR
                )
            )
            assert patch.get_facecolor()[:3] == pytest.approx(colour)
            top -= share

    sel = st.selectivity(trace, epoch).xs(epoch, level="epoch")
    for col, layer in enumerate(head, start=len(labels)):
        nodes = next(c for c in ax.collections if c.get_gid() == f"nodes:{layer}")
        rows = sel.xs(layer, level="layer")
        order = plots.neuron_order(rows)
        if len(order) > plots.MAX_NODES:
            continue  # sampled: the MLP tests cover the sample
        drawn = nodes.get_offsets()
        assert np.allclose(drawn[:, 0], col) and len(drawn) == trace.layer_info(layer)["neurons"]
        expected = plots.stain_colours(rows.loc[order, "stain"], rows.loc[order, "selectivity"], palette)
        assert np.allclose(nodes.get_facecolors()[:, :3], expected)


def test_staining_graph_labels_do_not_overlap(bert):
    fig = plots.plot_staining_graph(bert)
    renderer = FigureCanvasAgg(fig).get_renderer()
    fig.draw(renderer)
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].get_xticklabels()]
    for a, b in zip(boxes, boxes[1:]):
        assert a.x1 <= b.x0 + 1, "column labels overlap"
    assert max(b.x1 for b in boxes) <= fig.bbox.x1 and min(b.x0 for b in boxes) >= 0


def test_staining_graph_paths_stay_in_the_head(resnet):
    layout = plots.graph_layout(resnet, summary=plots.layer_summary(resnet, plots.MAX_GRAPH_LAYERS))
    assert layout.chain == ["L_fc"] and layout.x_column == "L_avgpool"
    layers = {s.rsplit("/n_", 1)[0] for s in pd.concat([layout.edges["source"], layout.edges["target"]])}
    assert layers == {"L_avgpool", "L_fc"}
    # the report's default layout is still every layer in detail
    assert plots.graph_layout(resnet).columns == resnet.layers


# -- the brain scan ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "labels", "head"),
    [("resnet", RESNET_BLOCKS, ["L_avgpool", "L_fc"]), ("bert", BERT_BLOCKS, BERT_HEAD)],
)
def test_brain_scan_fits_a_screen_with_a_row_per_block_and_the_head_in_detail(request, name, labels, head):
    trace = request.getfixturevalue(name)
    fig = plots.plot_brain_scan(trace)
    width, height = pixels(fig)
    assert width <= SCREEN and height <= SCREEN
    assert f"in {len(labels)} blocks summarised" in fig._suptitle.get_text()
    per_epoch = [
        ax.get_title(loc="left")
        for ax in fig.axes
        if ax.get_title(loc="left").endswith("mean activation per epoch")
    ]
    assert per_epoch == [f"{k}: mean activation per epoch" for k in head]

    maps = [ax for ax in fig.axes if any(im.get_gid() == "scan:blocks" for im in ax.images)]
    history, shares = (np.asarray(ax.images[0].get_array()) for ax in maps)
    assert history.shape == (len(labels), len(trace.epochs))
    assert shares.shape == (len(labels), trace.num_classes + 2)
    assert [t.get_text().split(" (")[0].replace("\n", "") for t in maps[0].get_yticklabels()] == labels
    for row, layers_in in enumerate(expected_blocks(trace, labels, head).values()):
        for col, epoch in enumerate(trace.epochs):
            stained = block_shares(trace, layers_in, epoch)[: trace.num_classes].sum()
            assert history[row, col] == pytest.approx(stained)
        assert shares[row] == pytest.approx(block_shares(trace, layers_in, trace.epochs[-1]))


# -- the line figures and the class means --------------------------------------------------------------------
def test_line_figures_draw_a_line_per_block_and_per_head_layer(resnet):
    names, note = plots.line_groups(resnet)
    lines = [f"{b} ({n} layers)" for b, n in zip(RESNET_BLOCKS, [4, 6, 6, 8, 6, 8, 6, 8, 6])]
    lines += ["L_avgpool", "L_fc"]
    assert list(dict.fromkeys(names.values())) == lines

    fig = plots.plot_stain_evolution(resnet)
    assert max(pixels(fig)) <= SCREEN and "in 9 blocks summarised" in fig._suptitle.get_text()
    drawn = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert [k for k in drawn if not k.endswith(" dead")] == lines
    blocks = expected_blocks(resnet, RESNET_BLOCKS, ["L_avgpool", "L_fc"])
    for label, layers_in in zip(lines, blocks.values()):
        expected = [block_shares(resnet, layers_in, e)[:4].sum() for e in resnet.epochs]
        assert drawn[label].get_ydata() == pytest.approx(expected)

    fig = plots.plot_unit_health(resnet)
    assert max(pixels(fig)) <= SCREEN and "in 9 blocks summarised" in fig._suptitle.get_text()
    legend = [t.get_text() for t in fig.legends[0].get_texts()] if fig.legends else []
    assert set(legend) <= set(lines)
    dead = {line.get_label(): line for line in fig.axes[0].get_lines()}
    for label, layers_in in zip(lines, blocks.values()):
        if label in dead:
            expected = [block_shares(resnet, layers_in, e)[-1] for e in resnet.epochs]
            assert dead[label].get_ydata() == pytest.approx(expected)

    fig = plots.plot_weight_drift(resnet)
    assert max(pixels(fig)) <= SCREEN
    assert [line.get_label() for line in fig.axes[0].get_lines()] == [k for k in lines if k != "L_avgpool"]
    assert [ax.get_title().split(":")[0] for ax in fig.axes[1:] if ax.get_title()] == ["L_fc"]
    assert "bias panels for the head only (1 of 21 layers with biases)" in fig._suptitle.get_text().replace(
        "\n", " "
    )


def test_class_means_draw_each_blocks_output_and_the_head(bert):
    fig = plots.plot_class_means(bert)
    assert max(pixels(fig)) <= SCREEN
    titles = [ax.get_title().replace("\n", "") for ax in fig.axes if ax.get_xlabel() == "class"]
    outputs = ["L_bert.embeddings.dropout"] + [
        f"L_bert.encoder.layer.{i}.output.LayerNorm" for i in range(3)
    ]  # what the next block reads
    assert [t.split("(")[0] for t in titles] == [*outputs, "L_bert.encoder.layer.3.output.dense", *BERT_HEAD]
    assert "in 5 blocks summarised" in fig._suptitle.get_text()


def test_cka_figures_show_each_blocks_output_and_the_head(resnet):
    from nn_staining import representations as rep

    probed = rep.probe_layers(resnet)
    assert len(probed) > plots.MAX_CKA_LAYERS
    fig = plots.plot_cka(resnet)
    assert max(pixels(fig)) <= SCREEN and "in 9 blocks summarised" in fig._suptitle.get_text()
    image = next(im for ax in fig.axes for im in ax.images if im.get_gid() == "cka")
    names = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    outputs = ["maxpool"] + [f"layer{s}.{b}.relu:2" for s in range(1, 5) for b in range(2)]
    assert names == [*outputs, "avgpool", "fc"]
    frame = rep.cka(resnet, epoch=-1)["cka"]
    epoch = resnet.epochs[-1]
    expected = [[frame[(epoch, f"L_{a}", f"L_{b}")] for b in names] for a in names]
    assert np.asarray(image.get_array()) == pytest.approx(np.array(expected), nan_ok=True)

    fig = plots.plot_cka_epochs(resnet)
    assert max(pixels(fig)) <= SCREEN and "in 9 blocks summarised" in fig._suptitle.get_text()
    assert [ax.get_title() for ax in fig.axes if ax.get_visible() and ax.images] == [
        *outputs,
        "avgpool",
        "fc",
    ]


def test_breadcrumbs_probe_accuracy_and_animation_of_a_large_model(resnet, tmp_path):
    fig = plots.plot_breadcrumbs(resnet, 0)
    assert max(pixels(fig)) <= SCREEN and "in 9 blocks summarised" in fig._supxlabel.get_text()
    assert len(fig.axes[0].get_xticks()) == len(RESNET_BLOCKS) + 2
    crumbs = [line for line in fig.axes[0].get_lines() if (line.get_gid() or "").startswith("breadcrumb:")]
    assert crumbs and all(np.all(np.isin(line.get_xdata(), [9, 10])) for line in crumbs)  # in the head

    fig = plots.plot_probe_accuracy(resnet)
    assert max(pixels(fig)) <= SCREEN and "in 9 blocks summarised" in fig._suptitle.get_text()
    drawn = [
        line.get_gid() for line in fig.axes[0].get_lines() if (line.get_gid() or "").startswith("probe:L_")
    ]
    assert drawn == ["probe:L_maxpool"] + [
        f"probe:L_layer{s}.{b}.relu:2" for s in range(1, 5) for b in range(2)
    ] + [
        "probe:L_avgpool",
        "probe:L_fc",
    ]

    path = plots.save_staining_animation(resnet, tmp_path / "graph.gif")
    from PIL import Image

    with Image.open(path) as gif:
        assert gif.n_frames == len(resnet.epochs) and max(gif.size) <= SCREEN
