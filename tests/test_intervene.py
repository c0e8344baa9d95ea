"""Interventions: ablation hooks and edge cuts leave the model bit-identical, checkpoints restore the
recorded weights, and on a hand-built planted network the causal check finds exactly what was planted.

The planted network has C classes and inputs ``x = 2·onehot(y) + noise`` plus one class-blind noise
feature. Hidden neurons 2c and 2c+1 read input c (weights 1 and 0.8); the class-c logit reads only
them (weights 1). Two extra hidden neurons read the noise feature and feed nothing. Its trace is
recorded with ``NetworkTrace``, so the stains come from real statistics; every expected number is
recomputed here with numpy from the known weights.
"""

from __future__ import annotations

import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.patches import Rectangle
from torch import nn

from nn_staining import NetworkTrace, intervene, load_trace
from nn_staining import staining as st
from nn_staining.checkpoints import checkpoint_epochs

torch.set_num_threads(1)

C = 3
PER_CLASS = 120
HIDDEN = 2 * C + 2


def planted_data(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(PER_CLASS)
    x = torch.zeros(len(y), C + 1)
    x[:, :C] = 2.0 * nn.functional.one_hot(y, C) + 0.3 * torch.randn(len(y), C, generator=g)
    x[:, C] = torch.randn(PER_CLASS, generator=g).repeat(C)  # the same values in every class: class-blind
    order = torch.randperm(len(y), generator=g)
    return x[order], y[order]


def planted_model() -> nn.Sequential:
    model = nn.Sequential(
        OrderedDict(hidden=nn.Linear(C + 1, HIDDEN), relu=nn.ReLU(), out=nn.Linear(HIDDEN, C))
    )
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        for c in range(C):
            model.hidden.weight[2 * c, c] = 1.0
            model.hidden.weight[2 * c + 1, c] = 0.8
            model.out.weight[c, 2 * c] = 1.0
            model.out.weight[c, 2 * c + 1] = 1.0
        model.hidden.weight[2 * C, C] = 1.0
        model.hidden.weight[2 * C + 1, C] = -1.0
    return model


def numpy_logits(model: nn.Module, x: torch.Tensor, zero_hidden=(), zero_edges=()) -> np.ndarray:
    """The planted model's logits in float64 numpy, with hidden neurons or weights zeroed."""
    w1 = model.hidden.weight.detach().double().numpy().copy()
    b1 = model.hidden.bias.detach().double().numpy()
    w2 = model.out.weight.detach().double().numpy().copy()
    b2 = model.out.bias.detach().double().numpy()
    for layer, j, k in zero_edges:
        (w1 if layer == "L_hidden" else w2)[j, k] = 0.0
    h = x.double().numpy() @ w1.T + b1
    h[:, list(zero_hidden)] = 0.0
    return np.maximum(h, 0) @ w2.T + b2


def per_class(logits: np.ndarray, y: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    y = y.numpy()
    acc = np.array([(logits[y == c].argmax(1) == c).mean() for c in range(C)])
    logit = np.array([logits[y == c, c].mean() for c in range(C)])
    return acc, logit


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    model = planted_model()
    x, y = planted_data(0)
    store = tmp_path_factory.mktemp("planted") / "run"
    with NetworkTrace(model, store, num_classes=C, background=False) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            for start in range(0, len(x), 64):
                trace.set_targets(y[start : start + 64])
                model(x[start : start + 64])
            trace.end_epoch()
    x_test, y_test = planted_data(1)
    return model, load_trace(store), x_test, y_test


def test_planted_stains_are_the_planted_neurons(planted):
    model, t, _, _ = planted
    stains = st.selectivity(t, -1).droplevel("epoch")["stain"]
    expected = [c for c in range(C) for _ in (0, 1)] + [-1, -1]
    assert stains.xs("L_hidden").to_list() == expected
    assert stains.xs("L_out").to_list() == list(range(C))


def test_planted_neuron_ablation_is_class_specific(planted):
    model, t, x, y = planted
    effects = intervene.stain_effects(model, t, x, y, layers="L_hidden", pathways=False)
    base_acc, base_logit = per_class(numpy_logits(model, x), y)
    assert (base_acc == 1).all()
    assert set(effects["stain_class"]) == set(range(C)) and (effects["n_ablated"] == 2).all()
    assert (effects["n_control"] == 2).all()
    for c in range(C):
        rows = effects[effects["stain_class"] == c].set_index("eval_class")
        acc, logit = per_class(numpy_logits(model, x, zero_hidden=(2 * c, 2 * c + 1)), y)
        np.testing.assert_allclose(rows["acc_change"], acc - base_acc, atol=1e-12)
        np.testing.assert_allclose(rows["logit_change"], logit - base_logit, rtol=1e-5, atol=1e-5)
        assert rows.loc[c, "acc_base"] + rows.loc[c, "acc_change"] <= 1 / C  # at or below chance
        assert rows.loc[c, "logit_base"] + rows.loc[c, "logit_change"] == 0  # no evidence left
        others = rows.drop(index=c)
        assert (others["acc_change"].abs() < 0.01).all()
        # the control (the two class-blind neurons, which feed nothing) moves no class at all
        assert (rows["control_acc_change"] == 0).all() and (rows["control_logit_change"] == 0).all()
    spec = intervene.specificity(effects).loc[("neurons", t.epochs[-1], "L_hidden")]
    own = effects[effects["stain_class"] == effects["eval_class"]]["acc_change"].to_numpy()
    assert spec["specificity"] == pytest.approx(-own.mean())
    assert spec["control_specificity"] == 0 and spec["stain_classes"] == C


def test_planted_pathway_edge_ablation_removes_the_evidence(planted):
    model, t, x, y = planted
    base_acc, base_logit = per_class(numpy_logits(model, x), y)
    for top_k, expect_zero in ((1, False), (2, True)):
        effects = intervene.stain_effects(model, t, x, y, layers="L_hidden", top_k=top_k)
        paths = effects[effects["unit"] == "edges"]
        assert set(paths["layer"]) == {intervene.PATHWAYS}
        for c in range(C):
            edges = [("L_hidden", 2 * c, c), ("L_out", c, 2 * c)]
            if top_k == 2:
                edges += [("L_hidden", 2 * c + 1, c), ("L_out", c, 2 * c + 1)]
            assert sorted(intervene.pathway_edges(st.pathways(t, c, top_k=top_k))) == sorted(edges)
            rows = paths[paths["stain_class"] == c].set_index("eval_class")
            assert (rows["n_ablated"] == len(edges)).all()
            acc, logit = per_class(numpy_logits(model, x, zero_edges=edges), y)
            np.testing.assert_allclose(rows["logit_change"], logit - base_logit, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(rows["acc_change"], acc - base_acc, atol=1e-12)
            if expect_zero:
                assert rows.loc[c, "logit_base"] + rows.loc[c, "logit_change"] == 0
                assert rows.loc[c, "acc_base"] + rows.loc[c, "acc_change"] <= 1 / C
            else:  # the top path carries 1/1.8 of the class's evidence
                assert rows.loc[c, "logit_change"] == pytest.approx(-base_logit[c] / 1.8, rel=1e-5)
            assert (rows.drop(index=c)["acc_change"].abs() < 0.01).all()
            # random edges almost never hit the 2·top_k planted ones among 5·8 + 8·3 weights
            assert rows.loc[c, "control_logit_change"] > rows.loc[c, "logit_change"]


def test_neuron_effects_match_numpy(planted):
    model, t, x, y = planted
    effects = intervene.neuron_effects(model, t, x, y, layers=["L_hidden"])
    _, base_logit = per_class(numpy_logits(model, x), y)
    for j in range(HIDDEN):
        _, logit = per_class(numpy_logits(model, x, zero_hidden=(j,)), y)
        row = effects.loc[("L_hidden", j)]
        c = int(row["top_class"])
        assert row["logit_change"] == pytest.approx(logit[c] - base_logit[c], abs=1e-5)
        expected = max(0.0, base_logit[c] - logit[c]) if j < 2 * C else 0.0
        assert row["effect"] == pytest.approx(expected, abs=1e-5)
    assert (effects["effect"] >= 0).all() and effects.loc[("L_hidden", 0), "effect"] > 1.5


def test_ablate_zero_and_mean_outputs(planted):
    model, t, x, _ = planted
    epoch = t.epochs[-1]
    with torch.no_grad():
        with intervene.ablate(model, "L_hidden/n_0,3", trace=t) as chosen:
            zeroed = model(x).double().numpy()
        assert chosen == {"L_hidden": [0, 3]}
        np.testing.assert_allclose(zeroed, numpy_logits(model, x, zero_hidden=(0, 3)), atol=1e-5)
        means = t.query(f"E_{epoch}/L_hidden/n_0,3", columns=["act_mean"])["act_mean"].to_numpy(np.float64)
        with intervene.ablate(model, "L_hidden/n_0,3", mode="mean", trace=t, epoch=epoch):
            replaced = model(x).double().numpy()
    w1, w2 = model.hidden.weight.detach().double().numpy(), model.out.weight.detach().double().numpy()
    h = x.double().numpy() @ w1.T
    h[:, [0, 3]] = means.astype(np.float32)
    np.testing.assert_allclose(replaced, np.maximum(h, 0) @ w2.T, atol=1e-5)
    assert means[0] == pytest.approx(2 / C, abs=0.1)  # hidden 0 averages 2 over a third of the samples


def test_selection_forms(planted):
    model, t, _, _ = planted
    sel = st.selectivity(t, -1)
    frame = sel[sel["stain"] == 1]
    chosen, epoch = intervene.neuron_selection(frame, model, t)
    assert chosen == {"L_hidden": [2, 3], "L_relu": [2, 3], "L_out": [1]} and epoch == t.epochs[-1]
    assert intervene.neuron_selection(frame.droplevel("epoch"), model, t) == (chosen, None)
    assert intervene.neuron_selection("E_0/L_*/n_5:7", model, t)[0] == {
        "L_hidden": [5, 6],
        "L_relu": [5, 6],
    }
    assert intervene.neuron_selection("L_out", model, t)[0] == {"L_out": [0, 1, 2]}
    assert intervene.neuron_selection({"out": [2]}, model)[0] == {"L_out": [2]}
    assert intervene.neuron_selection([("L_hidden", 1), ("L_hidden", 0)], model)[0] == {"L_hidden": [0, 1]}
    with pytest.raises(KeyError, match="layer 'L_hiden' matches no layer; layers: L_hidden, L_relu, L_out"):
        intervene.neuron_selection("L_hiden/n_1", model, t)
    with pytest.raises(KeyError, match=r"layer 'L_out' has no neuron 3; its neurons: 0\.\.2"):
        intervene.neuron_selection("L_out/n_3", model, t)
    with pytest.raises(ValueError, match="malformed signature"):
        intervene.neuron_selection("L_out/n_x", model, t)
    with pytest.raises(ValueError, match="names no neuron"):
        intervene.neuron_selection(frame.iloc[:0], model, t)
    with pytest.raises(ValueError, match=r"indexed by \(layer, neuron\)"):
        intervene.neuron_selection(pd.DataFrame({"a": [1]}), model, t)


def _fingerprint(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def _bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_ablate_leaves_no_trace_even_after_an_exception():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(11, 5)
    before, params = model(x).detach().clone(), _fingerprint(model)
    with intervene.ablate(model, "L_0/n_1,2"):
        assert not torch.equal(model(x), before)
        # one hook on the ablated module, and the model's pass boundary (where calls are counted)
        assert [len(m._forward_hooks) for m in model.modules()] == [1, 1, 0, 0]
        assert [len(m._forward_pre_hooks) for m in model.modules()] == [1, 0, 0, 0]
    assert _no_hooks(model) and _bit_equal(model(x).detach(), before)
    with pytest.raises(RuntimeError, match="inside"), intervene.ablate(model, "L_*/n_0"):
        model(x)
        raise RuntimeError("inside the block")
    with pytest.raises(ValueError, match="beyond"), intervene.ablate(model, "L_2/n_5"):
        model(x)  # no trace: the width is only known in the forward pass
    assert _no_hooks(model) and _bit_equal(model(x).detach(), before)
    assert all(_bit_equal(model.state_dict()[k], v) for k, v in params.items())


def test_ablate_edges_restores_weights_bit_exactly():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    x = torch.randn(11, 5)
    before, params = model(x).detach().clone(), _fingerprint(model)
    edges = [("L_0", 2, 4), ("L_2", 1, 2), ("L_0", 2, 4)]
    with intervene.ablate_edges(model, edges) as listed:
        assert listed == edges
        assert model[0].weight[2, 4] == 0 and model[2].weight[1, 2] == 0
        changed = (model[0].weight != params["0.weight"]).sum() + (
            model[2].weight != params["2.weight"]
        ).sum()
        assert changed == 2
    with pytest.raises(RuntimeError), intervene.ablate_edges(model, [("x/n_0", "L_0/n_1", "L_2/n_0")]):
        assert model[0].weight[1, 0] == 0 and model[2].weight[0, 1] == 0
        raise RuntimeError
    with (
        pytest.raises(KeyError, match=r"edge out of range for layer 'L_2': its weight is \(3, 7\)"),
        intervene.ablate_edges(model, [("L_0", 0, 0), ("L_2", 3, 0)]),
    ):
        pass
    assert all(_bit_equal(model.state_dict()[k], v) for k, v in params.items())
    assert _bit_equal(model(x).detach(), before)


def test_ablate_channels_and_sequences():
    torch.manual_seed(2)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    seen = []
    conv[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    image = torch.randn(3, 1, 6, 6)
    reference = conv[0](image).detach()
    with intervene.ablate(conv, "L_0/n_1"):
        conv(image)
    expected = reference.clone()
    expected[:, 1] = 0
    assert torch.equal(seen[-1], expected)
    seq = nn.Sequential(nn.Linear(4, 6))
    tokens = torch.randn(2, 5, 4)
    with intervene.ablate(seq, "L_0/n_5"):
        out = seq(tokens)
    reference = seq(tokens).detach()
    assert (out[..., 5] == 0).all() and torch.equal(out[..., :5], reference[..., :5])


def test_ablate_recorded_channels_with_means(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 2))
    x, y = torch.randn(20, 1, 6, 6), torch.arange(20) % 2
    with NetworkTrace(model, tmp_path / "conv", num_classes=2, background=False) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        model(x)
        trace.end_epoch()
    t = load_trace(tmp_path / "conv")
    assert t.layer_info("L_1")["kind"] == "channels"
    mean = float(t["E_0/L_1/n_2"]["act_mean"])
    seen = []
    model[2].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    with intervene.ablate(model, "L_1/n_2", mode="mean", trace=t):
        model(x)
    reference = torch.relu(model[0](x)).detach()
    assert torch.equal(seen[-1][:, 2], torch.full_like(reference[:, 2], np.float32(mean)))
    assert torch.equal(seen[-1][:, :2], reference[:, :2])


def test_ablate_argument_errors(planted):
    model, t, _, _ = planted
    with (
        pytest.raises(ValueError, match="mode 'half' is not one of: zero, mean"),
        intervene.ablate(model, "L_out/n_0", mode="half"),
    ):
        pass
    with pytest.raises(ValueError, match="pass trace="), intervene.ablate(model, "L_out/n_0", mode="mean"):
        pass
    other = nn.Sequential(OrderedDict(hidden=nn.Linear(4, 8)))
    with (
        pytest.raises(KeyError, match="trace layer 'L_relu' .* is not a module of this model"),
        intervene.ablate(other, "L_hidden/n_0", trace=t),
    ):
        pass
    assert _no_hooks(other) and _no_hooks(model)


# -- checkpoints ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small MLP trained 4 epochs with SGD on the planted data, recorded with checkpoints."""
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(hidden=nn.Linear(C + 1, 12), relu=nn.ReLU(), out=nn.Linear(12, C)))
    x, y = planted_data(2)
    store = tmp_path_factory.mktemp("trained") / "run"
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with NetworkTrace(
        model, store, num_classes=C, epoch_intervals=[0, 2, 3], record_checkpoints=True
    ) as trace:
        for epoch in range(4):
            trace.start_epoch(epoch)
            for start in range(0, len(x), 60):
                xb, yb = x[start : start + 60], y[start : start + 60]
                trace.set_targets(yb)
                loss = nn.functional.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            trace.end_epoch()
    x_test, y_test = planted_data(3)
    return model, load_trace(store), x_test, y_test


def test_load_checkpoint_reproduces_recorded_weights(trained):
    model, t, _, _ = trained
    assert checkpoint_epochs(t) == t.epochs == [0, 2, 3]
    fresh = nn.Sequential(OrderedDict(hidden=nn.Linear(C + 1, 12), relu=nn.ReLU(), out=nn.Linear(12, C)))
    for epoch in t.epochs:
        assert intervene.load_checkpoint(fresh, t, epoch) == epoch
        for layer, module in (("L_hidden", fresh.hidden), ("L_out", fresh.out)):
            np.testing.assert_array_equal(module.weight.detach().numpy(), t.weights(epoch, layer))
            bias = t.query(f"E_{epoch}/{layer}", columns=["bias"])["bias"].to_numpy()
            np.testing.assert_array_equal(module.bias.detach().numpy(), bias)
    assert intervene.load_checkpoint(fresh, t.path) == 3
    assert all(_bit_equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    with pytest.raises(KeyError, match="no checkpoint for epoch 1 .*epochs with checkpoints: 0, 2, 3"):
        intervene.load_checkpoint(fresh, t, 1)


def test_load_checkpoint_names_the_mismatch(trained):
    _, t, _, _ = trained
    wider = nn.Sequential(OrderedDict(hidden=nn.Linear(C + 1, 13), relu=nn.ReLU(), out=nn.Linear(13, C)))
    with pytest.raises(
        ValueError, match=r"shape differences: hidden.weight: checkpoint \(12, 4\), model \(13, 4\)"
    ):
        intervene.load_checkpoint(wider, t, 0)
    other = nn.Sequential(OrderedDict(hidden=nn.Linear(C + 1, 12), extra=nn.Linear(12, 12)))
    with pytest.raises(
        ValueError, match=r"missing from the checkpoint: extra.weight, extra.bias; not in the model: out"
    ):
        intervene.load_checkpoint(other, t, 0)


def test_effects_over_training_restore_the_model(trained, tmp_path):
    model, t, x, y = trained
    params = _fingerprint(model)
    model.train()
    effects = intervene.stain_effects(model, t, x, y, epoch="all", layers=["L_hidden", "L_relu"], controls=2)
    assert model.training and all(_bit_equal(model.state_dict()[k], v) for k, v in params.items())
    assert sorted(effects["epoch"].unique()) == [0, 2, 3]
    assert set(effects["unit"]) == {"neurons", "edges"}
    # epoch 0's rows are measured with epoch 0's weights: its baseline accuracy is that model's
    fresh = nn.Sequential(OrderedDict(hidden=nn.Linear(C + 1, 12), relu=nn.ReLU(), out=nn.Linear(12, C)))
    for epoch in (0, 3):
        intervene.load_checkpoint(fresh, t, epoch)
        acc, logit = intervene.class_scores(fresh.eval()(x).detach(), y.numpy(), C)
        rows = effects[(effects["epoch"] == epoch)].drop_duplicates("eval_class").set_index("eval_class")
        np.testing.assert_allclose(rows["acc_base"].sort_index(), acc)
        np.testing.assert_allclose(rows["logit_base"].sort_index(), logit, rtol=1e-6)
    spec = intervene.specificity(effects)
    assert set(spec.index.get_level_values("epoch")) == {0, 2, 3}
    intervene.save_effects(t, effects)
    back = intervene.load_effects(t.path)
    pd.testing.assert_frame_equal(back, effects)
    assert intervene.load_effects(tmp_path) is None
    with pytest.raises(KeyError, match="epoch 1 not in trace"):
        intervene.stain_effects(model, t, x, y, epoch=[1])


def test_effects_without_checkpoint_use_the_last_epoch_only(planted):
    model, t, x, y = planted
    effects = intervene.stain_effects(model, t, x, y, epoch=-1, layers="L_out", pathways=False, controls=1)
    assert (effects["epoch"] == t.epochs[-1]).all()
    with pytest.raises(KeyError, match="epoch 0 has no checkpoint .*epochs with checkpoints: none"):
        intervene.stain_effects(model, t, x, y, epoch=0)
    with pytest.raises(KeyError, match="epoch='all' needs checkpoints"):
        intervene.stain_effects(model, t, x, y, epoch="all")
    with pytest.raises(ValueError, match="control 'none' is not one of: unstained, random"):
        intervene.stain_effects(model, t, x, y, control="none")
    with pytest.raises(ValueError, match="label 5 is not a class"):
        intervene.stain_effects(model, t, x, torch.full_like(y, 5))


def test_specificity_by_hand():
    rows = []
    for stain in (0, 1):
        for ev in (0, 1, 2):
            drop = {(0, 0): 0.5, (0, 1): 0.1, (0, 2): 0.0, (1, 0): 0.2, (1, 1): 0.3, (1, 2): 0.1}[(stain, ev)]
            rows.append(
                dict(
                    unit="neurons", epoch=4, layer="L_a", stain_class=stain, eval_class=ev, n_ablated=3,
                    acc_change=-drop, logit_change=-2 * drop, control_acc_change=0.0, control_logit_change=-0.1,
                )
            )  # fmt: skip
    spec = intervene.specificity(pd.DataFrame(rows))
    row = spec.loc[("neurons", 4, "L_a")]
    assert row["specificity"] == pytest.approx(((0.5 - 0.05) + (0.3 - 0.15)) / 2)
    assert row["logit_specificity"] == pytest.approx(2 * row["specificity"])
    assert row["control_specificity"] == 0 and row["control_logit_specificity"] == pytest.approx(0)
    per = intervene.specificity(pd.DataFrame(rows), per_class=True)
    assert per["specificity"].to_list() == pytest.approx([0.45, 0.15])


# -- Captum ----------------------------------------------------------------------------------------
def test_conductance_matches_the_closed_form(planted):
    pytest.importorskip("captum")
    model, t, x, y = planted
    table = intervene.conductance(model, t, x, y, layers=["L_hidden", "L_out"], n_steps=8)
    # along the straight path α·x (bias 0, ReLU positively homogeneous) the gradient of logit c with
    # respect to hidden pre-activation j is constant, W_out[c, j]·1[z_j > 0], and the pre-activation is
    # α·z_j. Captum sums gradient × (change of the neuron between consecutive quadrature points), here
    # the 9 Gauss-Legendre nodes on [0, 1], so the conductance is W_out[c, j]·relu(z_j)·(α_last − α_first).
    nodes = (np.polynomial.legendre.leggauss(9)[0] + 1) / 2
    span = nodes.max() - nodes.min()
    z = x.double().numpy() @ model.hidden.weight.detach().double().numpy().T
    w2 = model.out.weight.detach().double().numpy()
    for c in range(C):
        expected = (np.maximum(z[y.numpy() == c], 0) * w2[c]).mean(0) * span
        np.testing.assert_allclose(table.loc["L_hidden"][c].to_numpy(), expected, rtol=1e-4, atol=1e-6)
        logits = numpy_logits(model, x)[y.numpy() == c].mean(0)
        np.testing.assert_allclose(table.loc[("L_out", c), c], logits[c] * span, rtol=1e-4)
    corr = intervene.conductance_correlation(model, t, x, y, layers=["L_hidden", "L_relu"], n_steps=8)
    from scipy.stats import spearmanr

    sel = st.selectivity(t, -1).droplevel("epoch").xs("L_hidden", level="layer", drop_level=False)
    sel = sel[sel["stain"] >= 0]
    own = [table.loc[idx, s] for idx, s in zip(sel.index, sel["stain"])]
    assert corr.loc["L_hidden", "n_stained"] == 2 * C
    assert corr.loc["L_hidden", "spearman"] == pytest.approx(spearmanr(sel["selectivity"], own)[0])
    assert corr.loc["L_hidden", "positive_frac"] == 1.0


def test_rank_correlation_against_scipy():
    from scipy.stats import spearmanr

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=40), rng.normal(size=40)
    b[:10] = a[:10]
    a[5] = a[6]  # a tie
    assert intervene.rank_correlation(a, b) == pytest.approx(spearmanr(a, b)[0])
    assert np.isnan(intervene.rank_correlation([1, 2], [2, 1]))
    assert np.isnan(intervene.rank_correlation([1, 1, 1], [1, 2, 3]))


def test_captum_is_optional():
    code = (
        "import sys; sys.modules['captum'] = None; sys.modules['captum.attr'] = None\n"
        "import nn_staining.intervene as iv\n"
        "try:\n    iv.conductance(None, None, None, None)\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "pip install captum" in out


def test_class_pathway_edges_are_those_of_staining_pathways(trained):
    _, t, _, _ = trained
    for epoch in t.epochs:
        for top_k in (1, 4):
            edges = intervene.class_pathway_edges(t, epoch, top_k)
            assert sorted(edges) == list(range(C))
            for c in range(C):
                assert edges[c] == intervene.pathway_edges(st.pathways(t, c, epoch, top_k=top_k))


def test_controls_unstained_and_random(planted):
    model, t, x, y = planted
    out = intervene.stain_effects(model, t, x, y, layers=["L_out"], pathways=False)
    assert (out["n_control"] == 0).all() and out["control_acc_change"].isna().all()  # no unstained logit
    first = intervene.stain_effects(model, t, x, y, layers=["L_hidden"], control="random", pathways=False)
    again = intervene.stain_effects(model, t, x, y, layers=["L_hidden"], control="random", pathways=False)
    pd.testing.assert_frame_equal(first, again)
    assert (first["n_control"] == 2).all()
    # random pairs of the 8 hidden neurons often hit planted ones: the control now moves classes
    assert (first["control_logit_change"] < 0).any()
    other = intervene.stain_effects(
        model, t, x, y, layers=["L_hidden"], control="random", seed=1, pathways=False
    )
    assert not np.allclose(first["control_logit_change"], other["control_logit_change"])


# -- figures -------------------------------------------------------------------------------------
def test_effect_matrix_draws_the_effects(planted, tmp_path):
    from nn_staining import plots

    model, t, x, y = planted
    effects = intervene.stain_effects(model, t, x, y, layers=["L_hidden", "L_out"], top_k=2)
    fig = plots.plot_effect_matrix(t, effects)
    axes = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title().split("\n")[0] for ax in axes] == [
        "L_hidden",
        "L_out",
        "top pathways' edges (pathways)",
    ]
    for ax, (unit, layer) in zip(
        axes, [("neurons", "L_hidden"), ("neurons", "L_out"), ("edges", "pathways")]
    ):
        part = effects[(effects["unit"] == unit) & (effects["layer"] == layer)]
        expected = part.pivot(index="stain_class", columns="eval_class", values="acc_change").to_numpy() * 100
        np.testing.assert_allclose(ax.images[0].get_array().filled(np.nan), expected)
        diagonal = [p for p in ax.patches if isinstance(p, Rectangle)]
        assert sorted(p.get_xy() for p in diagonal) == [(c - 0.5, c - 0.5) for c in range(C)]
        texts = {(round(tx.get_position()[0]), round(tx.get_position()[1])): tx.get_text() for tx in ax.texts}
        assert texts[(0, 0)] == f"{int(round(expected[0, 0])):+d}" and texts[(1, 0)] == "+0"
        noun = "neuron" if unit == "neurons" else "edge"
        for label in (t.get_text() for t in ax.get_yticklabels()):  # "(1 neuron)", "(5 neurons)", "(none)"
            count = label.rpartition("(")[2].split(" ")[0]
            assert label.endswith(
                "(none)" if count == "none" else f"({count} {noun}{'' if count == '1' else 's'})"
            ), label
    spec = intervene.specificity(effects).loc[("neurons", t.epochs[-1], "L_hidden"), "specificity"]
    assert f"specificity {int(round(spec * 100)):+d} points (control: +0)" in axes[0].get_title()
    assert "control: no unstained neurons" in axes[1].get_title()
    with pytest.raises(ValueError, match="has no stored stain effects"):
        plots.plot_effect_matrix(t)
    with pytest.raises(KeyError, match="no stain effects at epoch 0; epochs with effects: 1"):
        plots.plot_effect_matrix(t, effects, epoch=0)


def test_specificity_figure_draws_the_curves(trained):
    from nn_staining import plots

    model, t, x, y = trained
    effects = intervene.stain_effects(model, t, x, y, epoch="all", layers=["L_hidden", "L_relu"], controls=2)
    spec = intervene.specificity(effects)
    fig = plots.plot_specificity(t, effects)
    left, right = fig.axes[:2]
    solid = {
        line.get_label(): line
        for line in left.lines
        if line.get_linestyle() == "-" and line.get_marker() == "o"
    }
    assert list(solid) == ["L_hidden", "L_relu", "top pathways' edges (pathways)"]
    dashed = [line for line in left.lines if line.get_linestyle() == "--"]
    for (label, line), control in zip(solid.items(), dashed):
        unit, layer = ("edges", "pathways") if label.startswith("top") else ("neurons", label)
        data = spec.xs((unit, layer), level=("unit", "layer")).sort_index()
        np.testing.assert_array_equal(line.get_xdata(), [0, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), data["specificity"] * 100)
        np.testing.assert_allclose(control.get_ydata(), data["control_specificity"] * 100)
        assert control.get_color() == line.get_color()
    logit = [line for line in right.lines if line.get_marker() == "o"]
    np.testing.assert_allclose(
        logit[0].get_ydata(), spec.xs(("neurons", "L_hidden"), level=("unit", "layer"))["logit_specificity"]
    )


def test_pipeline_stores_checkpoints_effects_and_causal_rings(tmp_path):
    from nn_staining import plots
    from nn_staining.figures import figure_names
    from nn_staining.pipeline import RunConfig, run_pipeline

    result = run_pipeline(RunConfig(dataset="moons", epochs=3, hidden=6, output_dir=str(tmp_path)))
    t = load_trace(result.store)
    assert checkpoint_epochs(t) == t.epochs == [0, 1, 2]
    effects = intervene.load_effects(t)
    assert sorted(effects["epoch"].unique()) == [0, 1, 2] and set(effects["unit"]) == {"neurons", "edges"}
    neurons = intervene.load_effects(t, "neuron_effects")
    assert neurons.index.names == ["layer", "neuron"] and (neurons["epoch"] == 2).all()
    mine = ["effect_matrix", "stain_specificity", "causal_staining_graph"]
    assert [name for name in figure_names(t) if name in mine] == mine
    rings = intervene.causal_rings(t, neurons)
    assert set(rings.index.get_level_values("layer")) == {"L_input", "L_hidden_1"}  # the logits left out
    fig = plots.plot_staining_graph(t, -1, neuron_rings=rings)
    drawn = [c for ax in fig.axes for c in ax.collections if c.get_gid() == "rings"]
    positive = rings[rings > 0]
    assert len(positive) >= 2
    (collection,) = drawn
    widths = np.sort(collection.get_linewidths())
    np.testing.assert_allclose(widths, np.sort(0.5 + 3.5 * positive.to_numpy() / positive.max()))
    # a replaced run loses the old run's checkpoints and effects
    run_pipeline(
        RunConfig(dataset="moons", epochs=1, hidden=6, output_dir=str(tmp_path), interventions=False)
    )
    assert checkpoint_epochs(t) == [0] and intervene.load_effects(t) is None


def test_the_pipeline_checks_stains_at_a_few_evenly_spaced_epochs():
    from nn_staining.pipeline import MAX_EFFECT_EPOCHS, _spread

    assert MAX_EFFECT_EPOCHS == 8
    assert _spread(list(range(30)), 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert _spread([3, 5], 8) == [3, 5]
    assert _spread(list(range(0, 22, 2)), 3) == [0, 10, 20]
