"""The report of a large model: torchvision's resnet18 (``zoo.resnet18`` at width 8, 60 recorded layers)
is drawn as the figures draw it (``plots.layer_summary``): 9 block columns of class shares and the head
(``L_avgpool``, ``L_fc``) neuron by neuron, the other per-layer sections summarised, a note saying so.

The checks read what the page draws (the plotly data it embeds, and in Chromium the laid-out SVG) and
compare it with shares counted here from ``staining.selectivity`` and blocks found here from the layer names.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
from test_report import _plotly_figure, browser, screenshot, wait_for  # noqa: F401 (browser: a fixture)

from nn_staining import staining as st
from nn_staining.report import GRAPH_ID, write_report
from tests import zoo

CLASSES = 10
BLOCKS = ["conv1–maxpool", "layer1.0", "layer1.1", "layer2.0", "layer2.1"] + [
    "layer3.0", "layer3.1", "layer4.0", "layer4.1",
]  # fmt: skip
HEAD = ["L_avgpool", "L_fc"]
#: What the next block reads: the layers drawn for the blocks in the CKA, probe and intervention views.
OUTPUTS = ["L_maxpool"] + [f"L_layer{s}.{b}.relu:2" for s in range(1, 5) for b in range(2)]
NOTE = "58 layers in 9 blocks summarised (grouped by module name); head (2 layers: L_avgpool, L_fc)"


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    """zoo.resnet18(10 classes, width 8) on 32×32 random images, a class's bright square in one channel, for
    two epochs; 16 of them are the probe set; ablation effects stored for every layer."""
    intervene = pytest.importorskip("nn_staining.intervene")
    model = zoo.resnet18(num_classes=CLASSES, width=8)
    x, y = zoo.square_images(64, CLASSES, 32)
    store = tmp_path_factory.mktemp("report_large") / "resnet18"
    trace = zoo.record_training(model, store, x, y, CLASSES, probe=(x[:16], y[:16]))
    rows = [
        {"layer": k, "stain_class": s, "eval_class": e, "acc_change": -0.3 if s == e else 0.01,
         "control_acc_change": -0.02, "epoch": 1}
        for k in trace.layers for s in range(CLASSES) for e in range(CLASSES)
    ]  # fmt: skip
    intervene.save_effects(trace, pd.DataFrame(rows))
    return trace


@pytest.fixture(scope="module")
def page(resnet) -> str:
    return write_report(resnet).read_text()


def expected_blocks(trace) -> dict[str, list[str]]:
    """Each block's layers, by module-name prefix (top-level modules together), from the layer names."""
    blocks: dict[str, list[str]] = {label: [] for label in BLOCKS}
    for layer in trace.layers[: -len(HEAD)]:
        name = layer[2:].split(":")[0]
        blocks[next((b for b in BLOCKS if name.startswith(b + ".")), BLOCKS[0])].append(layer)
    return blocks


def block_shares(trace, layers: list[str], epoch: int) -> np.ndarray:
    """Share of the layers' units stained for each class, then unstained and dead, counted from selectivity."""
    sel = st.selectivity(trace, epoch).xs(epoch, level="epoch")
    rows = sel[sel.index.get_level_values("layer").isin(layers)]
    stain, dead = rows["stain"].to_numpy(), rows["dead"].to_numpy()
    counts = [((stain == c) & ~dead).sum() for c in range(CLASSES)]
    counts += [((stain < 0) & ~dead).sum(), dead.sum()]
    units = sum(trace.layer_info(k)["neurons"] for k in layers)
    assert len(rows) == units
    return np.array(counts) / units


def frames(page: str, div_id: str) -> list[dict]:
    """The animation frames a plotly div was given (plotly.py's addFrames call)."""
    start = re.search(rf"Plotly\.addFrames\('{div_id}',\s*", page).end()
    return json.JSONDecoder().raw_decode(page, start)[0]


def test_graph_draws_a_column_per_block_with_its_class_shares_and_the_head_in_detail(resnet, page) -> None:
    figure = _plotly_figure(page, GRAPH_ID)
    data, layout = figure["data"], figure["layout"]
    blocks = expected_blocks(resnet)
    assert len(layout["xaxis"]["tickvals"]) == len(BLOCKS) + len(HEAD) == 11  # was 61 (x, then every layer)
    ticks = layout["xaxis"]["ticktext"]
    assert [t.split("<br>")[0] for t in ticks] == [*BLOCKS, *HEAD]
    for tick, layers in zip(ticks, blocks.values()):
        assert f"<br>{len(layers)} layers<br>" in tick

    bars = [d for d in data if d["type"] == "bar"]
    assert len(bars) == CLASSES + 2  # one per stain, stacked: classes, unstained, dead
    last = resnet.epochs[-1]
    expected = np.array([block_shares(resnet, layers, last) for layers in blocks.values()])  # blocks × stains
    assert expected[:, :CLASSES].sum() > 0  # some units are stained: the class bars are tested
    drawn = np.array([bar["y"] for bar in bars], dtype=float).T
    np.testing.assert_allclose(drawn, expected, atol=1e-6)
    tops = 1 - np.cumsum(expected, axis=1)
    np.testing.assert_allclose(np.array([bar["base"] for bar in bars], dtype=float).T, tops, atol=1e-6)
    assert all(list(bar["x"]) == list(range(len(BLOCKS))) for bar in bars)
    hover = bars[0]["hovertext"][3]  # layer2.0: its layers and shares
    assert all(k in hover for k in blocks["layer2.0"]) and "8 layers, 128 units" in hover
    assert f"class 0: {expected[3, 0]:.1%}" in hover and f"unstained: {expected[3, CLASSES]:.1%}" in hover

    nodes = {d["name"]: d for d in data if d["name"].startswith("nodes:")}
    assert list(nodes) == [f"nodes:{k}" for k in HEAD]
    for col, layer in enumerate(HEAD, start=len(BLOCKS)):
        assert set(np.asarray(nodes[f"nodes:{layer}"]["x"], float)) == {col}
        assert len(nodes[f"nodes:{layer}"]["x"]) == resnet.layer_info(layer)["neurons"]
    edges = [d for d in data if d["name"] == "edge" and len(d["x"])]
    assert edges and all(set(d["x"]) <= {len(BLOCKS), len(BLOCKS) + 1} for d in edges)  # pathways in the head

    first = frames(page, GRAPH_ID)[0]  # the slider's epoch 0 restyles the bars and the labels
    assert first["name"] == str(resnet.epochs[0])
    at_first = np.array([block_shares(resnet, layers, resnet.epochs[0]) for layers in blocks.values()])
    frame_bars = [d for d in first["data"] if "base" in d]
    np.testing.assert_allclose(np.array([d["y"] for d in frame_bars], float).T, at_first, atol=1e-6)
    stained = 1 - at_first[:, CLASSES:].sum(axis=1)
    labels = first["layout"]["xaxis"]["ticktext"][: len(BLOCKS)]
    assert [t.rsplit("<br>", 1)[1] for t in labels] == [f"{v:.0%} stained" for v in stained]


