"""Shared fixtures: tiny seeded models and data, the test's own capture hooks and a recorded store.

The reference values every test compares against come from :class:`Capture`, forward hooks of
the test's own that keep a copy of each module's input and output per batch, and from snapshots
of the model's parameters taken at the end of each epoch; numpy computes the statistics.
"""

from __future__ import annotations

import os
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import settings
from torch import nn

from nn_staining import NetworkTrace
from nn_staining.store import ROW_GROUP_ROWS

# Tiny tensors: one intra-op thread avoids spin-waiting on a shared 2-core machine (100x faster here).
torch.set_num_threads(1)

# Hypothesis: CI (the environment variable CI set, as `bash .ci/run` does) gets the same examples on
# every run and no example database; locally, fresh random examples each run. HYPOTHESIS_PROFILE
# picks a profile by name. No deadline in either: a shared 2-core machine makes timings noisy.
settings.register_profile(
    "ci", derandomize=True, database=None, max_examples=100, deadline=None, print_blob=True
)
settings.register_profile("dev", deadline=None)
_ON_CI = os.environ.get("CI", "").lower() not in ("", "0", "false", "no")
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if _ON_CI else "dev"))

SEED = 0
N_SAMPLES = 50
BATCH_SIZE = 16  # 16, 16, 16 and a smaller last batch of 2
N_FEATURES = 6
HIDDEN = 24
N_CLASSES = 3
EPOCHS = 4
MLP_LAYERS = ["L_input", "L_relu_1", "L_hidden_1", "L_relu_2", "L_output"]


def make_data(
    n: int = N_SAMPLES,
    features: int | tuple[int, ...] = N_FEATURES,
    classes: int = N_CLASSES,
    seed: int = SEED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded inputs and labels in which every class occurs."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, *features) if isinstance(features, tuple) else (n, features)
    x = torch.randn(shape, generator=g)
    y = (torch.arange(n) % classes)[torch.randperm(n, generator=g)]
    return x, y


def make_mlp(seed: int = SEED, hidden: int = HIDDEN, classes: int = N_CLASSES) -> nn.Sequential:
    """An nn.Sequential MLP with ReLU modules; keys L_input, L_relu_1, L_hidden_1, L_relu_2, L_output."""
    torch.manual_seed(seed)
    return nn.Sequential(
        OrderedDict(
            input=nn.Linear(N_FEATURES, hidden),
            relu_1=nn.ReLU(),
            hidden_1=nn.Linear(hidden, hidden),
            relu_2=nn.ReLU(),
            output=nn.Linear(hidden, classes),
        )
    )


def key_of(name: str) -> str:
    """The layer key DESIGN.md gives a module name."""
    return name if name.startswith("L_") else f"L_{name}"


class Capture:
    """The test's own forward hooks: a copy of each named module's output and first input per batch.

    Values are kept per epoch (set :attr:`epoch` before each epoch) as float64 numpy arrays; tuple
    outputs keep their first tensor, as DESIGN.md says the recorder does.
    """

    def __init__(self, model: nn.Module, names: Iterable[str] | None = None) -> None:
        modules = dict(model.named_modules())
        if names is None:
            names = [n for n, m in modules.items() if n and not any(True for _ in m.children())]
        self.names = list(names)
        self.epoch = 0
        self.outputs: dict[int, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
        self.inputs: dict[int, dict[str, list[np.ndarray]]] = defaultdict(lambda: defaultdict(list))
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in self.names]

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.outputs[self.epoch][key_of(name)].append(out.detach().clone().double().numpy())
            if args and isinstance(args[0], torch.Tensor):
                self.inputs[self.epoch][key_of(name)].append(args[0].detach().clone().double().numpy())

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def snapshot_params(model: nn.Module, keys: Iterable[str] | None = None) -> dict[str, dict[str, np.ndarray]]:
    """Each module's weight rows, bias and weight-gradient rows (float64 numpy) right now."""
    out = {}
    for name, module in model.named_modules():
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if not name or not isinstance(weight, torch.Tensor):
            continue
        entry = {"weight": weight.detach().double().reshape(weight.shape[0], -1).numpy().copy()}
        if isinstance(bias, torch.Tensor):
            entry["bias"] = bias.detach().double().numpy().copy()
        if weight.grad is not None:
            entry["grad"] = weight.grad.detach().double().reshape(weight.shape[0], -1).numpy().copy()
        out[key_of(name)] = entry
    return out


@dataclass
class Run:
    """What a training run recorded (``store``) and what the test saw on its own."""

    store: Path
    model: nn.Module
    capture: Capture | None
    labels: dict[int, list[np.ndarray]] = field(default_factory=dict)
    params: dict[int, dict[str, dict[str, np.ndarray]]] = field(default_factory=dict)
    outputs: list[torch.Tensor] = field(default_factory=list)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    trace: NetworkTrace | None = None,
    capture: Capture | None = None,
    optimiser: str | None = "sgd",
    lr: float = 0.1,
    seed: int = SEED,
    targets: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    store: Path | None = None,
) -> Run:
    """Train ``model`` in a fixed, seeded batch order, optionally recorded by ``trace``.

    ``optimiser=None`` computes gradients but never steps (the weights stay frozen).
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    opt = None
    if optimiser == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    elif optimiser == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    run = Run(Path(store or (trace.store if trace else ".")), model, capture)
    model.train()
    for epoch in range(epochs):
        if capture is not None:
            capture.epoch = epoch
        if trace is not None:
            trace.start_epoch(epoch)
        order = torch.randperm(len(x), generator=generator)
        run.labels[epoch] = []
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            xb, yb = x[idx], y[idx]
            run.labels[epoch].append(yb.numpy().copy())
            if trace is not None and targets:
                trace.set_targets(yb)
            out = model(xb)
            run.outputs.append(out.detach().clone())
            loss = loss_fn(out, yb)
            if opt is not None:
                opt.zero_grad()
            else:
                model.zero_grad()
            loss.backward()
            if opt is not None:
                opt.step()
        run.params[epoch] = snapshot_params(model)
        if trace is not None:
            trace.end_epoch()
    return run


# -- numpy references ----------------------------------------------------------------------------
def rows_of(batches: list[np.ndarray], channel_first: bool = False) -> np.ndarray:
    """Stack per-batch outputs into (observations, neurons) the way DESIGN.md defines neurons."""
    if channel_first:
        return np.concatenate([b.reshape(b.shape[0], b.shape[1], -1).mean(2) for b in batches])
    return np.concatenate([b.reshape(-1, b.shape[-1]) for b in batches])


def labels_of(batches: list[np.ndarray], labels: list[np.ndarray]) -> np.ndarray:
    """Each observation's class: a sample's label repeated over its middle positions (sequence steps)."""
    return np.concatenate(
        [np.repeat(lab, b.reshape(-1, b.shape[-1]).shape[0] // len(lab)) for b, lab in zip(batches, labels)]
    )


def numpy_stats(rows: np.ndarray) -> dict[str, np.ndarray]:
    """The ``neurons`` activation columns of (observations, neurons) rows, computed by numpy in float64."""
    rows = rows.astype(np.float64)
    return {
        "act_count": np.full(rows.shape[1], rows.shape[0]),
        "act_mean": rows.mean(0),
        "act_std": rows.std(0),
        "act_min": rows.min(0),
        "act_max": rows.max(0),
        "act_active_frac": (rows > 0).mean(0),
        "act_nan_count": np.isnan(rows).sum(0),
    }


def class_means(rows: np.ndarray, labels: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts (classes,), means (neurons, classes)) by a numpy masked mean."""
    counts = np.array([(labels == c).sum() for c in range(classes)])
    means = np.stack(
        [
            np.ma.masked_array(rows, ~(labels == c)[:, None].repeat(rows.shape[1], 1)).mean(0)
            for c in range(classes)
        ],
        axis=1,
    )
    return counts, np.ma.filled(means, np.nan)


