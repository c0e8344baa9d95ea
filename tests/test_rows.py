"""Tests for nn_staining.rows: the offsets the writer assigns and the row ranges a reader plans, on
hand-written layer entries whose rows are counted out by hand in each test."""

from __future__ import annotations

import pyarrow as pa
import pytest

from nn_staining.rows import ReadPlan, RowLayout, _runs, assign_offsets
from nn_staining.signature import IndexSelection

#: Three layers as meta.json lists them (before offsets): a Linear with 2 inputs, an activation,
#: a Linear with 4 inputs. Neuron rows: L_a 0-2, L_b 3-6, L_c 7-8; input rows: L_a 0-1, L_c 2-5.
LAYERS = [
    {"key": "L_a", "neurons": 3, "in_features": 2, "kind": "features"},
    {"key": "L_b", "neurons": 4, "in_features": None, "kind": "features"},
    {"key": "L_c", "neurons": 2, "in_features": 4, "kind": "features"},
]
ALL = IndexSelection()


def values(*v: int) -> IndexSelection:
    return IndexSelection(values=v)


def span(start: int, stop: int) -> IndexSelection:
    return IndexSelection(start=start, stop=stop)


@pytest.fixture
def layers() -> list[dict]:
    return assign_offsets(LAYERS)


def test_assign_offsets_counts_neurons_and_inputs_in_order() -> None:
    out = assign_offsets(LAYERS)
    assert out == [
        {
            "key": "L_a",
            "neurons": 3,
            "in_features": 2,
            "kind": "features",
            "row_offset": 0,
            "input_offset": 0,
        },
        {"key": "L_b", "neurons": 4, "in_features": None, "kind": "features", "row_offset": 3},
        {
            "key": "L_c",
            "neurons": 2,
            "in_features": 4,
            "kind": "features",
            "row_offset": 7,
            "input_offset": 2,
        },
    ]
    assert "row_offset" not in LAYERS[0], "the caller's entries are copied, not changed"
    assert assign_offsets([]) == []


def test_layout_offsets_and_row_counts(layers: list[dict]) -> None:
    layout = RowLayout(layers, num_classes=3)
    assert layout.offsets == {"L_a": 0, "L_b": 3, "L_c": 7}
    assert layout.input_offsets == {"L_a": 0, "L_c": 2}
    assert (layout.num_neurons, layout.num_inputs) == (9, 6)
    assert [layout.rows(t) for t in ("neurons", "classes", "inputs", "batches")] == [9, 27, 18, None]


def test_layout_of_the_layers_present_in_an_epoch(layers: list[dict]) -> None:
    """An epoch in which L_b did not fire and only L_c's inputs were recorded packs the rest tightly."""
    layout = RowLayout(layers, 2, present=["L_c", "L_a"], present_inputs=["L_c"])
    assert layout.offsets == {"L_a": 0, "L_c": 3}, "meta order, not the order listed"
    assert layout.input_offsets == {"L_c": 0}
    assert [layout.rows(t) for t in ("neurons", "classes", "inputs")] == [5, 10, 8]
    assert layout.plan("neurons", ["L_b"], None) is None
    assert layout.plan("neurons", ["L_b", "L_c"], values(1)) == ReadPlan([(4, 5)], 5, None)
    assert layout.plan("inputs", ["L_a"], None) is None
    assert layout.plan("inputs", ["L_a", "L_c"], None) == ReadPlan([(0, 8)], 8, None)


def test_inputs_need_an_input_offset_or_a_listed_layout() -> None:
    """Entries without ``input_offset`` record no inputs, unless a layout lists them; an empty list keeps none."""
    assert RowLayout(LAYERS, 2).input_offsets == {}
    assert RowLayout(LAYERS, 2, present_inputs=["L_a", "L_b", "L_c"]).input_offsets == {"L_a": 0, "L_c": 2}
    assert RowLayout(assign_offsets(LAYERS), 2, present_inputs=[]).input_offsets == {}
    assert RowLayout(LAYERS, None).rows("classes") == 0, "no labels: no class rows"


