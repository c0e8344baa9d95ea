"""Tests for nn_staining.stats (on-device accumulators) against numpy float64 on the same data:
small chunks, labels, NaNs, per-batch rows, and the precision of long epochs far from zero."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_close, numpy_stats
from torch import nn

from nn_staining import NetworkTrace, load_trace
from nn_staining.records import ACTIVATION_COLUMNS, BATCH_COLUMNS, LayerStats
from nn_staining.stats import ChunkPool, Moments, PhaseStats

CLASSES = 4
WIDTHS = {"a": 3, "b": 7, "c": 1}


def phase_stats(chunk_bytes: int | None, keep_batches: bool = False) -> PhaseStats:
    """A PhaseStats whose chunks hold at most ``chunk_bytes`` (1: every batch is its own chunk)."""
    pool = ChunkPool() if chunk_bytes is None else ChunkPool(chunk_bytes=chunk_bytes)
    return PhaseStats(CLASSES, keep_batches=keep_batches, pool=pool)


def as_columns(layer: LayerStats) -> dict[str, np.ndarray]:
    """A layer's typed statistics as one dict of the store's column names (plus class_count/class_mean)."""
    out = {name: getattr(layer.activations, name) for name in ACTIVATION_COLUMNS}
    if layer.classes is not None:
        out |= {"class_count": layer.classes.count, "class_mean": layer.classes.mean}
    if layer.batches is not None:  # (count, mean, std, min, max) × batches × neurons
        out["batches"] = np.stack([getattr(layer.batches, name) for name in BATCH_COLUMNS])
    return out


def finish(stats: PhaseStats) -> tuple[dict, dict]:
    record = stats.finish()
    inputs = {k: {"class_count": m.count, "class_mean": m.mean} for k, m in record.inputs.items()}
    return {k: as_columns(v) for k, v in record.outputs.items()}, inputs


def random_batches(seed: int, nan: bool = False) -> list[tuple[torch.Tensor | None, dict[str, torch.Tensor]]]:
    """37 batches of 1 to 9 rows per layer; a few without labels; with ``nan``, NaNs in a few cells."""
    rng = np.random.default_rng(seed)
    batches = []
    for i in range(37):
        n = int(rng.integers(1, 10))
        labels = None if i % 9 == 4 else torch.as_tensor(rng.integers(0, CLASSES, n))
        rows = {
            k: rng.normal(3.0 * (j + 1), 2.0, (n, f)).astype(np.float32)
            for j, (k, f) in enumerate(WIDTHS.items())
        }
        if nan and i in (0, 5, 30):
            rows["b"][0, 2] = np.nan
            rows["b"][-1, 5] = np.nan
        batches.append((labels, {k: torch.from_numpy(v) for k, v in rows.items()}))
    return batches


def feed(stats: PhaseStats, batches) -> None:
    for labels, rows in batches:
        stats.start_batch(labels)
        for layer, r in rows.items():
            stats.add(layer, r)


def reference(batches, layer: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows of ``layer`` (float64) and their labels (-1 for unlabelled batches)."""
    rows = np.concatenate([r[layer].numpy() for _, r in batches]).astype(np.float64)
    labels = np.concatenate(
        [np.full(len(r[layer]), -1) if lab is None else lab.numpy() for lab, r in batches]
    )
    return rows, labels


def assert_stats(got: dict[str, np.ndarray], rows: np.ndarray, labels: np.ndarray, msg: str = "") -> None:
    expected = numpy_stats(rows)
    for column, value in expected.items():
        if column in ("act_count", "act_nan_count"):
            np.testing.assert_array_equal(got[column], value, err_msg=f"{msg} {column}")
        else:
            assert_close(got[column], value, rtol=1e-6, atol=1e-9, err_msg=f"{msg} {column}")
    counts = np.array([(labels == c).sum() for c in range(CLASSES)])
    np.testing.assert_array_equal(got["class_count"], counts, err_msg=msg)
    for c in range(CLASSES):
        assert_close(got["class_mean"][c], rows[labels == c].mean(0), rtol=1e-6, err_msg=f"{msg} class {c}")


@pytest.mark.parametrize("chunk_bytes", [1, 200, None])
def test_phase_stats_match_numpy(chunk_bytes: int | None) -> None:
    batches = random_batches(seed=1)
    stats = phase_stats(chunk_bytes)
    feed(stats, batches)
    outputs, _ = finish(stats)
    assert set(outputs) == set(WIDTHS)
    for layer in WIDTHS:
        rows, labels = reference(batches, layer)
        assert_stats(outputs[layer], rows, labels, layer)


@pytest.mark.parametrize("chunk_bytes", [1, None])
def test_nan_count_and_other_neurons_unaffected(chunk_bytes: int | None) -> None:
    batches = random_batches(seed=2, nan=True)
    stats = phase_stats(chunk_bytes)
    feed(stats, batches)
    outputs, _ = finish(stats)
    rows, labels = reference(batches, "b")
    got = outputs["b"]
    np.testing.assert_array_equal(got["act_nan_count"], [0, 0, 3, 0, 0, 3, 0])
    np.testing.assert_array_equal(got["act_count"], np.full(7, len(rows)))
    clean = [0, 1, 3, 4, 6]
    expected = numpy_stats(rows[:, clean])
    for column in ("act_mean", "act_std", "act_min", "act_max", "act_active_frac"):
        assert_close(got[column][clean], expected[column], rtol=1e-6, err_msg=column)
    for c in range(CLASSES):
        assert_close(got["class_mean"][c][clean], rows[labels == c][:, clean].mean(0), rtol=1e-6)
    assert_close(got["act_active_frac"], (rows > 0).mean(0), rtol=1e-6)
    for layer in ("a", "c"):
        rows, labels = reference(batches, layer)
        assert_stats(outputs[layer], rows, labels, layer)


