"""Faults and misuse on the recording side that once gave silently wrong answers (issue 11): float
labels that are no class, labels given twice or never used, forward passes from several threads,
activations whose squares overflow float32, modules whose output cannot be recorded, empty epochs,
and run names that are not a plain folder name. Each compares with numpy on the tensors the test
captured itself, or checks the error names the bad value."""

from __future__ import annotations

import copy
import functools
import logging
import re
import shlex
import sys
import threading
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, load_trace

CLASSES = 3


def data(n: int = 24, features: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.arange(n) % CLASSES


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def class_counts(path: Path, layer: str, epoch: int = 0) -> np.ndarray:
    frame = load_trace(path).classes(f"E_{epoch}/{layer}")
    return frame.xs(0, level="neuron")["act_count"].to_numpy()


# -- 5. labels ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "shown"),
    [([0.3, 0.7, 1.6, 2.9], "0.3"), ([0.0, float("nan"), 1.0, 2.0], "nan"), ([0.0, 1.0, 2.5, 1.0], "2.5")],
)
def test_fractional_or_nan_float_labels_are_refused(tmp_path: Path, labels: list[float], shown: str) -> None:
    model = mlp()
    x = torch.randn(4, 5)
    with NetworkTrace(model, tmp_path / "t") as trace:  # num_classes inferred: NaN must not hide
        trace.start_epoch(0)
        with pytest.raises(ValueError, match=rf"(?i)set_targets.*{shown}.*integral"):
            trace.set_targets(torch.tensor(labels))
        model(x)
        trace.end_epoch()
    assert load_trace(tmp_path / "t").num_classes is None  # the refused labels inferred nothing


