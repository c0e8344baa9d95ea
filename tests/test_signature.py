"""Tests for nn_staining.signature: examples, error cases, brute-force and property checks."""

import fnmatch
import string
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # until the package is installed

from nn_staining.signature import (
    GRAMMAR,
    IndexSelection,
    Signature,
    call_key,
    epoch_key,
    format_signature,
    is_glob,
    layer_key,
    match_layers,
    neuron_key,
    parse_key,
    parse_signature,
)

ALL = IndexSelection()


def one(v: int) -> IndexSelection:
    return IndexSelection(values=(v,))


# --- examples -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("E_30/L_hidden_1/n_20", Signature(one(30), "L_hidden_1", one(20))),
        ("E_*/L_hidden_1/n_20", Signature(ALL, "L_hidden_1", one(20))),
        ("E_10:20/L_*", Signature(IndexSelection(start=10, stop=20), "L_*")),
        (
            "E_3/L_features.0/n_1,4,7",
            Signature(one(3), "L_features.0", IndexSelection(values=(1, 4, 7))),
        ),
        ("E_3/L_hidden_*", Signature(one(3), "L_hidden_*")),
        ("E_3", Signature(one(3))),
        ("E_*", Signature(ALL)),
        ("E_0:1", Signature(IndexSelection(start=0, stop=1))),
        ("E_5/L_encoder.layers.0.self_attn", Signature(one(5), "L_encoder.layers.0.self_attn")),
        ("E_5/L_block[0-3].fc?/n_*", Signature(one(5), "L_block[0-3].fc?", ALL)),
        ("  E_30/L_hidden_1/n_20\n", Signature(one(30), "L_hidden_1", one(20))),
        ("E_007/L_a/n_00", Signature(one(7), "L_a", one(0))),
    ],
)
def test_parse_examples(text: str, expected: Signature) -> None:
    assert parse_signature(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "E_30/L_hidden_1/n_20",
        "E_*/L_hidden_1/n_20",
        "E_10:20/L_*",
        "E_3/L_features.0/n_1,4,7",
        "E_3/L_hidden_*",
        "E_3",
    ],
)
def test_canonical_examples_format_back(text: str) -> None:
    assert str(parse_signature(text)) == text


@pytest.mark.parametrize(
    ("legacy", "slash"),
    [
        ("E_30-L_hidden_1-n_20", "E_30/L_hidden_1/n_20"),
        ("E_30-L_hidden_1", "E_30/L_hidden_1"),
        ("E_*-L_hidden_1-n_20", "E_*/L_hidden_1/n_20"),
        ("E_10:20-L_*", "E_10:20/L_*"),
        ("E_3-L_features.0-n_1,4,7", "E_3/L_features.0/n_1,4,7"),
        ("E_3-L_hidden_*", "E_3/L_hidden_*"),
    ],
)
def test_legacy_dash_form_equals_slash_form(legacy: str, slash: str) -> None:
    assert parse_signature(legacy) == parse_signature(slash)
    assert str(parse_signature(legacy)) == slash


def test_dashes_inside_names() -> None:
    # the legacy form's neuron part starts at the last "-n_"; in the slash form a dash is part of the name
    assert parse_signature("E_1-L_a-n_b-n_2") == Signature(one(1), "L_a-n_b", one(2))
    assert parse_signature("E_1/L_a-") == Signature(one(1), "L_a-")
    assert parse_signature("E_1/L_a-n_2") == Signature(one(1), "L_a-n_2")


def test_values_are_sorted_and_unique() -> None:
    assert parse_signature("E_3/L_a/n_7,1,4,1").neurons == IndexSelection(values=(1, 4, 7))
    assert str(IndexSelection(values=(7, 1, 4))) == "1,4,7"
    assert IndexSelection(values=(2, 2)).is_single


def test_selection_properties() -> None:
    assert ALL.is_all and not ALL.is_single and str(ALL) == "*"
    assert one(3).is_single and not one(3).is_all and str(one(3)) == "3"
    rng = IndexSelection(start=2, stop=5)
    assert not rng.is_all and not rng.is_single and str(rng) == "2:5"
    assert IndexSelection(start=2, stop=3).is_single is False
    assert str(IndexSelection(values=(1, 4, 7))) == "1,4,7"


