"""nn_staining.staining against independent computations: numpy on the same activations, brute force,
hand-built networks with planted class structure, and hand-made sick units."""

from __future__ import annotations

import itertools
import json
import logging
import re
import shutil
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import sklearn.datasets  # noqa: F401  (the real-data tests' import, paid once at collection: mutmut forks after it)
import torch
from conftest import Capture
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
    inf, nan = np.inf, np.nan
    means = np.array(
        [
            [4.0, 1.0, 1.0],  # Morcos (4-1)/(4+1)
            [2.0, -1.0, nan],  # shifted by 2: [4, 1], class 2 unseen and left out of μ'rest
            [1.0, 1.0, 1.0],  # flat
            [0.0, 0.0, 0.0],  # all zero
            [-3.0, 1.0, 3.0],  # shifted by 1, clipped at 0: [0, 2, 4] -> (4 - 1)/(4 + 1)
            [5.0, nan, nan],  # one class seen: undefined
            [nan, nan, nan],  # nothing seen
            [inf, 1.0, 1.0],  # not finite
            [1.0, 3.0, 2.0],  # top class in the middle: (3 - 1.5)/(3 + 1.5)
        ]
    )
    floor = np.array([0.0, -2.0, -1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0])
    np.testing.assert_allclose(
        st.selectivity_index(means, floor), [0.6, 0.6, 0.0, 0.0, 0.6, nan, nan, nan, 1 / 3]
    )
    np.testing.assert_allclose(
        st.selectivity_index(np.array([[3.0, 1.0], [1.0, 0.0]])), [0.5, 1.0]
    )  # floor 0
    np.testing.assert_allclose(st.selectivity_index(np.array([[3.0, 1.0]]), -1.0), [1 / 3])  # scalar floor


def test_neuron_floor_by_hand():
    """The floor: the minimum, but no lower than 3 std below the mean, and never above 0; a NaN minimum is ignored."""
    floor = st.neuron_floor(
        np.array([-10.0, -1.0, 2.0, np.nan, -0.5]),
        np.array([0.0, 0.0, 5.0, 0.0, 0.0]),
        np.array([1.0, 1.0, 1.0, 1.0, 0.25]),
    )
    np.testing.assert_allclose(floor, [-3.0, -1.0, 0.0, -3.0, -0.5])


def numpy_selectivity(
    values: np.ndarray,
    labels: np.ndarray,
    classes: int,
    judged_dead: bool,
    threshold: float = st.SELECTIVITY_THRESHOLD,
    min_margin: float = st.MARGIN_THRESHOLD,
    margin_z: float = st.MARGIN_Z,
) -> dict[str, object]:
    """One neuron's row of ``selectivity`` from its activations (float64) by the formulas of the docstring."""
    seen = [c for c in range(classes) if (labels == c).any()]
    means = np.array([values[labels == c].mean() if c in seen else np.nan for c in range(classes)])
    counts = np.array([(labels == c).sum() for c in range(classes)])
    floor = min(0.0, max(values.min(), values.mean() - 3 * values.std()))
    shifted = np.clip(means - floor, 0, None)
    ranked = sorted(seen, key=lambda c: (-means[c], c))  # highest mean first, ties to the lower class
    top = ranked[0]
    rest = np.mean([shifted[c] for c in seen if c != top])
    index = 0.0 if shifted[top] + rest == 0 else (shifted[top] - rest) / (shifted[top] + rest)
    second = ranked[1]
    margin = (means[top] - means[second]) / values.std() if values.std() > 0 else 0.0
    dead = judged_dead and (values.max() <= 0 or not (values > 0).any())
    needed = max(min_margin, margin_z * np.sqrt(1 / counts[top] + 1 / counts[second]))
    stained = not dead and index >= threshold and margin >= needed
    return {
        "selectivity": index,
        "stain_margin": margin,
        "top_class": top,
        "stain": top if stained else -1,
        "dead": dead,
    }


def simple_nn_activations(model: SimpleNN, x: torch.Tensor) -> dict[str, np.ndarray]:
    """SimpleNN's three Linear outputs in float64, by hand."""
    with torch.no_grad():
        h0 = x.double() @ model.input.weight.double().T + model.input.bias.double()
        h1 = torch.relu(h0) @ model.hidden_1.weight.double().T + model.hidden_1.bias.double()
        h2 = torch.relu(h1) @ model.output.weight.double().T + model.output.bias.double()
    return {"L_input": h0.numpy(), "L_hidden_1": h1.numpy(), "L_output": h2.numpy()}


def assert_selectivity_matches_numpy(
    frame: pd.DataFrame, acts: dict, labels: np.ndarray | dict[str, np.ndarray], classes: int, **kw
):
    assert frame.index.names == ["epoch", "layer", "neuron"]
    assert list(frame.columns) == ["stain", "selectivity", "stain_margin", "top_class", "dead"]
    assert [str(t) for t in frame.dtypes] == ["int64", "float64", "float64", "int64", "bool"]
    assert frame.index.droplevel("epoch").tolist() == [
        (layer, n) for layer, a in acts.items() for n in range(a.shape[1])
    ]
    for layer, a in acts.items():
        for n in range(a.shape[1]):
            observed = labels[layer] if isinstance(labels, dict) else labels
            judged = (
                kw.pop("judged", {}).get(layer, layer != "L_output")
                if "judged" in kw
                else layer != "L_output"
            )
            expected = numpy_selectivity(a[:, n], observed, classes, judged, **kw)
            row = frame.xs((layer, n), level=["layer", "neuron"]).iloc[0]
            assert row["selectivity"] == pytest.approx(expected["selectivity"], abs=1e-4), (layer, n)
            assert row["stain_margin"] == pytest.approx(expected["stain_margin"], abs=1e-4), (layer, n)
            for key in ("top_class", "stain", "dead"):
                assert row[key] == expected[key], (layer, n, key)


