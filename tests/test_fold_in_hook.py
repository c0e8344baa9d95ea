"""Batches whose labels are known when a layer fires are folded by the C++ kernel straight from the
hook (nn_staining.stats.PhaseStats.fold_now): no rows are copied into the chunk. Checked against
numpy on the same rows, against the chunk path (torch ops), with both paths mixed in one epoch
(a masked batch and an unlabelled one take the chunk), and for the chunk staying empty."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nn_staining import kernels
from nn_staining.records import ACTIVATION_COLUMNS
from nn_staining.stats import PhaseStats

CLASSES = 4


@pytest.fixture(scope="module", autouse=True)
def kernel() -> None:
    if kernels.backend().ops is None:
        pytest.skip(f"no C++ kernel: {kernels.backend().why}")


def batches(rng: np.random.Generator) -> list[dict]:
    """Five passes: plain labelled, labels out of range, a sequence output (3 rows per sample), a
    masked pass and an unlabelled one (the last two go through the chunk)."""
    out = []
    for i in range(5):
        samples = 6 + i
        rows = 3 * samples if i == 2 else samples
        labels = rng.integers(-1, CLASSES + 2, samples) if i == 1 else rng.integers(0, CLASSES, samples)
        out.append(
            {
                "values": rng.normal(1.0, 2.0, (rows, 5)).astype(np.float32),
                "inputs": rng.normal(0.0, 1.0, (rows, 3)).astype(np.float32),
                "labels": None if i == 4 else labels,
                "mask": rng.random(samples) < 0.7 if i == 3 else None,
                "samples": samples,
            }
        )
    return out


def record(passes: list[dict]) -> tuple[PhaseStats, list[int]]:
    """The passes added to a PhaseStats as a hook would; returns it and the chunk's buffered bytes
    after each pass."""
    stats = PhaseStats(CLASSES)
    buffered = []
    for p in passes:
        labels = None if p["labels"] is None else torch.from_numpy(p["labels"])
        mask = None if p["mask"] is None else torch.from_numpy(p["mask"])
        stats.start_batch(labels, mask)
        stats.add("layer", torch.from_numpy(p["values"]), p["samples"])
        stats.add("layer", torch.from_numpy(p["inputs"]), p["samples"], inputs=True)
        buffered.append(stats._chunk.nbytes)
    return stats, buffered


def expected(passes: list[dict], key: str) -> dict[str, np.ndarray]:
    """numpy float64 statistics of every observation, per class where a pass's labels apply."""
    rows, labels = [], []
    for p in passes:
        per_sample = len(p[key]) // p["samples"]
        keep = np.ones(p["samples"], bool) if p["mask"] is None else p["mask"]
        label = np.full(p["samples"], -1) if p["labels"] is None else p["labels"]
        rows.append(p[key][np.repeat(keep, per_sample)])
        labels.append(np.repeat(label, per_sample)[np.repeat(keep, per_sample)])
    x, y = np.concatenate(rows).astype(np.float64), np.concatenate(labels)
    means = np.stack(
        [x[y == c].mean(0) if (y == c).any() else np.full(x.shape[1], np.nan) for c in range(CLASSES)]
    )
    return {"mean": x.mean(0), "std": x.std(0), "min": x.min(0), "max": x.max(0), "class_mean": means}


def test_labelled_batches_are_folded_in_the_hook_and_match_numpy() -> None:
    passes = batches(np.random.default_rng(0))
    stats, buffered = record(passes)
    assert buffered[:3] == [0, 0, 0], "labelled passes without a mask buffer no rows"
    assert buffered[3] > 0, "a masked pass is buffered in the chunk"
    record_ = stats.finish()
    got, want = record_.outputs["layer"], expected(passes, "values")
    np.testing.assert_allclose(got.activations.act_mean, want["mean"], rtol=1e-6)
    np.testing.assert_allclose(got.activations.act_std, want["std"], rtol=1e-5)
    np.testing.assert_array_equal(got.activations.act_min, want["min"].astype(np.float32))
    np.testing.assert_array_equal(got.activations.act_max, want["max"].astype(np.float32))
    np.testing.assert_allclose(got.classes.mean, want["class_mean"], rtol=1e-5)
    inputs = record_.inputs["layer"]
    np.testing.assert_allclose(inputs.mean, expected(passes, "inputs")["class_mean"], rtol=1e-5, atol=1e-6)
    assert stats.label_summary().out_of_range == int((passes[1]["labels"] >= CLASSES).sum())