def test_probability_rows_with_nan_are_refused(tmp_path: Path) -> None:
    rows = torch.tensor([[0.1, 0.9, 0.0], [float("nan"), 0.5, 0.5]])
    with NetworkTrace(mlp(), tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        with pytest.raises(ValueError, match="nan"):
            trace.set_targets(rows)


def test_labels_on_an_accelerator_are_checked_on_the_device_and_refused_at_end_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Off the CPU the check makes no host transfer per batch: bad labels are counted on the device,
    left out of the per-class statistics and raised at end_epoch (the epoch is still written)."""
    from nn_staining import stats

    monkeypatch.setattr(stats, "checked_on_the_host", lambda labels: False)  # as on a GPU
    model = mlp()
    x, y = data(12)
    outputs: list[np.ndarray] = []
    model[0].register_forward_hook(lambda m, a, o: outputs.append(o.detach().double().numpy()))
    good = y.to(torch.float32)
    bad = torch.tensor([0.3, 0.7, 1.6, 2.9, 1.0, 2.0])
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(good)
        model(x)
        trace.set_targets(bad)
        model(x[:6])
        with pytest.raises(ValueError, match=r"4 float labels .*e\.g\. 0\.3"):
            trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert t.epochs == [0]
    assert t.query("E_0/L_0/n_0")["act_count"].item() == 18  # every sample is an observation
    # the two integral labels of the second batch count, the fractional ones do not
    labels = np.r_[y.numpy(), [-1, -1, -1, -1, 1, 2]]
    np.testing.assert_array_equal(class_counts(tmp_path / "t", "L_0"), np.bincount(labels[labels >= 0]))
    values, classes = np.concatenate(outputs), t.classes("E_0/L_0")
    for c in range(CLASSES):
        expected = values[labels == c].mean(0)
        np.testing.assert_allclose(classes.xs(c, level="class")["act_mean"], expected, rtol=1e-5, atol=1e-6)


def test_labels_checked_on_the_device_make_no_host_transfer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_no_host_sync import host_transfers_forbidden

    from nn_staining import stats

    monkeypatch.setattr(stats, "checked_on_the_host", lambda labels: False)  # as on a GPU
    model = mlp()
    x, y = data(24)
    calls: list[str] = []
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        with host_transfers_forbidden(calls):
            for i in range(0, 24, 8):
                trace.set_targets(y[i : i + 8].double() + (0.5 if i == 8 else 0.0))
                model(x[i : i + 8])
                trace.set_targets(nn.functional.one_hot(y[i : i + 8], CLASSES).float())
                model(x[i : i + 8])
        with pytest.raises(ValueError, match=r"8 float labels .*e\.g\. (0|1|2)\.5"):
            trace.end_epoch()
    assert calls == []


def test_exactly_integral_float_and_one_hot_labels_are_accepted(tmp_path: Path) -> None:
    model = mlp()
    x, y = data(12)
    outputs: list[np.ndarray] = []
    model[0].register_forward_hook(lambda m, a, o: outputs.append(o.detach().double().numpy()))
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y.double())
        model(x)
        trace.set_targets(nn.functional.one_hot(y, CLASSES).float())
        model(x)
        trace.end_epoch()
    frame = load_trace(tmp_path / "t").classes("E_0/L_0")
    values, labels = np.concatenate(outputs), np.r_[y.numpy(), y.numpy()]
    for c in range(CLASSES):
        expected = values[labels == c].mean(0)
        np.testing.assert_allclose(frame.xs(c, level="class")["act_mean"], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(class_counts(tmp_path / "t", "L_0"), np.bincount(labels))


def test_set_targets_twice_before_a_forward_pass_is_an_error(tmp_path: Path) -> None:
    model = mlp()
    x, y = data(6)
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        with pytest.raises(RuntimeError, match="set_targets.* twice .*forward pass"):
            trace.set_targets(y)
        model(x)  # the first labels are still the pass's
        trace.set_targets(y)  # a new pass, new labels: fine
        model(x)
        trace.end_epoch()
    np.testing.assert_array_equal(class_counts(tmp_path / "t", "L_0"), 2 * np.bincount(y.numpy()))


def test_labels_never_used_warn_at_end_epoch_and_do_not_carry_over(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = mlp()
    x, y = data(6)
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        model(x)
        trace.set_targets(y)  # no forward pass follows
        with caplog.at_level(logging.WARNING, logger="nn_staining"):
            trace.end_epoch()
        assert any(
            "epoch 0" in m and "set_targets" in m and "no forward pass" in m for m in warnings_of(caplog)
        )
        caplog.clear()
        trace.start_epoch(1)
        model(x)  # no labels of its own: the epoch-0 labels must not apply
        with caplog.at_level(logging.WARNING, logger="nn_staining"):
            trace.end_epoch()
        assert not warnings_of(caplog)
    np.testing.assert_array_equal(class_counts(tmp_path / "t", "L_0", 1), [0, 0, 0])


# -- 6. several threads --------------------------------------------------------------------------
@pytest.fixture
def fast_thread_switches():
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads' passes as much as possible
    yield
    sys.setswitchinterval(interval)


class SharedActivation(nn.Module):
    """An MLP whose ReLU module is called twice per pass (two layers, L_act and L_act:2, per batch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(5, 8)
        self.act = nn.ReLU()
        self.out = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act(self.act(self.fc(x)) - 0.5))


def test_forward_passes_from_a_thread_pool_are_recorded_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_thread_switches: None
) -> None:
    from nn_staining import stats

    monkeypatch.setattr(stats.ChunkPool.__init__, "__defaults__", (2048,))  # chunks end mid-pass
    model = SharedActivation()
    sizes = [8 + (7 * i) % 25 for i in range(64)]
    x, _ = data(sum(sizes), seed=1)
    y = torch.randint(0, CLASSES, (len(x),), generator=torch.Generator().manual_seed(2))
    starts = np.cumsum([0] + sizes)
    batch_of = threading.local()
    seen: dict[str, dict[int, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))

    def keep(name: str):
        def hook(m: nn.Module, a: tuple, o: torch.Tensor) -> None:
            seen[name][batch_of.index].append(o.detach().double().numpy().copy())

        return hook

    for name, module in model.named_children():
        module.register_forward_hook(keep(f"L_{name}"))

    def one_pass(i: int) -> None:
        batch_of.index = i
        trace.set_targets(y[starts[i] : starts[i + 1]])
        with torch.no_grad():
            model(x[starts[i] : starts[i + 1]])

    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES, drop_batches=False) as trace:
        for epoch in range(2):
            seen.clear()
            trace.start_epoch(epoch)
            with ThreadPoolExecutor(4) as pool:
                list(pool.map(one_pass, range(len(sizes))))
            trace.end_epoch()
            t = trace.load()
            for i in range(len(sizes)):  # act's second call in each pass is the layer L_act:2
                seen["L_act:2"][i] = seen["L_act"][i][1:]
                seen["L_act"][i] = seen["L_act"][i][:1]
            for layer, batches in seen.items():
                calls = 1
                values = np.concatenate([np.concatenate(batches[i]) for i in range(len(sizes))])
                labels = np.concatenate(
                    [np.tile(y[starts[i] : starts[i + 1]], calls) for i in range(len(sizes))]
                )
                frame = t.query(f"E_{epoch}/{layer}")
                np.testing.assert_array_equal(frame["act_count"], calls * len(x))
                np.testing.assert_allclose(frame["act_mean"], values.mean(0), rtol=1e-5, atol=1e-6)
                np.testing.assert_allclose(frame["act_std"], values.std(0), rtol=1e-4, atol=1e-6)
                np.testing.assert_allclose(frame["act_max"], values.max(0), rtol=1e-6)
                classes = t.classes(f"E_{epoch}/{layer}")
                for c in range(CLASSES):
                    part = classes.xs(c, level="class")
                    np.testing.assert_array_equal(part["act_count"], (labels == c).sum())
                    expected = values[labels == c].mean(0)
                    np.testing.assert_allclose(part["act_mean"], expected, rtol=1e-5, atol=1e-6)
                # per-batch rows: batches are numbered in the order they started, which the test does
                # not know; as a multiset they are the test's batches
                per_batch = t.batches(f"E_{epoch}/{layer}").xs(1, level="neuron")
                recorded = np.array(
                    sorted(zip(per_batch["act_count"], per_batch["act_mean"], per_batch["act_std"]))
                )
                expected = np.array(
                    sorted((calls * n, np.concatenate(b)[:, 1].mean(), np.concatenate(b)[:, 1].std())
                           for n, b in zip(sizes, (batches[i] for i in range(len(sizes)))))
                )  # fmt: skip
                np.testing.assert_array_equal(recorded[:, 0], expected[:, 0])
                np.testing.assert_allclose(recorded[:, 1:], expected[:, 1:], rtol=1e-5, atol=1e-6)