@pytest.mark.parametrize(
    ("table", "layer_keys", "neurons", "ranges", "rows"),
    [
        ("neurons", ["L_b"], None, [(3, 7)], 9),
        ("neurons", ["L_b"], ALL, [(3, 7)], 9),
        ("neurons", ["L_a", "L_c"], values(1), [(1, 2), (8, 9)], 9),
        ("neurons", ["L_a", "L_b", "L_c"], values(0, 2, 3), [(0, 1), (2, 3), (3, 4), (5, 7), (7, 8)], 9),
        ("neurons", ["L_c"], span(1, 50), [(8, 9)], 9),
        ("neurons", ["L_b"], span(1, 3), [(4, 6)], 9),
        ("classes", ["L_b"], span(1, 3), [(12, 18)], 27),
        ("classes", ["L_b"], values(0, 2, 3), [(9, 12), (15, 21)], 27),
        ("classes", ["L_c", "L_a"], None, [(21, 27), (0, 9)], 27),
        ("inputs", ["L_a", "L_b", "L_c"], values(0), [(0, 6), (6, 18)], 18),
        ("inputs", ["L_c"], None, [(6, 18)], 18),
    ],
)
def test_plan_row_ranges(layers: list[dict], table, layer_keys, neurons, ranges, rows) -> None:
    assert RowLayout(layers, 3).plan(table, layer_keys, neurons) == ReadPlan(ranges, rows, None)


@pytest.mark.parametrize(
    ("table", "layer_keys", "neurons"),
    [
        ("inputs", ["L_b"], None),  # an activation has no inputs
        ("neurons", ["L_a"], span(3, 9)),  # past the layer's last neuron
        ("classes", ["L_c"], values(2, 5)),
    ],
)
def test_plan_is_none_when_nothing_is_selected(layers: list[dict], table, layer_keys, neurons) -> None:
    assert RowLayout(layers, 3).plan(table, layer_keys, neurons) is None


def test_plan_for_batches_is_a_filter(layers: list[dict]) -> None:
    """Batch rows have no fixed layout: the plan filters on layer and neuron ids (here n_1 of L_a: n_3 is
    past its last neuron)."""
    layout = RowLayout(layers, 3)
    rows = pa.table(
        {
            "layer": ["L_a", "L_a", "L_a", "L_b", "L_b", "L_c"],
            "neuron": pa.array([0, 1, 2, 1, 3, 1], pa.int32()),
        }
    )
    plan = layout.plan("batches", ["L_a"], values(1, 3))
    assert (plan.row_ranges, plan.expected_rows) == (None, None)
    kept = rows.filter(plan.fallback)
    assert list(zip(kept["layer"].to_pylist(), kept["neuron"].to_pylist())) == [("L_a", 1)]
    for neurons in (None, ALL):
        kept = rows.filter(layout.plan("batches", ["L_b", "L_c"], neurons).fallback)
        assert kept["layer"].to_pylist() == ["L_b", "L_b", "L_c"]
    kept = rows.filter(layout.plan("batches", ["L_a", "L_b"], values(3)).fallback)
    assert list(zip(kept["layer"].to_pylist(), kept["neuron"].to_pylist())) == [("L_b", 3)]


def test_neuron_runs_and_ids(layers: list[dict]) -> None:
    layout = RowLayout(layers, 3)
    assert layout.neuron_runs("L_b", None) == [(0, 4)]
    assert layout.neuron_runs("L_b", span(2, 3)) == [(2, 3)]
    assert layout.neuron_runs("L_a", span(2, 10)) == [(2, 3)]
    assert layout.neuron_runs("L_a", span(3, 10)) == []
    assert layout.neuron_runs("L_b", values(0, 1, 3, 9)) == [(0, 2), (3, 4)]
    empty = RowLayout([{"key": "L_z", "neurons": 0, "kind": "features"}], 2)
    assert empty.neuron_runs("L_z", None) == [] and empty.neuron_runs("L_z", ALL) == []
    assert layout.neuron_ids(["L_a", "L_b"], values(0, 2, 3)) == [0, 2, 3]
    assert layout.neuron_ids(["L_c", "L_a"], span(1, 9)) == [1, 2]


def test_check_selection_lists_each_layers_neurons(layers: list[dict]) -> None:
    layout = RowLayout(layers, 3)
    layout.check_selection(["L_a", "L_b"], values(3))  # L_b has n_3: no error
    layout.check_selection(["L_c"], None)
    with pytest.raises(KeyError) as info:
        layout.check_selection(["L_a", "L_c"], values(5, 6))
    assert info.value.args[0] == "neuron 5,6 not in L_a, L_c; neurons: L_a: n_0 … n_2, L_c: n_0 … n_1"
    with pytest.raises(KeyError) as info:
        layout.check_selection(["L_b"], span(4, 8))
    assert info.value.args[0] == "neuron 4:8 not in L_b; neurons: L_b: n_0 … n_3"


@pytest.mark.parametrize(
    ("ints", "runs"),
    [([], []), ([4], [(4, 5)]), ([1, 2, 3, 5, 7, 8], [(1, 4), (5, 6), (7, 9)]), ([0, 2], [(0, 1), (2, 3)])],
)
def test_runs_of_sorted_ints(ints: list[int], runs: list[tuple[int, int]]) -> None:
    assert _runs(ints) == runs