def test_selectivity_matches_numpy_on_the_same_activations(frozen):
    trace, model, x, y = frozen
    frame = st.selectivity(trace, epoch=0)
    assert_selectivity_matches_numpy(frame, simple_nn_activations(model, x), y.numpy(), 3)
    # the stains are not all alike, so the comparison above distinguishes stained from unstained
    assert set(frame["stain"]) >= {-1, 0, 1, 2}


@pytest.mark.parametrize(
    "kw",
    [
        {"threshold": 0.02, "min_margin": 0.0, "margin_z": 0.0},
        {"threshold": 0.5},
        {"min_margin": 0.6},
        {"margin_z": 0.5},
        {"margin_z": 6.0},
    ],
)
def test_selectivity_thresholds_match_numpy(frozen, kw):
    trace, model, x, y = frozen
    frame = st.selectivity(trace, epoch=0, **kw)
    assert_selectivity_matches_numpy(frame, simple_nn_activations(model, x), y.numpy(), 3, **kw)


def test_noise_margin_uses_the_counts_of_the_top_two_classes(tmp_path):
    """Classes of 240, 40 and 20 samples: the standard error of a neuron's lead depends on which two
    classes lead; a sweep of margin_z must match numpy for every neuron and flip some stain."""
    torch.manual_seed(8)
    model = SimpleNN(6, 7, 3)
    g = torch.Generator().manual_seed(12)
    y = torch.cat([torch.zeros(240), torch.ones(40), torch.full((20,), 2)]).long()[
        torch.randperm(300, generator=g)
    ]
    x = torch.randn(300, 6, generator=g)
    x[torch.arange(300), y] += 1.0
    trace = record(model, tmp_path / "run", x, y, 3)
    acts = simple_nn_activations(model, x)
    labels = y.numpy()
    counts = np.bincount(labels)
    flips = 0
    for z in (0.5, 1.0, 2.0, 3.0, 5.0, 8.0):
        kw = {"threshold": 0.0, "min_margin": 0.0, "margin_z": z}
        assert_selectivity_matches_numpy(st.selectivity(trace, epoch=0, **kw), acts, labels, 3, **kw)
        for a in acts.values():
            for n in range(a.shape[1]):
                means = np.array([a[labels == c, n].mean() for c in range(3)])
                top, second = np.argsort(-means, kind="stable")[:2]
                lead = (means[top] - means[second]) / a[:, n].std()
                right = lead >= z * np.sqrt(1 / counts[top] + 1 / counts[second])
                flips += right != (lead >= z * np.sqrt(2 / counts[second]))
                flips += right != (lead >= z * np.sqrt(2 / counts[top]))
    assert flips > 0  # the sweep tells the right standard error from the mixed-up ones


class SeqThenHead(nn.Module):
    """A Linear over 3 steps (each step an observation of its sample's class), then one over the step mean:
    the first layer counts 3 observations per sample, the second one. Named so that the model order
    (z_seq, a_head) is not the alphabetical one."""

    def __init__(self) -> None:
        super().__init__()
        self.z_seq, self.a_head = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a_head(self.z_seq(x).mean(1))


def test_noise_margin_uses_each_layers_own_counts(tmp_path):
    torch.manual_seed(11)
    model = SeqThenHead()
    g = torch.Generator().manual_seed(15)
    y = torch.cat([torch.zeros(150), torch.ones(50), torch.full((25,), 2)]).long()[
        torch.randperm(225, generator=g)
    ]
    x = torch.randn(225, 3, 4, generator=g)
    x[torch.arange(225), :, y] += 0.7
    trace = record(model, tmp_path / "run", x, y, 3)
    with torch.no_grad():
        seq = model.z_seq(x)
        acts = {
            "L_z_seq": seq.reshape(-1, 5).double().numpy(),
            "L_a_head": model.a_head(seq.mean(1)).double().numpy(),
        }
    labels = {"L_z_seq": np.repeat(y.numpy(), 3), "L_a_head": y.numpy()}
    assert trace.classes("E_0/L_z_seq/n_0")["act_count"].tolist() == [450, 150, 75]
    flips = 0
    for z in (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 12.0):
        kw = {"threshold": 0.0, "min_margin": 0.0, "margin_z": z}
        frame = st.selectivity(trace, epoch=0, **kw)
        assert_selectivity_matches_numpy(
            frame, acts, labels, 3, judged={"L_z_seq": True, "L_a_head": False}, **kw
        )
        for layer, a in acts.items():
            other = labels["L_a_head" if layer == "L_z_seq" else "L_z_seq"]
            for n in range(a.shape[1]):
                mine = numpy_selectivity(a[:, n], labels[layer], 3, False, **kw)["stain"]
                means = np.array([a[labels[layer] == c, n].mean() for c in range(3)])
                top, second = np.argsort(-means, kind="stable")[:2]
                counts = np.bincount(other)
                lead = (means[top] - means[second]) / a[:, n].std()
                theirs = lead >= z * np.sqrt(1 / counts[top] + 1 / counts[second])
                flips += (mine >= 0) != theirs
    assert flips > 0  # the sweep tells each layer's counts from the other layer's


def test_tied_class_means_stain_the_lowest_class(tmp_path):
    """20 classes, one input feature whose value is fixed per class; classes 11 and 15 tie for the top.
    numpy's default (unstable) argsort puts 15 first here; the stain must be 11."""
    values = [11, 9, 19, 4, 12, 0, 16, 15, 8, 1, 7, 25, 5, 2, 3, 25, 6, 17, 18, 10]
    model = nn.Sequential(nn.Linear(1, 1))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    y = torch.arange(400) % 20
    x = torch.tensor(values, dtype=torch.float32)[y][:, None]
    trace = record(model, tmp_path / "run", x, y, 20)
    means = trace.classes("E_0/L_0/n_0")["act_mean"].to_numpy()
    np.testing.assert_allclose(means, values, atol=1e-5)
    assert means[11] == means[15] == means.max()  # an exact tie
    row = st.selectivity(trace, epoch=0, threshold=0.0, min_margin=0.0, margin_z=0.0).iloc[0]
    assert row["top_class"] == 11 and row["stain"] == 11
    assert row["stain_margin"] == 0.0  # the runner-up is the tied class 15