def test_the_hook_fold_and_the_chunk_of_torch_ops_agree() -> None:
    passes = batches(np.random.default_rng(1))
    folded = record(passes)[0].finish()
    with kernels.using("torch"):
        stats, buffered = record(passes)
        chunked = stats.finish()
    assert all(b > 0 for b in buffered), "the torch-op path buffers every pass"
    a, b = folded.outputs["layer"], chunked.outputs["layer"]
    for name in ACTIVATION_COLUMNS:
        np.testing.assert_allclose(getattr(a.activations, name), getattr(b.activations, name), rtol=1e-5)
    np.testing.assert_array_equal(a.classes.count, b.classes.count)
    np.testing.assert_allclose(a.classes.mean, b.classes.mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        folded.inputs["layer"].mean, chunked.inputs["layer"].mean, rtol=1e-6, atol=1e-7
    )


def test_per_batch_rows_keep_the_chunk() -> None:
    """drop_batches=False needs each batch's rows in the chunk: nothing is folded in the hook."""
    stats = PhaseStats(CLASSES, keep_batches=True)
    stats.start_batch(torch.tensor([0, 1, 2]))
    stats.add("layer", torch.ones(3, 2))
    assert stats._chunk.nbytes == 3 * 2 * 4


def test_rows_whose_samples_are_not_the_labels_get_no_class() -> None:
    """An output shared by the batch (samples -1) or of another sample count is folded without labels."""
    stats = PhaseStats(CLASSES)
    rows = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    stats.start_batch(torch.tensor([0, 1, 1, 3]))
    stats.add("shared", rows[:1], -1)
    stats.add("other", torch.cat([rows, rows]), 2)  # 8 rows of 2 samples: 4 labels must not repeat onto them
    stats.add("mine", rows, 4)
    assert stats._chunk.nbytes == 0
    record_ = stats.finish()
    for layer, n in (("shared", 1), ("other", 8)):
        np.testing.assert_array_equal(record_.outputs[layer].activations.act_count, [n] * 3)
        np.testing.assert_array_equal(record_.outputs[layer].classes.count, [0] * CLASSES)
    np.testing.assert_array_equal(record_.outputs["mine"].classes.count, [1, 2, 0, 1])
    np.testing.assert_allclose(record_.outputs["mine"].classes.mean[1], rows[1:3].double().mean(0).numpy())


def test_a_first_batch_in_inference_mode_leaves_ordinary_accumulators() -> None:
    """Running sums made inside torch.inference_mode are still updated outside it (an eval pass
    under inference mode, then training)."""
    stats = PhaseStats(CLASSES)
    with torch.inference_mode():
        stats.start_batch(torch.tensor([0, 1]))
        stats.add("layer", torch.ones(2, 3))
    assert not stats.moments["layer"].sum.is_inference()
    stats.start_batch(torch.tensor([2, 3]))
    stats.add("layer", torch.full((2, 3), 3.0))
    got = stats.finish().outputs["layer"]
    np.testing.assert_array_equal(got.activations.act_mean, [2.0, 2.0, 2.0])
    np.testing.assert_array_equal(got.classes.mean[:, 0], [1.0, 1.0, 3.0, 3.0])


def test_a_layer_folded_after_the_chunk_was_reduced() -> None:
    """reduce_pending mid-batch leaves no chunk; a later layer of the same labelled batch is still
    folded from the hook (its labels stored and counted in a new chunk), matching numpy."""
    rng = np.random.default_rng(7)
    labels = np.array([0, 1, 2, 0, 3, 1])
    first, later = (rng.normal(0.0, 1.0, (6, 5)).astype(np.float32) for _ in range(2))
    stats = PhaseStats(CLASSES)
    stats.start_batch(torch.from_numpy(labels))
    stats.add("a", torch.from_numpy(first))
    stats.reduce_pending()
    stats.add("b", torch.from_numpy(later))
    record = stats.finish()
    for layer, rows in (("a", first), ("b", later)):
        got = record.outputs[layer]
        np.testing.assert_allclose(got.activations.act_mean, rows.mean(0), rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(got.classes.count, np.bincount(labels, minlength=CLASSES))
        want = np.stack([rows[labels == c].mean(0) for c in range(CLASSES)])
        np.testing.assert_allclose(got.classes.mean, want, rtol=1e-6, atol=1e-7)
    assert stats.label_summary().out_of_range == 0