def test_a_pass_split_over_two_chunks_keeps_its_labels_and_one_batch_row() -> None:
    """Another thread's pass may end a chunk in the middle of a pass: the pass's later rows carry its
    labels into the next chunk, its out-of-range labels count once, and its per-batch row is one."""
    from nn_staining.stats import ChunkPool, PhaseStats

    stats = PhaseStats(CLASSES, keep_batches=True, pool=ChunkPool(chunk_bytes=1))
    g = torch.Generator().manual_seed(0)
    first, second, other = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g), torch.randn(3, 2)
    labels_a, labels_b = torch.tensor([0, 1, 2, 7]), torch.tensor([1, 1, 5])  # 7 and 5: out of range
    a = stats.start_batch(labels_a)
    stats.add("h", first, batch=a)
    b = stats.start_batch(labels_b)  # the full chunk is reduced here; pass a goes on in the next one
    stats.add("h", other, batch=b)
    stats.add("h", second, batch=a)  # pass a calls the module again
    layer = stats.finish().outputs["h"]
    values = torch.cat([first, other, second]).double().numpy()
    labels = torch.cat([labels_a, labels_b, labels_a]).numpy()
    np.testing.assert_array_equal(layer.activations.act_count, 11)
    np.testing.assert_allclose(layer.activations.act_mean, values.mean(0), rtol=1e-6)
    np.testing.assert_allclose(layer.activations.act_std, values.std(0), rtol=1e-5)
    np.testing.assert_array_equal(layer.classes.count, np.bincount(labels[labels < CLASSES]))
    for c in range(CLASSES):
        np.testing.assert_allclose(layer.classes.mean[c], values[labels == c].mean(0), rtol=1e-6)
    assert stats.label_summary().out_of_range == 2
    batches = layer.batches
    np.testing.assert_array_equal(batches.batch, [0, 1])
    np.testing.assert_array_equal(batches.act_count[:, 0], [8, 3])
    both = torch.cat([first, second]).double().numpy()
    np.testing.assert_allclose(batches.act_mean[0], both.mean(0), rtol=1e-6)
    np.testing.assert_allclose(batches.act_std[0], both.std(0), rtol=1e-5)
    np.testing.assert_allclose(batches.act_min[0], both.min(0), rtol=1e-6)
    np.testing.assert_allclose(batches.act_max[1], other.double().numpy().max(0), rtol=1e-6)