def test_a_neuron_exactly_at_a_threshold_is_stained(frozen):
    trace = frozen[0]
    frame = st.selectivity(trace, epoch=0)
    stained = frame[frame["stain"] >= 0]
    assert len(stained) > 0
    for cell, row in stained.iterrows():
        at_index = st.selectivity(trace, epoch=0, threshold=row["selectivity"]).loc[cell, "stain"]
        above_index = st.selectivity(trace, epoch=0, threshold=np.nextafter(row["selectivity"], 2)).loc[
            cell, "stain"
        ]
        assert (at_index, above_index) == (row["stain"], -1), cell
        kw = {"threshold": 0.0, "margin_z": 0.0}
        at_margin = st.selectivity(trace, epoch=0, min_margin=row["stain_margin"], **kw).loc[cell, "stain"]
        above = st.selectivity(trace, epoch=0, min_margin=np.nextafter(row["stain_margin"], 99), **kw)
        assert (at_margin, above.loc[cell, "stain"]) == (row["stain"], -1), cell


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_selectivity_with_two_classes_one_never_seen(tmp_path):
    """Class 1 has no samples: its count is 0, which must not warn (1/0) nor stain anything."""
    torch.manual_seed(12)
    model = SimpleNN(6, 5, 2)
    x, _ = class_data(60, 2, 6, seed=16)
    trace = record(model, tmp_path / "run", x, torch.zeros(60, dtype=torch.long), 2)
    frame = st.selectivity(trace, epoch=0)
    assert (frame["stain"] == -1).all() and (frame["top_class"] == 0).all()
    assert frame["selectivity"].isna().all() and frame["stain_margin"].isna().all()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_selectivity_with_a_class_never_seen(tmp_path):
    """Class 2 has no samples: its mean is NaN, it is never the top class and is left out of μ'rest."""
    torch.manual_seed(3)
    model = SimpleNN(6, 7, 3)
    x, y = class_data(300, 2, 6, seed=8)
    trace = record(model, tmp_path / "run", x, y, 3)
    assert trace.classes("E_0/L_output/n_0")["act_count"].tolist() == [150, 150, 0]
    frame = st.selectivity(trace, epoch=0)
    assert_selectivity_matches_numpy(frame, simple_nn_activations(model, x), y.numpy(), 3)
    assert set(frame["top_class"]) == {0, 1}


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_selectivity_with_one_class_stains_nothing(tmp_path):
    torch.manual_seed(4)
    model = SimpleNN(6, 5, 2)
    x, _ = class_data(100, 2, 6, seed=9)
    trace = record(model, tmp_path / "run", x, torch.zeros(100, dtype=torch.long), 1)
    frame = st.selectivity(trace, epoch=0)
    assert len(frame) == 12
    assert (frame["stain"] == -1).all() and (frame["top_class"] == 0).all()
    assert frame["selectivity"].isna().all()  # one class: no μ'rest
    assert (frame["stain_margin"] == 0).all()


def test_selectivity_epoch_selection(trained):
    every = st.selectivity(trained)
    assert every.index.get_level_values("epoch").unique().tolist() == trained.epochs == list(range(6))
    pd.testing.assert_frame_equal(
        every, pd.concat([st.selectivity(trained, epoch=e) for e in trained.epochs])
    )
    last = st.selectivity(trained, epoch=-1)
    pd.testing.assert_frame_equal(last, st.selectivity(trained, epoch=5))
    pd.testing.assert_frame_equal(st.selectivity(trained, epoch=-6), st.selectivity(trained, epoch=0))
    assert (
        not every.loc[[0]].droplevel("epoch").equals(every.loc[[5]].droplevel("epoch"))
    )  # training moved them
    with pytest.raises(KeyError, match=r"epoch 99 not in trace; recorded epochs: \[0, 1, 2, 3, 4, 5\]"):
        st.selectivity(trained, epoch=99)
    with pytest.raises(KeyError, match=r"epoch -7 out of range; recorded epochs: \[0, 1, 2, 3, 4, 5\]"):
        st.selectivity(trained, epoch=-7)


def test_epochs_counted_from_the_end_when_the_first_is_not_zero(tmp_path):
    torch.manual_seed(13)
    model = SimpleNN(6, 4, 2)
    x, y = class_data(40, 2, 6, seed=17)
    with NetworkTrace(model, tmp_path / "run", num_classes=2) as trace:
        for epoch in (2, 5):
            trace.start_epoch(epoch)
            trace.set_targets(y)
            model(x)
            trace.end_epoch()
    t = load_trace(tmp_path / "run")
    assert st.resolve_epoch(t, -1) == 5 and st.resolve_epoch(t, -2) == 2 and st.resolve_epoch(t, 2) == 2
    with pytest.raises(KeyError, match=r"epoch 0 not in trace; recorded epochs: \[2, 5\]"):
        st.resolve_epoch(t, 0)
    with pytest.raises(KeyError, match=r"epoch -3 out of range; recorded epochs: \[2, 5\]"):
        st.resolve_epoch(t, -3)


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


def test_settling_epochs_of_few_epochs():
    np.testing.assert_array_equal(
        st.settling_epochs(np.array([[1, 1], [1, 2], [-1, 0]]), np.array([3, 9])), [3, 9, 9]
    )
    np.testing.assert_array_equal(st.settling_epochs(np.array([[4], [-1], [0]]), np.array([7])), [7, 7, 7])
    np.testing.assert_array_equal(
        st.settling_epochs(np.zeros((2, 0), dtype=int), np.array([], dtype=int)), [-1, -1]
    )


