"""nn_staining.layers.select_layers: which modules become layers, their keys, and the errors for names
no signature can address or keys two modules share. Models are built by hand with ``add_module``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, load_trace
from nn_staining.layers import select_layers


def model_of(*names: str, width: int = 3) -> nn.Sequential:
    """An nn.Sequential of Linear(width, width) modules registered under ``names``, in order."""
    model = nn.Sequential()
    for name in names:
        model.add_module(name, nn.Linear(width, width))
    return model


def keys_to_names(model: nn.Module, selected: dict[str, nn.Module]) -> dict[str, str]:
    """Each selected key with the name of the module it maps to (modules compared by identity)."""
    names = {id(m): name for name, m in model.named_modules()}
    return {key: names[id(m)] for key, m in selected.items()}


# -- keys ------------------------------------------------------------------------------------------
def test_default_keys_prefix_names_and_keep_existing_keys_in_model_order() -> None:
    model = model_of("b", "L_a", "c_d", "L_", "L_L_x")
    assert keys_to_names(model, select_layers(model)) == {
        "L_b": "b",
        "L_a": "L_a",
        "L_c_d": "c_d",
        "L_L_": "L_",  # 'L_' alone is no key: it gets the prefix
        "L_L_x": "L_L_x",
    }


def test_a_model_without_submodules_is_one_layer() -> None:
    model = nn.Linear(2, 2)
    assert select_layers(model) == {"L_model": model}


def test_a_module_named_l_underscore_is_recorded_as_l_l(tmp_path) -> None:
    """The name hypothesis found (``L_``): recorded under the key ``L_L_``, with the values numpy computes."""
    torch.manual_seed(0)
    model = model_of("L_", width=2)
    x = torch.randn(10, 2)
    with NetworkTrace(model, tmp_path / "t") as trace:
        assert trace.layers == ["L_L_"]
        trace.start_epoch(0)
        out = model(x)
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_L_"]
    frame = t.query("E_0/L_L_", columns=["act_mean", "act_max"])
    expected = out.detach().double().numpy()
    np.testing.assert_allclose(frame["act_mean"], expected.mean(0), rtol=1e-5)
    np.testing.assert_allclose(frame["act_max"], expected.max(0), rtol=1e-5)


# -- collisions --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("first", "second"), [("x", "L_x"), ("L_x", "x"), ("L_", "L_L_")])
def test_two_modules_with_one_key_are_an_error_naming_both(tmp_path, first: str, second: str) -> None:
    model = model_of(first, second)
    with pytest.raises(ValueError, match="both have the layer key") as info:
        NetworkTrace(model, tmp_path / "t")
    message = str(info.value)
    assert repr(first) in message and repr(second) in message
    assert not (tmp_path / "t").exists()


def test_colliding_modules_are_fine_when_only_one_is_recorded() -> None:
    model = model_of("x", "L_x")
    assert keys_to_names(model, select_layers(model, ["x"])) == {"L_x": "x"}
    # 'L_x' is both a module's name and the other module's key: the exact name is meant, and both
    # modules are recorded, so the collision is reported
    with pytest.raises(ValueError, match=r"'x' and 'L_x' both have the layer key 'L_x'"):
        select_layers(model, ["L_x"])


# -- names no signature can address ----------------------------------------------------------------
@pytest.mark.parametrize("bad", ["a/b", "a b", "tab\there"])
def test_a_recorded_module_with_an_unaddressable_name_is_an_error_naming_it(tmp_path, bad: str) -> None:
    model = model_of("ok", bad)
    with pytest.raises(ValueError, match="cannot be recorded") as info:
        NetworkTrace(model, tmp_path / "t")
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="cannot be recorded"):
        select_layers(model, ["*"])


@pytest.mark.parametrize("bad", ["a/b", "a b"])
def test_an_excluded_module_may_have_any_name(tmp_path, bad: str) -> None:
    model = model_of("ok", bad)
    with NetworkTrace(model, tmp_path / "t", layers=["ok"]) as trace:
        assert trace.layers == ["L_ok"]
    assert keys_to_names(model, select_layers(model, "L_o?")) == {"L_ok": "ok"}


# -- patterns ------------------------------------------------------------------------------------
def test_an_exact_name_wins_over_its_glob_reading() -> None:
    model = model_of("x", "[x]", "y")
    assert keys_to_names(model, select_layers(model, ["[x]"])) == {"L_[x]": "[x]"}
    assert keys_to_names(model, select_layers(model, ["L_[x]"])) == {"L_[x]": "[x]"}
    # a glob that is no module's name still matches as a glob
    assert keys_to_names(model, select_layers(model, ["[xy]"])) == {"L_x": "x", "L_y": "y"}
    assert keys_to_names(model, select_layers(model, ["L_[xy]"])) == {"L_x": "x", "L_y": "y"}


def test_patterns_select_in_model_order_without_duplicates() -> None:
    model = model_of("c", "a", "b")
    selected = select_layers(model, ["b", "*", "L_a"])
    assert keys_to_names(model, selected) == {"L_c": "c", "L_a": "a", "L_b": "b"}
    assert list(selected) == ["L_c", "L_a", "L_b"]
    assert list(select_layers(model, ("b", "c"))) == ["L_c", "L_b"]


def test_a_pattern_matching_nothing_lists_the_module_names() -> None:
    model = model_of("first", "second")
    with pytest.raises(
        ValueError, match=r"layers pattern 'thrid' matches no module; module names: first, second"
    ):
        select_layers(model, ["first", "thrid"])


def test_default_selection_is_leaves_and_opaque_modules_but_not_their_insides() -> None:
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(4, 2))
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    model.add_module("block", block)
    selected = select_layers(model)
    assert keys_to_names(model, selected) == {
        "L_attn": "attn",
        "L_block.0": "block.0",
        "L_block.1": "block.1",
    }
    # asked for by name, a non-leaf module and a module inside an opaque one are recorded
    assert list(select_layers(model, ["block", "attn.out_proj"])) == ["L_attn.out_proj", "L_block"]


# -- what is a neuron --------------------------------------------------------------------------------
def cnn_with_reshapes() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 2, 3),
        nn.ReLU(),
        nn.Identity(),
        nn.Flatten(),
        nn.Unflatten(1, (2, 16)),
        nn.Flatten(),
        nn.Linear(32, 3),
    )


def test_pure_reshapes_are_not_recorded_by_default_but_can_be_chosen() -> None:
    model = cnn_with_reshapes()
    assert list(select_layers(model)) == ["L_0", "L_1", "L_6"]
    assert list(select_layers(model, ["3", "6"])) == ["L_3", "L_6"]


def test_a_model_of_reshapes_only_still_records_them(tmp_path) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    assert list(select_layers(model)) == ["L_0", "L_1"]
    with NetworkTrace(model, tmp_path / "t") as trace, trace.epoch(0):
        model(torch.ones(2, 3, 4))
    assert load_trace(tmp_path / "t").query("E_0/L_0")["act_mean"].tolist() == [1.0] * 12


def test_meta_names_each_layer_s_module_as_the_model_names_it(tmp_path) -> None:
    model = model_of("L_hidden", "out")
    with NetworkTrace(model, tmp_path / "t") as trace, trace.epoch(0):
        model(torch.ones(2, 3))
    t = load_trace(tmp_path / "t")
    assert [t.layer_info(k)["module"] for k in t.layers] == ["L_hidden", "out"]  # not "hidden"


def test_gradient_norms_in_blocks_equal_numpy_across_block_edges(monkeypatch) -> None:
    from nn_staining import layers

    monkeypatch.setattr(layers, "NORM_BLOCK_ROWS", 7)
    rows = torch.randn(30, 4, generator=torch.Generator().manual_seed(0)) * 1e25  # squares overflow float32
    expected = np.linalg.norm(rows.double().numpy(), axis=1)
    np.testing.assert_allclose(layers._row_norms(rows).numpy(), expected, rtol=1e-12)


def test_a_module_named_l_underscore_is_found_by_its_name(tmp_path) -> None:
    """The recorder keys a module named 'L_' as 'L_L_'; the trace finds it by either."""
    model = model_of("L_", "out")
    with NetworkTrace(model, tmp_path / "t") as trace, trace.epoch(0):
        model(torch.ones(2, 3))
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_L_", "L_out"]
    assert t.layer_info("L_")["key"] == t.layer_info("L_L_")["key"] == "L_L_"
    assert t.layer_info("out")["key"] == "L_out"
    with pytest.raises(KeyError, match="layer 'a/b' not in trace"):
        t.layer_info("a/b")
