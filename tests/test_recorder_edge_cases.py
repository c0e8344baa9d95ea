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


def test_module_called_at_two_widths_records_the_first_width(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SharedActivation()
    x, y = data()
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        model(x)
        trace.end_epoch()
    expected = torch.relu(model.fc1(x)).detach().numpy().mean(0)
    np.testing.assert_allclose(neuron_means(tmp_path / "t", "L_act"), expected, rtol=1e-5, atol=1e-6)
    # only act's first-width calls are recorded, and they are exactly fc2's input
    h = torch.relu(model.fc1(x)).detach().numpy()
    means = load_trace(tmp_path / "t").inputs("E_0/L_fc2")["mean"].unstack("class").to_numpy()
    for c in range(CLASSES):
        np.testing.assert_allclose(means[:, c], h[y.numpy() == c].mean(0), rtol=1e-5, atol=1e-6)


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
    assert t.inputs("E_0/L_fc2").empty  # act's statistics mix both calls: not used, and not faked
    h = torch.relu(model.fc1(x)).detach().numpy()  # from the next epoch on, fc2's input is copied
    means = t.inputs("E_1/L_fc2")["mean"].unstack("class").to_numpy()
    for c in range(CLASSES):
        np.testing.assert_allclose(means[:, c], h[y.numpy() == c].mean(0), rtol=1e-5, atol=1e-6)


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
    for c in range(CLASSES):
        np.testing.assert_allclose(classes[:, c], out[:, y.numpy() == c, :].reshape(-1, 2).mean(0), rtol=1e-5)
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
    for c in range(CLASSES):
        np.testing.assert_allclose(means[:, c], h[y.numpy() == c].mean(0), rtol=1e-5, atol=1e-6)


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