def test_stain_evolution_of_hand_built_stains(trained):
    """Stains and dead flags given by hand, in trace order (L_input before L_hidden_1, which sorts first)."""
    rows = {  # (layer, neuron): stains at epochs 0, 2, 5 and dead flags at those epochs
        ("L_input", 3): ([1, 1, 1], [0, 0, 0]),
        ("L_input", 0): ([-1, 0, 0], [1, 0, 0]),
        ("L_hidden_1", 10): ([2, -1, 2], [0, 0, 0]),
        ("L_hidden_1", 2): ([0, 1, -1], [0, 1, 1]),
        ("L_hidden_1", 4): ([-1, -1, 0], [0, 0, 0]),
    }
    epochs = [0, 2, 5]
    index = pd.MultiIndex.from_tuples(
        [(e, layer, n) for e in epochs for layer, n in rows], names=["epoch", "layer", "neuron"]
    )
    stains = pd.DataFrame(
        {
            "stain": [rows[k][0][i] for i in range(3) for k in rows],
            "dead": [bool(rows[k][1][i]) for i in range(3) for k in rows],
        },
        index=index,
    )
    evolution = st.stain_evolution(trained, stains)
    assert evolution.stains.index.tolist() == list(rows)
    assert evolution.stains.columns.tolist() == epochs
    np.testing.assert_array_equal(evolution.stains.to_numpy(), [v[0] for v in rows.values()])
    expected = pd.DataFrame(
        {
            "final_stain": [1, 0, 2, -1, 0],
            "settling_epoch": [0, 2, 5, 5, 5],
            "changes": [0, 1, 2, 2, 1],
        },
        index=pd.MultiIndex.from_tuples(list(rows), names=["layer", "neuron"]),
    )
    pd.testing.assert_frame_equal(evolution.neurons, expected)
    layers = pd.DataFrame(
        {
            "stained_frac": [1 / 2, 2 / 3, 1, 1 / 3, 1, 2 / 3],
            "dead_frac": [1 / 2, 0, 0, 1 / 3, 0, 1 / 3],
        },
        index=pd.MultiIndex.from_product([epochs, ["L_input", "L_hidden_1"]], names=["epoch", "layer"]),
    )
    pd.testing.assert_frame_equal(evolution.layers, layers)
    # rows handed over in another order (L_hidden_1 first): the per-layer table keeps the trace's order
    shuffled = st.stain_evolution(trained, stains.iloc[::-1])
    pd.testing.assert_frame_equal(shuffled.layers, layers)


def test_stain_evolution_on_a_trained_trace(trained):
    frame = st.selectivity(trained)
    evolution = st.stain_evolution(trained)
    pd.testing.assert_frame_equal(evolution.neurons, st.stain_evolution(trained, frame).neurons)
    assert list(evolution.stains.columns) == trained.epochs
    assert evolution.stains.index.tolist() == frame.loc[0].index.tolist()  # trace order, not sorted
    assert evolution.stains.index.get_level_values("layer").unique().tolist() == trained.layers
    for (layer, neuron), row in evolution.neurons.iterrows():
        history = [int(frame.loc[(e, layer, neuron), "stain"]) for e in trained.epochs]
        assert row["final_stain"] == history[-1]
        assert row["settling_epoch"] == brute_settling(history, trained.epochs)
        assert row["changes"] == sum(a != b for a, b in itertools.pairwise(history))
    assert evolution.neurons["changes"].max() > 0  # the trace exercises what is checked: stains change
    assert evolution.layers.index.tolist() == [(e, layer) for e in trained.epochs for layer in trained.layers]
    for (epoch, layer), row in evolution.layers.iterrows():
        at = frame.xs((epoch, layer), level=["epoch", "layer"])
        assert row["stained_frac"] == (at["stain"] >= 0).mean()
        assert row["dead_frac"] == at["dead"].mean()
    assert (evolution.layers["stained_frac"] != evolution.layers["dead_frac"]).any()


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


