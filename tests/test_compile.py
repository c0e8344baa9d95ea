"""A model under ``torch.compile``: the same statistics as without it, one graph break per forward
whatever the number of layers (the model's own hooks run outside the compiled region; the layers' hooks
only keep their outputs, recorded at the end of the pass), no recompilation from one recorded epoch
to the next, and layer names that do not depend on when the model was compiled.

Dynamo's graph breaks are a property of tracing, so the tests compile with ``backend="eager"`` (no
code generation: fast); references come from the test's own hooks on the model run without compile.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo
from conftest import numpy_stats
from torch import nn

from nn_staining import NetworkTrace, load_trace

CLASSES = 3


def mlp(depth: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(6, 16), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(16, 16), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(16, CLASSES))


def batches(n: int = 4, size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 6, generator=g), torch.arange(size) % CLASSES) for _ in range(n)]


def record(model: nn.Module, runner: nn.Module, path: Path, epochs: int = 2) -> None:
    """Forward and backward passes without optimiser steps: every epoch sees the same outputs."""
    with NetworkTrace(model, path, num_classes=CLASSES) as trace:
        for epoch in range(epochs):
            trace.start_epoch(epoch)
            for x, y in batches():
                trace.set_targets(y)
                nn.functional.cross_entropy(runner(x), y).backward()
            trace.end_epoch()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    dynamo.reset()
    dynamo.utils.counters.clear()
    yield
    dynamo.reset()


def test_compiled_statistics_equal_the_eager_capture(tmp_path: Path) -> None:
    model = mlp(3)
    outputs: dict[str, list[np.ndarray]] = {}
    reference = mlp(3)
    for name, module in reference.named_children():
        module.register_forward_hook(
            lambda m, a, o, key=f"L_{name}": outputs.setdefault(key, []).append(o.detach().double().numpy())
        )
    for x, _ in batches():
        reference(x)
    labels = np.concatenate([y.numpy() for _, y in batches()])
    record(model, torch.compile(model, backend="eager"), tmp_path / "t")
    t = load_trace(tmp_path / "t")
    assert t.layers == list(outputs)  # L_0 … L_4: no _orig_mod in the names
    for epoch in (0, 1):
        for key, parts in outputs.items():
            rows = np.concatenate(parts)
            got = t.query(f"E_{epoch}/{key}")
            for column, expected in numpy_stats(rows).items():
                np.testing.assert_allclose(got[column].to_numpy(), expected, rtol=1e-5, atol=1e-6)
            means = t.classes(f"E_{epoch}/{key}")["act_mean"].unstack("class").to_numpy()
            expected = np.stack([rows[labels == c].mean(0) for c in range(CLASSES)], axis=1)
            np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("depth", [3, 8])
def test_one_graph_break_whatever_the_depth(tmp_path: Path, depth: int) -> None:
    """Before: the hooks broke the graph at each layer (16 breaks, 14 graphs for 3 Linear layers)."""
    model = mlp(depth)
    record(model, torch.compile(model, backend="eager"), tmp_path / "t", epochs=3)
    breaks = sum(dynamo.utils.counters["graph_break"].values())
    graphs = dynamo.utils.counters["stats"]["unique_graphs"]
    assert breaks == 1, dict(dynamo.utils.counters["graph_break"])
    assert graphs <= 2
    assert len(load_trace(tmp_path / "t").layers) == 2 * depth - 1


def test_names_do_not_depend_on_when_the_model_was_compiled(tmp_path: Path) -> None:
    before = mlp(3)
    with NetworkTrace(before, tmp_path / "a", num_classes=CLASSES) as trace:  # attached, then compiled
        runner = torch.compile(before, backend="eager")
        with trace.epoch(0):
            for x, y in batches(1):
                trace.set_targets(y)
                runner(x)
    after = torch.compile(mlp(3), backend="eager")  # compiled, then attached
    with NetworkTrace(after, tmp_path / "b", num_classes=CLASSES) as trace, trace.epoch(0):
        for x, y in batches(1):
            trace.set_targets(y)
            after(x)
    a, b = load_trace(tmp_path / "a"), load_trace(tmp_path / "b")
    assert a.layers == b.layers == ["L_0", "L_1", "L_2", "L_3", "L_4"]
    np.testing.assert_allclose(a.query("E_0/L_2")["act_mean"], b.query("E_0/L_2")["act_mean"], rtol=1e-6)


def test_a_compiled_submodule_inside_an_eager_model(tmp_path: Path) -> None:
    """Only part of the model compiled: its layers' outputs are recorded at the end of the model's pass."""
    model = mlp(3)
    model[2] = torch.compile(model[2], backend="eager")
    reference = mlp(3)
    trace = NetworkTrace(model, tmp_path / "t", num_classes=CLASSES, layers=["0", "2._orig_mod", "4"])
    with trace, trace.epoch(0):
        for x, y in batches():
            trace.set_targets(y)
            model(x)
    t = load_trace(tmp_path / "t")
    rows = np.concatenate([reference[:3](x).detach().numpy() for x, _ in batches()])
    np.testing.assert_allclose(t.query("E_0/L_2._orig_mod")["act_mean"].to_numpy(), rows.mean(0), rtol=1e-5)