def test_is_cell() -> None:
    assert parse_signature("E_30/L_hidden_1/n_20").is_cell
    assert parse_signature("E_30-L_hidden_1-n_20").is_cell
    for text in ["E_*/L_hidden_1/n_20", "E_30/L_hidden_*/n_20", "E_30/L_hidden_1/n_1,2"]:
        assert not parse_signature(text).is_cell, text
    for text in ["E_30/L_hidden_1", "E_30", "E_30/L_h/n_0:2", "E_3:4/L_h/n_0"]:
        assert not parse_signature(text).is_cell, text


def test_layer_matches() -> None:
    assert parse_signature("E_1/L_hidden_*").layer_matches("L_hidden_1")
    assert not parse_signature("E_1/L_hidden_*").layer_matches("L_output")
    assert parse_signature("E_1/L_*").layer_matches("L_encoder.layers.0.self_attn")
    assert parse_signature("E_1/L_features.?").layer_matches("L_features.0")
    assert not parse_signature("E_1/L_Hidden_1").layer_matches("L_hidden_1")
    assert parse_signature("E_1/L_hidden_1").layer_matches("L_hidden_1")
    assert parse_signature("E_1").layer_matches("L_anything")


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "L_a/n_3",
        "3/L_a",
        "e_3/L_a",
        "E_/L_a",
        "E_x/L_a",
        "E_1.5",
        "E_-1",
        "E_3/L_a/n_-2",
        "E_-1:3",
        "E_2:2",
        "E_5:3",
        "E_1:",
        "E_:3",
        "E_1:2:3",
        "E_1,",
        "E_,1",
        "E_1,,2",
        "E_ 3",
        "E_\u0663",
        "E_\u00b2",
        "E_" + "9" * 5000,
        "E_1/",
        "E_1/L_a/",
        "E_1//n_3",
        "E_1/L_",
        "E_1/n_3",
        "E_1-n_3",
        "E_1/L_a/n_2/x",
        "E_1/L_a/n_x",
        "E_1/L_a/N_2",
        "E_1/L_a b",
        "E_1/hidden_1",
        "E_1-",
        "E_1-L_a-n_2-",
        "E_1-L_a-n_x",
    ],
)
def test_malformed_raises_value_error_quoting_input(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_signature(text)
    message = str(info.value)
    assert message.startswith(f"malformed signature {text!r}: ")
    assert GRAMMAR in message


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("E_x/L_a", "epoch part 'E_x' is not a selection"),
        ("L_a", "epoch part 'L_a' does not start with 'E_'"),
        ("E_1/n_3", "neuron part 'n_3' needs a layer"),
        ("E_1/L_a/n_2/x", "4 parts"),
        ("E_1/L_a/", "trailing '/'"),
        ("E_2:2", "epoch part 'E_2:2' is an empty range"),
        ("E_1:2:3", "epoch part 'E_1:2:3' is not a selection"),
        ("E_1/L_a/n_5:3", "neuron part 'n_5:3' is an empty range"),
    ],
)
def test_error_says_which_part(text: str, detail: str) -> None:
    with pytest.raises(ValueError, match="malformed signature") as info:
        parse_signature(text)
    assert detail in str(info.value)


def test_example_error_message() -> None:
    with pytest.raises(ValueError) as info:
        parse_signature("E_x/L_a")
    message = str(info.value)
    assert message.startswith("malformed signature 'E_x/L_a': ")
    assert "expected E_<sel>[/L_<name>[/n_<sel>]] where <sel> is *, 3, 2:5 or 1,4,7" in message