@pytest.mark.parametrize("seed", range(8))
def test_top_paths_with_zeros_and_signs_match_brute_force(seed):
    """Sparse signed shares (zero edges make ties at score 0): the scores are brute force's, each path's
    product is its score, and no path comes twice."""
    rng = np.random.default_rng(100 + seed)
    sizes = [int(v) for v in rng.integers(1, 6, size=int(rng.integers(2, 5)))]
    shares = [rng.normal(size=(b, a)) * (rng.random((b, a)) < 0.6) for a, b in itertools.pairwise(sizes)]
    for k in (1, 2, 5, 40):
        for target in range(sizes[-1]):
            scores, paths = st.top_paths(shares, target, k)
            expected = brute_paths(shares, target)[:k]
            np.testing.assert_allclose(scores, [s for s, _ in expected], atol=1e-12)
            assert len(set(paths)) == len(paths) == len(expected)
            for score, path in zip(scores, paths):
                assert path[-1] == target
                product = np.prod([m[path[i + 1], path[i]] for i, m in enumerate(shares)])
                assert score == pytest.approx(product, abs=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_top_paths_skip_paths_through_nan_edges(seed):
    """NaN edges (a user's shares may hold them) end every path through them: the top paths are brute
    force's among the paths whose product is a number, however few of those remain."""
    rng = np.random.default_rng(200 + seed)
    sizes = [int(v) for v in rng.integers(2, 7, size=int(rng.integers(3, 5)))]
    shares = [
        np.where(rng.random((b, a)) < 0.5, np.nan, rng.normal(size=(b, a)))
        for a, b in itertools.pairwise(sizes)
    ]
    for k in (1, 2, 3, 50):
        for target in range(sizes[-1]):
            scores, paths = st.top_paths(shares, target, k)
            finite = [(s, p) for s, p in brute_paths(shares, target) if np.isfinite(s)]
            expected = sorted(finite, key=lambda sp: -sp[0])[:k]
            np.testing.assert_allclose(scores, [s for s, _ in expected], atol=1e-12)
            assert len(set(paths)) == len(paths)
            for score, path in zip(scores, paths):
                product = np.prod([m[path[i + 1], path[i]] for i, m in enumerate(shares)])
                assert score == pytest.approx(product, abs=1e-12)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_edge_shares_by_hand():
    contrib = np.array([[[1.0, -3.0], [0.0, 0.0]], [[2.0, 2.0], [-1.0, 0.0]]])
    np.testing.assert_allclose(
        st.edge_shares(contrib), [[[0.25, -0.75], [0.0, 0.0]], [[0.5, 0.5], [-1.0, 0.0]]]
    )


def brute_pathways(trace, target: int, epoch: int, chain: list[str], k: int) -> list[tuple[float, tuple]]:
    """The top paths by brute force from the trace's weights and class-conditional input means."""
    shares = []
    for layer in chain:
        w = trace.weights(epoch, layer).astype(np.float64)
        means = trace.inputs(f"E_{epoch}/{layer}")["mean"].xs(target, level="class").to_numpy(np.float64)
        contrib = w * means[None, :]
        shares.append(contrib / np.abs(contrib).sum(1, keepdims=True))
    names = ["x", *chain]
    return [
        (score, tuple(f"{names[i]}/n_{n}" for i, n in enumerate(path)))
        for score, path in brute_paths(shares, target)[:k]
    ]


def test_pathways_match_brute_force_on_a_recorded_network(frozen):
    trace = frozen[0]
    layers = ["L_input", "L_hidden_1", "L_output"]
    assert st.linear_chain(trace) == layers
    for c in range(3):
        expected = brute_pathways(trace, c, 0, layers, 8)
        got = st.pathways(trace, c, top_k=8)
        assert got.index.name == "rank" and list(got.index) == list(range(8))
        assert list(got.columns) == ["score", "path", "epoch", "target_class"]
        np.testing.assert_allclose(got["score"], [s for s, _ in expected], rtol=1e-6)
        assert list(got["path"]) == [p for _, p in expected]
        assert (got["epoch"] == 0).all() and (got["target_class"] == c).all()


def test_pathways_default_to_ten_and_name_the_end_layer(tmp_path):
    torch.manual_seed(15)
    model = SimpleNN(6, 7, 2)  # 2 output neurons, 3 classes
    x, y = class_data(90, 3, 6, seed=20)
    trace = record(model, tmp_path / "run", x, y, 3)
    assert len(st.pathways(trace, 1)) == 10  # of 6 * 7 * 7 paths
    with pytest.raises(KeyError, match=r"layer 'L_output' has no neuron 2"):
        st.pathways(trace, 2)


def test_pathways_at_an_epoch_of_a_trained_network(trained):
    layers = trained.layers
    for epoch in (2, None):
        got = st.pathways(trained, 1, epoch=epoch, top_k=4)
        at = 5 if epoch is None else epoch  # None: the last recorded epoch
        expected = brute_pathways(trained, 1, at, layers, 4)
        np.testing.assert_allclose(got["score"], [s for s, _ in expected], rtol=1e-6)
        assert list(got["path"]) == [p for _, p in expected]
        assert (got["epoch"] == at).all()
    assert not np.allclose(st.pathways(trained, 1, epoch=2)["score"], st.pathways(trained, 1)["score"])


def test_contributions_match_numpy_on_the_layer_inputs(frozen):
    """C[c, j, k] = W[j, k]·E[x_k | c], with the inputs of each Linear computed here from the model."""
    trace, model, x, y = frozen
    acts = simple_nn_activations(model, x)
    inputs = {
        "L_input": x.double().numpy(),
        "L_hidden_1": np.maximum(acts["L_input"], 0),
        "L_output": np.maximum(acts["L_hidden_1"], 0),
    }
    labels = y.numpy()
    for layer, module in zip(inputs, (model.input, model.hidden_1, model.output)):
        w = module.weight.detach().double().numpy()
        means = np.stack([inputs[layer][labels == c].mean(0) for c in range(3)])  # (classes, inputs)
        expected = w[None, :, :] * means[:, None, :]
        np.testing.assert_allclose(st.contributions(trace, layer, epoch=0), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        st.contributions(trace, "hidden_1"), st.contributions(trace, "L_hidden_1", 0)
    )


class Branches(nn.Module):
    """Four Linear layers on two branches: z and a read x (a's 5 outputs feed nothing), b reads x,
    c reads b's ReLU. The chain into c is b, c; the chain into a is a alone: z's width fits a's input,
    but a reads x, not z's output (the layer graph says so)."""

    def __init__(self) -> None:
        super().__init__()
        self.z, self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 5), nn.Linear(4, 3)
        self.act, self.c = nn.ReLU(), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.z(x)
        self.a(x)
        return self.c(self.act(self.b(x)))


@pytest.fixture(scope="module")
def branches(tmp_path_factory):
    torch.manual_seed(9)
    x, y = class_data(150, 3, 4, seed=13)
    return record(Branches(), tmp_path_factory.mktemp("branches") / "run", x, y, 3)


def test_linear_chain_follows_the_layer_graph(branches, tmp_path, caplog):
    assert branches.layers == ["L_z", "L_a", "L_b", "L_act", "L_c"]
    assert st.linear_chain(branches) == ["L_b", "L_c"]
    assert st.linear_chain(branches, "L_c") == ["L_b", "L_c"]
    assert st.linear_chain(branches, "a") == ["L_a"]
    assert st.linear_chain(branches, "L_z") == ["L_z"]
    old = without_graph(branches, tmp_path / "old")  # the old rule: matching widths in model order
    assert st.linear_chain(old) == ["L_b", "L_c"] and st.linear_chain(old, "L_a") == ["L_z", "L_a"]
    with caplog.at_level(logging.INFO, logger="nn_staining.staining"):
        st.linear_chain(branches)
    assert caplog.messages == [
        "pathways into L_c: the chain starts at L_b: its input is no recorded layer's output "
        "(the model's input, or a tensor computed outside recorded modules)"
    ]
    with pytest.raises(ValueError) as info:
        st.linear_chain(branches, "act")
    assert str(info.value) == (
        "pathways need an nn.Linear end layer with recorded inputs; 'L_act' is not one "
        "(such layers: L_z, L_a, L_b, L_c)"
    )


def test_linear_chain_needs_a_linear_layer(tmp_path):
    model = nn.Sequential(OrderedDict(act=nn.Tanh()))
    x, y = class_data(20, 2, 3, seed=18)
    trace = record(model, tmp_path / "run", x, y, 2)
    with pytest.raises(ValueError) as info:
        st.linear_chain(trace)
    assert str(info.value) == (
        "pathways need an nn.Linear end layer with recorded inputs; 'L_act' is not one (such layers: none)"
    )