@pytest.mark.parametrize("chunk_bytes", [1, 100, None])
def test_per_batch_rows_across_chunks(chunk_bytes: int | None) -> None:
    batches = random_batches(seed=3) * 2  # 74 batches: more than one chunk of 64 holds
    stats = phase_stats(chunk_bytes, keep_batches=True)
    feed(stats, batches)
    outputs, _ = finish(stats)
    per_batch = outputs["b"]["batches"]  # (count, mean, std, min, max) × batches × neurons
    assert per_batch.shape == (5, len(batches), WIDTHS["b"])
    for i, (_, rows) in enumerate(batches):
        r = rows["b"].numpy().astype(np.float64)
        np.testing.assert_array_equal(per_batch[0, i], np.full(r.shape[1], len(r)))
        assert_close(per_batch[1, i], r.mean(0), rtol=1e-6, atol=1e-9)
        assert_close(per_batch[2, i], r.std(0), rtol=1e-5, atol=1e-6)
        assert_close(per_batch[3, i], r.min(0), rtol=1e-7)
        assert_close(per_batch[4, i], r.max(0), rtol=1e-7)


def test_add_mean_is_the_spatial_mean_per_channel() -> None:
    rng = np.random.default_rng(4)
    images = [rng.normal(0, 1, (n, 5, 3, 4)).astype(np.float32) for n in (4, 4, 3)]
    stats = phase_stats(1)
    for image in images:
        stats.start_batch(None)
        stats.add_mean("conv", torch.from_numpy(image), (2, 3))
    outputs, _ = finish(stats)
    rows = np.concatenate([i.astype(np.float64).mean((2, 3)) for i in images])
    expected = numpy_stats(rows)
    for column in ("act_mean", "act_std", "act_min", "act_max", "act_active_frac"):
        assert_close(outputs["conv"][column], expected[column], rtol=1e-5, atol=1e-7, err_msg=column)
    assert (outputs["conv"]["act_count"] == 11).all()


def test_moments_fold_chunks_in_float64() -> None:
    """Moments alone: 20 chunks far from zero, labels 0, 1 and 2 (= num_classes: no class)."""
    rng = np.random.default_rng(5)
    data = rng.normal(1e4, 1.0, (20, 50, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (20, 50))
    moments = Moments(3, 2, torch.device("cpu"))
    for rows, lab in zip(data, labels):
        moments.update(torch.from_numpy(rows), torch.as_tensor(lab))
    got = as_columns(moments.result())
    rows = data.reshape(-1, 3).astype(np.float64)
    flat = labels.reshape(-1)
    assert_close(got["act_mean"], rows.mean(0), rtol=1e-9)
    assert_close(got["act_std"], rows.std(0), rtol=1e-4)
    assert_close(got["act_min"], rows.min(0), rtol=0)
    assert_close(got["act_max"], rows.max(0), rtol=0)
    np.testing.assert_array_equal(got["act_count"], [1000] * 3)
    np.testing.assert_array_equal(got["class_count"], [(flat == 0).sum(), (flat == 1).sum()])
    for c in (0, 1):
        assert_close(got["class_mean"][c], rows[flat == c].mean(0), rtol=1e-9)


# -- 5. precision of a long epoch, through the recorder ------------------------------------------------
def long_epoch(store: Path, model: nn.Module, batches: np.ndarray) -> dict[str, np.ndarray]:
    with NetworkTrace(model, store) as trace, trace.epoch(0), torch.no_grad():
        for batch in batches:
            model(torch.from_numpy(batch))
    return load_trace(store).query("E_0").droplevel(["epoch", "layer"]).to_dict("series")


@pytest.mark.parametrize("kind", ["identity", "linear"])
def test_long_epoch_far_from_zero_keeps_std_precise(tmp_path: Path, kind: str) -> None:
    """2,000 batches of activations with mean 1e4 and std 1: float32 running sums would lose the std."""
    rng = np.random.default_rng(6)
    if kind == "identity":
        model = nn.Identity()
        batches = rng.normal(1e4, 1.0, (2000, 32, 4)).astype(np.float32)
        outputs = batches
    else:
        model = nn.Linear(4, 4)
        with torch.no_grad():
            model.weight.copy_(torch.eye(4) * torch.tensor([1.0, 0.5, 2.0, 1.0]))
            model.bias.fill_(1e4)
        batches = rng.normal(0.0, 1.0, (2000, 32, 4)).astype(np.float32)
        with torch.no_grad():
            outputs = model(torch.from_numpy(batches)).numpy()
    got = long_epoch(tmp_path / "t", model, batches)
    rows = outputs.reshape(-1, 4).astype(np.float64)
    expected_std = rows.std(0)
    assert (got["act_count"] == 64_000).all()
    np.testing.assert_allclose(got["act_std"], expected_std, rtol=1e-3)
    np.testing.assert_allclose(got["act_mean"], rows.mean(0), rtol=1e-6)
    # the data is hard: naive float32 sums of x and x² give a useless std
    x = torch.from_numpy(outputs.reshape(-1, 4))
    naive_var = (x * x).sum(0) / len(x) - (x.sum(0) / len(x)) ** 2
    naive_std = naive_var.clamp_min(0).sqrt().numpy()
    assert (np.abs(naive_std - expected_std) / expected_std > 1e-2).any()
