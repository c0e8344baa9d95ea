"""Per-sample analyses address each call of a module as the recorder does: ``L_x`` is module x's first
call in a forward pass, ``L_x:n`` its n-th.

Two models call one module several times: a hand-built network whose ``act`` ReLU runs three times and
whose square ``tied`` Linear twice (every expected value recomputed here in float64 numpy from its
weights), and ``tests/zoo.py``'s torchvision resnet18, whose ``layer1.0.relu`` runs before and after the
residual sum (expected values from this test's own hooks on the second call alone).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, intervene, load_trace
from nn_staining import representations as rep
from nn_staining import staining as st
from nn_staining.probes import ProbeSet, read_probe_inputs
from tests import zoo

torch.set_num_threads(1)

N = 48


class Loop(nn.Module):
    """``act`` called three times and ``tied`` twice in each pass; ``fc`` and ``out`` once."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(5)
        self.fc = nn.Linear(3, 6)
        self.act = nn.ReLU()
        self.tied = nn.Linear(6, 6)
        self.out = nn.Linear(6, 2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        h = self.act(self.tied(h))
        h = self.act(self.tied(h))
        return self.out(h)


def loop_numpy(model: Loop, x: torch.Tensor, change=None, cut=None) -> dict[str, np.ndarray]:
    """Every layer of the loop network in float64: ``change(layer, values)`` edits a call's output, ``cut``
    maps a Linear call's key to the (j, k) weights zeroed in that call only."""
    w = {name: p.detach().double().numpy() for name, p in model.named_parameters()}
    change = change or (lambda layer, values: values)
    cut = cut or {}

    def linear(name: str, key: str, h: np.ndarray) -> np.ndarray:
        weight = w[f"{name}.weight"].copy()
        for j, k in cut.get(key, ()):
            weight[j, k] = 0.0
        return change(key, h @ weight.T + w[f"{name}.bias"])

    out = {"input": x.double().numpy()}
    out["L_fc"] = linear("fc", "L_fc", out["input"])
    out["L_act"] = change("L_act", np.maximum(out["L_fc"], 0))
    out["L_tied"] = linear("tied", "L_tied", out["L_act"])
    out["L_act:2"] = change("L_act:2", np.maximum(out["L_tied"], 0))
    out["L_tied:2"] = linear("tied", "L_tied:2", out["L_act:2"])
    out["L_act:3"] = change("L_act:3", np.maximum(out["L_tied:2"], 0))
    out["L_out"] = linear("out", "L_out", out["L_act:3"])
    return out


def zeroed(layer: str, neurons: list[int]):
    def change(key: str, values: np.ndarray) -> np.ndarray:
        if key == layer:
            values = values.copy()
            values[:, neurons] = 0.0
        return values

    return change


def loop_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 3, generator=g)
    return x, (x[:, 0] + 0.5 * x[:, 1] > 0).long()


def numpy_cka(a: np.ndarray, b: np.ndarray) -> float:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return float(np.linalg.norm(a.T @ b) ** 2 / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b)))


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    model = Loop()
    x, y = loop_data()
    store = tmp_path_factory.mktemp("loop") / "run"
    with NetworkTrace(model, store, num_classes=2, probe=(x, y), background=False) as trace:
        trace.start_epoch(0)
        for start in range(0, N, 16):
            trace.set_targets(y[start : start + 16])
            model(x[start : start + 16])
        trace.end_epoch()
    return model, load_trace(store), x, y