def test_pathways_into_a_chosen_end_layer(branches):
    got = st.pathways(branches, 2, top_k=3, end_layer="L_b")
    expected = brute_pathways(branches, 2, 0, ["L_b"], 3)
    np.testing.assert_allclose(got["score"], [s for s, _ in expected], rtol=1e-6)
    assert list(got["path"]) == [p for _, p in expected]
    with pytest.raises(KeyError, match=r"layer 'L_c' has no neuron 2"):
        st.pathways(branches, 2)
    for bad in (3, -1):
        with pytest.raises(KeyError, match=rf"target_class {bad} not in the trace's classes 0\.\.2"):
            st.pathways(branches, bad, end_layer="L_b")


def test_analyses_need_classes_and_epochs(tmp_path):
    torch.manual_seed(10)
    model = SimpleNN(6, 5, 2)
    x, _ = class_data(60, 2, 6, seed=14)
    with NetworkTrace(model, tmp_path / "plain") as trace:  # no num_classes, no targets
        trace.start_epoch(0)
        model(x)
        trace.end_epoch()
    plain = load_trace(tmp_path / "plain")
    message = f"trace {plain.path} has no per-class statistics; record with num_classes= and set_targets(y)"
    for call in (
        lambda: st.selectivity(plain),
        lambda: st.pathways(plain, 0),
        lambda: st.contributions(plain, "L_input"),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message
    assert not st.unit_health(plain).neurons.empty  # needs no classes
    with NetworkTrace(model, tmp_path / "empty", num_classes=2):
        pass
    empty = load_trace(tmp_path / "empty")
    with pytest.raises(KeyError, match=rf"trace {re.escape(str(empty.path))} has no recorded epochs"):
        st.selectivity(empty, epoch=-1)


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
    config = RunConfig(
        dataset=dataset,
        epochs=3,
        hidden=16,
        lr=1e-2,
        output_dir=str(tmp_path),
        figures=False,
        checkpoints=False,
        interventions=False,
        probe=0,
    )
    trace = load_trace(run_pipeline(config).store)
    assert trace.num_classes == classes
    frame = st.selectivity(trace)
    output = frame.loc[trace.epochs[-1]].xs("L_output", level="layer")
    assert list(output["stain"]) == list(range(classes))
    evolution = st.stain_evolution(trace, frame)
    stained = (frame["stain"] >= 0).groupby(level=["epoch", "layer"], sort=False).mean()
    np.testing.assert_array_equal(evolution.layers["stained_frac"], stained.to_numpy())
    # each path's score is the product of its edges' shares W[j,k]·E[x_k|c] / Σ_k' |W[j,k']·E[x_k'|c]|
    target, epoch = classes - 1, trace.epochs[-1]
    paths = st.pathways(trace, target, top_k=3)
    chain = st.linear_chain(trace)
    shares = []
    for layer in chain:
        w = trace.weights(epoch, layer).astype(np.float64)
        means = trace.inputs(f"E_{epoch}/{layer}")["mean"].xs(target, level="class").to_numpy(np.float64)
        shares.append(w * means / np.abs(w * means).sum(1, keepdims=True))
    for path, score in zip(paths["path"], paths["score"]):
        nodes = [int(p.rsplit("_", 1)[1]) for p in path]
        assert path[0].startswith("x/n_") and path[-1] == f"L_output/n_{target}"
        assert score == pytest.approx(np.prod([m[nodes[i + 1], nodes[i]] for i, m in enumerate(shares)]))
    assert list(paths["score"]) == sorted(paths["score"], reverse=True)


# -- dead units ------------------------------------------------------------------------------------
class NextLayerDecides(nn.Module):
    """Neuron 0 of every Linear is -1 on every sample; whether that is *dead* depends on what follows:
    a ReLU (yes), a tanh (no), a normalisation (no), a functional relu (yes, as in SimpleNN), an
    activation of another width (yes), nothing at all (no: the logits). c_norm feeds a sigmoid gate
    and a product, not a ReLU (no)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.a_relu = nn.Linear(4, 4), nn.ReLU()
        self.b, self.b_tanh = nn.Linear(4, 4), nn.Tanh()
        self.c, self.c_norm = nn.Linear(4, 4), nn.BatchNorm1d(4)
        self.d = nn.Linear(4, 4)
        self.e = nn.Linear(4, 3)
        self.gate = nn.Sigmoid()  # applied to c_norm's 4 outputs, recorded after e
        self.out = nn.Linear(3, 2)
        with torch.no_grad():
            for linear in (self.a, self.b, self.c, self.d, self.e, self.out):
                linear.weight[0] = 0.0
                linear.bias[0] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_norm(self.c(self.b_tanh(self.b(self.a_relu(self.a(x))))))
        g = self.gate(h)
        h = self.e(torch.relu(self.d(h * g)))
        return self.out(torch.relu(h))


#: Per layer of NextLayerDecides: is "never positive" dead? (DESIGN.md's rule, written out by hand.)
JUDGED = {
    "L_a": True,
    "L_a_relu": True,
    "L_b": False,
    "L_b_tanh": False,
    "L_c": False,
    "L_c_norm": False,
    "L_d": True,
    "L_e": True,
    "L_gate": False,
    "L_out": False,
}


def captured(model: nn.Module, tmp_path, x, y, classes, epochs=1):
    """Record ``model`` (frozen) and capture every leaf module's output: (trace, {key: (samples, neurons)})."""
    capture = Capture(model)
    trace = record(model, tmp_path / "run", x, y, classes, epochs=epochs)
    capture.remove()
    rows = {key: np.concatenate(batches)[: len(x)] for key, batches in capture.outputs[0].items()}
    return trace, rows


def numpy_dead(rows: np.ndarray, judged: bool) -> np.ndarray:
    never = (rows.max(0) <= 0) | ((rows > 0).mean(0) == 0)
    return judged & never & np.isfinite(rows).all(0)


#: The rule of traces recorded before the layer graph existed: by model order, so the BatchNorm c_norm,
#: followed by the Linear d, counts as feeding a ReLU (as SimpleNN's pre-activations do).
JUDGED_BY_ORDER = {**JUDGED, "L_c_norm": True}


def without_graph(trace, destination):
    """A copy of ``trace`` whose meta.json has no layer graph, as recorded before it existed."""
    shutil.copytree(trace.path, destination)
    meta = json.loads((destination / "meta.json").read_text())
    for info in meta["layers"]:
        for field in ("inputs_from", "input_ops", "elementwise"):
            info.pop(field, None)
    (destination / "meta.json").write_text(json.dumps(meta))
    return load_trace(destination)


def test_dead_depends_on_the_layer_that_follows(tmp_path):
    torch.manual_seed(6)
    model = NextLayerDecides()
    x, y = class_data(200, 2, 4, seed=10)
    trace, rows = captured(model, tmp_path, x, y, 2)
    assert trace.layers == list(JUDGED)
    old = without_graph(trace, tmp_path / "old")
    assert st.has_layer_graph(trace) and not st.has_layer_graph(old)
    for t, judged_by_layer in ((trace, JUDGED), (old, JUDGED_BY_ORDER)):
        frame = st.selectivity(t, epoch=0)
        health = st.unit_health(t, epoch=0)
        for layer, judged in judged_by_layer.items():
            expected = numpy_dead(rows[layer], judged)
            assert expected[0] == judged, layer  # neuron 0 never fires (but in gate, judged False anyway)
            np.testing.assert_array_equal(frame.loc[(0, layer), "dead"], expected, err_msg=layer)
            np.testing.assert_array_equal(health.neurons.loc[(0, layer), "dead"], expected, err_msg=layer)
            assert not frame.loc[(0, layer), "stain"][expected].ge(0).any(), layer  # dead is unstained


class SignKeeping(nn.Module):
    """a reaches a ReLU through a Dropout and an Identity (both keep the sign); b feeds c through a
    functional tanh (not sign-keeping: no ReLU that way) and, second in model order, a ReLU module.
    Neuron 0 of every Linear is -1 on every sample."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.drop, self.ident, self.relu = nn.Linear(4, 3), nn.Dropout(0.5), nn.Identity(), nn.ReLU()
        self.b, self.c, self.b_relu = nn.Linear(4, 3), nn.Linear(3, 2), nn.ReLU()
        with torch.no_grad():
            for linear in (self.a, self.b, self.c):
                linear.weight[0] = 0.0
                linear.bias[0] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.ident(self.drop(self.a(x))))
        g = self.b(x)
        return self.c(torch.tanh(g)) + self.b_relu(g)[:, :2] + h[:, :2]


def test_dead_through_sign_keeping_modules_and_past_other_consumers(tmp_path):
    torch.manual_seed(14)
    x, y = class_data(100, 2, 4, seed=19)
    trace, rows = captured(SignKeeping(), tmp_path, x, y, 2)
    assert trace.layer_info("L_c")["input_ops"] == [["tanh"]]  # the graph the rule reads
    judged = {
        "L_a": True,
        "L_drop": True,  # through the Identity, which is not recorded by default
        "L_relu": True,
        "L_b": True,
        "L_c": False,
        "L_b_relu": True,
    }
    health = st.unit_health(trace, epoch=0).neurons
    for layer, judged_here in judged.items():
        expected = numpy_dead(rows[layer], judged_here)
        assert expected[0] == judged_here, layer
        at = health.xs((0, layer), level=["epoch", "layer"])["dead"]
        np.testing.assert_array_equal(at, expected, err_msg=layer)


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_nan_and_inf_neurons_are_exploding_not_dead(tmp_path):
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
    with torch.no_grad():
        model[0].weight[0] = float("nan")  # unit 0: NaN before and after the ReLU
        model[0].weight[1] = 0.0
        model[0].bias[1] = -1.0  # unit 1: never fires
        model[0].weight[2] = 0.0
        model[0].bias[2] = -float("inf")  # unit 2: -inf, 0 after the ReLU
    x, y = class_data(100, 2, 4, seed=11)
    trace = record(model, tmp_path / "run", x, y, 2)
    neurons = trace.query("E_0/L_*", columns=["act_nan_count"])["act_nan_count"]
    assert neurons.tolist() == [100, 0, 100, 100, 0, 0]
    health = st.unit_health(trace).neurons
    assert health["exploding"].tolist() == [True, False, True, True, False, False]
    assert health["dead"].tolist() == [False, True, False, False, True, True]
    frame = st.selectivity(trace, epoch=0)
    assert frame["dead"].tolist() == [False, True, False, False, True, True]
    assert (frame["stain"] == -1).all()
    assert frame.loc[(0, "L_0", 0), "top_class"] == -1 and frame.loc[(0, "L_1", 0), "top_class"] == -1
    assert frame.loc[(0, "L_0", 1), "stain_margin"] == 0.0  # a constant unit: std 0, margin 0 (not NaN)


# -- unit health -----------------------------------------------------------------------------------
BOUNDED = {"tanh": (1.0, 0.0), "sigmoid": (0.5, 0.5)}


def sick_model() -> nn.Sequential:
    """ReLU unit 0 never fires; tanh unit 1 and sigmoid unit 2 sit at a constant near 1; output unit 1 is NaN."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 2)
    )
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = -1.0
        model[2].weight.mul_(0.1)
        model[2].weight[1] = 0.0
        model[2].bias[1] = 5.0
        model[4].weight.mul_(3.0)
        model[4].weight[2] = 0.0
        model[4].bias[2] = 4.0
        model[6].weight[1, 0] = float("nan")
    return model


