"""nn_staining.report: the self-contained HTML report, its embedded data, and the page in a real browser.

The browser test drives Debian's headless Chromium through Selenium with the system's chromedriver
(nothing downloaded, ``SE_AVOID_STATS=true``): it moves the epoch slider and checks the drawn node
colours against ``staining.selectivity`` at that epoch, and clicks a neuron and checks the numbers
shown against ``t.query`` and ``t.classes``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_plots import record_run

from nn_staining import cli, load_trace, plots
from nn_staining import staining as st
from nn_staining.report import GRAPH_ID, HISTORY_TABLE_ID, build_report, slider_epochs, write_report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
#: Where the browser test also saves its screenshots (unset: only under pytest's tmp_path).
SCREENSHOTS = os.environ.get("NN_STAINING_SCREENSHOTS")


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    return record_run(tmp_path_factory.mktemp("report") / "tiny", classes=3, hidden=8, epochs=4)


@pytest.fixture(scope="module")
def report(trace) -> Path:
    return write_report(trace)


def embedded(page: str) -> dict:
    match = re.search(r'<script type="application/json" id="nn-data">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def test_report_is_one_self_contained_file(trace, report) -> None:
    page = report.read_text()
    assert report == trace.path / "report.html"
    assert report.stat().st_size < 10_000_000
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=|@import", page)  # nothing loaded from elsewhere
    assert page.count("plotly.js v") >= 1 and page.count('<script type="text/javascript">') == 1
    for section in ("Run summary", "Training curves", "Staining graph over training", "Brain scan"):
        assert f">{section}</h2>" in page
    for layer in trace.layers:
        assert f'id="scan-{layer}"' in page


def test_embedded_histories_equal_the_trace(trace, report) -> None:
    data = embedded(report.read_text())
    assert data["classes"] == ["0: c0", "1: c1", "2: c2"]
    assert set(data["history"]) == {
        f"{k}/n_{n}" for k in trace.layers for n in range(trace.layer_info(k)["neurons"])
    }
    for sig in ("L_hidden_1/n_3", "L_output/n_1"):
        history = data["history"][sig]
        expected = trace.query(f"E_*/{sig}", columns=["act_mean", "bias"])
        classes = trace.classes(f"E_*/{sig}", columns=["act_mean"])["act_mean"].unstack("class")
        assert history["epoch"] == trace.epochs
        np.testing.assert_allclose(history["act_mean"], expected["act_mean"], rtol=1e-6)
        np.testing.assert_allclose(history["bias"], expected["bias"], rtol=1e-6)
        np.testing.assert_allclose(np.array(history["class_means"]).T, classes.to_numpy(), rtol=1e-6)


def test_slider_epochs_keep_first_and_last() -> None:
    assert slider_epochs([0, 1, 2], 40) == [0, 1, 2]
    picked = slider_epochs(list(range(100)), 10)
    assert picked[0] == 0 and picked[-1] == 99 and len(picked) == 10
    assert picked == sorted(set(picked))


def test_wide_layers_are_sampled_with_a_visible_note(trace) -> None:
    page = build_report(trace, max_nodes=4, max_epochs=2)
    assert "The slider shows 2 of the 4 recorded epochs" in page
    assert "L_hidden_1: showing 4 of 8" in page
    history = embedded(page)["history"]
    assert len([s for s in history if s.startswith("L_hidden_1/")]) == 4  # only drawn neurons carry histories


def test_report_command_writes_and_names_the_file(trace, tmp_path, capsys) -> None:
    out = tmp_path / "r.html"
    assert cli.main(["report", str(trace.path), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "MB" in printed
    assert out.read_text().startswith("<!DOCTYPE html>")
    assert cli.main(["report", str(tmp_path / "missing")]) == 2


def test_intervention_section_shows_the_stored_effects(trace, tmp_path) -> None:
    intervene = pytest.importorskip("nn_staining.intervene")
    run = tmp_path / "run"
    shutil.copytree(trace.path, run)
    rows = [
        {"layer": "L_hidden_1", "stain_class": s, "eval_class": e, "acc_change": -0.5 if s == e else 0.01 * (s + e),
         "control_acc_change": -0.02, "epoch": 3, "specificity": 0.4}
        for s in range(3) for e in range(3)
    ]  # fmt: skip
    intervene.save_effects(run, pd.DataFrame(rows))
    page = build_report(load_trace(run))
    assert ">Interventions: ablating stains</h2>" in page
    figure = _plotly_figure(page, "effects")
    z = np.array(figure["data"][0]["z"], dtype=float)
    np.testing.assert_allclose(z, [[-0.5, 0.01, 0.02], [0.01, -0.5, 0.03], [0.02, 0.03, -0.5]])
    assert ">Interventions" not in build_report(trace)  # no stored effects: no section


def _plotly_figure(page: str, div_id: str) -> dict:
    """The data and layout a plotly div was created with (plotly.py's newPlot call), with typed arrays decoded."""
    decoder = json.JSONDecoder()
    start = re.search(rf'Plotly\.newPlot\(\s*"{div_id}",\s*', page).end()
    data, end = decoder.raw_decode(page, start)
    layout, _ = decoder.raw_decode(page, re.compile(r",\s*").match(page, end).end())
    for entry in data:
        for key, value in list(entry.items()):
            if isinstance(value, dict) and "bdata" in value:
                import base64

                array = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
                shape = value.get("shape")
                entry[key] = array.reshape([int(v) for v in str(shape).split(",")]) if shape else array
    return {"data": data, "layout": layout}


# -- in a real browser ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    """Headless Chromium driven by the system's chromedriver; skipped (failed on CI) without them."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).exists()]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install -y chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run on CI: {reason}; .ci/run installs them")
        pytest.skip(reason)
    os.environ["SE_AVOID_STATS"] = "true"  # Selenium Manager: no statistics sent
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait_for(condition, timeout: float = 15.0):
    end = time.monotonic() + timeout
    while True:
        value = condition()
        if value or time.monotonic() > end:
            return value
        time.sleep(0.1)


def drawn_colours(driver, column: int) -> list[tuple[int, int, int]]:
    """The fill colours of the node markers of one graph column, as drawn in the SVG."""
    points = driver.find_elements("css selector", f"#{GRAPH_ID} g.tracenodes{column} path.point")
    styles = [p.get_attribute("style") for p in points]
    return [tuple(int(v) for v in re.search(r"fill: rgb\((\d+), (\d+), (\d+)\)", s).groups()) for s in styles]


def expected_colours(trace, epoch: int, layer: str, neurons: list[int]) -> list[tuple[int, int, int]]:
    sel = st.selectivity(trace, epoch=epoch).xs((epoch, layer), level=["epoch", "layer"]).loc[neurons]
    palette = plots.class_palette(trace.num_classes)
    rgb = plots.stain_colours(sel["stain"].to_numpy(), sel["selectivity"].to_numpy(), palette)
    return [tuple(int(round(255 * v)) for v in colour) for colour in rgb]


def screenshot(driver, tmp_path: Path, name: str) -> None:
    driver.save_screenshot(str(tmp_path / name))
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(SCREENSHOTS) / name))


