"""Which dimension of a layer's output is the batch: known from the labels' sample count, the modules'
own ``batch_first`` (or their block's), the layer an output continues, and the model's inputs, never
from the order of hooks; refused with a warning where nothing decides.

References: the test's own forward hooks capture every output, numpy takes per-class means with the
sample dimension the test knows; time-major models use PyTorch's default ``batch_first=False``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import zoo
from torch import nn

from nn_staining import NetworkTrace, load_trace

CLASSES = 3


def hooks(model: nn.Module) -> dict[str, list[np.ndarray]]:
    """The test's own capture: each leaf module's (first) output per call, by layer key."""
    seen: dict[str, list[np.ndarray]] = {}
    for name, module in model.named_modules():
        if name and not any(True for _ in module.children()) or isinstance(module, nn.MultiheadAttention):

            def keep(m, a, o, key=f"L_{name}"):
                out = o[0] if isinstance(o, tuple) else o
                seen.setdefault(key, []).append(out.detach().double().numpy().copy())

            module.register_forward_hook(keep)
    return seen


def expected_class_means(values: np.ndarray, labels: np.ndarray, sample_dim: int) -> np.ndarray:
    """(features, classes): numpy's mean over every observation of each class's samples."""
    means = []
    for c in range(CLASSES):
        chosen = np.take(values, np.flatnonzero(labels == c), axis=sample_dim)
        means.append(chosen.reshape(-1, values.shape[-1]).mean(0))
    return np.stack(means, axis=1)


def recorded_class_means(path: Path, layer: str) -> np.ndarray:
    frame = load_trace(path).classes(f"E_0/{layer}")["act_mean"]
    return frame.unstack("class").to_numpy()


def run_one_pass(model: nn.Module, x: torch.Tensor, y: torch.Tensor, path: Path, **kwargs) -> dict:
    seen = hooks(model)
    with NetworkTrace(model, path, num_classes=CLASSES, **kwargs) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        model(x).sum().backward()
        trace.end_epoch()
    return seen


@pytest.mark.parametrize("steps,batch", [(8, 64), (8, 8)])
def test_time_major_gru_with_a_plain_linear_first(tmp_path: Path, steps: int, batch: int) -> None:
    """Before: 'set_targets got 64 labels but layer L_inp saw a batch of 8 samples' aborted the pass;
    with steps == batch the layout was guessed. The model's GRU says batch_first=False."""
    model = zoo.TimeMajorGRU()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(steps, batch, 5, generator=g), torch.arange(batch) % CLASSES
    seen = run_one_pass(model, x, y, tmp_path / "t")
    labels = y.numpy()
    for layer, sample_dim in (("L_inp", 1), ("L_act", 1), ("L_gru", 1), ("L_head", 0)):
        expected = expected_class_means(seen[layer][0], labels, sample_dim)
        np.testing.assert_allclose(
            recorded_class_means(tmp_path / "t", layer), expected, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("steps,batch", [(6, 12), (12, 12)])
def test_time_major_transformer_encoder_every_layer(tmp_path: Path, steps: int, batch: int) -> None:
    """Before: 12 of 16 layers had wrong class means (the batch dimension was followed through a
    weakref to a tensor freed after the residual add)."""
    model = zoo.TimeMajorEncoder()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(steps, batch, 5, generator=g), torch.arange(batch) % CLASSES
    seen = run_one_pass(model, x, y, tmp_path / "t")
    t = load_trace(tmp_path / "t")
    labels = y.numpy()
    checked = 0
    for layer in t.layers:
        values = seen[layer][0]
        sample_dim = 0 if values.ndim == 2 else 1
        expected = expected_class_means(values, labels, sample_dim)
        got = recorded_class_means(tmp_path / "t", layer)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=layer)
        checked += 1
    assert checked >= 16