@pytest.fixture(scope="module")
def sick(tmp_path_factory):
    x, y = class_data(200, 2, 4, seed=6)
    return captured(sick_model(), tmp_path_factory.mktemp("sick"), x, y, 2, epochs=2)


def numpy_health(trace, rows: dict[str, np.ndarray], level: float) -> pd.DataFrame:
    """unit_health's flags by numpy on the captured activations (frozen weights: every epoch alike)."""
    judged = {"L_0": True, "L_1": True}
    out = []
    for layer in trace.layers:
        a = rows[layer]
        act = trace.layer_info(layer)["activation"]
        exploding = ~np.isfinite(a).all(0)
        if act in BOUNDED:
            scale, offset = BOUNDED[act]
            saturated = (((a - offset) / scale) ** 2).mean(0) >= level**2
        else:
            saturated = np.zeros(a.shape[1], bool)
        dead = numpy_dead(a, judged.get(layer, False))
        out += [(layer, n, dead[n], saturated[n], exploding[n]) for n in range(a.shape[1])]
    frame = pd.DataFrame(out, columns=["layer", "neuron", "dead", "saturated", "exploding"])
    return frame.set_index(["layer", "neuron"])


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_unit_health_matches_numpy(sick):
    trace, rows = sick
    assert [trace.layer_info(k)["activation"] for k in trace.layers] == [
        None,
        "relu",
        None,
        "tanh",
        None,
        "sigmoid",
        None,
    ]
    health = st.unit_health(trace)
    expected = numpy_health(trace, rows, st.SATURATION_LEVEL)
    assert health.neurons.index.names == ["epoch", "layer", "neuron"]
    assert list(health.neurons.columns) == ["dead", "saturated", "exploding"]
    for epoch in trace.epochs:
        pd.testing.assert_frame_equal(
            health.neurons.loc[epoch], expected, check_names=False, check_index_type=False
        )
    # the planted units, so that the comparison above is not all False
    flagged = {c: set(expected.index[expected[c]]) for c in expected.columns}
    assert flagged == {
        "dead": {("L_0", 0), ("L_1", 0)},
        "saturated": {("L_3", 1), ("L_5", 2)},
        "exploding": {("L_6", 1)},
    }
    fractions = expected.groupby(level="layer", sort=False).mean()
    fractions.columns = ["dead_frac", "saturated_frac", "exploding_frac"]
    assert health.layers.index.tolist() == [(e, k) for e in trace.epochs for k in trace.layers]
    for epoch in trace.epochs:
        pd.testing.assert_frame_equal(health.layers.loc[epoch], fractions, check_names=False)
    pd.testing.assert_frame_equal(st.unit_health(trace, epoch=-1).neurons, health.neurons.loc[[1]])