@pytest.mark.parametrize("value", [None, 3, b"E_1", ["E_1"]])
def test_non_string_raises_type_error(value: object) -> None:
    with pytest.raises(TypeError):
        parse_signature(value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"start": 3, "stop": 3},
        {"start": 5, "stop": 3},
        {"start": 1},
        {"stop": 4},
        {"start": -1, "stop": 2},
        {"values": ()},
        {"values": (-1,)},
        {"start": 1, "stop": 2, "values": (1,)},
    ],
)
def test_invalid_index_selection(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        IndexSelection(**kwargs)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: Signature(one(1), None, one(2)), ValueError, "a neuron selection needs a layer"),
        (lambda: Signature(one(1), "hidden_1"), ValueError, "layer part 'hidden_1' does not start with 'L_'"),
        (lambda: Signature(one(1), "L_"), ValueError, "layer part 'L_' has an empty name"),
        (lambda: Signature(one(1), "L_a/b"), ValueError, "layer part 'L_a/b' contains '/'"),
        (lambda: Signature(one(1), "L_a\tb"), ValueError, "layer part 'L_a\\tb' contains whitespace"),
        (lambda: Signature("E_1"), TypeError, "epochs must be an IndexSelection, got 'E_1'"),
        (
            lambda: Signature(one(1), "L_a", "n_2"),
            TypeError,
            "neurons must be an IndexSelection or None, got 'n_2'",
        ),
        (lambda: Signature(one(1), 3), TypeError, "layer must be a str or None, got 3"),
        (lambda: IndexSelection(values=(True,)), TypeError, "a selected value must be an int, got True"),
        (lambda: IndexSelection(values=(-2,)), ValueError, "a selected value must be non-negative, got -2"),
        (
            lambda: IndexSelection(values=()),
            ValueError,
            "values must not be empty; use IndexSelection() for '*'",
        ),
        (lambda: IndexSelection(values="12"), TypeError, "values must be a tuple of ints, got '12'"),
        (lambda: IndexSelection(values=5), TypeError, "values must be a tuple of ints, got 5"),
        (
            lambda: IndexSelection(start=1, values=(1,)),
            ValueError,
            "IndexSelection takes either start/stop or values, not both",
        ),
        (lambda: IndexSelection(stop=4), ValueError, "a range needs both start and stop"),
        (lambda: IndexSelection(start=-1, stop=2), ValueError, "range start must be non-negative, got -1"),
        (lambda: IndexSelection(start=1, stop=1.5), TypeError, "range stop must be an int, got 1.5"),
        (lambda: IndexSelection(start=5, stop=3), ValueError, "empty range 5:3; need start < stop"),
        (lambda: parse_signature(b"E_1"), TypeError, "signature must be a str, got bytes: b'E_1'"),
        (lambda: format_signature("x"), ValueError, "epochs 'x' is not a selection: *, 3, 2:5 or 1,4,7"),
        (lambda: format_signature(1, "a", -2), ValueError, "neurons must be non-negative, got -2"),
        (lambda: format_signature(1.5), TypeError, "epochs must be an int, got 1.5"),
        (lambda: layer_key(None), TypeError, "layer name must be a str, got None"),
        (lambda: epoch_key(-1), ValueError, "epoch must be non-negative, got -1"),
        (lambda: epoch_key(True), TypeError, "epoch must be an int, got True"),
        (lambda: neuron_key(-3), ValueError, "neuron must be non-negative, got -3"),
        (lambda: neuron_key(2.0), TypeError, "neuron must be an int, got 2.0"),
        (lambda: parse_key("E_", 3), TypeError, "key must be a str, got 3"),
        (lambda: parse_key("n_", "n_x"), ValueError, "key 'n_x' is not of the form n_<int>"),
    ],
)
def test_error_messages_name_the_bad_value(call, error: type, message: str) -> None:
    with pytest.raises(error) as info:
        call()
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("", "it is empty"),
        ("E_1/L_a/n_2/", "trailing '/'"),
        ("E_1-", "trailing '-'"),
        ("E_1/L_a/n_2/x", "4 parts, at most 3 allowed"),
        ("E_1/n_2", "neuron part 'n_2' needs a layer part L_<name> before it"),
        ("E_1/hidden", "layer part 'hidden' does not start with 'L_'"),
        ("E_1/L_", "layer part 'L_' has an empty name"),
        ("E_1/L_a b", "layer part 'L_a b' contains whitespace"),
        ("X_1", "epoch part 'X_1' does not start with 'E_'"),
        ("E_1/L_a/m_2", "neuron part 'm_2' does not start with 'n_'"),
        ("E_4:4", "epoch part 'E_4:4' is an empty range; need start < stop"),
        ("E_1/L_a/n_x", "neuron part 'n_x' is not a selection"),
    ],
)
def test_malformed_message_in_full(text: str, detail: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_signature(text)
    assert str(info.value) == f"malformed signature {text!r}: {detail}; expected {GRAMMAR}"


# --- formatting and keys --------------------------------------------------------------------


def test_format_signature() -> None:
    assert format_signature(30, "hidden_1", 20) == "E_30/L_hidden_1/n_20"
    assert format_signature(30, "L_hidden_1", 20) == "E_30/L_hidden_1/n_20"
    assert format_signature("*", "hidden_1", 20) == "E_*/L_hidden_1/n_20"
    assert format_signature("10:20", "*") == "E_10:20/L_*"
    assert format_signature(3, "features.0", "1,4,7") == "E_3/L_features.0/n_1,4,7"
    assert format_signature(IndexSelection(start=2, stop=5)) == "E_2:5"
    assert format_signature(3, "hidden_*", IndexSelection()) == "E_3/L_hidden_*/n_*"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((-1,), ValueError),
        (("x",), ValueError),
        (("5:3",), ValueError),
        ((1, None, 2), ValueError),
        ((1, ""), ValueError),
        ((1, "a/b"), ValueError),
        ((1, "a", -2), ValueError),
        ((1.5,), TypeError),
        ((True,), TypeError),
    ],
)
def test_format_signature_errors(args: tuple, error: type) -> None:
    with pytest.raises(error):
        format_signature(*args)