def assert_close(
    actual: Any, expected: Any, rtol: float = 2e-5, atol: float = 2e-6, err_msg: str = ""
) -> None:
    """float32 storage of float64 statistics: compare with a tolerance a float32 round trip allows."""
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        np.asarray(expected, np.float64),
        rtol=rtol,
        atol=atol,
        err_msg=err_msg,
    )


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def mlp_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The MLP trained 4 epochs (SGD, 3 classes, batches of 16 and a last one of 2), every epoch
    recorded with per-batch statistics, next to the test's own captured activations and parameters."""
    store = tmp_path_factory.mktemp("mlp") / "trace"
    model = make_mlp()
    x, y = make_data()
    capture = Capture(model)
    with NetworkTrace(model, store, num_classes=N_CLASSES, drop_batches=False) as trace:
        run = train(model, x, y, trace=trace, capture=capture)
    capture.remove()
    return run


@pytest.fixture(scope="session")
def frozen_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The MLP recorded for 2 epochs with gradients computed but no optimiser step (weights frozen)."""
    store = tmp_path_factory.mktemp("frozen") / "trace"
    model = make_mlp(seed=1)
    x, y = make_data(seed=1)
    capture = Capture(model)
    with NetworkTrace(model, store, num_classes=N_CLASSES) as trace:
        run = train(model, x, y, epochs=2, trace=trace, capture=capture, optimiser=None)
    capture.remove()
    return run


#: Neurons of the wide store's layer: two and a half Parquet row groups' worth.
WIDE = 2 * ROW_GROUP_ROWS + ROW_GROUP_ROWS // 2


@pytest.fixture(scope="session")
def wide_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose one layer (``L_0``) has more neurons than two Parquet row groups hold."""
    store = tmp_path_factory.mktemp("wide") / "trace"
    torch.manual_seed(SEED)
    model = nn.Sequential(nn.Linear(2, WIDE))
    x, y = make_data(n=8, features=2, classes=2)
    with NetworkTrace(model, store, num_classes=2) as trace:
        train(model, x, y, epochs=2, batch_size=4, trace=trace, optimiser=None)
    return store


def assert_same_cell(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two cell dicts (``t["E_3/L_x/n_5"]``) hold the same metrics; NaN/None equal each other."""
    assert a.keys() == b.keys()
    for key in a:
        x, y = a[key], b[key]
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            np.testing.assert_array_equal(x, y, err_msg=key)
        elif isinstance(x, dict):
            assert x.keys() == y.keys(), key
            assert all(x[k] == y[k] or (np.isnan(x[k]) and np.isnan(y[k])) for k in x), key
        elif x is None or y is None or (isinstance(x, float) and np.isnan(x)):
            assert (x is None or np.isnan(x)) and (y is None or np.isnan(y)), key
        else:
            assert x == y, key
