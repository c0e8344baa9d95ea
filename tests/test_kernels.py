"""Tests for nn_staining.kernels (the fused C++ chunk reduction) against numpy float64 on the same
rows: NaN and infinite values, empty classes, rows without a class, masked rows, a single row,
widths around the tile, values far beyond float32's squares, per-batch rows, the float32 drift of
a long epoch; and the fallback to torch ops when the kernel cannot be built."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, kernels
from nn_staining.stats import Moments, Segment

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kernel() -> kernels.Backend:
    """The built kernel (the test fails with the reason when it could not be built)."""
    if os.environ.get(kernels.ENV, "").strip().lower() == "torch":
        pytest.skip(f"{kernels.ENV}=torch")
    chosen = kernels.backend()
    assert chosen.ops is not None, chosen.why
    return chosen


def fold(
    backend: str,
    chunks: list[np.ndarray],
    labels: list[np.ndarray | None],
    drops: list[np.ndarray | None],
    classes: int,
    class_only: bool = False,
    device: str = "cpu",
    keep_batches: bool = True,
) -> Moments:
    """Every chunk folded on ``device`` into one Moments by ``backend``; each chunk's rows are two batches."""
    moments = Moments(chunks[0].shape[1], classes, torch.device(device), keep_batches, class_only)
    with kernels.using(backend):
        for i, (rows, lab, drop) in enumerate(zip(chunks, labels, drops)):
            n = len(rows)
            half = max(n // 2, 1)
            segments = [Segment(2 * i, half, half)] + (
                [Segment(2 * i + 1, n - half, n - half)] if n > 1 else []
            )
            moments.update(
                torch.from_numpy(rows).to(device),
                None if lab is None else torch.from_numpy(lab).to(device),
                segments,
                None,
                None if drop is None else torch.from_numpy(drop[:, None]).to(device),
            )
    return moments


def expected(
    chunks: list[np.ndarray], labels: list[np.ndarray | None], drops: list[np.ndarray | None], classes: int
) -> dict[str, np.ndarray]:
    """numpy float64 statistics of the rows no mask drops (labels outside 0..classes-1: no class)."""
    rows = np.concatenate(chunks).astype(np.float64)
    n = len(rows)
    keep = np.concatenate([np.ones(len(c), bool) if d is None else ~d for c, d in zip(chunks, drops)])
    lab = np.concatenate([np.full(len(c), -1) if x is None else x for c, x in zip(chunks, labels)])
    kept = rows[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "act_count": np.full(rows.shape[1], len(kept)),
            "act_mean": kept.mean(0) if len(kept) else np.full(rows.shape[1], np.nan),
            "act_std": kept.std(0) if len(kept) else np.full(rows.shape[1], np.nan),
            "act_min": kept.min(0) if len(kept) else np.full(rows.shape[1], np.nan),
            "act_max": kept.max(0) if len(kept) else np.full(rows.shape[1], np.nan),
            "act_active_frac": (kept > 0).sum(0) / len(kept),
            "act_nan_count": (~np.isfinite(kept)).sum(0),
        }
    member = [(lab == c) & keep for c in range(classes)]
    out["class_count"] = np.array([m.sum() for m in member])
    out["class_mean"] = np.stack(
        [rows[m].mean(0) if m.any() else np.full(rows.shape[1], np.nan) for m in member]
    ).reshape(classes, rows.shape[1])
    assert n == keep.size
    return out


def columns(moments: Moments) -> dict[str, np.ndarray]:
    result = moments.result()
    out = {name: getattr(result.activations, name) for name in expected_names()}
    if result.classes is not None:
        out |= {"class_count": result.classes.count, "class_mean": result.classes.mean}
    return out


def expected_names() -> tuple[str, ...]:
    return ("act_count", "act_mean", "act_std", "act_min", "act_max", "act_active_frac", "act_nan_count")


def check(got: dict[str, np.ndarray], want: dict[str, np.ndarray], rtol: float = 1e-5) -> None:
    for name, value in want.items():
        if name in ("act_count", "act_nan_count", "class_count"):
            np.testing.assert_array_equal(got[name], value, err_msg=name)
        elif name in ("act_min", "act_max"):
            np.testing.assert_array_equal(got[name], value.astype(np.float32), err_msg=name)
        else:
            np.testing.assert_allclose(got[name], value, rtol=rtol, atol=1e-6, err_msg=name)


def random_chunks(
    rng: np.random.Generator, width: int, classes: int, sizes: list[int], masked: bool = False
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray | None]]:
    chunks = [rng.normal(2.0, 3.0, (n, width)).astype(np.float32) for n in sizes]
    labels = [rng.integers(0, classes + 1, n) for n in sizes]  # classes: no class
    drops = [rng.random(n) < 0.3 if masked and i % 2 else None for i, n in enumerate(sizes)]
    return chunks, labels, drops