# -- probes ------------------------------------------------------------------------------------------
def test_probe_records_every_call_of_a_module_against_numpy(loop):
    model, t, x, _ = loop
    expected = loop_numpy(model, x)
    for key in ["L_fc", "L_act", "L_tied", "L_act:2", "L_tied:2", "L_act:3", "L_out"]:
        np.testing.assert_allclose(t.probe(0, key), expected[key], rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(
            t.probe_gram(0, key), expected[key] @ expected[key].T, rtol=1e-5, atol=1e-5, err_msg=key
        )
    # each call of the shared Linear keeps its own inputs (breadcrumbs)
    np.testing.assert_allclose(read_probe_inputs(t.path, t.meta, 0, "L_tied"), expected["L_act"], rtol=1e-5)
    np.testing.assert_allclose(
        read_probe_inputs(t.path, t.meta, 0, "L_tied:2"), expected["L_act:2"], rtol=1e-5
    )
    assert rep.probe_layers(t, 0) == ["L_fc", "L_act", "L_act:2", "L_act:3", "L_tied", "L_tied:2", "L_out"]


def test_cka_and_linear_probe_treat_each_call_as_a_layer(loop):
    model, t, x, _ = loop
    expected = loop_numpy(model, x)
    cka = rep.cka(t, epoch=0)["cka"]
    for a, b in [("L_act", "L_act:3"), ("L_act:2", "L_tied:2"), ("L_tied", "L_tied:2")]:
        assert cka.loc[(0, a, b)] == pytest.approx(numpy_cka(expected[a], expected[b]), abs=1e-6)
    probed = rep.linear_probe(t).reset_index()
    assert {"L_act:2", "L_act:3", "L_tied:2"} <= set(probed["layer"])


def test_probe_of_the_second_relu_call_of_a_resnet_block(tmp_path):
    """The probe's ``L_layer1.0.relu:2`` is this test's own capture of the second call (spatial means),
    whether the activations are kept or only the Gram (budget 0)."""
    model = zoo.resnet18(num_classes=10, width=8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(12, 3, 32, 32, generator=g), torch.arange(12) % 10
    for budget in (8 * 2**20, 0):
        store = tmp_path / f"budget{budget}"
        probe = ProbeSet.from_arg((x, y), budget_bytes=budget)
        with NetworkTrace(model, store, num_classes=10, probe=probe, background=False) as trace:
            trace.start_epoch(0)
            trace.set_targets(y)
            model(x)  # training mode: the batch-norm statistics move before the probe pass
            trace.end_epoch()
        calls = _capture_calls(model, model.layer1[0].relu, x)
        assert len(calls) == 2
        t = load_trace(store)
        for key, out in zip(["L_layer1.0.relu", "L_layer1.0.relu:2"], calls):
            means = out.mean((2, 3)).double().numpy()
            np.testing.assert_allclose(t.probe_gram(0, key), means @ means.T, rtol=1e-4, atol=1e-5)
            if budget:
                np.testing.assert_allclose(t.probe(0, key), means, rtol=1e-5, atol=1e-6)
        assert not np.allclose(calls[0].mean((2, 3)), calls[1].mean((2, 3)))


def _capture_calls(model: nn.Module, module: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each call's output of ``module`` in one eval-mode pass (the probe's mode), by this test's own hook."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
        model.train(training)
    return seen


# -- interventions -----------------------------------------------------------------------------------
def _outputs_per_call(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Logits and each call's output of ``module`` as the layers after it see it (the hook runs after any
    ablation hook registered before it)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda m, a, out: seen.append(out.detach().clone()))
    try:
        with torch.no_grad():
            logits = model(x)
    finally:
        handle.remove()
    return logits, seen


@pytest.mark.parametrize("traced", [False, True])
def test_ablating_one_call_changes_that_call_only(loop, traced):
    model, t, x, _ = loop
    trace = t if traced else None
    base, base_calls = _outputs_per_call(model, model.act, x)
    for call, key in enumerate(["L_act", "L_act:2", "L_act:3"]):
        with intervene.ablate(model, f"{key}/n_1,4", trace=trace) as chosen:
            logits, calls = _outputs_per_call(model, model.act, x)
        assert chosen == {key: [1, 4]}
        expected = loop_numpy(model, x, zeroed(key, [1, 4]))
        np.testing.assert_allclose(logits.double().numpy(), expected["L_out"], rtol=1e-5, atol=1e-5)
        for n in range(3):
            if n == call:
                assert (calls[n][:, [1, 4]] == 0).all()
                keep = [0, 2, 3, 5]
                assert torch.equal(calls[n][:, keep], base_calls[n][:, keep])
            elif n < call:
                assert torch.equal(calls[n], base_calls[n])  # calls before the ablated one are untouched
    assert torch.equal(_outputs_per_call(model, model.act, x)[0], base)


def test_ablating_a_call_equals_a_hook_on_that_call_alone(loop):
    """Against the test's own hook that zeroes the neurons at the second call only (torch, bit for bit)."""
    model, t, x, _ = loop
    count = [0]

    def second_call_only(module, args, out):
        count[0] += 1
        if count[0] % 3 == 2:
            out = out.clone()
            out[:, 2] = 0
            return out
        return None

    handle = model.act.register_forward_hook(second_call_only)
    with torch.no_grad():
        expected = model(x)
    handle.remove()
    for trace in (None, t):
        with torch.no_grad(), intervene.ablate(model, "L_act:2/n_2", trace=trace):
            assert torch.equal(model(x), expected)
            assert torch.equal(model(x[:5]), expected[:5])  # counted again in each pass


def test_ablating_with_recorded_means_of_a_call(loop):
    model, t, x, _ = loop
    mean = float(t["E_0/L_act:2/n_3"]["act_mean"])
    assert mean != float(t["E_0/L_act/n_3"]["act_mean"])

    def change(key, values):
        if key == "L_act:2":
            values = values.copy()
            values[:, 3] = np.float32(mean)
        return values

    with torch.no_grad(), intervene.ablate(model, "L_act:2/n_3", mode="mean", trace=t):
        logits = model(x)
    np.testing.assert_allclose(
        logits.double().numpy(), loop_numpy(model, x, change)["L_out"], rtol=1e-5, atol=1e-5
    )


def test_globs_name_the_calls_they_match(loop):
    model, t, x, _ = loop
    names = ["L_act", "L_act:2", "L_act:3"]
    for trace in (None, t):
        for pattern, keys in [("L_act*", names), ("L_act:*", names[1:]), ("L_*:3", names[2:])]:
            with torch.no_grad(), intervene.ablate(model, f"{pattern}/n_0", trace=trace):
                logits, calls = _outputs_per_call(model, model.act, x)

            def change(key, values, keys=keys):
                return zeroed(key, [0])(key, values) if key in keys else values

            expected = loop_numpy(model, x, change)
            np.testing.assert_allclose(logits.double().numpy(), expected["L_out"], rtol=1e-5, atol=1e-5)
            for name, call in zip(names, calls):
                np.testing.assert_allclose(call.double().numpy(), expected[name], rtol=1e-5, atol=1e-6)


def test_unknown_call_numbers_name_the_calls(loop):
    model, t, x, _ = loop
    with pytest.raises(
        ValueError,
        match=r"'L_act:7' names call 7 of module 'act', but the trace has 3 calls of it per forward pass; "
        r"its layers: L_act, L_act:2, L_act:3$",
    ):
        intervene.neuron_selection("L_act:7/n_0", model, t)
    with (
        pytest.raises(
            ValueError,
            match=r"'L_act:7' names call 7 .*called at most 3 times; its layers: L_act, L_act:2, L_act:3",
        ),
        intervene.ablate(model, "L_act:7/n_0"),
        torch.no_grad(),
    ):
        model(x)
    with (
        pytest.raises(ValueError, match=r"'L_tied:3' names call 3 .*its layers: L_tied, L_tied:2"),
        intervene.ablate_edges(model, [("L_tied:3", 0, 0)], trace=t),
    ):
        pass
    with pytest.raises(
        ValueError, match=r"'L_fc:2' names call 2 of module 'fc', but the trace has 1 call of it"
    ):
        intervene.stain_effects(model, t, x, torch.zeros(N, dtype=torch.long), layers="L_fc:2")


@pytest.mark.parametrize("traced", [False, True])
def test_cutting_edges_of_one_call_of_a_shared_linear(loop, traced):
    model, t, x, _ = loop
    trace = t if traced else None
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for cut in (
        {"L_tied": [(1, 2), (3, 0)]},
        {"L_tied:2": [(1, 2)]},
        {"L_tied": [(1, 2)], "L_tied:2": [(4, 5)]},
    ):
        edges = [(key, j, k) for key, pairs in cut.items() for j, k in pairs]
        with torch.no_grad(), intervene.ablate_edges(model, edges, trace=trace):
            logits = model(x)
            between = model.tied.weight.detach().clone()  # between passes: the first call's cut
        np.testing.assert_allclose(
            logits.double().numpy(), loop_numpy(model, x, cut=cut)["L_out"], rtol=1e-5, atol=1e-5
        )
        first = params["tied.weight"].clone()
        for j, k in cut.get("L_tied", ()):
            first[j, k] = 0
        assert torch.equal(between, first)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in params.items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_stain_and_neuron_effects_name_and_ablate_the_call_layer(loop):
    model, t, x, y = loop
    effects = intervene.stain_effects(model, t, x, y, layers="L_act:2", controls=1, pathways=False)
    assert set(effects["layer"]) == {"L_act:2"}
    stains = st.selectivity(t, 0).droplevel("epoch").xs("L_act:2", level="layer")["stain"]
    base = loop_numpy(model, x)["L_out"]
    for c, rows in effects.groupby("stain_class"):
        neurons = stains.index[stains.to_numpy() == c].to_list()
        ablated = loop_numpy(model, x, zeroed("L_act:2", neurons))["L_out"]
        for _, row in rows.iterrows():
            e = int(row["eval_class"])
            mine = y.numpy() == e
            acc = (ablated[mine].argmax(1) == e).mean() - (base[mine].argmax(1) == e).mean()
            assert row["acc_change"] == pytest.approx(acc, abs=1e-9)
            assert row["logit_change"] == pytest.approx((ablated[mine, e] - base[mine, e]).mean(), abs=1e-4)
    single = intervene.neuron_effects(model, t, x, y, layers=["L_act", "L_act:2"])
    assert set(single.index.get_level_values("layer")) == {"L_act", "L_act:2"}
    for (layer, neuron), row in single.iterrows():
        c = int(row["top_class"])
        ablated = loop_numpy(model, x, zeroed(layer, [neuron]))["L_out"]
        mine = y.numpy() == c
        assert row["logit_change"] == pytest.approx((ablated[mine, c] - base[mine, c]).mean(), abs=1e-4)


def test_ablating_the_second_relu_call_of_a_resnet_block(tmp_path):
    """Zeroing channel 3 of ``L_layer1.0.relu:2`` equals the test's own hook zeroing it at the second call
    only; the first call's output is untouched, and it differs from zeroing it in both calls."""
    model = zoo.resnet18(num_classes=10, width=8).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 32, 32, generator=g)
    relu = model.layer1[0].relu

    def own(calls: set[int]):
        count = [0]

        def hook(module, args, out):
            count[0] += 1
            if count[0] in calls:
                out = out.clone()
                out[:, 3] = 0
                return out
            return None

        return hook

    expected = {}
    for name, calls in (("second", {2}), ("both", {1, 2})):
        handle = relu.register_forward_hook(own(calls))
        with torch.no_grad():
            expected[name] = model(x)
        handle.remove()
    base, base_calls = _outputs_per_call(model, relu, x)
    with intervene.ablate(model, "L_layer1.0.relu:2/n_3"):
        logits, calls = _outputs_per_call(model, relu, x)
    assert torch.allclose(logits, expected["second"], rtol=0, atol=0)
    assert not torch.allclose(logits, expected["both"]) and not torch.allclose(logits, base)
    assert torch.equal(calls[0], base_calls[0])
    assert (calls[1][:, 3] == 0).all() and torch.equal(calls[1][:, :3], base_calls[1][:, :3])
    with intervene.ablate(model, "L_layer1.0.relu/n_3"):
        _, calls = _outputs_per_call(model, relu, x)
    assert (calls[0][:, 3] == 0).all() and not (calls[1][:, 3] == 0).all()


