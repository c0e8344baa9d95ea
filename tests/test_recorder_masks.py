"""Masks and batch-shared outputs: set_targets(y, mask=...) excludes masked samples / positions from
every statistic; an output that is not per sample (batch size 1, as a position embedding) gets no labels.
Compared with numpy on activations captured by the test's own hooks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from nn_staining import NetworkTrace, load_trace

CLASSES = 3


class TokenModel(nn.Module):
    """Token embeddings plus a learned position embedding (one row per position, shared by the batch)."""

    def __init__(self, vocab: int = 20, steps: int = 6, width: int = 5) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, width)
        self.positions = nn.Embedding(steps, width)
        self.proj = nn.Linear(width, 4)
        self.head = nn.Linear(4, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        steps = torch.arange(ids.shape[1]).unsqueeze(0)  # (1, steps): the same for every sample
        h = torch.relu(self.proj(self.tokens(ids) + self.positions(steps)))
        return self.head(h).mean(1)


def capture(model: nn.Module, names: list[str]) -> tuple[dict[str, list[np.ndarray]], list]:
    seen: dict[str, list[np.ndarray]] = {n: [] for n in names}
    handles = [
        getattr(model, n).register_forward_hook(
            lambda m, a, o, n=n: seen[n].append(o.detach().numpy().copy())
        )
        for n in names
    ]
    return seen, handles


def token_batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(4):
        ids = torch.randint(0, 20, (8, 6), generator=g)
        y = torch.randint(0, CLASSES, (8,), generator=g)
        lengths = torch.randint(1, 7, (8,), generator=g)
        mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).long()  # right padding
        yield ids, y, mask


def test_attention_mask_excludes_padded_positions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TokenModel()
    seen, handles = capture(model, ["proj", "tokens"])
    masks, labels = [], []
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for ids, y, mask in token_batches():
            trace.set_targets(y, mask=mask)
            model(ids)
            masks.append(mask.numpy().astype(bool))
            labels.append(y.numpy())
        trace.end_epoch()
    for h in handles:
        h.remove()
    t = load_trace(tmp_path / "t")
    keep = np.concatenate([m.reshape(-1) for m in masks])
    row_labels = np.concatenate([np.repeat(y, 6) for y in labels])
    for name in ("proj", "tokens"):
        rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in seen[name]]).astype(np.float64)[keep]
        got = t.query(f"E_0/L_{name}")
        np.testing.assert_array_equal(got["act_count"], keep.sum())
        np.testing.assert_allclose(got["act_mean"], rows.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got["act_std"], rows.std(0), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got["act_min"], rows.min(0), rtol=1e-6)
        np.testing.assert_allclose(got["act_max"], rows.max(0), rtol=1e-6)
        np.testing.assert_allclose(got["act_active_frac"], (rows > 0).mean(0), rtol=1e-6)
        classes = t.classes(f"E_0/L_{name}")
        for c in range(CLASSES):
            sel = row_labels[keep] == c
            counts = classes.xs(c, level="class")["act_count"].to_numpy()
            np.testing.assert_array_equal(counts, sel.sum())
            means = classes.xs(c, level="class")["act_mean"].to_numpy()
            np.testing.assert_allclose(means, rows[sel].mean(0), rtol=1e-5, atol=1e-6)


def test_output_shared_by_the_batch_gets_no_labels_but_keeps_its_statistics(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TokenModel()
    seen, handles = capture(model, ["positions"])
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for ids, y, _ in token_batches():
            trace.set_targets(y)
            model(ids)
        trace.end_epoch()
    for h in handles:
        h.remove()
    t = load_trace(tmp_path / "t")
    rows = np.concatenate([o.reshape(-1, o.shape[-1]) for o in seen["positions"]]).astype(np.float64)
    got = t.query("E_0/L_positions")
    np.testing.assert_array_equal(got["act_count"], len(rows))
    np.testing.assert_allclose(got["act_mean"], rows.mean(0), rtol=1e-5, atol=1e-6)
    classes = t.classes("E_0/L_positions")
    assert (classes["act_count"] == 0).all()  # its rows belong to no sample, so to no class
    assert classes["act_mean"].isna().all()


def test_per_sample_mask_drops_padded_duplicates(tmp_path: Path) -> None:
    """A DistributedSampler-style padded batch: the duplicated samples are masked out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, CLASSES))
    x, y = torch.randn(30, 4), torch.randint(0, CLASSES, (30,))
    padded_x, padded_y = torch.cat([x, x[:2]]), torch.cat([y, y[:2]])
    keep = torch.ones(32, dtype=torch.bool)
    keep[30:] = False
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        for i in range(0, 32, 8):
            trace.set_targets(padded_y[i : i + 8], mask=keep[i : i + 8])
            model(padded_x[i : i + 8])
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    with torch.no_grad():
        h = model[0](x).numpy().astype(np.float64)
    got = t.query("E_0/L_0")
    np.testing.assert_array_equal(got["act_count"], 30)
    np.testing.assert_allclose(got["act_mean"], h.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["act_std"], h.std(0), rtol=1e-4, atol=1e-6)
    inputs = t.inputs("E_0/L_0")
    for c in range(CLASSES):
        means = inputs.xs(c, level="class")["mean"].to_numpy()
        np.testing.assert_allclose(means, x.numpy()[y.numpy() == c].mean(0), rtol=1e-5, atol=1e-6)
        assert (inputs.xs(c, level="class")["count"] == (y == c).sum().item()).all()


def test_a_mask_that_does_not_fit_the_labels_is_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    with NetworkTrace(model, tmp_path / "t", num_classes=2) as trace:
        trace.start_epoch(0)
        with pytest.raises(ValueError, match=r"mask of shape \(3,\) does not match the batch of 4 labels"):
            trace.set_targets(torch.zeros(4, dtype=torch.long), mask=torch.ones(3))
        trace.end_epoch()


def test_integer_label_rows_that_are_not_one_hot_are_refused(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 2))
    ids = torch.randint(0, 30, (16, 32))  # token ids, or per-token classes: not one label per sample
    with NetworkTrace(model, tmp_path / "t", num_classes=2) as trace:
        trace.start_epoch(0)
        with pytest.raises(ValueError, match=r"integer labels of shape \(16, 32\) that are not one-hot rows"):
            trace.set_targets(ids)
        trace.set_targets(nn.functional.one_hot(torch.tensor([0, 1, 1]), 2))  # one-hot rows stay accepted
        model(torch.randn(3, 4))
        trace.end_epoch()
    assert load_trace(tmp_path / "t").classes("E_0/L_0")["act_count"].groupby(
        level="class"
    ).first().tolist() == [1, 2]