@pytest.mark.parametrize("width", [1, 7, 127, 128, 129, 300])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("per_batch", [True, False], ids=["row-by-row", "four-rows"])
def test_kernel_matches_numpy_across_tile_widths(kernel, width: int, masked: bool, per_batch: bool) -> None:
    """With per-batch rows the kernel reads the chunk batch by batch, a row at a time; without, it
    sums kept rows four at a time (the remainder one by one)."""
    rng = np.random.default_rng(width)
    chunks, labels, drops = random_chunks(rng, width, 4, [1, 70, 200, 3], masked)
    got = fold("cpp", chunks, labels, drops, 4, keep_batches=per_batch)
    check(columns(got), expected(chunks, labels, drops, 4))
    reference = fold("torch", chunks, labels, drops, 4, keep_batches=per_batch)
    check(columns(got), columns(reference), rtol=1e-6)


def test_kernel_nan_and_infinite_values_stay_in_their_neurons(kernel) -> None:
    """NaN propagates into its neuron's min, max, mean and the class means of its row, as amin/amax
    and the torch path do; ±Inf sets min/max; both are counted; other neurons are untouched."""
    rng = np.random.default_rng(1)
    chunks, labels, drops = random_chunks(rng, 5, 3, [40, 40])
    chunks[0][3, 1] = np.nan
    chunks[1][0, 2] = np.inf
    chunks[1][5, 2] = -np.inf
    chunks[1][7, 4] = np.nan
    chunks[1][8, 4] = np.inf
    got = columns(fold("cpp", chunks, labels, drops, 3, keep_batches=False))
    want = expected(chunks, labels, drops, 3)
    np.testing.assert_array_equal(got["act_nan_count"], [0, 1, 2, 0, 2])
    assert np.isnan(got["act_min"][[1, 4]]).all() and np.isnan(got["act_max"][[1, 4]]).all()
    assert got["act_min"][2] == -np.inf and got["act_max"][2] == np.inf
    for name in ("act_mean", "act_std", "act_active_frac"):
        np.testing.assert_allclose(got[name][[0, 3]], want[name][[0, 3]], rtol=1e-5, err_msg=name)
    for name in ("act_min", "act_max"):
        np.testing.assert_array_equal(got[name][[0, 3]], want[name][[0, 3]].astype(np.float32))
    row_class = labels[0][3]
    if row_class < 3:
        assert np.isnan(got["class_mean"][row_class, 1])
    clean = [c for c in range(3) if c != row_class]
    np.testing.assert_allclose(got["class_mean"][clean, 0], want["class_mean"][clean, 0], rtol=1e-5)
    reference = columns(fold("torch", chunks, labels, drops, 3))
    for name in got:
        np.testing.assert_allclose(got[name], reference[name], rtol=1e-6, equal_nan=True, err_msg=name)


@pytest.mark.parametrize("per_batch", [True, False], ids=["row-by-row", "four-rows"])
def test_kernel_empty_classes_and_rows_without_a_class(kernel, per_batch: bool) -> None:
    """Classes no row has stay at count 0 (mean NaN); labels below 0 or ≥ classes count for no
    class (the hooks hand the kernel labels as given: -100 is cross-entropy's ignore_index)."""
    rng = np.random.default_rng(2)
    chunks = [rng.normal(0.0, 1.0, (30, 6)).astype(np.float32)]
    outside = np.array([-1, -100, 5, 9, 2**40])[np.arange(30) % 5]
    labels = [np.where(np.arange(30) % 3 == 1, 0, outside).astype(np.int64)]
    got = columns(fold("cpp", chunks, labels, [None], 5, keep_batches=per_batch))
    np.testing.assert_array_equal(got["class_count"], [10, 0, 0, 0, 0])
    assert np.isnan(got["class_mean"][1:]).all()
    np.testing.assert_allclose(got["class_mean"][0], chunks[0][1::3].astype(np.float64).mean(0), rtol=1e-5)
    check(got, {k: v for k, v in expected(chunks, [None], [None], 5).items() if not k.startswith("class")})


