"""Models and training loops that break naive recorders: each compared with numpy on captured values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from nn_staining import NetworkTrace, load_trace

CLASSES = 3


def data(n: int = 24, features: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.arange(n) % CLASSES


def capture(module: nn.Module, store: list[np.ndarray]) -> None:
    module.register_forward_hook(lambda m, a, o: store.append(o.detach().double().numpy().copy()))


def assert_class_means(
    recorded: np.ndarray, values: np.ndarray, labels: torch.Tensor, sample_dim: int = 0
) -> None:
    """``recorded`` (units, classes) against numpy's per-class mean of ``values`` (samples on
    ``sample_dim``, features last; every other position an observation of its sample)."""
    y = labels.numpy()
    for c in range(CLASSES):
        chosen = np.take(values, np.flatnonzero(y == c), axis=sample_dim)
        expected = chosen.reshape(-1, values.shape[-1]).mean(0)
        np.testing.assert_allclose(recorded[:, c], expected, rtol=1e-5, atol=1e-6)


def neuron_means(path: Path, layer: str, epoch: int = 0) -> np.ndarray:
    return load_trace(path).query(f"E_{epoch}/{layer}")["act_mean"].to_numpy()


def test_eval_under_inference_mode_then_training_again(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
    x, y = data()
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES, record_eval=True) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            model.train()
            trace.set_targets(y)
            model(x)
            model.eval()
            with torch.inference_mode():
                trace.set_targets(y)
                model(x)
            trace.end_epoch()
    assert load_trace(tmp_path / "t").epochs == [0, 1]
    assert load_trace(tmp_path / "t", phase="eval").epochs == [0, 1]


def test_frozen_submodule_in_eval_mode_stays_in_the_training_record(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU())
    x, y = data()
    seen: list[np.ndarray] = []
    capture(model[1], seen)
    model.train()
    model[1].eval()  # frozen BatchNorm, as in fine-tuning
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        model(x)
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_0", "L_1", "L_2"]
    np.testing.assert_allclose(neuron_means(tmp_path / "t", "L_1"), seen[0].mean(0), rtol=1e-5, atol=1e-6)


class SharedActivation(nn.Module):
    """One ReLU module used after two layers of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.act = nn.Linear(5, 6), nn.Linear(6, 4), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


def test_module_called_at_two_widths_records_each_call(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    model = SharedActivation()
    x, y = data()
    with (
        caplog.at_level("WARNING", logger="nn_staining"),
        NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace,
    ):
        for epoch in range(2):
            trace.start_epoch(epoch)
            trace.set_targets(y)
            model(x)
            trace.end_epoch()
    assert not [r for r in caplog.records if "several widths" in r.getMessage()]
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_fc1", "L_fc2", "L_act", "L_act:2"]  # each call its own layer, after the module
    assert [t.layer_info(k)["neurons"] for k in t.layers] == [6, 4, 6, 4]
    h = torch.relu(model.fc1(x)).detach().numpy()
    np.testing.assert_allclose(neuron_means(tmp_path / "t", "L_act"), h.mean(0), rtol=1e-5, atol=1e-6)
    second = torch.relu(model.fc2(torch.relu(model.fc1(x)))).detach().numpy()
    np.testing.assert_allclose(neuron_means(tmp_path / "t", "L_act:2"), second.mean(0), rtol=1e-5, atol=1e-6)
    means = t.inputs("E_0/L_fc2")["mean"].unstack("class").to_numpy()  # fc2's input is act's first call
    assert_class_means(means, h, y)


class SameWidthShared(nn.Module):
    """One ReLU module used after two layers of the same width."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3, self.act = nn.Linear(5, 4), nn.Linear(4, 4), nn.Linear(4, 2), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


def test_inputs_are_not_taken_from_a_module_that_fires_twice(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SameWidthShared()
    x, y = data()
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            trace.set_targets(y)
            with torch.no_grad():
                model(x)
            trace.end_epoch()
    t = load_trace(tmp_path / "t")
    # act's two calls are two layers; fc2's input is copied from its own call, never taken from them
    h = torch.relu(model.fc1(x)).detach().numpy()
    for epoch in (0, 1):
        means = t.inputs(f"E_{epoch}/L_fc2")["mean"].unstack("class").to_numpy()
        assert_class_means(means, h, y)


class SeqFirst(nn.Module):
    """An LSTM with batch_first=False, then a Linear on every step: (steps, batch, features)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm, self.head = nn.LSTM(3, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0])