def test_saturation_level_sweeps_through_each_units_second_moment(sick):
    """Just below a bounded unit's E[y²]^½ it is saturated, just above it is not (y ∈ [-1, 1])."""
    trace, rows = sick
    for layer in ("L_3", "L_5"):
        scale, offset = BOUNDED[trace.layer_info(layer)["activation"]]
        second = (((rows[layer] - offset) / scale) ** 2).mean(0)
        for n, m2 in enumerate(second):
            for level in (np.sqrt(m2) * 0.999, np.sqrt(m2) * 1.001):
                got = st.unit_health(trace, epoch=0, level=level).neurons
                expected = numpy_health(trace, rows, level)
                np.testing.assert_array_equal(got["saturated"], expected["saturated"], err_msg=f"{layer} {n}")
                assert got.loc[(0, layer, n), "saturated"] == (level < np.sqrt(m2))


def test_a_unit_exactly_at_the_saturation_level_is_saturated(sick):
    trace, _ = sick
    stats = trace.query("E_0/L_*", columns=["act_mean", "act_std"])
    for cell, act in [((0, "L_3", 1), "tanh"), ((0, "L_5", 2), "sigmoid")]:
        scale, offset = BOUNDED[act]
        assert stats.loc[cell, "act_std"] == 0.0  # a constant unit: E[y²] = y²
        level = (float(stats.loc[cell, "act_mean"]) - offset) / scale
        assert st.unit_health(trace, epoch=0, level=level).neurons.loc[cell, "saturated"]
        assert not st.unit_health(trace, epoch=0, level=np.nextafter(level, 2.0)).neurons.loc[
            cell, "saturated"
        ]


def test_unit_health_layers_follow_the_trace_order(trained):
    """SimpleNN's layers are not in alphabetical order (L_input, L_hidden_1, L_output): neither are the rows."""
    health = st.unit_health(trained)
    assert health.layers.index.tolist() == [(e, k) for e in trained.epochs for k in trained.layers]
    for (epoch, layer), row in health.layers.iterrows():
        flags = health.neurons.xs((epoch, layer), level=["epoch", "layer"])
        assert row.tolist() == flags.mean().tolist()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_sick_units_are_unstained(sick):
    trace, _ = sick
    stains = st.selectivity(trace, epoch=-1)
    assert stains.loc[(1, "L_1", 0), "stain"] == -1 and stains.loc[(1, "L_6", 1), "stain"] == -1
    assert stains.loc[(1, "L_6", 1), "top_class"] == -1  # every class mean is NaN


# -- weight drift ----------------------------------------------------------------------------------
def test_weight_drift_summarises_weight_delta_norm(trained):
    drift = st.weight_drift(trained)
    deltas = trained.query("E_*/L_*", columns=["weight_delta_norm"])["weight_delta_norm"]
    assert deltas.loc[0].isna().all()  # nothing to compare the first epoch with: no row for it
    assert drift.index.tolist() == [(e, k) for e in trained.epochs[1:] for k in trained.layers]
    assert list(drift.columns) == ["median", "q25", "q75"]
    expected = []
    for epoch, layer in drift.index:
        values = deltas.xs((epoch, layer), level=["epoch", "layer"]).to_numpy(np.float64)
        expected.append([np.median(values), np.quantile(values, 0.25), np.quantile(values, 0.75)])
    np.testing.assert_allclose(drift.to_numpy(), expected, rtol=1e-6)  # pandas averages float32 values
    assert (drift["q75"] > drift["median"]).all() and (drift["median"] > drift["q25"]).all()
