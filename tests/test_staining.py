"""nn_staining.staining against independent computations: numpy on the same activations, brute force,
hand-built networks with planted class structure, and hand-made sick units."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, load_trace
from nn_staining import staining as st
from nn_staining.models import SimpleNN
from nn_staining.pipeline import RunConfig, run_pipeline


def record(
    model: nn.Module, store, x: torch.Tensor, y: torch.Tensor, num_classes: int, epochs: int = 1, lr=None
):
    """Record ``model`` on (x, y) in batches of 50; it trains (SGD) given ``lr``, else weights stay frozen."""
    optimiser = torch.optim.SGD(model.parameters(), lr=lr) if lr else None
    with NetworkTrace(model, store, num_classes=num_classes) as trace:
        for epoch in range(epochs):
            trace.start_epoch(epoch)
            for start in range(0, len(x), 50):
                xb, yb = x[start : start + 50], y[start : start + 50]
                trace.set_targets(yb)
                out = model(xb)
                if optimiser is not None:
                    loss = nn.functional.cross_entropy(out, yb)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
            trace.end_epoch()
    return load_trace(store)


def class_data(n: int, classes: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs: class c shifts feature c % features up by 1.5."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, features, generator=g)
    x[torch.arange(n), y % features] += 1.5
    return x, y


@pytest.fixture(scope="module")
def frozen(tmp_path_factory):
    """A random SimpleNN recorded for one epoch without training, with its data."""
    torch.manual_seed(0)
    model = SimpleNN(6, 7, 3)
    x, y = class_data(300, 3, 6, seed=1)
    trace = record(model, tmp_path_factory.mktemp("frozen") / "run", x, y, 3)
    return trace, model, x, y


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A SimpleNN trained for 6 epochs (its stains change)."""
    torch.manual_seed(2)
    model = SimpleNN(6, 12, 3)
    x, y = class_data(300, 3, 6, seed=3)
    return record(model, tmp_path_factory.mktemp("trained") / "run", x, y, 3, epochs=6, lr=0.3)


