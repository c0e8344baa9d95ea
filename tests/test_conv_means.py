"""A convolution's per-channel spatial means computed from its input's window sums (no read of its
output) equal the means of its output, and the recorder takes that path only where it reads fewer
values; references: the module's own output averaged by numpy in float64."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import numpy_stats
from torch import nn

from nn_staining import NetworkTrace, conv_means, load_trace

CONVS = [
    lambda: nn.Conv2d(1, 32, 3),
    lambda: nn.Conv2d(3, 8, 3, stride=2, padding=1),
    lambda: nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    lambda: nn.Conv2d(8, 8, 3, groups=8, padding=1),  # depthwise
    lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False),
    lambda: nn.Conv1d(3, 16, 5, stride=2, padding=2),
    lambda: nn.Conv1d(4, 8, 3, dilation=3, groups=4),
]


@pytest.mark.parametrize("build", CONVS)
def test_spatial_means_from_the_input_equal_the_output_means(build) -> None:
    torch.manual_seed(0)
    module = build()
    size = (17, 13) if isinstance(module, nn.Conv2d) else (29,)
    x = torch.randn(5, module.in_channels, *size)
    out = module(x).detach()
    expected = out.double().numpy().mean(axis=tuple(range(2, out.dim())))
    got = conv_means.spatial_means(module, x, tuple(out.shape)).detach().double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_unsupported_convolutions_are_read_from_their_output() -> None:
    assert not conv_means.supported(nn.Conv2d(1, 4, 3, padding="same"))
    assert not conv_means.supported(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"))
    assert not conv_means.supported(nn.Conv3d(1, 4, 3))
    assert not conv_means.supported(nn.Conv2d(1, 4, 3).double())
    wide_in = nn.Conv2d(32, 8, 3)  # more input than output: its output is cheaper
    x = torch.randn(2, 32, 10, 10)
    assert not conv_means.cheaper_from_input(wide_in, x, wide_in(x))
    first = nn.Conv2d(1, 32, 3)
    x = torch.randn(2, 1, 10, 10)
    assert conv_means.cheaper_from_input(first, x, first(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not conv_means.cheaper_from_input(first, x, first(x).float())


def test_recorded_first_convolution_takes_the_input_path_and_matches_numpy(
    tmp_path: Path, monkeypatch
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3), nn.Flatten(), nn.Linear(64, 3))
    calls = []
    original = conv_means.spatial_means
    monkeypatch.setattr(conv_means, "spatial_means", lambda *a: calls.append(a[0]) or original(*a))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 1, 8, 8, generator=g), torch.arange(24) % 3
    outputs: dict[str, list[np.ndarray]] = {"L_0": [], "L_2": []}
    for key in outputs:
        model[int(key[2:])].register_forward_hook(
            lambda m, a, o, key=key: outputs[key].append(o.detach().double().numpy().mean((2, 3)))
        )
    with NetworkTrace(model, tmp_path / "t", num_classes=3) as trace, trace.epoch(0):
        for i in range(0, 24, 8):
            trace.set_targets(y[i : i + 8])
            model(x[i : i + 8]).sum().backward()
    assert calls and all(m is model[0] for m in calls)  # the first conv only: the second reads its output
    t = load_trace(tmp_path / "t")
    for key, parts in outputs.items():
        rows = np.concatenate(parts)
        got = t.query(f"E_0/{key}")
        for column, expected in numpy_stats(rows).items():
            np.testing.assert_allclose(got[column].to_numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=column)
        means = t.classes(f"E_0/{key}")["act_mean"].unstack("class").to_numpy()
        labels = y.numpy()
        expected = np.stack([rows[labels == c].mean(0) for c in range(3)], axis=1)
        np.testing.assert_allclose(means, expected, rtol=1e-5, atol=1e-6)
