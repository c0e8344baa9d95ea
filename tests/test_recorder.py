"""Tests for nn_staining.recorder (NetworkTrace): every recorded value against numpy on activations
captured by the test's own forward hooks and against the model's parameters at each epoch's end."""

from __future__ import annotations

import gc
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import (
    BATCH_SIZE,
    EPOCHS,
    MLP_LAYERS,
    N_CLASSES,
    N_SAMPLES,
    Capture,
    Run,
    assert_close,
    assert_same_cell,
    class_means,
    labels_of,
    make_data,
    make_mlp,
    numpy_stats,
    rows_of,
    train,
)
from torch import nn

from nn_staining import NetworkTrace, load_trace

ACT_COLUMNS = ["act_count", "act_mean", "act_std", "act_min", "act_max", "act_active_frac", "act_nan_count"]
WEIGHT_COLUMNS = ["bias", "weight_norm", "weight_mean", "weight_delta_norm", "grad_norm", "weights"]
LINEAR_LAYERS = ["L_input", "L_hidden_1", "L_output"]


def layer_frame(store: Path, epoch: int, layer: str, phase: str = "train") -> pd.DataFrame:
    """Every ``neurons`` column of one layer at one epoch, indexed by neuron."""
    frame = load_trace(store, phase=phase).query(f"E_{epoch}/{layer}", columns=ACT_COLUMNS + WEIGHT_COLUMNS)
    return frame.droplevel(["epoch", "layer"])


def assert_activations(frame: pd.DataFrame, rows: np.ndarray, msg: str = "") -> None:
    """The activation columns of ``frame`` equal numpy's statistics of (observations, neurons) ``rows``."""
    expected = numpy_stats(rows)
    assert frame.index.tolist() == list(range(rows.shape[1])), msg
    np.testing.assert_array_equal(frame["act_count"], expected["act_count"], err_msg=msg)
    np.testing.assert_array_equal(frame["act_nan_count"], expected["act_nan_count"], err_msg=msg)
    for column in ("act_mean", "act_std", "act_min", "act_max", "act_active_frac"):
        assert_close(frame[column], expected[column], err_msg=f"{msg} {column}")


def assert_inputs(store: Path, run: Run, capture: Capture, epoch: int, layer: str) -> None:
    """The ``inputs`` table of a Linear layer equals the masked numpy mean of its captured inputs."""
    batches = capture.inputs[epoch][layer]
    rows = rows_of(batches)
    counts, means = class_means(rows, labels_of(batches, run.labels[epoch]), N_CLASSES)
    frame = load_trace(store).inputs(f"E_{epoch}/{layer}")
    assert len(frame) == rows.shape[1] * N_CLASSES, layer
    np.testing.assert_array_equal(
        frame["count"].unstack("class").to_numpy(), np.tile(counts, (rows.shape[1], 1))
    )
    assert_close(frame["mean"].unstack("class").to_numpy(), means, err_msg=f"E_{epoch}/{layer} inputs")


# -- 1. every neurons column against numpy ---------------------------------------------------------
@pytest.mark.parametrize("epoch", range(EPOCHS))
@pytest.mark.parametrize("layer", MLP_LAYERS)
def test_activation_columns_match_numpy(mlp_run: Run, epoch: int, layer: str) -> None:
    frame = layer_frame(mlp_run.store, epoch, layer)
    batches = mlp_run.capture.outputs[epoch][layer]
    assert [len(b) for b in batches] == [16, 16, 16, 2]
    assert_activations(frame, rows_of(batches), f"E_{epoch}/{layer}")


def test_act_count_includes_the_smaller_last_batch(mlp_run: Run) -> None:
    frame = load_trace(mlp_run.store).to_dataframe(columns=["act_count"])
    assert (frame["act_count"] == N_SAMPLES).all()
    assert N_SAMPLES % BATCH_SIZE != 0


def test_active_frac_counts_strictly_positive_values(mlp_run: Run) -> None:
    relu = layer_frame(mlp_run.store, 0, "L_relu_1")
    rows = rows_of(mlp_run.capture.outputs[0]["L_relu_1"])
    assert (rows == 0).any(), "a ReLU output has zeros: they must not count as active"
    assert_close(relu["act_active_frac"], (rows > 0).mean(0))
    assert (relu["act_min"] >= 0).all()