def test_data_parallel_on_the_cpu_records_like_the_bare_model(tmp_path: Path) -> None:
    model = mlp()
    x, y = data(30)
    outputs: list[np.ndarray] = []
    model[2].register_forward_hook(lambda m, a, o: outputs.append(o.detach().double().numpy()))
    wrapped = nn.DataParallel(model)  # no GPU: DataParallel calls the module itself
    with NetworkTrace(wrapped, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for i in range(0, 30, 8):
            trace.set_targets(y[i : i + 8])
            wrapped(x[i : i + 8])
        trace.end_epoch()
    frame = load_trace(tmp_path / "t").query("E_0/L_2")
    values = np.concatenate(outputs)
    np.testing.assert_array_equal(frame["act_count"], 30)
    np.testing.assert_allclose(frame["act_mean"], values.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(frame["act_std"], values.std(0), rtol=1e-4, atol=1e-6)


def test_data_parallel_replicas_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    """nn.DataParallel on several GPUs runs replicas of the model in threads; a replica shares the
    model's hooks (as ``replicate`` makes it, simulated here on the CPU)."""
    model = mlp()
    x, _ = data(6)
    replica = model._replicate_for_data_parallel()
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        model(x)
        with ThreadPoolExecutor(1) as pool, pytest.raises(RuntimeError, match="DataParallel.*Distributed"):
            pool.submit(replica, x).result()
        trace.end_epoch()
    assert load_trace(tmp_path / "t").query("E_0/L_0")["act_count"].tolist() == [6] * 8


def test_a_copy_of_the_model_made_during_an_epoch_is_not_recorded(tmp_path: Path) -> None:
    model = mlp()
    x, _ = data(6)
    with NetworkTrace(model, tmp_path / "t") as trace:
        trace.start_epoch(0)
        model(x)
        twin = copy.deepcopy(model)  # an EMA or best-model copy carries the hooks along
        twin(torch.randn(50, 5))
        trace.end_epoch()
        trace.start_epoch(1)
        twin(torch.randn(50, 5))
        model(x)
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert t.query("E_*/L_0/n_0")["act_count"].tolist() == [6, 6]


# -- 8. activations whose squares overflow float32 ---------------------------------------------------
@pytest.mark.parametrize("scale", [1e20, 1e30, 1e36])
def test_huge_activations_give_the_float64_mean_and_std(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scale: float
) -> None:
    from nn_staining import stats

    monkeypatch.setattr(stats.ChunkPool.__init__, "__defaults__", (1024,))  # several chunks
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    with torch.no_grad():
        model.weight.mul_(scale)
        model.bias.fill_(scale)
    x, y = data(200)
    outputs: list[np.ndarray] = []
    model.register_forward_hook(lambda m, a, o: outputs.append(o.detach().double().numpy()))
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for i in range(0, 200, 20):
            trace.set_targets(y[i : i + 20])
            model(x[i : i + 20])
        trace.end_epoch()
    values = np.concatenate(outputs)
    assert np.isfinite(values).all() and np.abs(values).max() > scale
    frame = load_trace(tmp_path / "t").query("E_0/L_model")
    np.testing.assert_array_equal(frame["act_nan_count"], 0)
    np.testing.assert_allclose(frame["act_mean"], values.mean(0), rtol=1e-5)
    np.testing.assert_allclose(frame["act_std"], values.std(0), rtol=1e-5)
    classes = load_trace(tmp_path / "t").classes("E_0/L_model")
    for c in range(CLASSES):
        expected = values[y.numpy() == c].mean(0)
        np.testing.assert_allclose(classes.xs(c, level="class")["act_mean"], expected, rtol=1e-5)


def test_huge_gradients_give_the_float64_grad_norm(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    with NetworkTrace(model, tmp_path / "t") as trace:
        trace.start_epoch(0)
        (model(torch.randn(4, 5)).sum() * 1e25).backward()  # squares of 1e25 overflow float32
        trace.end_epoch()
    expected = np.linalg.norm(model.weight.grad.double().numpy(), axis=1)
    recorded = load_trace(tmp_path / "t").query("E_0/L_model")["grad_norm"]
    np.testing.assert_allclose(recorded, expected, rtol=1e-6)


# -- 11. outputs that cannot be recorded, empty epochs ------------------------------------------------
@dataclass
class Output:
    value: torch.Tensor


class Returns(nn.Module):
    """A leaf whose output is whatever ``make`` gives."""

    def __init__(self, make) -> None:
        super().__init__()
        self.make = make

    def forward(self, h: torch.Tensor):
        return self.make(h)


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.as_dict = Returns(lambda h: {"h": h})
        self.as_dataclass = Returns(Output)
        self.as_none = Returns(lambda h: None)
        self.as_int = Returns(lambda h: h.argmax(1))
        self.as_scalar = Returns(lambda h: h.sum())
        self.empty = nn.Linear(4, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        for module in (
            self.as_dict,
            self.as_dataclass,
            self.as_none,
            self.as_int,
            self.as_scalar,
            self.empty,
        ):
            module(h)
        return h


def test_unrecordable_outputs_are_skipped_with_one_warning_that_lists_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = Mixed()
    x, _ = data(10)
    outputs: list[np.ndarray] = []
    model.fc.register_forward_hook(lambda m, a, o: outputs.append(o.detach().double().numpy()))
    with caplog.at_level(logging.WARNING, logger="nn_staining"), NetworkTrace(model, tmp_path / "t") as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            model(x)  # the zero-width Linear must not break the user's forward
            trace.end_epoch()
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    expected = {
        "L_as_dict": "a dict",
        "L_as_dataclass": "an Output",
        "L_as_none": "None",
        "L_as_int": "an int64 tensor",
        "L_as_scalar": "a 0-dim tensor",
        "L_empty": "0 neurons",
    }
    for key, reason in expected.items():
        assert f"{key} ({reason})" in warnings[0]
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_fc"] and t.epochs == [0, 1]
    np.testing.assert_allclose(t.query("E_1/L_fc")["act_mean"], outputs[1].mean(0), rtol=1e-5, atol=1e-6)


def test_a_model_with_no_recordable_layer_is_an_error(tmp_path: Path) -> None:
    model = nn.Sequential(Returns(lambda x: {"logits": x}))
    with NetworkTrace(model, tmp_path / "t") as trace:
        trace.start_epoch(0)
        model(torch.randn(4, 5))
        with pytest.raises(ValueError, match=r"no layer .* recordable.*L_0 \(a dict\).*layers="):
            trace.end_epoch()


def test_a_model_of_zero_width_layers_is_an_error_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no layer .* recordable.*L_model \(0 neurons\)"):
        NetworkTrace(nn.Linear(5, 0), tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_a_slash_in_a_module_left_out_by_layers_is_fine(tmp_path: Path) -> None:
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(5, 3))
    model.add_module("x/y", nn.Sequential(nn.ReLU()))
    with NetworkTrace(model, tmp_path / "t", layers=["fc"]) as trace:
        assert trace.layers == ["L_fc"]
    with pytest.raises(ValueError, match=r"module 'x/y' cannot be recorded"):
        NetworkTrace(model, tmp_path / "u", layers=["fc", "x*"])


def test_an_epoch_of_empty_batches_is_written_with_zero_counts(tmp_path: Path) -> None:
    model = mlp()
    x, y = data(12)
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            for _ in range(3):
                batch = slice(0, 0) if epoch == 0 else slice(0, 12)
                trace.set_targets(y[batch])
                model(x[batch])
            trace.end_epoch()
    t = load_trace(tmp_path / "t")
    assert t.epochs == [0, 1] and t.layers == ["L_0", "L_1", "L_2"]
    empty = t.query("E_0/L_2")
    assert (empty["act_count"] == 0).all()
    for column in ("act_mean", "act_std", "act_min", "act_max", "act_active_frac"):
        assert empty[column].isna().all(), column
    np.testing.assert_array_equal(class_counts(tmp_path / "t", "L_2"), [0, 0, 0])
    assert (t.query("E_1/L_2")["act_count"] == 36).all()


def test_an_epoch_without_a_recorded_pass_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model = mlp()
    x, _ = data(6)
    with NetworkTrace(model, tmp_path / "t") as trace:
        trace.start_epoch(0)
        model.eval()
        model(x)
        with caplog.at_level(logging.WARNING, logger="nn_staining"):
            trace.end_epoch()
    (message,) = warnings_of(caplog)
    assert "epoch 0" in message and "not written" in message and "record_eval=True" in message
    assert load_trace(tmp_path / "t").epochs == []


# -- 12. main.py --run-name ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["", " ", ".", "..", "../escape", "a/b", "/tmp/elsewhere"])
def test_run_name_must_be_a_plain_folder_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    from nn_staining import cli
    from nn_staining.pipeline import RunConfig, run_pipeline

    out = tmp_path / "results"
    (out / "breast_cancer").mkdir(parents=True)
    (out / "breast_cancer" / "meta.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        cli.run_main(["--run-name", name, "--output-dir", str(out), "--epochs", "1", "--no-figures"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument --run-name" in error and f"{name!r} is not a plain folder name" in error
    with pytest.raises(ValueError, match=rf"run_name {re.escape(repr(name))} is not a plain folder name"):
        run_pipeline(RunConfig(run_name=name, output_dir=str(out), epochs=1))
    assert sorted(tmp_path.rglob("*")) == before


def test_the_printed_query_is_shell_quoted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nn_staining import cli

    out = tmp_path / "my runs"
    argv = ["--dataset", "moons", "--epochs", "1", "--hidden", "4", "--output-dir", str(out)]
    assert cli.run_main([*argv, "--run-name", "it's $HOME", "--no-figures", "--no-report"]) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("example query")]
    command = shlex.split(line.split("  (", 1)[1].removesuffix(")"))
    assert command[:4] == ["python", "-m", "nn_staining", "query"]
    assert command[4] == str(out / "it's $HOME")
    assert cli.main(command[3:]) == 0


def test_a_hook_that_runs_while_end_epoch_detaches_folds_nothing(tmp_path: Path, monkeypatch) -> None:
    """A hook another thread dispatched before ``end_epoch`` removed it may run while the hooks are
    being removed, or after: it waits for the removal, then finds no pass and no plan, so nothing
    folds into statistics that are being finished (in place, at width). Here such a call is made
    from a thread started in the middle of the removal."""
    from nn_staining import recorder as recorder_module
    from nn_staining.tap import HookTap

    monkeypatch.setattr(recorder_module, "LARGE_EPOCH_BYTES", 1)  # finished in the running sums
    remove_pre_hooks = HookTap._remove_pre_hooks
    stores, late_calls, threads = {}, [], []

    def remove_and_call_late(tap) -> None:
        remove_pre_hooks(tap)
        calls, late_calls[:] = list(late_calls), []
        for call in calls:
            thread = threading.Thread(target=call)
            thread.start()
            thread.join(timeout=0.5)  # it waits for the lock until the removal is done
            threads.append(thread)

    for late in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3), nn.ReLU())
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        stores[late] = tmp_path / f"late-{late}"
        with NetworkTrace(model, stores[late], num_classes=3) as trace:
            trace.start_epoch(0)
            for _ in range(3):  # the later passes take the planned path
                trace.set_targets(y)
                model(x)
            if late:
                hook, layer = trace._tap._make_hook("L_0"), model[0]
                output = nn.functional.linear(x, layer.weight, layer.bias) + 100.0  # no hook runs
                late_calls.append(functools.partial(hook, layer, (x,), output))
                monkeypatch.setattr(HookTap, "_remove_pre_hooks", remove_and_call_late)
            trace.end_epoch()
            monkeypatch.setattr(HookTap, "_remove_pre_hooks", remove_pre_hooks)
    for thread in threads:
        thread.join(timeout=5)
    assert len(threads) == 1 and not threads[0].is_alive()
    frames = [load_trace(stores[late]).to_dataframe() for late in (False, True)]
    pd.testing.assert_frame_equal(frames[1], frames[0], check_exact=True)