class BatchMajorIntoTimeMajor(nn.Module):
    """A batch-first Linear, then a transpose into a ``batch_first=False`` LSTM: the model's modules
    disagree, so a (steps, batch) output of equal sizes cannot be placed by declarations alone."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.lstm = nn.LSTM(6, 5)
        self.head = nn.Linear(5, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x).transpose(0, 1)  # (batch, steps, 6) -> (steps, batch, 6)
        return self.head(self.lstm(h)[0][-1])


def test_ambiguous_layout_refuses_classes_keeps_the_rest(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    model = BatchMajorIntoTimeMajor()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 6, 4, generator=g), torch.arange(6) % CLASSES  # steps == batch
    with caplog.at_level(logging.WARNING, logger="nn_staining"):
        seen = run_one_pass(model, x, y, tmp_path / "t")
    warned = [r.getMessage() for r in caplog.records if "nothing tells which is the batch" in r.getMessage()]
    assert (
        len(warned) == 1 and warned[0].startswith("L_inp: its output (6, 6, 6)") and "batch_dim=" in warned[0]
    )
    t = load_trace(tmp_path / "t")
    assert int(t.classes("E_0/L_inp")["act_count"].sum()) == 0  # no class statistics at all
    rows = seen["L_inp"][0].reshape(-1, 6)
    np.testing.assert_allclose(
        t.query("E_0/L_inp")["act_mean"].to_numpy(), rows.mean(0), rtol=1e-5, atol=1e-6
    )
    # the LSTM declares its own layout: its classes are right
    expected = expected_class_means(seen["L_lstm"][0], y.numpy(), 1)
    np.testing.assert_allclose(recorded_class_means(tmp_path / "t", "L_lstm"), expected, rtol=1e-5, atol=1e-6)


def test_stated_batch_dim_resolves_the_ambiguity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BatchMajorIntoTimeMajor()
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(6, 6, 4, generator=g), torch.arange(6) % CLASSES
    seen = run_one_pass(model, x, y, tmp_path / "t", batch_dim=0)
    expected = expected_class_means(seen["L_inp"][0], y.numpy(), 0)
    np.testing.assert_allclose(recorded_class_means(tmp_path / "t", "L_inp"), expected, rtol=1e-5, atol=1e-6)
    expected = expected_class_means(seen["L_lstm"][0], y.numpy(), 1)  # declared by the module: kept
    np.testing.assert_allclose(recorded_class_means(tmp_path / "t", "L_lstm"), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [-1, 1.0, True, "1"])
def test_batch_dim_must_be_a_dimension(tmp_path: Path, bad) -> None:
    with pytest.raises(ValueError, match=r"batch_dim=.* must be None .*, 0 .* or 1"):
        NetworkTrace(nn.Linear(2, 2), tmp_path / "t", batch_dim=bad)


class SharedPositions(nn.Module):
    """A BERT-like embedding: token embeddings per sample plus a position embedding of batch size 1."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(20, 8)
        self.positions = nn.Embedding(steps, 8)
        self.head = nn.Linear(8, CLASSES)
        self.register_buffer("ids", torch.arange(steps).unsqueeze(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x) + self.positions(self.ids)  # (1, steps, 8) broadcast over the batch
        return self.head(h.mean(1))


@pytest.mark.parametrize("steps,batch", [(5, 10), (10, 10)])
def test_an_output_shared_by_the_batch_gets_no_classes(tmp_path: Path, steps: int, batch: int) -> None:
    """Before: BERT's (1, 32, 64) position embeddings got per-class statistics by repeated labels."""
    torch.manual_seed(0)
    model = SharedPositions(steps)
    g = torch.Generator().manual_seed(4)
    x, y = torch.randint(0, 20, (batch, steps), generator=g), torch.arange(batch) % CLASSES
    seen = run_one_pass(model, x, y, tmp_path / "t")
    t = load_trace(tmp_path / "t")
    assert int(t.classes("E_0/L_positions")["act_count"].sum()) == 0
    np.testing.assert_allclose(
        t.query("E_0/L_positions")["act_mean"].to_numpy(),
        seen["L_positions"][0][0].mean(0),
        rtol=1e-5,
        atol=1e-6,
    )
    expected = expected_class_means(seen["L_tokens"][0], y.numpy(), 0)
    np.testing.assert_allclose(
        recorded_class_means(tmp_path / "t", "L_tokens"), expected, rtol=1e-5, atol=1e-6
    )


def test_bert_with_sequence_length_equal_to_batch(tmp_path: Path) -> None:
    """No module of BERT is time-major: every per-token layer has its batch first, residual sums and
    the attention's reshapes included; the position embeddings are shared."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=CLASSES,
    )
    model = transformers.BertForSequenceClassification(config)
    seen = hooks(model)
    g = torch.Generator().manual_seed(5)
    ids, y = torch.randint(1, 50, (8, 8), generator=g), torch.arange(8) % CLASSES
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        trace.start_epoch(0)
        trace.set_targets(y)
        model(input_ids=ids).logits.sum().backward()
        trace.end_epoch()
    t = load_trace(tmp_path / "t")
    per_token = [k for k in t.layers if seen[k][0].ndim == 3 and seen[k][0].shape[0] == 8]
    assert len(per_token) >= 12
    for layer in per_token:
        expected = expected_class_means(seen[layer][0], y.numpy(), 0)
        np.testing.assert_allclose(
            recorded_class_means(tmp_path / "t", layer), expected, rtol=1e-4, atol=1e-5
        )
    assert int(t.classes("E_0/L_bert.embeddings.position_embeddings")["act_count"].sum()) == 0


def test_probe_of_a_time_major_model_with_steps_equal_to_the_probe_batch(tmp_path: Path) -> None:
    """The probe set holds samples along dim 0; the model takes (steps, batch, features): each probe
    batch is fed time-major, and each layer's batch dimension is the one training revealed."""
    model = zoo.TimeMajorGRU()
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(6, 16, 5, generator=g), torch.arange(16) % CLASSES  # training: 6 steps, 16 samples
    probe_x, probe_y = torch.randn(6, 6, 5, generator=g), torch.arange(6) % CLASSES  # 6 samples of 6 steps
    trace = NetworkTrace(model, tmp_path / "t", num_classes=CLASSES, probe=(probe_x, probe_y))
    with trace, trace.epoch(0):
        trace.set_targets(y)
        model(x).sum().backward()
    seen = hooks(model)
    model.eval()
    with torch.no_grad():
        model(probe_x.movedim(0, 1))
    t = load_trace(tmp_path / "t")
    for layer in ("L_inp", "L_act", "L_gru"):
        expected = seen[layer][0].transpose(1, 0, 2).mean(1)  # (samples, features): mean over steps
        np.testing.assert_allclose(t.probe(0, layer), expected, rtol=1e-5, atol=1e-6, err_msg=layer)
    np.testing.assert_allclose(t.probe(0, "L_head"), seen["L_head"][0], rtol=1e-5, atol=1e-6)