def test_the_note_says_what_was_summarised(page) -> None:
    notes = re.findall(r'<section id="(\w+)"><h2>[^<]*</h2><p class="note">([^<]*)</p>', page)
    notes = dict(notes)
    assert NOTE + " shown neuron by neuron" in notes["graph"] and "A block&#x27;s bar" in notes["graph"]
    assert NOTE + " shown neuron by neuron" in notes["scan"]
    assert NOTE + " in full; a block is drawn by its output" in notes["representations"]
    assert NOTE + " in full" in notes["interventions"]


def test_other_sections_are_summarised(resnet, page) -> None:
    from nn_staining import representations as rep

    # brain scan: one heatmap pair for the blocks, then the head's layers
    assert re.findall(r'id="scan-([^"]+)"', page) == ["blocks", *HEAD]
    scan = _plotly_figure(page, "scan-blocks")["data"]
    history, shares = (np.asarray(d["z"], dtype=float) for d in scan)
    blocks = list(expected_blocks(resnet).values())
    for col, epoch in enumerate(resnet.epochs):
        stained = [block_shares(resnet, layers, epoch)[:CLASSES].sum() for layers in blocks]
        np.testing.assert_allclose(history[:, col], stained, atol=1e-9)
    last = resnet.epochs[-1]
    np.testing.assert_allclose(shares, [block_shares(resnet, layers, last) for layers in blocks], atol=1e-9)

    # CKA between each block's output and the head's layers, probe and PCA lines for them
    cka = _plotly_figure(page, "cka")["data"][0]
    assert list(cka["x"]) == [*OUTPUTS, *HEAD]
    frame = rep.cka(resnet, epoch=last)["cka"]
    expected = [[frame[(last, a, b)] for b in cka["x"]] for a in cka["x"]]
    np.testing.assert_allclose(np.asarray(cka["z"], dtype=float), expected, rtol=1e-6)
    probe = _plotly_figure(page, "probe")["data"]
    lines = [d["name"] for d in probe if d.get("xaxis", "x") == "x" and d["name"] != "chance"]
    assert lines == [*OUTPUTS, *HEAD]

    # interventions: the same 11 layers, three panels a row
    effects = _plotly_figure(page, "effects")
    titles = [a["text"] for a in effects["layout"]["annotations"]]
    assert titles == [*OUTPUTS, *HEAD]
    assert effects["layout"]["width"] <= 1200

    # the summary's layer table: a row per block and per head layer; every layer behind a <details>
    table = re.search(r'<h3>Layers</h3>.*?<table class="layers">(.*?)</table>', page, re.S).group(1)
    assert table.count("<tr") == 1 + len(BLOCKS) + len(HEAD)
    assert "layer2.0 (block of 8 layers)</td><td>Conv2d ×3, BatchNorm2d ×3, ReLU ×2" in table
    assert "<details><summary>All 60 layers</summary>" in page


def test_large_report_fits_the_window_in_a_browser(browser, resnet, page, tmp_path) -> None:  # noqa: F811
    report = resnet.path / "report.html"
    browser.get(report.resolve().as_uri())
    assert wait_for(lambda: browser.find_elements("css selector", f"#{GRAPH_ID} g.xtick text"))
    graph = browser.find_element("id", GRAPH_ID)
    browser.execute_script("arguments[0].scrollIntoView()", graph)
    screenshot(browser, tmp_path, "report_large.png")
    width = browser.execute_script("return document.documentElement.scrollWidth")
    assert width <= 1400  # the window: no section overflows it (the graph drew 61 columns in 1,240 px before)
    assert graph.rect["width"] <= 1400
    boxes = browser.execute_script(
        "return [...arguments[0].querySelectorAll('g.xtick text')].map(t => t.getBoundingClientRect())"
        ".map(r => [r.left, r.right])",
        graph,
    )
    assert len(boxes) == len(BLOCKS) + len(HEAD)
    assert all(a[1] <= b[0] for a, b in zip(boxes, boxes[1:])), "column labels overlap"
    bars = browser.find_elements("css selector", f"#{GRAPH_ID} g.barlayer g.point path")
    assert len(bars) >= len(BLOCKS)  # the block columns' stacked bars are drawn
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
    assert browser.execute_script("return window.__nnErrors") == []