def test_modules_no_signature_can_address_are_skipped():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(3, 4))
    model.add_module("odd name", nn.ReLU())
    x = torch.randn(5, 3)
    with torch.no_grad(), intervene.ablate(model, "L_fc/n_1") as chosen:
        out = model(x)
    assert chosen == {"L_fc": [1]}
    assert (out[:, 1] == 0).all()
    with pytest.raises(KeyError) as error:
        intervene.neuron_selection("L_odd*/n_0", model)
    assert error.value.args[0].endswith("matches no layer; layers: L_fc")


def test_breadcrumbs_follow_each_call_of_a_shared_linear_by_brute_force(loop):
    """A sample's paths through ``fc → tied → tied:2 → out``: each call's own inputs, the shared weights."""
    model, t, x, y = loop
    sample = 3
    layers = loop_numpy(model, x)
    w = {name: p.detach().double().numpy() for name, p in model.named_parameters()}
    steps = [
        (w["fc.weight"], layers["input"]),
        (w["tied.weight"], layers["L_act"]),
        (w["tied.weight"], layers["L_act:2"]),
        (w["out.weight"], layers["L_act:3"]),
    ]
    shares = []
    for weight, inputs in steps:
        contrib = weight * inputs[sample][None, :]
        shares.append(contrib / np.abs(contrib).sum(1, keepdims=True))
    target = int(y[sample])
    scored = []
    for i0 in range(3):
        for i1 in range(6):
            for i2 in range(6):
                for i3 in range(6):
                    path = (i0, i1, i2, i3, target)
                    score = np.prod([shares[s][path[s + 1], path[s]] for s in range(4)])
                    scored.append((score, path))
    scored.sort(key=lambda item: -item[0])
    crumbs = rep.breadcrumbs(t, sample, 0, top_k=4)
    names = ["x", "L_fc", "L_tied", "L_tied:2", "L_out"]
    for rank, (score, path) in enumerate(scored[:4]):
        assert crumbs.paths.loc[rank, "score"] == pytest.approx(score, rel=1e-5)
        assert crumbs.paths.loc[rank, "path"] == tuple(f"{names[i]}/n_{n}" for i, n in enumerate(path))


def test_conductance_leaves_out_modules_called_several_times(loop):
    """Captum hooks a module, not one of its calls: only the layers of modules called once are measured."""
    pytest.importorskip("captum")
    model, t, x, y = loop
    table = intervene.conductance(model, t, x, y, layers=["L_fc", "L_act:2", "L_tied"], n_steps=4)
    assert set(table.index.get_level_values("layer")) == {"L_fc"}
    assert set(intervene.conductance_correlation(model, t, x, y, n_steps=4).index) == {"L_fc", "L_out"}