def test_keys() -> None:
    assert layer_key("hidden_1") == "L_hidden_1"
    assert layer_key("L_hidden_1") == "L_hidden_1"
    assert layer_key("features.0") == "L_features.0"
    assert epoch_key(3) == "E_3"
    assert neuron_key(20) == "n_20"
    assert parse_key("E_", "E_3") == 3
    assert parse_key("n_", "n_20") == 20
    assert parse_key("E_", epoch_key(12)) == 12


@pytest.mark.parametrize(("prefix", "key"), [("E_", "n_3"), ("E_", "E_"), ("E_", "E_-1"), ("n_", "n_x")])
def test_parse_key_errors_quote_key(prefix: str, key: str) -> None:
    with pytest.raises(ValueError, match=repr(key)):
        parse_key(prefix, key)


@pytest.mark.parametrize("bad", [-1, True, 1.0])
def test_epoch_and_neuron_key_reject_bad_values(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        epoch_key(bad)  # type: ignore[arg-type]
    with pytest.raises((TypeError, ValueError)):
        neuron_key(bad)  # type: ignore[arg-type]


def test_is_glob() -> None:
    assert is_glob("L_hidden_*") and is_glob("L_fc?") and is_glob("L_block[0-3]")
    assert not is_glob("L_hidden_1") and not is_glob("L_features.0")


# --- brute force and properties -------------------------------------------------------------

indices = st.integers(min_value=0, max_value=60)
ranges = st.builds(
    lambda start, length: IndexSelection(start=start, stop=start + length),
    indices,
    st.integers(min_value=1, max_value=30),
)
value_lists = st.lists(indices, min_size=1, max_size=6).map(lambda vs: IndexSelection(values=tuple(vs)))
selections = st.one_of(st.just(IndexSelection()), ranges, value_lists)

module_names = st.from_regex(r"\A[A-Za-z_][A-Za-z0-9_]{0,8}(\.[A-Za-z0-9_]{1,5}){0,3}\Z")
glob_names = st.text(alphabet=string.ascii_letters + string.digits + "_.*?[]", min_size=1, max_size=12)
odd_names = st.text(min_size=1, max_size=12).filter(
    lambda s: "/" not in s and not any(c.isspace() for c in s)
)
layer_names = st.one_of(module_names, glob_names, odd_names)


def brute_force(selection: IndexSelection, value: int) -> bool:
    if selection.values is not None:
        return value in set(selection.values)
    if selection.start is not None and selection.stop is not None:
        return value in range(selection.start, selection.stop)
    return value >= 0


@given(selections, st.lists(st.integers(min_value=-5, max_value=100), max_size=40))
def test_select_and_contains_match_brute_force(selection: IndexSelection, available: list) -> None:
    for value in available:
        assert selection.contains(value) == brute_force(selection, value)
    expected = sorted({v for v in available if brute_force(selection, v)})
    assert selection.select(available) == expected
    assert selection.select(iter(available)) == expected


@given(selections)
def test_selection_str_parses_back(selection: IndexSelection) -> None:
    assert parse_signature(f"E_{selection}").epochs == selection


@given(selections, st.none() | layer_names, st.none() | selections)
def test_format_parse_format_is_identity(
    epochs: IndexSelection, layer: str | None, neurons: IndexSelection | None
) -> None:
    if layer is None:
        neurons = None
    text = format_signature(epochs, layer, neurons)
    signature = parse_signature(text)
    assert signature == Signature(epochs, None if layer is None else layer_key(layer), neurons)
    assert str(signature) == text
    assert format_signature(signature.epochs, signature.layer, signature.neurons) == text
    assert format_signature(str(epochs), layer, None if neurons is None else str(neurons)) == text


@given(selections, module_names, st.none() | selections)
def test_legacy_form_of_formatted_signature(
    epochs: IndexSelection, layer: str, neurons: IndexSelection | None
) -> None:
    text = format_signature(epochs, layer, neurons)
    assert parse_signature(text.replace("/", "-")) == parse_signature(text)


def _check_parse(text: str) -> None:
    try:
        signature = parse_signature(text)
    except ValueError as error:
        assert f"malformed signature {text!r}" in str(error)
    else:
        assert parse_signature(str(signature)) == signature


@given(st.text())
def test_parse_arbitrary_text_only_raises_value_error(text: str) -> None:
    _check_parse(text)


@given(st.text(alphabet="EL_n/-:,*0123456789 .[]?x\t", max_size=20))
def test_parse_grammar_like_text_only_raises_value_error(text: str) -> None:
    _check_parse(text)


def expected_key(name: str) -> str:
    """DESIGN.md's key: 'L_' + name, a name that already is a key kept; 'L_' alone is no key."""
    return name if name.startswith("L_") and name != "L_" else "L_" + name


@given(st.one_of(layer_names, st.text(), st.sampled_from(["L_", "L_L_", "L_L", "L", "_", "L_ ", "L_/"])))
def test_layer_key_is_idempotent(name: str) -> None:
    """Every string is either a key's name (the key addresses it in a signature) or a ValueError naming it."""
    unaddressable = name == "" or "/" in name or any(c.isspace() for c in name)
    try:
        key = layer_key(name)
    except ValueError as error:
        assert unaddressable, name
        assert f"invalid layer name {name!r}" in str(error)
        return
    assert not unaddressable, name
    assert key == expected_key(name)
    assert layer_key(key) == key
    assert parse_signature(f"E_0/{key}").layer == key
    assert format_signature(0, name) == f"E_0/{key}"


def test_layer_key_of_l_underscore() -> None:
    assert layer_key("L_") == "L_L_"
    assert layer_key("L_L_") == "L_L_"
    assert layer_key("L_x") == "L_x"
    assert layer_key("L") == "L_L"
    for bad, problem in [("", "it is empty"), ("a/b", "contains '/'"), ("L_a b", "contains whitespace")]:
        with pytest.raises(ValueError, match=f"invalid layer name {bad!r}: .*{problem}"):
            layer_key(bad)
    with pytest.raises(TypeError, match="layer name must be a str, got 3"):
        layer_key(3)  # type: ignore[arg-type]


# --- exact keys before globs ----------------------------------------------------------------


def test_an_exact_key_wins_over_its_glob_reading() -> None:
    keys = ["L_x", "L_[x]", "L_y", "L_a*"]
    assert match_layers("L_[x]", keys) == ["L_[x]"]
    assert match_layers("L_[xy]", keys) == ["L_x", "L_y"]
    assert match_layers("L_a*", keys) == ["L_a*"]
    assert match_layers("L_*", keys) == keys
    assert match_layers("L_z", keys) == []
    assert parse_signature("E_0/L_[x]").matching_layers(keys) == ["L_[x]"]
    assert parse_signature("E_0/L_?").matching_layers(iter(keys)) == ["L_x", "L_y"]
    assert parse_signature("E_0").matching_layers(keys) == keys
    assert parse_signature("E_0/L_[x]").layer_matches("L_[x]")
    assert parse_signature("E_0/L_[x]").layer_matches("L_x")


@given(
    st.lists(st.sampled_from(["L_x", "L_[x]", "L_y", "L_*", "L_x*", "L_?", "L_xy"]), unique=True), glob_names
)
def test_match_layers_matches_brute_force(keys: list[str], body: str) -> None:
    pattern = "L_" + body
    expected = [pattern] if pattern in keys else [k for k in keys if fnmatch.fnmatchcase(k, pattern)]
    assert match_layers(pattern, keys) == expected
    assert parse_signature(f"E_0/{pattern}").matching_layers(keys) == expected


# --- a module's later calls in one forward pass ---------------------------------------------


def test_call_keys() -> None:
    assert call_key("L_layer1.0.relu", 1) == "L_layer1.0.relu"
    assert call_key("L_layer1.0.relu", 2) == "L_layer1.0.relu:2"
    assert call_key("L_x:2", 3) == "L_x:2:3"  # a module whose own name ends in ":2"
    for bad, error, message in [
        (0, ValueError, "call must be 1 or more, got 0"),
        (-1, ValueError, "call must be non-negative, got -1"),
        (True, TypeError, "call must be an int, got True"),
        (2.0, TypeError, "call must be an int, got 2.0"),
    ]:
        with pytest.raises(error) as info:
            call_key("L_x", bad)  # type: ignore[arg-type]
        assert str(info.value) == message
    for layer, message in [
        ("x", "layer part 'x' does not start with 'L_'"),
        ("L_", "layer part 'L_' has an empty name"),
        (3, "layer 3 is not a str"),
    ]:
        with pytest.raises(ValueError) as info:
            call_key(layer, 2)  # type: ignore[arg-type]
        assert str(info.value) == message


@pytest.mark.parametrize(
    ("text", "layer", "neurons"),
    [
        ("E_3/L_layer1.0.relu:2/n_1", "L_layer1.0.relu:2", one(1)),
        ("E_3-L_layer1.0.relu:2-n_1", "L_layer1.0.relu:2", one(1)),  # the legacy dash form
        ("E_3/L_relu:12/n_0:4", "L_relu:12", IndexSelection(0, 4)),  # a neuron range after the call
        ("E_3/L_relu:*", "L_relu:*", None),
    ],
)
def test_call_keys_in_signatures(text: str, layer: str, neurons: IndexSelection | None) -> None:
    assert parse_signature(text) == Signature(one(3), layer, neurons)
    assert format_signature(3, layer.removeprefix("L_"), neurons) == text.replace("-", "/")


def test_globs_over_calls() -> None:
    keys = ["L_relu", "L_relu:2", "L_relu:3", "L_fc", "L_fc:2"]
    assert match_layers("L_relu*", keys) == ["L_relu", "L_relu:2", "L_relu:3"]
    assert match_layers("L_*:2", keys) == ["L_relu:2", "L_fc:2"]
    assert match_layers("L_relu:[23]", keys) == ["L_relu:2", "L_relu:3"]
    assert match_layers("L_relu", keys) == ["L_relu"]  # the first call alone
    assert "relu:2" in GRAMMAR