# -- selectivity ---------------------------------------------------------------------------------
def test_selectivity_index_by_hand():
    means = np.array([[4.0, 1.0, 1.0], [2.0, -1.0, np.nan], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    floor = np.array([0.0, -2.0, -1.0, 0.0])
    got = st.selectivity_index(means, floor)
    # row 0: Morcos (4-1)/(4+1); row 1: shifted [4, 1] (class 2 unseen); row 2: flat; row 3: all zero
    np.testing.assert_allclose(got, [0.6, 0.6, 0.0, 0.0])
    # the floor: the minimum, but no lower than 3 std below the mean, and never above 0
    floor = st.neuron_floor(
        np.array([-10.0, -1.0, 2.0]), np.array([0.0, 0.0, 5.0]), np.array([1.0, 1.0, 1.0])
    )
    np.testing.assert_allclose(floor, [-3.0, -1.0, 0.0])


def test_selectivity_matches_numpy_on_the_same_activations(frozen):
    trace, model, x, y = frozen
    with torch.no_grad():
        h0 = x.double() @ model.input.weight.double().T + model.input.bias.double()
        h1 = torch.relu(h0) @ model.hidden_1.weight.double().T + model.hidden_1.bias.double()
        h2 = torch.relu(h1) @ model.output.weight.double().T + model.output.bias.double()
    frame = st.selectivity(trace, epoch=0)
    assert frame.index.names == ["epoch", "layer", "neuron"]
    for layer, acts in zip(["L_input", "L_hidden_1", "L_output"], [h0, h1, h2]):
        a = acts.numpy()
        for n in range(a.shape[1]):
            values, labels = a[:, n], y.numpy()
            means = np.array([values[labels == c].mean() for c in range(3)])
            counts = np.array([(labels == c).sum() for c in range(3)])
            floor = min(0.0, max(values.min(), values.mean() - 3 * values.std()))
            shifted = np.clip(means - floor, 0, None)
            top, second = np.argsort(-means)[:2]
            rest = np.delete(shifted, top).mean()
            expected = (shifted[top] - rest) / (shifted[top] + rest)
            margin = (means[top] - means[second]) / values.std()
            row = frame.loc[(0, layer, n)]
            assert row["selectivity"] == pytest.approx(expected, abs=1e-4)
            assert row["stain_margin"] == pytest.approx(margin, abs=1e-4)
            assert row["top_class"] == top
            dead = layer != "L_output" and values.max() <= 0
            needed = max(st.MARGIN_THRESHOLD, 2 * np.sqrt(1 / counts[top] + 1 / counts[second]))
            stained = not dead and expected >= st.SELECTIVITY_THRESHOLD and margin >= needed
            assert row["stain"] == (top if stained else -1)
            assert bool(row["dead"]) == dead


def test_selectivity_epoch_selection(trained):
    every = st.selectivity(trained)
    assert sorted(every.index.get_level_values("epoch").unique()) == trained.epochs
    last = st.selectivity(trained, epoch=-1)
    pd.testing.assert_frame_equal(last, st.selectivity(trained, epoch=trained.epochs[-1]))
    pd.testing.assert_frame_equal(last, every.loc[[trained.epochs[-1]]])
    assert every["selectivity"].between(0, 1).all()
    with pytest.raises(KeyError, match="recorded epochs"):
        st.selectivity(trained, epoch=99)


# -- stain evolution -----------------------------------------------------------------------------
def brute_settling(row: list[int], epochs: list[int]) -> int:
    for i, epoch in enumerate(epochs):
        if all(s == row[i] for s in row[i:]):
            return epoch
    raise AssertionError


def test_settling_epochs_match_brute_force():
    rng = np.random.default_rng(0)
    stains = rng.integers(-1, 2, size=(200, 7))
    stains[:20] = stains[:20, :1]  # never change
    epochs = np.array([0, 2, 4, 6, 8, 10, 12])
    got = st.settling_epochs(stains, epochs)
    assert list(got) == [brute_settling(list(r), list(epochs)) for r in stains]


def test_stain_evolution_on_a_trained_trace(trained):
    frame = st.selectivity(trained)
    evolution = st.stain_evolution(trained)
    assert list(evolution.stains.columns) == trained.epochs
    for (layer, neuron), row in evolution.neurons.iterrows():
        history = [int(frame.loc[(e, layer, neuron), "stain"]) for e in trained.epochs]
        assert row["final_stain"] == history[-1]
        assert row["settling_epoch"] == brute_settling(history, trained.epochs)
        assert row["changes"] == sum(a != b for a, b in itertools.pairwise(history))
    for (epoch, layer), row in evolution.layers.iterrows():
        stains = frame.xs((epoch, layer), level=["epoch", "layer"])["stain"]
        assert row["stained_frac"] == pytest.approx((stains >= 0).mean())
    assert list(evolution.layers.index.get_level_values("layer")[:3]) == trained.layers


# -- contributions and pathways ------------------------------------------------------------------
def test_contributions_plus_bias_are_the_class_means(frozen):
    trace = frozen[0]
    classes = trace.classes("E_0/L_*")["act_mean"]
    for layer in trace.layers:
        contrib = st.contributions(trace, layer, epoch=0)
        bias = trace.query(f"E_0/{layer}", columns=["bias"])["bias"].to_numpy()
        expected = classes.xs(layer, level="layer").unstack("class").to_numpy()  # (neurons, classes)
        np.testing.assert_allclose(contrib.sum(-1) + bias[None, :], expected.T, rtol=1e-4, atol=1e-4)


def brute_paths(shares: list[np.ndarray], target: int) -> list[tuple[float, tuple[int, ...]]]:
    sizes = [shares[0].shape[1]] + [m.shape[0] for m in shares[:-1]]
    out = []
    for nodes in itertools.product(*(range(n) for n in sizes)):
        path = (*nodes, target)
        out.append((float(np.prod([m[path[i + 1], path[i]] for i, m in enumerate(shares)])), path))
    return sorted(out, key=lambda p: -p[0])


@pytest.mark.parametrize("sizes", [(5, 4, 3, 2), (9, 7, 8, 3), (4, 2), (3, 12, 2, 6, 2)])
@pytest.mark.parametrize("k", [1, 3, 10])
def test_top_paths_match_brute_force(sizes, k):
    rng = np.random.default_rng(sum(sizes) * k)
    shares = [rng.normal(size=(b, a)) for a, b in itertools.pairwise(sizes)]
    for target in range(sizes[-1]):
        scores, paths = st.top_paths(shares, target, k)
        expected = brute_paths(shares, target)[:k]
        np.testing.assert_allclose(scores, [s for s, _ in expected])
        assert paths == [p for _, p in expected]


def test_top_paths_in_small_chunks_match_brute_force(monkeypatch):
    monkeypatch.setattr(st, "_CANDIDATES_PER_STEP", 7)  # a few lower nodes per step
    rng = np.random.default_rng(7)
    shares = [rng.normal(size=(b, a)) for a, b in itertools.pairwise((6, 9, 5, 3))]
    scores, paths = st.top_paths(shares, 2, 6)
    expected = brute_paths(shares, 2)[:6]
    np.testing.assert_allclose(scores, [s for s, _ in expected])
    assert paths == [p for _, p in expected]


def test_pathways_match_brute_force_on_a_recorded_network(frozen):
    trace = frozen[0]
    layers = ["L_input", "L_hidden_1", "L_output"]
    assert st.linear_chain(trace) == layers
    for c in range(3):
        shares = []
        for layer in layers:
            w = trace.weights(0, layer).astype(np.float64)
            means = trace.inputs(f"E_0/{layer}")["mean"].xs(c, level="class").to_numpy(np.float64)
            contrib = w * means[None, :]
            shares.append(contrib / np.abs(contrib).sum(1, keepdims=True))
        expected = brute_paths(shares, c)[:8]
        got = st.pathways(trace, c, top_k=8)
        np.testing.assert_allclose(got["score"], [s for s, _ in expected], rtol=1e-6)
        names = ["x", *layers]
        assert list(got["path"]) == [tuple(f"{names[i]}/n_{n}" for i, n in enumerate(p)) for _, p in expected]
        assert (got["epoch"] == 0).all() and (got["target_class"] == c).all()


# -- planted structure ---------------------------------------------------------------------------
class Planted(nn.Module):
    """Class c is signalled by input features 2c and 2c+1; neuron c of every layer reads only those
    (through neuron c of the layer before); distractor neurons 3 and 4 read class-blind noise features."""

    def __init__(self) -> None:
        super().__init__()
        self.input, self.hidden_1, self.output = nn.Linear(8, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        with torch.no_grad():
            for layer in (self.input, self.hidden_1, self.output):
                layer.weight.zero_()
                layer.bias.zero_()
            for c in range(3):
                self.input.weight[c, [2 * c, 2 * c + 1]] = 1.0
                self.input.bias[c] = -1.0
                self.hidden_1.weight[c, c] = 1.0
                self.hidden_1.bias[c] = -0.5
                self.output.weight[c, c] = 1.0
            self.input.weight[3, 6] = self.input.weight[4, 7] = 1.0
            self.hidden_1.weight[3, 3] = self.hidden_1.weight[4, 4] = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden_1(torch.relu(self.input(x)))))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    g = torch.Generator().manual_seed(4)
    y = torch.arange(600) % 3
    x = 0.3 * torch.randn(600, 8, generator=g)
    x[:, 6:] = torch.randn(600, 2, generator=g)
    x[torch.arange(600), 2 * y] += 2.0
    x[torch.arange(600), 2 * y + 1] += 2.0
    return record(Planted(), tmp_path_factory.mktemp("planted") / "run", x, y, 3)


def test_selectivity_stains_exactly_the_planted_neurons(planted):
    frame = st.selectivity(planted, epoch=-1)
    for layer in ("L_input", "L_hidden_1"):
        stains = frame.xs(layer, level="layer")["stain"].droplevel("epoch")
        assert list(stains) == [0, 1, 2, -1, -1], layer
    assert list(frame.xs("L_output", level="layer")["stain"]) == [0, 1, 2]
    assert (frame.xs("L_output", level="layer")["selectivity"] > 0.99).all()


def test_top_paths_run_through_the_planted_neurons(planted):
    for c in range(3):
        paths = st.pathways(planted, c, top_k=3)
        planted_paths = {
            (f"x/n_{f}", f"L_input/n_{c}", f"L_hidden_1/n_{c}", f"L_output/n_{c}") for f in (2 * c, 2 * c + 1)
        }
        assert set(paths["path"][:2]) == planted_paths
        assert paths["score"][0] == pytest.approx(0.5, abs=0.05)
        assert paths["score"][2] < 0.01


def test_contribution_identity_on_the_planted_network(planted):
    classes = planted.classes("E_0/L_*")["act_mean"]
    for layer in planted.layers:
        bias = planted.query(f"E_0/{layer}", columns=["bias"])["bias"].to_numpy()
        expected = classes.xs(layer, level="layer").unstack("class").to_numpy().T
        np.testing.assert_allclose(st.contributions(planted, layer, 0).sum(-1) + bias, expected, atol=1e-4)


# -- real data -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("dataset", "classes"), [("breast_cancer", 2), ("digits", 10)])
def test_output_neurons_stain_with_their_own_class(tmp_path, dataset, classes):
    config = RunConfig(dataset=dataset, epochs=3, hidden=16, lr=1e-2, output_dir=str(tmp_path), figures=False)
    trace = load_trace(run_pipeline(config).store)
    assert trace.num_classes == classes
    output = st.selectivity(trace, epoch=-1).xs("L_output", level="layer")
    assert list(output["stain"]) == list(range(classes))
    evolution = st.stain_evolution(trace)
    assert evolution.layers["stained_frac"].between(0, 1).all()
    paths = st.pathways(trace, classes - 1, top_k=3)
    assert all(p[0].startswith("x/n_") and p[-1] == f"L_output/n_{classes - 1}" for p in paths["path"])


# -- unit health -----------------------------------------------------------------------------------
def test_unit_health_flags_dead_saturated_and_exploding_units(tmp_path):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -1.0  # ReLU unit 0 never fires
        model[2].weight.mul_(0.1)
        model[2].weight[1] = 0.0
        model[2].bias[1] = 5.0  # tanh unit 1 sits at tanh(5)
        model[4].weight[1, 0] = float("nan")  # output unit 1 is NaN
    x, y = class_data(200, 2, 4, seed=6)
    trace = record(model, tmp_path / "sick", x, y, 2, epochs=2)
    assert [trace.layer_info(k)["activation"] for k in trace.layers] == [None, "relu", None, "tanh", None]
    health = st.unit_health(trace)
    flags = health.neurons
    assert flags.index.names == ["epoch", "layer", "neuron"]
    for epoch in trace.epochs:
        at = flags.xs(epoch, level="epoch")
        assert set(at.index[at["dead"]]) == {("L_0", 0), ("L_1", 0)}
        assert set(at.index[at["saturated"]]) == {("L_3", 1)}
        assert set(at.index[at["exploding"]]) == {("L_4", 1)}
    layers = health.layers.xs(trace.epochs[-1], level="epoch")
    assert layers.loc["L_1", "dead_frac"] == pytest.approx(1 / 3)
    assert layers.loc["L_3", "saturated_frac"] == pytest.approx(1 / 3)
    assert layers.loc["L_4", "exploding_frac"] == pytest.approx(1 / 2)
    stains = st.selectivity(trace, epoch=-1)
    assert stains.loc[(1, "L_1", 0), "stain"] == -1 and stains.loc[(1, "L_4", 1), "stain"] == -1


def test_weight_drift_summarises_weight_delta_norm(trained):
    drift = st.weight_drift(trained)
    deltas = trained.query("E_*/L_*", columns=["weight_delta_norm"])["weight_delta_norm"]
    for (epoch, layer), row in drift.iterrows():
        values = deltas.xs((epoch, layer), level=["epoch", "layer"]).to_numpy()
        assert row["median"] == pytest.approx(np.median(values))
        assert row["q25"] == pytest.approx(np.quantile(values, 0.25))
    assert trained.epochs[0] not in drift.index.get_level_values("epoch")