def test_layer_after_a_seq_first_lstm_gets_each_step_its_samples_class(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SeqFirst()
    steps, batch = 5, 6
    x = torch.randn(steps, batch, 3)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    seen: list[np.ndarray] = []
    capture(model.head, seen)
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        model(x)
        trace.end_epoch()
    out = seen[0]  # (steps, batch, 2)
    classes = load_trace(tmp_path / "t").classes("E_0/L_head")["act_mean"].unstack("class").to_numpy()
    assert_class_means(classes, out, y, sample_dim=1)
    assert load_trace(tmp_path / "t")["E_0/L_head/n_0"]["act_count"] == steps * batch


class InplaceRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        h.relu_()  # changes a's output in place after a's hook has run
        return self.b(h)


def test_inputs_after_an_inplace_change_are_the_changed_values(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = InplaceRelu()
    x, y = data()
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        with torch.no_grad():
            model(x)
        trace.end_epoch()
    h = torch.relu(model.a(x)).detach().numpy()
    means = load_trace(tmp_path / "t").inputs("E_0/L_b")["mean"].unstack("class").to_numpy()
    assert_class_means(means, h, y)


class Sometimes(nn.Module):
    """Layer b runs only on odd batches."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(3, 3)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h = self.a(x)
        return self.b(h) if self.calls % 2 == 0 else h


def test_batches_table_keeps_the_batch_index_of_a_layer_that_skips_batches(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Sometimes()
    x, _ = data()
    seen: list[np.ndarray] = []
    capture(model.b, seen)
    with NetworkTrace(model, tmp_path / "t", drop_batches=False) as trace:
        trace.start_epoch(0)
        for i in range(4):
            model(x[6 * i : 6 * i + 6])
        trace.end_epoch()
    frame = load_trace(tmp_path / "t").batches("E_0/L_b")
    assert sorted(set(frame.index.get_level_values("batch"))) == [1, 3]
    got = frame.xs(0, level="neuron")["act_mean"].to_numpy()
    np.testing.assert_allclose(got, [s[:, 0].mean() for s in seen], rtol=1e-5)


def test_checkpointed_forward_is_counted_once(tmp_path: Path) -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(5, 4), nn.ReLU())
    model = nn.Sequential(block, nn.Linear(4, 2))
    x, _ = data()
    with NetworkTrace(model, tmp_path / "t") as trace:
        trace.start_epoch(0)
        out = model[1](checkpoint(block, x, use_reentrant=False))
        out.sum().backward()
        trace.end_epoch()
    counts = load_trace(tmp_path / "t").query("E_0/L_*/n_0")["act_count"]
    assert set(counts) == {len(x)}


def test_overwrite_refuses_a_folder_that_is_not_a_trace(tmp_path: Path) -> None:
    folder = tmp_path / "project"
    (folder / "inputs").mkdir(parents=True)
    (folder / "inputs" / "data.csv").write_text("a,b\n")
    with pytest.raises(FileExistsError, match="not an nn_staining trace"):
        NetworkTrace(nn.Linear(2, 2), folder, overwrite=True)
    assert (folder / "inputs" / "data.csv").exists()


def test_bfloat16_channel_means_keep_their_spread(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Conv2d(1, 3, 3).to(torch.bfloat16)
    with torch.no_grad():
        model.bias.fill_(100.0)
    x = torch.randn(16, 1, 6, 6).to(torch.bfloat16)
    with NetworkTrace(model, tmp_path / "t") as trace:
        trace.start_epoch(0)
        with torch.no_grad():
            out = model(x)
        trace.end_epoch()
    per_sample = out.float().mean(dim=(2, 3)).double().numpy()
    std = load_trace(tmp_path / "t").query("E_0/L_model")["act_std"].to_numpy()
    np.testing.assert_allclose(std, per_sample.std(0), rtol=0.05)


def test_inputs_of_a_layer_after_a_seq_first_lstm_follow_the_samples(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SeqFirst()
    x, y = torch.randn(5, 6, 3), torch.tensor([0, 1, 2, 0, 1, 2])
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        with torch.no_grad():
            model(x)
        trace.end_epoch()
    h = model.lstm(x)[0].detach().numpy()  # (steps, batch, 4): the head's input
    means = load_trace(tmp_path / "t").inputs("E_0/L_head")["mean"].unstack("class").to_numpy()
    assert_class_means(means, h, y, sample_dim=1)


def test_labels_for_half_the_batch_are_refused(tmp_path: Path) -> None:
    model = nn.Linear(5, 2)
    x, y = data(16)
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y[:8])
        with pytest.raises(
            ValueError,
            match=r"8 labels .* no recorded layer.s output has a dimension of 8 samples \(L_model \(16, 2\)\)",
        ):
            model(x)


def test_integer_one_hot_labels_are_accepted(tmp_path: Path) -> None:
    model = nn.Linear(5, 2)
    x, y = data()
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(nn.functional.one_hot(y, CLASSES))
        with torch.no_grad():
            out = model(x).numpy()
        trace.end_epoch()
    classes = load_trace(tmp_path / "t").classes("E_0/L_model")["act_mean"].unstack("class").to_numpy()
    assert_class_means(classes, out, y)


class Autoencoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc, self.dec = nn.Linear(5, 3), nn.Linear(3, 5)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dec(self.enc(x))


def test_submodules_called_directly_make_one_batch_per_call(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Autoencoder()
    x, y = data()
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES, drop_batches=False) as trace:
        trace.start_epoch(0)
        for i in range(3):  # the model's own forward is never called
            trace.set_targets(y[8 * i : 8 * i + 8])
            with torch.no_grad():
                model.encode(x[8 * i : 8 * i + 8])
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert sorted(set(t.batches("E_0/L_enc").index.get_level_values("batch"))) == [0, 1, 2]
    out = model.enc(x).detach().numpy()
    classes = t.classes("E_0/L_enc")["act_mean"].unstack("class").to_numpy()
    assert_class_means(classes, out, y)


def test_a_failed_write_names_the_epoch_and_later_epochs_are_written(tmp_path: Path, monkeypatch) -> None:
    from nn_staining import store

    model = nn.Linear(5, 2)
    x, _ = data()
    calls = {"n": 0}
    original = store.TraceWriter.write_epoch

    def failing_once(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(store.TraceWriter, "write_epoch", failing_once)
    trace = NetworkTrace(model, tmp_path / "t", background=False)
    for epoch in range(3):
        trace.start_epoch(epoch)
        model(x)
        if epoch == 1:
            message = r"writing epoch 1 \(train\) of .*/t' failed: OSError: disk full .* intact: \[0\]"
            with pytest.raises(OSError, match=message):
                trace.end_epoch()
        else:
            trace.end_epoch()
    trace.close()
    assert load_trace(tmp_path / "t").epochs == [0, 2]
    assert not list((tmp_path / "t").rglob("epoch=1"))


def test_config_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="JSON"):
        NetworkTrace(nn.Linear(2, 2), tmp_path / "t", config={"data": Path("/data")})
    assert not (tmp_path / "t" / "meta.json").exists()


def test_pipeline_keeps_figures_of_a_folder_that_was_no_trace(tmp_path: Path) -> None:
    from nn_staining.pipeline import RunConfig, run_pipeline

    figures = tmp_path / "proj" / "figures"
    figures.mkdir(parents=True)
    (figures / "mine.png").write_bytes(b"x")
    run_pipeline(RunConfig(epochs=1, output_dir=str(tmp_path), run_name="proj", figures=False))
    assert (figures / "mine.png").exists()
    assert load_trace(tmp_path / "proj").epochs == [0]


def test_feature_names_given_in_config_reach_the_trace(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    for config, expected in (({"feature_names": ["width", "height"]}, ["width", "height"]), ({}, None)):
        store = tmp_path / str(len(config))
        with NetworkTrace(model, store, config=config) as trace:
            trace.start_epoch(0)
            model(torch.randn(4, 2))
            trace.end_epoch()
        assert load_trace(store).feature_names == expected


def test_weight_norms_of_huge_weights_are_finite(tmp_path: Path) -> None:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(3e19)
    with NetworkTrace(model, tmp_path / "t") as trace:
        for epoch in range(2):
            with trace.epoch(epoch):
                model(torch.ones(4, 3))
    got = load_trace(tmp_path / "t").query("E_1/L_model")
    np.testing.assert_allclose(got["weight_norm"], np.sqrt(3) * 3e19, rtol=1e-6)
    np.testing.assert_array_equal(got["weight_delta_norm"], 0.0)