@pytest.mark.parametrize("epoch", range(EPOCHS))
@pytest.mark.parametrize("layer", LINEAR_LAYERS)
def test_weight_columns_match_parameters_at_epoch_end(mlp_run: Run, epoch: int, layer: str) -> None:
    frame = layer_frame(mlp_run.store, epoch, layer)
    params = mlp_run.params[epoch][layer]
    w, b = params["weight"], params["bias"]
    np.testing.assert_array_equal(np.stack(frame["weights"].to_numpy()), w.astype(np.float32))
    np.testing.assert_array_equal(frame["bias"], b.astype(np.float32))
    assert_close(frame["weight_norm"], np.linalg.norm(w, axis=1))
    assert_close(frame["weight_mean"], w.mean(1), atol=1e-6)
    assert_close(frame["grad_norm"], np.linalg.norm(params["grad"], axis=1))


@pytest.mark.parametrize("layer", LINEAR_LAYERS)
def test_weight_delta_norm_is_null_first_then_the_row_change(mlp_run: Run, layer: str) -> None:
    assert layer_frame(mlp_run.store, 0, layer)["weight_delta_norm"].isna().all()
    for epoch in range(1, EPOCHS):
        frame = layer_frame(mlp_run.store, epoch, layer)
        change = mlp_run.params[epoch][layer]["weight"] - mlp_run.params[epoch - 1][layer]["weight"]
        assert (np.linalg.norm(change, axis=1) > 0).any()
        assert_close(frame["weight_delta_norm"], np.linalg.norm(change, axis=1), rtol=1e-4, atol=1e-6)