def test_kernel_single_row_and_no_labels(kernel) -> None:
    rows = [np.array([[1.5, -2.0, 0.0]], dtype=np.float32)]
    got = columns(fold("cpp", rows, [None], [None], 0))
    np.testing.assert_array_equal(got["act_mean"], [1.5, -2.0, 0.0])
    np.testing.assert_array_equal(got["act_std"], [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(got["act_active_frac"], [1.0, 0.0, 0.0])
    assert "class_count" not in got


def test_kernel_every_row_masked_gives_no_observation(kernel) -> None:
    rows = [np.ones((4, 2), dtype=np.float32)]
    got = columns(fold("cpp", rows, [np.zeros(4, dtype=np.int64)], [np.ones(4, bool)], 2))
    np.testing.assert_array_equal(got["act_count"], [0, 0])
    assert np.isnan(got["act_mean"]).all() and np.isnan(got["act_min"]).all()
    np.testing.assert_array_equal(got["class_count"], [0, 0])


def test_kernel_values_far_beyond_float32_squares(kernel) -> None:
    """A neuron at ±1e25 (its squares overflow float32) is summed divided by a power of two."""
    rng = np.random.default_rng(3)
    chunks = [rng.normal(0.0, 1.0, (50, 3)).astype(np.float32) for _ in range(2)]
    chunks[1][:, 1] = rng.normal(0.0, 1e25, 50).astype(np.float32)
    labels = [rng.integers(0, 2, 50) for _ in range(2)]
    got = columns(fold("cpp", chunks, labels, [None, None], 2, keep_batches=False))
    want = expected(chunks, labels, [None, None], 2)
    assert np.isfinite(got["act_std"]).all()
    check(got, want, rtol=1e-4)


def test_kernel_class_only_sums(kernel) -> None:
    """A Linear's input: only per-class counts and means, masked rows left out."""
    rng = np.random.default_rng(4)
    chunks, labels, drops = random_chunks(rng, 130, 3, [64, 9], masked=True)
    got = fold("cpp", chunks, labels, drops, 3, class_only=True).class_means()
    want = expected(chunks, labels, drops, 3)
    np.testing.assert_array_equal(got.count, want["class_count"])
    np.testing.assert_allclose(got.mean, want["class_mean"], rtol=1e-5)


def test_kernel_per_batch_rows_match_torch_path(kernel) -> None:
    """Per-batch (count, mean, std, min, max) in float64, a batch split over two runs included."""
    rng = np.random.default_rng(5)
    rows = rng.normal(5.0, 2.0, (23, 131)).astype(np.float32)
    rows[4, 7] = np.nan
    rows[6, 9], rows[8, 9] = np.inf, -np.inf  # batch 4: a NaN mean, but no NaN min or max
    segments = [Segment(3, 5, 5), Segment(4, 10, 10), Segment(3, 8, 8)]
    results = {}
    for backend in ("cpp", "torch"):
        moments = Moments(131, 0, torch.device("cpu"), keep_batches=True)
        with kernels.using(backend):
            moments.update(torch.from_numpy(rows), None, segments)
        results[backend] = moments.result().batches
    got, ref = results["cpp"], results["torch"]
    np.testing.assert_array_equal(got.batch, [3, 4])
    np.testing.assert_array_equal(got.act_count, [[13] * 131, [10] * 131])
    batch3 = np.concatenate([rows[:5], rows[15:]]).astype(np.float64)
    np.testing.assert_allclose(got.act_mean[0, 8:], batch3.mean(0)[8:], rtol=1e-12)
    np.testing.assert_allclose(got.act_std[1, :9], rows[5:15, :9].astype(np.float64).std(0), rtol=1e-10)
    for name in ("act_mean", "act_std", "act_min", "act_max"):
        np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=1e-12, equal_nan=True)
    assert np.isnan(got.act_min[0, 7]) and np.isnan(got.act_max[0, 7]) and np.isnan(got.act_mean[0, 7])
    assert (got.act_min[1, 9], got.act_max[1, 9]) == (-np.inf, np.inf) and np.isnan(got.act_mean[1, 9])


def test_kernel_long_epoch_far_from_zero_keeps_std_precise(kernel) -> None:
    """2,000 chunks of 32 rows with mean 1e4 and std 1: float32 partial sums folded into float64."""
    rng = np.random.default_rng(6)
    data = rng.normal(1e4, 1.0, (2000, 32, 4)).astype(np.float32)
    labels = rng.integers(0, 3, (2000, 32))
    moments = Moments(4, 3, torch.device("cpu"))
    with kernels.using("cpp"):
        for rows, lab in zip(data, labels):
            moments.update(torch.from_numpy(rows), torch.from_numpy(lab))
    got = columns(moments)
    flat = data.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(got["act_std"], flat.std(0), rtol=1e-4)
    np.testing.assert_allclose(got["act_mean"], flat.mean(0), rtol=1e-9)
    for c in range(3):
        np.testing.assert_allclose(got["class_mean"][c], flat[labels.reshape(-1) == c].mean(0), rtol=1e-9)


def test_meta_json_names_the_reduction_backend(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    with NetworkTrace(model, tmp_path / "t", num_classes=2) as trace, trace.epoch(0):
        trace.set_targets(torch.tensor([0, 1]))
        model(torch.ones(2, 3))
    reduction = json.loads((tmp_path / "t" / "meta.json").read_text())["reduction"]
    assert reduction == kernels.describe()
    assert reduction["backend"] in ("cpp", "torch") and reduction["why"]


def test_a_failed_build_falls_back_with_one_message(monkeypatch, caplog) -> None:
    def no_compiler() -> str:
        raise RuntimeError("Error building extension 'nn_staining_kernels':\nc++: not found\nfatal error: x")

    monkeypatch.setattr(kernels, "_load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="nn_staining.kernels"):
        chosen = kernels._choose("auto")
    assert chosen.name == "torch" and chosen.ops is None
    assert [r.getMessage() for r in caplog.records] == [
        f"nn_staining reduces activations with torch ops: {chosen.why}"
    ]
    assert "RuntimeError" in chosen.why and "fatal error: x" in chosen.why
    with pytest.raises(RuntimeError, match="NN_STAINING_KERNEL=cpp"):
        kernels._choose("cpp")
    with pytest.raises(ValueError, match="'fast'.*auto, cpp, triton, torch"):
        kernels._choose("fast")
    caplog.clear()
    assert kernels._choose("torch") == kernels.Backend("torch", "NN_STAINING_KERNEL=torch")
    assert not caplog.records


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


DESCRIBE = "import json; from nn_staining import kernels; print(json.dumps(kernels.describe()))"


def test_without_a_compiler_training_uses_torch_ops(tmp_path: Path) -> None:
    """A fresh cache and no C++ compiler: the torch path, one warning naming the failure."""
    env = {"NN_STAINING_CACHE": str(tmp_path), "CXX": str(tmp_path / "no-such-c++"), kernels.ENV: "auto"}
    done = run_python(DESCRIBE, **env)
    assert done.returncode == 0, done.stderr
    reduction = json.loads(done.stdout.strip().splitlines()[-1])
    assert reduction["backend"] == "torch"
    assert "could not be built" in reduction["why"]
    assert done.stderr.count("nn_staining reduces activations with torch ops") == 1
    again = run_python(DESCRIBE, **env)  # the failure is remembered: no second attempt
    assert again.returncode == 0, again.stderr
    why = json.loads(again.stdout.strip().splitlines()[-1])["why"]
    assert why.startswith(reduction["why"][: reduction["why"].index("(") + 1])
    assert "an earlier build; delete" in why
    assert again.stderr.count("nn_staining reduces activations with torch ops") == 1
    assert len(list(tmp_path.glob("kernels/*/failed.txt"))) == 1


def test_concurrent_processes_build_once(tmp_path: Path, kernel) -> None:
    """Two processes on a fresh cache (DDP ranks, test workers): one builds, the other waits and loads."""
    env = {**os.environ, "NN_STAINING_CACHE": str(tmp_path), kernels.ENV: "auto"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", DESCRIBE], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    assert [o["backend"] for o in outputs] == ["cpp", "cpp"]
    assert sorted("built in" in o["why"] for o in outputs) == [False, True]
    assert len(list(tmp_path.glob("kernels/*/nn_staining_kernels.so"))) == 1