def test_report_in_a_browser_slider_recolours_and_click_shows_history(
    browser, trace, report, tmp_path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    browser.get(report.resolve().as_uri())
    assert wait_for(lambda: browser.find_elements("css selector", f"#{GRAPH_ID} g.tracenodes1 path.point"))
    graph = browser.find_element("id", GRAPH_ID)
    browser.execute_script("arguments[0].scrollIntoView()", graph)
    screenshot(browser, tmp_path, "report_graph_last_epoch.png")
    column = 1 + trace.layers.index("L_hidden_1")
    neurons = [int(s.rsplit("_", 1)[1]) for s in browser.execute_script(
        "return arguments[0].data.find(t => t.uid === 'nodes' + arguments[1]).customdata", graph, column
    )]  # fmt: skip
    assert drawn_colours(browser, column) == expected_colours(trace, trace.epochs[-1], "L_hidden_1", neurons)

    rail = browser.find_element("css selector", f"#{GRAPH_ID} .slider-rail-touch-rect")
    width, steps = rail.size["width"], len(trace.epochs)
    for epoch in (0, 2):  # plotly's rail: steps evenly between 10 px insets
        offset = 10 + (width - 20) * trace.epochs.index(epoch) / (steps - 1) - width / 2
        ActionChains(browser).move_to_element_with_offset(rail, int(round(offset)), 0).click().perform()
        step = trace.epochs.index(epoch)

        def active(step: int = step) -> bool:
            return browser.execute_script("return arguments[0].layout.sliders[0].active", graph) == step

        assert wait_for(active), f"slider did not move to epoch {epoch}"
        expected = expected_colours(trace, epoch, "L_hidden_1", neurons)
        assert wait_for(lambda e=expected: drawn_colours(browser, column) == e), f"colours at epoch {epoch}"
        labels = [t.text for t in graph.find_elements("css selector", "text") if t.text.startswith("epoch ")]
        assert f"epoch {epoch}" in labels
    screenshot(browser, tmp_path, "report_graph_epoch_2.png")

    point = browser.find_elements("css selector", f"#{GRAPH_ID} g.tracenodes{column} path.point")[3]
    ActionChains(browser).move_to_element(point).click().perform()
    signature = f"L_hidden_1/n_{neurons[3]}"
    assert wait_for(lambda: browser.find_element("id", "history-title").text.endswith(signature))
    rows = [
        [cell.text for cell in row.find_elements("css selector", "td")]
        for row in browser.find_elements("css selector", f"#{HISTORY_TABLE_ID} tr")
    ][1:]
    shown = np.array([[float(v) for v in row] for row in rows])
    expected = trace.query(f"E_*/{signature}", columns=["act_mean", "bias"])
    classes = trace.classes(f"E_*/{signature}", columns=["act_mean"])["act_mean"].unstack("class")
    assert shown[:, 0].tolist() == trace.epochs
    np.testing.assert_allclose(shown[:, 1:3], expected[["act_mean", "bias"]].to_numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(shown[:, 3:], classes.to_numpy(), rtol=1e-5, atol=1e-7)
    history_lines = browser.execute_script("return document.getElementById('neuron-history').data.length")
    assert history_lines == 2 + trace.num_classes  # mean, bias and one line per class
    browser.execute_script("document.getElementById('history-title').scrollIntoView()")
    screenshot(browser, tmp_path, "report_history.png")

    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    assert browser.execute_script("return window.__nnErrors") == []


def test_representation_section_shows_cka_and_probe_accuracy(tmp_path) -> None:
    representations = pytest.importorskip("nn_staining.representations")
    import torch
    from torch import nn

    from nn_staining import NetworkTrace
    from nn_staining.models import SimpleNN

    torch.manual_seed(0)
    y = torch.arange(60) % 3
    x = torch.randn(60, 5)
    x[torch.arange(60), y] += 2.0
    model = SimpleNN(5, 6, 3)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    with NetworkTrace(model, tmp_path / "probed", num_classes=3, probe=(x[:30], y[:30])) as t:
        for epoch in range(2):
            t.start_epoch(epoch)
            t.set_targets(y)
            loss = nn.functional.cross_entropy(model(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            t.end_epoch()
    trace = load_trace(tmp_path / "probed")
    page = build_report(trace)
    assert ">Representations</h2>" in page
    cka = _plotly_figure(page, "cka")["data"][0]
    expected = representations.cka(trace, epoch=1)["cka"].droplevel("epoch").unstack("layer_b")
    layers = trace.layers  # model order, not alphabetical
    assert list(cka["x"]) == layers and list(cka["y"]) == layers
    np.testing.assert_allclose(
        np.asarray(cka["z"], dtype=float), expected.loc[layers, layers].to_numpy(), rtol=1e-6
    )
    accuracy = {d["name"]: d for d in _plotly_figure(page, "probe")["data"] if d.get("xaxis", "x") == "x"}
    probe = representations.linear_probe(trace)["accuracy"]
    for layer in layers:
        np.testing.assert_allclose(np.asarray(accuracy[layer]["y"], float), probe.xs(layer, level="layer"))


def test_element_ids_are_unique(report) -> None:
    """Plotly draws into document.getElementById(id): a section sharing a figure's id would receive the plot."""
    ids = re.findall(r'\bid="([^"]+)"', report.read_text())
    assert len(ids) == len(set(ids)), sorted(i for i in set(ids) if ids.count(i) > 1)


def test_a_small_model_is_drawn_layer_by_layer(trace, report) -> None:
    """Summaries are for large models (``plots.layer_summary``): the MLP keeps a column per layer and no note."""
    page = report.read_text()
    graph = _plotly_figure(page, GRAPH_ID)
    assert len(graph["layout"]["xaxis"]["tickvals"]) == 1 + len(trace.layers)  # the inputs, then every layer
    assert not [d for d in graph["data"] if d["type"] == "bar"] and "shapes" not in graph["layout"]
    assert "summarised" not in page and 'id="scan-blocks"' not in page and "<details>" not in page