def test_weight_delta_norm_is_since_the_previous_recorded_epoch(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    with NetworkTrace(model, tmp_path / "t", epoch_intervals=[0, 2]) as trace:
        run = train(model, x, y, epochs=3, trace=trace)
    frame = layer_frame(tmp_path / "t", 2, "L_hidden_1")
    change = run.params[2]["L_hidden_1"]["weight"] - run.params[0]["L_hidden_1"]["weight"]
    assert_close(frame["weight_delta_norm"], np.linalg.norm(change, axis=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layer", ["L_relu_1", "L_relu_2"])
def test_layers_without_parameters_have_null_weight_columns(mlp_run: Run, layer: str) -> None:
    frame = layer_frame(mlp_run.store, 1, layer)
    for column in WEIGHT_COLUMNS:
        assert frame[column].isna().all(), column


@pytest.mark.parametrize("epoch", [0, EPOCHS - 1])
@pytest.mark.parametrize("layer", MLP_LAYERS)
def test_classes_table_matches_masked_mean(mlp_run: Run, epoch: int, layer: str) -> None:
    batches = mlp_run.capture.outputs[epoch][layer]
    rows = rows_of(batches)
    counts, means = class_means(rows, labels_of(batches, mlp_run.labels[epoch]), N_CLASSES)
    frame = load_trace(mlp_run.store).classes(f"E_{epoch}/{layer}")
    assert frame.index.names == ["epoch", "layer", "neuron", "class"]
    assert len(frame) == rows.shape[1] * N_CLASSES
    count = frame["act_count"].unstack("class").to_numpy()
    mean = frame["act_mean"].unstack("class").to_numpy()
    np.testing.assert_array_equal(count, np.tile(counts, (rows.shape[1], 1)))
    assert_close(mean, means)


@pytest.mark.parametrize("epoch", [0, EPOCHS - 1])
@pytest.mark.parametrize("layer", LINEAR_LAYERS)
def test_inputs_table_matches_class_conditional_input_mean(mlp_run: Run, epoch: int, layer: str) -> None:
    assert_inputs(mlp_run.store, mlp_run, mlp_run.capture, epoch, layer)
    assert load_trace(mlp_run.store).inputs(f"E_{epoch}/{layer}").index.names == [
        "epoch",
        "layer",
        "feature",
        "class",
    ]


def test_inputs_table_holds_only_linear_layers(mlp_run: Run) -> None:
    frame = load_trace(mlp_run.store).inputs()
    assert sorted(set(frame.index.get_level_values("layer"))) == sorted(LINEAR_LAYERS)


@pytest.mark.parametrize("layer", LINEAR_LAYERS)
def test_inputs_give_class_mean_pre_activation_with_frozen_weights(frozen_run: Run, layer: str) -> None:
    """W · mean[:, c] + b equals the layer's class-conditional mean output (weights constant all epoch)."""
    t = load_trace(frozen_run.store)
    for epoch in t.epochs:
        w = t.weights(epoch, layer).astype(np.float64)
        b = layer_frame(frozen_run.store, epoch, layer)["bias"].to_numpy(np.float64)
        inputs = t.inputs(f"E_{epoch}/{layer}")["mean"].unstack("class").to_numpy(np.float64)
        outputs = t.classes(f"E_{epoch}/{layer}")["act_mean"].unstack("class").to_numpy(np.float64)
        assert_close(w @ inputs + b[:, None], outputs, rtol=1e-4, atol=1e-5, err_msg=f"E_{epoch}/{layer}")
        # and both sides against the test's own capture
        batches = frozen_run.capture.outputs[epoch][layer]
        _, expected = class_means(rows_of(batches), labels_of(batches, frozen_run.labels[epoch]), N_CLASSES)
        assert_close(outputs, expected)


# -- 4. per-batch statistics -----------------------------------------------------------------------
@pytest.mark.parametrize("layer", MLP_LAYERS)
def test_batches_table_matches_numpy_per_batch(mlp_run: Run, layer: str) -> None:
    t = load_trace(mlp_run.store)
    frame = t.batches(f"E_*/{layer}")
    assert frame.index.names == ["epoch", "batch", "layer", "neuron"]
    for epoch in range(EPOCHS):
        batches = mlp_run.capture.outputs[epoch][layer]
        for b, out in enumerate(batches):
            got = frame.xs((epoch, b, layer), level=["epoch", "batch", "layer"])
            rows = out.reshape(-1, out.shape[-1])
            np.testing.assert_array_equal(got["act_count"], np.full(rows.shape[1], len(rows)))
            assert_close(got["act_mean"], rows.mean(0), err_msg=f"E_{epoch} batch {b}")
            assert_close(got["act_std"], rows.std(0), err_msg=f"E_{epoch} batch {b}")
            assert_close(got["act_min"], rows.min(0))
            assert_close(got["act_max"], rows.max(0))
        assert sorted(set(frame.xs(epoch, level="epoch").index.get_level_values("batch"))) == [0, 1, 2, 3]


def test_batches_table_across_many_chunks(tmp_path: Path) -> None:
    """70 batches of one sample: more batches than one reduction chunk holds (64)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4))
    x, y = make_data(n=70, features=3, classes=2)
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t", drop_batches=False) as trace:
        train(model, x, y, epochs=1, batch_size=1, trace=trace, capture=capture, targets=False)
    frame = load_trace(tmp_path / "t").batches("E_0/L_0")
    outs = np.concatenate(capture.outputs[0]["L_0"])
    assert len(frame) == 70 * 4
    got = frame["act_mean"].unstack("neuron").droplevel(["epoch", "layer"]).sort_index()
    assert got.index.tolist() == list(range(70))
    assert_close(got.to_numpy(), outs)
    assert (frame["act_std"] == 0).all()


def test_default_drop_batches_writes_no_batches_table(frozen_run: Run) -> None:
    assert not (frozen_run.store / "batches").exists()
    with pytest.raises(KeyError, match="no batches table.*drop_batches=False"):
        load_trace(frozen_run.store).batches()


# -- 2. models --------------------------------------------------------------------------------------
def make_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 4, 3, padding=1),
            bn=nn.BatchNorm2d(4),
            relu=nn.ReLU(),
            pool=nn.MaxPool2d(2),
            flat=nn.Flatten(),
            fc=nn.Linear(4 * 3 * 3, N_CLASSES),
        )
    )


def test_cnn_channels_are_neurons_valued_by_spatial_mean(tmp_path: Path) -> None:
    model = make_cnn()
    x, y = make_data(n=20, features=(1, 6, 6))
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        run = train(model, x, y, epochs=2, batch_size=8, trace=trace, capture=capture)
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_conv", "L_bn", "L_relu", "L_pool", "L_fc"]  # a Flatten is no neuron
    expected_neurons = {"L_conv": 4, "L_bn": 4, "L_relu": 4, "L_pool": 4, "L_fc": 3}
    assert {k: t.layer_info(k)["neurons"] for k in t.layers} == expected_neurons
    for epoch in (0, 1):
        for layer in t.layers:
            channel_first = layer in ("L_conv", "L_bn", "L_relu", "L_pool")
            batches = capture.outputs[epoch][layer]
            rows = rows_of(batches, channel_first=channel_first)
            frame = layer_frame(tmp_path / "t", epoch, layer)
            assert_activations(frame, rows, f"E_{epoch}/{layer}")
            _, means = class_means(rows, np.concatenate(run.labels[epoch]), N_CLASSES)
            classes = t.classes(f"E_{epoch}/{layer}")["act_mean"].unstack("class").to_numpy()
            assert_close(classes, means, err_msg=f"E_{epoch}/{layer} classes")
        assert_inputs(tmp_path / "t", run, capture, epoch, "L_fc")
        conv = layer_frame(tmp_path / "t", epoch, "L_conv")
        w = run.params[epoch]["L_conv"]["weight"]
        assert w.shape == (4, 9)
        np.testing.assert_array_equal(np.stack(conv["weights"].to_numpy()), w.astype(np.float32))
        assert_close(conv["weight_norm"], np.linalg.norm(w, axis=1))
        assert_close(conv["bias"], run.params[epoch]["L_conv"]["bias"])
        assert_close(conv["grad_norm"], np.linalg.norm(run.params[epoch]["L_conv"]["grad"], axis=1))


class FunctionalNet(nn.Module):
    """Activations applied functionally: only the two Linear layers are modules."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def test_functional_activations_record_only_linear_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = FunctionalNet()
    x, y = make_data()
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        assert trace.layers == ["L_fc1", "L_fc2"]
        run = train(model, x, y, epochs=2, trace=trace, capture=capture)
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_fc1", "L_fc2"]
    for epoch in (0, 1):
        for layer in t.layers:
            frame = layer_frame(tmp_path / "t", epoch, layer)
            assert_activations(frame, rows_of(capture.outputs[epoch][layer]), f"E_{epoch}/{layer}")
            assert_inputs(tmp_path / "t", run, capture, epoch, layer)
    assert (layer_frame(tmp_path / "t", 0, "L_fc1")["act_min"] < 0).any(), "fc1 neurons hold pre-activations"


def test_inplace_activation_does_not_change_the_recorded_pre_activation(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, N_CLASSES))
    x, y = make_data()
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        run = train(model, x, y, epochs=1, trace=trace, capture=capture)
    for layer in ("L_0", "L_1", "L_2"):
        assert_activations(layer_frame(tmp_path / "t", 0, layer), rows_of(capture.outputs[0][layer]), layer)
    assert (layer_frame(tmp_path / "t", 0, "L_0")["act_min"] < 0).any()
    assert_inputs(tmp_path / "t", run, capture, 0, "L_2")


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class NestedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Block()
        self.head = nn.Sequential(nn.Tanh(), nn.Linear(8, N_CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


def test_nested_submodules_are_keyed_by_qualified_name(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = NestedNet()
    x, y = make_data()
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        run = train(model, x, y, epochs=2, trace=trace, capture=capture)
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_block.fc1", "L_block.act", "L_block.fc2", "L_head.0", "L_head.1"]
    for layer in t.layers:
        assert_activations(layer_frame(tmp_path / "t", 1, layer), rows_of(capture.outputs[1][layer]), layer)
    for layer in ("L_block.fc1", "L_block.fc2", "L_head.1"):
        assert_inputs(tmp_path / "t", run, capture, 1, layer)
    cell = t["E_1"]["L_block.fc1"]["n_3"]
    assert_same_cell(cell, t["E_1/L_block.fc1/n_3"])
    assert cell["act_mean"] == pytest.approx(
        rows_of(capture.outputs[1]["L_block.fc1"])[:, 3].mean(), rel=1e-5
    )
    np.testing.assert_array_equal(
        cell["weights"], run.params[1]["L_block.fc1"]["weight"][3].astype(np.float32)
    )
    assert t.query("E_1/L_block.*").index.get_level_values("layer").unique().tolist() == [
        "L_block.fc1",
        "L_block.act",
        "L_block.fc2",
    ]


class SequenceNet(nn.Module):
    def __init__(self, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.lstm = nn.LSTM(3, 5, batch_first=batch_first)
        self.head = nn.Linear(5, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out, _ = self.lstm(x)
        return self.head(out[:, -1] if self.batch_first else out[-1])


@pytest.mark.parametrize("batch_first", [True, False])
def test_lstm_records_first_output_each_step_one_observation(tmp_path: Path, batch_first: bool) -> None:
    torch.manual_seed(0)
    steps = 7
    model = SequenceNet(batch_first)
    x, y = make_data(n=20, features=(steps, 3))
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        run = train(model, x, y, epochs=2, batch_size=8, trace=trace, capture=capture)
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_lstm", "L_head"]
    assert t.layer_info("L_lstm")["neurons"] == 5
    for epoch in (0, 1):
        batches = capture.outputs[epoch]["L_lstm"]
        if not batch_first:
            batches = [b.transpose(1, 0, 2) for b in batches]
        assert batches[0].shape == (8, steps, 5)
        rows = rows_of(batches)
        frame = layer_frame(tmp_path / "t", epoch, "L_lstm")
        assert (frame["act_count"] == steps * 20).all()
        assert_activations(frame, rows, f"E_{epoch}/L_lstm")
        counts, means = class_means(rows, labels_of(batches, run.labels[epoch]), N_CLASSES)
        classes = t.classes(f"E_{epoch}/L_lstm")
        np.testing.assert_array_equal(classes["act_count"].unstack("class").to_numpy()[0], counts)
        assert counts.sum() == steps * 20
        assert_close(classes["act_mean"].unstack("class").to_numpy(), means)
        assert layer_frame(tmp_path / "t", epoch, "L_lstm")["bias"].isna().all()
        assert_activations(
            layer_frame(tmp_path / "t", epoch, "L_head"), rows_of(capture.outputs[epoch]["L_head"])
        )
        assert_inputs(tmp_path / "t", run, capture, epoch, "L_head")


class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, N_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.attn(x, x, x)
        return self.head(out.mean(1))


def test_attention_records_its_first_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = AttentionNet()
    x, y = make_data(n=12, features=(5, 8))
    capture = Capture(model, names=["attn", "head"])
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        assert trace.layers == ["L_attn", "L_head"]
        train(model, x, y, epochs=1, batch_size=6, trace=trace, capture=capture)
    frame = layer_frame(tmp_path / "t", 0, "L_attn")
    assert (frame["act_count"] == 5 * 12).all()
    assert_activations(frame, rows_of(capture.outputs[0]["L_attn"]), "L_attn")


# -- layer selection ---------------------------------------------------------------------------------
def test_network_trace_alias() -> None:
    from nn_staining import Network_Trace

    assert Network_Trace is NetworkTrace


def test_default_selection_is_every_leaf_module(tmp_path: Path) -> None:
    assert NetworkTrace(make_mlp(), tmp_path / "a").layers == MLP_LAYERS
    assert NetworkTrace(make_cnn(), tmp_path / "b").layers == [
        "L_conv",
        "L_bn",
        "L_relu",
        "L_pool",
        "L_fc",  # not the Flatten: a pure reshape is no neuron
    ]
    plain = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    assert NetworkTrace(plain, tmp_path / "c").layers == ["L_0", "L_1", "L_2"]


def test_module_named_with_l_prefix_keeps_its_name(tmp_path: Path) -> None:
    model = nn.Sequential(OrderedDict(L_hidden_1=nn.Linear(2, 3), relu=nn.ReLU()))
    assert NetworkTrace(model, tmp_path / "t").layers == ["L_hidden_1", "L_relu"]


@pytest.mark.parametrize(
    ("patterns", "expected"),
    [
        (["hidden_1"], ["L_hidden_1"]),
        (["output", "input"], ["L_input", "L_output"]),
        (["L_hidden_1", "L_output"], ["L_hidden_1", "L_output"]),
        (["relu_*"], ["L_relu_1", "L_relu_2"]),
        ("L_*put", ["L_input", "L_output"]),
        (["hidden_?", "relu_2"], ["L_hidden_1", "L_relu_2"]),
    ],
)
def test_layers_by_name_and_glob(tmp_path: Path, patterns: list[str] | str, expected: list[str]) -> None:
    model = make_mlp()
    x, y = make_data()
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t", layers=patterns) as trace:
        assert trace.layers == expected
        train(model, x, y, epochs=1, trace=trace, capture=capture, targets=False)
    t = load_trace(tmp_path / "t")
    assert t.layers == expected
    assert t.to_dataframe().index.get_level_values("layer").unique().tolist() == expected
    for layer in expected:
        assert_activations(layer_frame(tmp_path / "t", 0, layer), rows_of(capture.outputs[0][layer]), layer)


def test_layers_selects_a_non_leaf_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = NestedNet()
    x, y = make_data()
    capture = Capture(model, names=["block"])
    with NetworkTrace(model, tmp_path / "t", layers=["block"]) as trace:
        train(model, x, y, epochs=1, trace=trace, capture=capture)
    assert load_trace(tmp_path / "t").layers == ["L_block"]
    assert_activations(layer_frame(tmp_path / "t", 0, "L_block"), rows_of(capture.outputs[0]["L_block"]))


@pytest.mark.parametrize("patterns", [["hiden_1"], ["L_conv*"], ["hidden_1", "nothing"]])
def test_pattern_matching_nothing_lists_module_names(tmp_path: Path, patterns: list[str]) -> None:
    with pytest.raises(ValueError, match=r"matches no module") as info:
        NetworkTrace(make_mlp(), tmp_path / "t", layers=patterns)
    for name in ("input", "relu_1", "hidden_1", "relu_2", "output"):
        assert name in str(info.value)
    assert not (tmp_path / "t" / "meta.json").exists()


# -- 3. epoch_intervals ------------------------------------------------------------------------------
def record(tmp_path: Path, epochs: int, **kwargs) -> list[int]:
    """Train a small MLP ``epochs`` epochs under ``kwargs``; the epochs present on disk (checked equal
    to those load_trace and meta.json report)."""
    model = make_mlp(hidden=4)
    x, y = make_data(n=12)
    store = tmp_path / "t"
    with NetworkTrace(model, store, num_classes=N_CLASSES, **kwargs) as trace:
        train(model, x, y, epochs=epochs, batch_size=6, trace=trace)
    t = load_trace(store)
    for table in ("neurons", "classes", "inputs"):
        on_disk = sorted(int(p.name.split("=")[1]) for p in (store / table).glob("epoch=*"))
        assert on_disk == t.epochs, table
    assert t.to_dataframe().index.get_level_values("epoch").unique().tolist() == t.epochs
    return t.epochs


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({}, [0, 1, 2, 3, 4, 5, 6]),
        ({"epoch_intervals": None}, [0, 1, 2, 3, 4, 5, 6]),
        ({"epoch_intervals": 3}, [0, 3, 6]),
        ({"epoch_intervals": 4}, [0, 4]),
        ({"epoch_intervals": 4, "total_epochs": 7}, [0, 4, 6]),
        ({"epoch_intervals": 3, "total_epochs": 7}, [0, 3, 6]),
        ({"epoch_intervals": 1}, [0, 1, 2, 3, 4, 5, 6]),
        ({"epoch_intervals": -1, "total_epochs": 7}, [6]),
        ({"epoch_intervals": [1, 5]}, [1, 5]),
        ({"epoch_intervals": (2,)}, [2]),
        ({"epoch_intervals": [0, 6, 9]}, [0, 6]),
    ],
)
def test_epoch_intervals_select_recorded_epochs(tmp_path: Path, kwargs: dict, expected: list[int]) -> None:
    assert record(tmp_path, 7, **kwargs) == expected


@pytest.mark.parametrize("value", [0, -2, -5, [1, -1], True, False, "x", 1.5, [1.0], []])
def test_invalid_epoch_intervals_raise_at_construction(tmp_path: Path, value: object) -> None:
    with pytest.raises(ValueError, match="epoch_intervals"):
        NetworkTrace(make_mlp(), tmp_path / "t", epoch_intervals=value, total_epochs=5)
    assert not (tmp_path / "t" / "meta.json").exists()


def test_last_epoch_only_needs_total_epochs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="total_epochs"):
        NetworkTrace(make_mlp(), tmp_path / "t", epoch_intervals=-1)


def test_non_recorded_epochs_write_nothing_and_add_nothing(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    store = tmp_path / "t"
    with NetworkTrace(model, store, epoch_intervals=[2], num_classes=N_CLASSES) as trace:
        trace.start_epoch(0)
        model(x)
        trace.end_epoch()
        assert load_trace(store).epochs == []  # an empty trace: meta.json is written at once
        assert not list(store.rglob("*.parquet"))
        model(x)  # between epochs: not recorded either
        trace.start_epoch(1)
        model(x)
        trace.end_epoch()
        trace.start_epoch(2)
        trace.set_targets(y)
        model(x)
        trace.end_epoch()
    assert sorted(p.parent.name for p in store.rglob("*.parquet")) == ["epoch=2"] * 3
    frame = load_trace(store).to_dataframe(columns=["act_count"])
    assert (frame["act_count"] == N_SAMPLES).all(), "passes of non-recorded epochs leak into the record"


# -- phases --------------------------------------------------------------------------------------------
def train_with_eval(store: Path, record_eval: bool) -> Capture:
    model = make_mlp()
    x, y = make_data()
    xe, ye = make_data(n=9, seed=5)
    capture = Capture(model)
    with NetworkTrace(model, store, num_classes=N_CLASSES, record_eval=record_eval) as trace:
        trace.start_epoch(0)
        capture.epoch = 0
        trace.set_targets(y)
        model(x).sum().backward()
        model.eval()
        capture.epoch = 1
        with torch.no_grad():
            trace.set_targets(ye)
            model(xe)
        model.train()
        trace.end_epoch()
    return capture


def test_eval_passes_are_not_mixed_into_the_training_record(tmp_path: Path) -> None:
    capture = train_with_eval(tmp_path / "t", record_eval=False)
    for layer in MLP_LAYERS:
        assert_activations(layer_frame(tmp_path / "t", 0, layer), rows_of(capture.outputs[0][layer]), layer)
    assert not list((tmp_path / "t").rglob("eval-0.parquet"))
    assert load_trace(tmp_path / "t", phase="eval").epochs == []


def test_record_eval_keeps_eval_rows_apart(tmp_path: Path) -> None:
    capture = train_with_eval(tmp_path / "t", record_eval=True)
    assert (tmp_path / "t" / "neurons" / "epoch=0" / "eval-0.parquet").exists()
    assert load_trace(tmp_path / "t", phase="eval").epochs == [0]
    for layer in MLP_LAYERS:
        assert_activations(layer_frame(tmp_path / "t", 0, layer), rows_of(capture.outputs[0][layer]), layer)
        assert_activations(
            layer_frame(tmp_path / "t", 0, layer, phase="eval"), rows_of(capture.outputs[1][layer])
        )
    phases = pd.read_parquet(tmp_path / "t" / "neurons" / "epoch=0" / "eval-0.parquet", columns=["phase"])
    assert set(phases["phase"]) == {"eval"}


# -- 6. the recorder never changes the model ---------------------------------------------------------
def make_regularised_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 3),
    )


@pytest.mark.parametrize("optimiser", ["sgd", "adam"])
def test_training_is_bit_identical_with_and_without_the_recorder(tmp_path: Path, optimiser: str) -> None:
    x, y = make_data()

    def run(recorded: bool) -> tuple[nn.Module, Run]:
        model = make_regularised_mlp(seed=3)
        torch.manual_seed(11)  # dropout masks
        if not recorded:
            return model, train(model, x, y, epochs=3, optimiser=optimiser, lr=0.05)
        with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES, drop_batches=False) as trace:
            return model, train(model, x, y, epochs=3, trace=trace, optimiser=optimiser, lr=0.05)

    plain, plain_run = run(False)
    traced, traced_run = run(True)
    assert load_trace(tmp_path / "t").epochs == [0, 1, 2]
    for (name, a), (_, b) in zip(plain.state_dict().items(), traced.state_dict().items()):
        assert torch.equal(a, b), name
    for (name, a), (_, b) in zip(plain.named_parameters(), traced.named_parameters()):
        assert torch.equal(a, b), name
        assert torch.equal(a.grad, b.grad), f"{name}.grad"
    assert all(torch.equal(a, b) for a, b in zip(plain_run.outputs, traced_run.outputs))


def hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_when_leaving_the_with_block(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        trace.start_epoch(0)
        assert hook_counts(model) > 0
        trace.set_targets(y)
        model(x)
    assert hook_counts(model) == 0
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


def test_hooks_removed_on_close_and_on_exception(tmp_path: Path) -> None:
    model = make_mlp()
    trace = NetworkTrace(model, tmp_path / "a")
    trace.start_epoch(0)
    assert hook_counts(model) > 0
    trace.close()
    assert hook_counts(model) == 0
    with pytest.raises(RuntimeError, match="boom"), NetworkTrace(model, tmp_path / "b") as trace:
        trace.start_epoch(0)
        model(torch.randn(4, 6))
        raise RuntimeError("boom")
    assert hook_counts(model) == 0


def test_nothing_holds_a_batch_output_after_the_forward_returns(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data(n=16)
    refs: list[weakref.ref] = []

    def keep_ref(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        refs.append(weakref.ref(output))
        if args:
            refs.append(weakref.ref(args[0]))

    handles = [m.register_forward_hook(keep_ref) for m in model]
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES, drop_batches=False) as trace:
        trace.start_epoch(0)
        for grad in (True, False):
            refs.clear()
            with torch.set_grad_enabled(grad):
                trace.set_targets(y)
                out = model(x.clone())
                if grad:
                    nn.functional.cross_entropy(out, y).backward()
            refs.append(weakref.ref(out))
            del out
            gc.collect()
            assert len(refs) == 11
            assert all(r() is None for r in refs), "the recorder keeps a reference to a batch's tensors"
        trace.end_epoch()
    for handle in handles:
        handle.remove()


# -- the live recorder ----------------------------------------------------------------------------------
def test_live_recorder_answers_for_completed_epochs(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        train(model, x, y, epochs=1, trace=trace, capture=capture)
        cell = trace["E_0/L_hidden_1/n_20"]
        assert cell["act_mean"] == pytest.approx(
            rows_of(capture.outputs[0]["L_hidden_1"])[:, 20].mean(), rel=1e-5
        )
        trace.start_epoch(1)
        model(x)
        with pytest.raises(KeyError, match=r"recorded epochs: \[0\]"):
            trace["E_1/L_hidden_1/n_20"]
        trace.end_epoch()
        assert trace["E_1"]["L_hidden_1"]["n_20"]["act_count"] == N_SAMPLES
    assert_same_cell(load_trace(tmp_path / "t")["E_0/L_hidden_1/n_20"], cell)


def test_epoch_context_manager_writes_on_clean_exit_only(tmp_path: Path) -> None:
    model = make_mlp()
    x, _ = make_data()
    with NetworkTrace(model, tmp_path / "t") as trace:
        with trace.epoch(0):
            model(x)
        with pytest.raises(RuntimeError, match="boom"), trace.epoch(1):
            model(x)
            raise RuntimeError("boom")
        assert hook_counts(model) == 0
        with trace.epoch(2):
            model(x)
    assert load_trace(tmp_path / "t").epochs == [0, 2]
    assert not (tmp_path / "t" / "neurons" / "epoch=1").exists()


# -- 10. errors ---------------------------------------------------------------------------------------
def test_set_targets_with_the_wrong_batch_size(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y[:5])
        with pytest.raises(ValueError, match=r"5 labels.*16"):
            model(x[:16])


def test_labels_outside_num_classes_raise_at_end_epoch_and_the_epoch_is_written(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data(n=8)
    with NetworkTrace(model, tmp_path / "t", num_classes=N_CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(torch.tensor([0, 1, 2, 3, 0, 7, 1, 2]))
        model(x)
        with pytest.raises(ValueError, match=r"epoch 0\b.*(\b2 labels|\b7\b).*num_classes=3"):
            trace.end_epoch()
        assert hook_counts(model) == 0
        trace.start_epoch(1)
        trace.set_targets(y % N_CLASSES)
        model(x)
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert t.epochs == [0, 1]
    counts = t.classes("E_0/L_output/n_0")["act_count"].tolist()
    assert counts == [2, 2, 2]


def test_end_epoch_without_start_epoch(tmp_path: Path) -> None:
    trace = NetworkTrace(make_mlp(), tmp_path / "t")
    with pytest.raises(RuntimeError, match="start_epoch"):
        trace.end_epoch()
    trace.start_epoch(0)
    trace.end_epoch()
    with pytest.raises(RuntimeError, match="start_epoch"):
        trace.end_epoch()


def test_num_classes_inferred_from_the_labels(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    capture = Capture(model)
    with NetworkTrace(model, tmp_path / "t") as trace:
        run = train(model, x, y, epochs=1, trace=trace, capture=capture)
    t = load_trace(tmp_path / "t")
    assert t.num_classes == N_CLASSES
    batches = capture.outputs[0]["L_hidden_1"]
    _, means = class_means(rows_of(batches), labels_of(batches, run.labels[0]), N_CLASSES)
    assert_close(t.classes("E_0/L_hidden_1")["act_mean"].unstack("class").to_numpy(), means)


def test_an_epoch_is_recorded_once(tmp_path: Path) -> None:
    model = make_mlp()
    with NetworkTrace(model, tmp_path / "t") as trace:
        with trace.epoch(0):
            model(torch.randn(3, 6))
        with pytest.raises(ValueError, match="epoch 0"):
            trace.start_epoch(0)


def test_start_epoch_twice_without_end_epoch(tmp_path: Path) -> None:
    with NetworkTrace(make_mlp(), tmp_path / "t") as trace:
        trace.start_epoch(0)
        with pytest.raises(RuntimeError, match="end_epoch"):
            trace.start_epoch(1)


@pytest.mark.parametrize("num_classes", [0, -1, True])
def test_invalid_num_classes(tmp_path: Path, num_classes: object) -> None:
    with pytest.raises(ValueError, match="num_classes"):
        NetworkTrace(make_mlp(), tmp_path / "t", num_classes=num_classes)


def test_existing_trace_needs_overwrite(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    with NetworkTrace(model, tmp_path / "t") as trace:
        train(model, x, y, epochs=2, trace=trace)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        NetworkTrace(model, tmp_path / "t")
    assert load_trace(tmp_path / "t").epochs == [0, 1], "a refused trace leaves the old one intact"
    with NetworkTrace(model, tmp_path / "t", overwrite=True) as trace:
        train(model, x, y, epochs=1, trace=trace)
    assert load_trace(tmp_path / "t").epochs == [0]
    assert not (tmp_path / "t" / "neurons" / "epoch=1").exists()


def test_crash_mid_epoch_leaves_exactly_the_completed_epochs(tmp_path: Path) -> None:
    model = make_mlp()
    x, y = make_data()
    store = tmp_path / "t"
    with (
        pytest.raises(RuntimeError, match="crash"),
        NetworkTrace(model, store, num_classes=N_CLASSES) as trace,
    ):
        train(model, x, y, epochs=2, trace=trace)
        trace.start_epoch(2)
        for start in range(0, N_SAMPLES, BATCH_SIZE):
            trace.set_targets(y[start : start + BATCH_SIZE])
            model(x[start : start + BATCH_SIZE])
            if start >= BATCH_SIZE:
                raise RuntimeError("crash")
    assert hook_counts(model) == 0
    t = load_trace(store)
    assert t.epochs == [0, 1]
    assert t.to_dataframe().index.get_level_values("epoch").unique().tolist() == [0, 1]
    parts = [p for p in store.rglob("*.parquet") if not p.name.startswith(".")]
    assert parts and not [p for p in parts if "epoch=2" in p.parts]
    assert not [p for p in store.rglob("*") if "epoch=2" in p.parts]
    assert not [p for p in store.rglob(".*")], "temporary files left behind"
    with pytest.raises(KeyError, match=r"recorded epochs: \[0, 1\]"):
        t["E_2/L_hidden_1/n_0"]
