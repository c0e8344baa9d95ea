"""A sweep over architectures nobody in this project wrote, recorded with defaults (no ``layers=``, no
``batch_dim=``): every recorded layer, every epoch, compared with the test's own capture.

Each model trains 2 epochs of 2 optimiser steps with ``set_targets(y)`` (and sometimes a mask) before
each forward pass. The test's own forward hooks keep every module's output per call (a module called
twice in a pass gives ``L_x`` and ``L_x:2``); numpy then computes, from the layout the test knows for
each layer (which dimension holds the samples, or channel-first), the statistics the README defines:
linear-like outputs have one observation per position before the features, conv-like outputs
``(batch, channels, *spatial)`` one per sample (the spatial mean). Outputs shared by the batch (a
``(1, steps, d)`` position embedding) carry no class.

Each ``BEFORE_…`` text below is what the library got wrong when this sweep was first run (the cases
were strict xfails until the fix): a parameter-free activation module after a Conv1d reached through
a residual sum, a learned gain or a concatenation (and any, under torch.compile) laid out as
linear-like; ConvNeXt's channels-last Linears laid out as channel-first; T5's relative position
bias, shared by the batch, split into classes (and masked) when steps == batch; a compiled model's
kept output overwritten by an in-place activation.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo
import zoo
from conftest import numpy_stats
from torch import nn

from nn_staining import NetworkTrace, load_trace

CLASSES = 3
EPOCHS = 2
COLUMNS = ("act_count", "act_mean", "act_std", "act_min", "act_max")
#: Module types the library leaves out by default (pure reshapes): the capture leaves them out too.
RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)

#: A layer's layout as the test knows it: "conv" (channel-first, batch first), an int (the dimension of
#: a linear-like output that holds the samples) or "shared" (no dimension is per sample).
Layout = Callable[[str, np.ndarray], "str | int"]


class Warnings(logging.Handler):
    """The library's log records at WARNING and above while a model is recorded."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Capture:
    """The test's own forward hooks: each recorded-kind module's output, per call, per pass."""

    def __init__(self, model: nn.Module) -> None:
        self.warnings: list[str] = []
        self.epoch = 0
        self.passes: dict[int, list[tuple[np.ndarray, np.ndarray | None]]] = defaultdict(list)
        self.outputs: dict[tuple[int, str], list[tuple[int, np.ndarray]]] = defaultdict(list)
        self._calls: dict[str, int] = {}
        self.handles = [model.register_forward_pre_hook(self._new_pass)]
        for name, module in model.named_modules():
            leaf = not any(True for _ in module.children())
            if (
                name
                and (leaf or isinstance(module, nn.MultiheadAttention))
                and not isinstance(module, RESHAPES)
            ):
                self.handles.append(module.register_forward_hook(self._hook(f"L_{name}")))

    def _new_pass(self, module: nn.Module, args: tuple) -> None:
        self._calls = {}

    def _hook(self, key: str):
        def keep(module: nn.Module, args: tuple, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            if not isinstance(out, torch.Tensor) or not out.is_floating_point():
                return
            call = self._calls[key] = self._calls.get(key, 0) + 1
            layer = key if call == 1 else f"{key}:{call}"
            pass_index = len(self.passes[self.epoch]) - 1
            self.outputs[(self.epoch, layer)].append((pass_index, out.detach().double().numpy().copy()))

        return keep

    def labels(self, y: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """The labels (and mask) of the pass about to run."""
        self.passes[self.epoch].append(
            (y.numpy().copy(), None if mask is None else mask.numpy().astype(bool))
        )

    def layers(self, epoch: int) -> set[str]:
        return {key for e, key in self.outputs if e == epoch}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def reference(capture: Capture, epoch: int, layer: str, layout: Layout) -> tuple[np.ndarray, np.ndarray]:
    """(observations, neurons) rows the README's rules give, and each row's class (-1: none)."""
    rows, labels = [], []
    for pass_index, out in capture.outputs[(epoch, layer)]:
        y, mask = capture.passes[epoch][pass_index]
        kind = layout(layer, out)
        if kind == "conv":
            r = out.reshape(out.shape[0], out.shape[1], -1).mean(2)
            lab = y.copy()
            keep = np.ones(len(r), bool) if mask is None else mask.reshape(len(y), -1).any(1)
        elif kind == "shared":
            r = out.reshape(-1, out.shape[-1])
            lab = np.full(len(r), -1)
            keep = np.ones(len(r), bool)
        else:
            moved = np.moveaxis(out, kind, 0) if out.ndim >= 3 else out
            r = moved.reshape(-1, out.shape[-1])
            per = len(r) // len(y)
            assert per * len(y) == len(r), (layer, out.shape, len(y))
            lab = np.repeat(y, per)
            if mask is None:
                keep = np.ones(len(r), bool)
            elif mask.size == len(r):
                keep = mask.reshape(-1)  # position by position
            else:
                keep = np.repeat(mask.reshape(len(y), -1).any(1), per)  # sample by sample
        rows.append(r[keep])
        labels.append(lab[keep])
    return np.concatenate(rows), np.concatenate(labels)


def check_layer(
    t, capture: Capture, epoch: int, layer: str, layout: Layout, rtol: float, atol: float
) -> None:
    rows, labels = reference(capture, epoch, layer, layout)
    got = t.query(f"E_{epoch}/{layer}")
    expected = numpy_stats(rows)
    for column in COLUMNS:
        np.testing.assert_allclose(
            got[column].to_numpy(np.float64),
            expected[column],
            rtol=rtol,
            atol=atol,
            err_msg=f"E_{epoch}/{layer} {column}",
        )
    classes = t.classes(f"E_{epoch}/{layer}")
    counts = classes["act_count"].unstack("class")
    means = classes["act_mean"].unstack("class")
    want_counts = np.array([(labels == c).sum() for c in range(CLASSES)])
    np.testing.assert_array_equal(
        counts.to_numpy().max(0) if len(counts) else np.zeros(CLASSES),
        want_counts,
        err_msg=f"E_{epoch}/{layer} class counts",
    )
    if want_counts.any():
        want = np.stack(
            [
                rows[labels == c].mean(0) if (labels == c).any() else np.full(rows.shape[1], np.nan)
                for c in range(CLASSES)
            ],
            axis=1,
        )
        np.testing.assert_allclose(
            means.to_numpy(np.float64), want, rtol=rtol, atol=atol, err_msg=f"E_{epoch}/{layer} class means"
        )


Batch = tuple[tuple, torch.Tensor, "torch.Tensor | None"]  # (model arguments, labels, mask or None)


def record(
    model: nn.Module,
    batches: list[Batch],
    path: Path,
    *,
    forward: Callable[..., torch.Tensor] | None = None,
    runner: nn.Module | None = None,
    capture_model: nn.Module | None = None,
    autocast: bool = False,
):
    """Train 2 epochs of ``batches`` (SGD steps) recorded with defaults; the test's capture hooks on
    ``capture_model`` (default ``model``). Returns the loaded trace and the capture."""
    forward = forward or (lambda m, *args: m(*args))
    runner = model if runner is None else runner
    capture = Capture(model if capture_model is None else capture_model)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    handler = Warnings()
    logging.getLogger("nn_staining").addHandler(handler)
    with NetworkTrace(model, path, num_classes=CLASSES) as trace:
        for epoch in range(EPOCHS):
            capture.epoch = epoch
            trace.start_epoch(epoch)
            for args, y, mask in batches:
                capture.labels(y, mask)
                trace.set_targets(y, mask=mask)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                    logits = forward(runner, *args)
                loss = nn.functional.cross_entropy(logits.float(), y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            trace.end_epoch()
    logging.getLogger("nn_staining").removeHandler(handler)
    capture.remove()
    capture.warnings = handler.messages
    return load_trace(path), capture


def check_all(t, capture: Capture, layout: Layout, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Every layer of every epoch; the recorded layers are exactly the captured ones; no warning (every
    layer's batch is known)."""
    assert capture.warnings == []
    for epoch in range(EPOCHS):
        assert set(t.layers) == capture.layers(epoch), (
            sorted(set(t.layers) ^ capture.layers(epoch)),
            epoch,
        )
        for layer in t.layers:
            check_layer(t, capture, epoch, layer, layout, rtol, atol)


def labels_for(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(batch) % CLASSES)[torch.randperm(batch, generator=g)]


def samples_in(dim: int) -> Layout:
    """A model without convolutions: its ≥3-D outputs hold the samples in ``dim``, 2-D ones first."""
    return lambda layer, out: dim if out.ndim >= 3 else 0


# -- 1. nn.Transformer, encoder-decoder, time-major ------------------------------------------------------
class Seq2Seq(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.src_in = nn.Linear(4, 8)
        self.tgt_in = nn.Linear(4, 8)
        self.transformer = nn.Transformer(8, 2, 1, 1, 16)  # batch_first=False: (steps, batch, d)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        padding = None if keep is None else ~keep.bool()  # (batch, src_steps), True where padded
        out = self.transformer(
            self.src_in(src), self.tgt_in(tgt), src_key_padding_mask=padding, memory_key_padding_mask=padding
        )
        return self.head(out.mean(0))


@pytest.mark.filterwarnings("ignore:enable_nested_tensor is True:UserWarning")
@pytest.mark.parametrize(
    "src_steps,tgt_steps,batch,padded", [(5, 4, 6, False), (6, 6, 6, False), (5, 4, 6, True)]
)
def test_nn_transformer_encoder_decoder(
    tmp_path: Path, src_steps: int, tgt_steps: int, batch: int, padded: bool
) -> None:
    """Time-major; with ``padded`` the source's (batch, steps) mask is given to set_targets: the encoder's
    (src_steps, batch, d) outputs lose their padded positions, the decoder's keep every sample."""
    model = Seq2Seq()
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(2):
        src, tgt = (
            torch.randn(src_steps, batch, 4, generator=g),
            torch.randn(tgt_steps, batch, 4, generator=g),
        )
        keep = None
        if padded:
            keep = (
                torch.arange(src_steps) < torch.randint(2, src_steps + 1, (batch,), generator=g)[:, None]
            ).long()
        batches.append(((src, tgt, keep), labels_for(batch, i), keep))
    t, capture = record(model, batches, tmp_path / "t")
    assert "L_transformer.decoder.layers.0.multihead_attn" in t.layers
    check_all(t, capture, samples_in(1))


# -- 2. recurrent: stacked bidirectional LSTM, time-major GRU over embeddings ------------------------------
class BiLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lstm = nn.LSTM(4, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(x)[0][:, -1])


@pytest.mark.parametrize("steps,batch", [(5, 8), (8, 8)])
def test_stacked_bidirectional_lstm(tmp_path: Path, steps: int, batch: int) -> None:
    g = torch.Generator().manual_seed(2)
    batches = [((torch.randn(batch, steps, 4, generator=g),), labels_for(batch, i), None) for i in range(2)]
    t, capture = record(BiLSTM(), batches, tmp_path / "t")
    assert t.layers == ["L_lstm", "L_head"]
    assert int(t.query("E_0/L_lstm")["act_count"].iloc[0]) == 2 * steps * batch
    check_all(t, capture, samples_in(0))


class EmbeddedGRU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, 8)
        self.gru = nn.GRU(8, 6, num_layers=2)  # batch_first=False
        self.head = nn.Linear(6, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.gru(self.embed(ids))[0][-1])


@pytest.mark.parametrize("steps,batch", [(5, 8), (8, 8)])
def test_time_major_gru_over_embeddings(tmp_path: Path, steps: int, batch: int) -> None:
    g = torch.Generator().manual_seed(3)
    batches = [
        ((torch.randint(0, 20, (steps, batch), generator=g),), labels_for(batch, i), None) for i in range(2)
    ]
    t, capture = record(EmbeddedGRU(), batches, tmp_path / "t")
    assert t.layers == ["L_embed", "L_gru", "L_head"]
    check_all(t, capture, samples_in(1))


# -- 3. convolutions: depthwise-separable 2-D, 1-D audio ---------------------------------------------------
def separable_cnn() -> nn.Sequential:
    """MobileNet's stem and one depthwise-separable block: in-place ReLU6 after each BatchNorm2d."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(inplace=True),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),  # depthwise
        nn.BatchNorm2d(8),
        nn.ReLU6(inplace=True),
        nn.Conv2d(8, 16, 1, bias=False),  # pointwise
        nn.BatchNorm2d(16),
        nn.ReLU6(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(16, CLASSES),
    )


CONV: Layout = lambda layer, out: "conv" if out.ndim >= 3 else 0  # noqa: E731


def image_batches(batch: int, size: int, seed: int, n: int = 2) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(batch, 3, size, size, generator=g),), labels_for(batch, i), None) for i in range(n)]


def test_depthwise_separable_cnn(tmp_path: Path) -> None:
    t, capture = record(separable_cnn(), image_batches(6, 12, 4), tmp_path / "t")
    assert len(t.layers) == 12  # everything but the Flatten
    check_all(t, capture, CONV)


class AudioNet(nn.Module):
    """Conv1d front end on (batch, 1, samples), a Conv1d block (with ``residual``, as in a 1-D ResNet:
    its ReLU module after the sum), a dropout and a pooled head. 8 channels; length 16 after pool1."""

    def __init__(self, residual: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.residual = residual
        self.conv1 = nn.Conv1d(1, 8, 9, stride=2)
        self.bn1 = nn.BatchNorm1d(8)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool1d(2)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm1d(8)
        self.relu2 = nn.ReLU()
        self.drop = nn.Dropout(0.1)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(h))
        h = self.relu2(out + h if self.residual else out)
        return self.head(self.pool(self.drop(h)).flatten(1))


BEFORE_RESIDUAL_1D = (
    "a ReLU module after a residual sum on a Conv1d output (6, 8, 16) is recorded as linear-like "
    "(kind 'features', 16 neurons = the length, act_count 96 = batch x channels per epoch) instead of 8 "
    "channels with act_count 12; the Dropout after it inherits the wrong layout"
)


@pytest.mark.parametrize(
    "residual",
    [
        False,
        pytest.param(True),
    ],
)
def test_conv1d_audio_net(tmp_path: Path, residual: bool) -> None:
    g = torch.Generator().manual_seed(5)
    batches = [((torch.randn(6, 1, 73, generator=g),), labels_for(6, i), None) for i in range(2)]
    t, capture = record(AudioNet(residual), batches, tmp_path / "t")
    assert t.layers == [
        f"L_{n}" for n in ("conv1", "bn1", "relu1", "pool1", "conv2", "bn2", "relu2", "drop", "pool", "head")
    ]
    for layer in t.layers[:-1]:
        assert t.layer_info(layer)["neurons"] == 8, (layer, t.layer_info(layer))
    check_all(t, capture, CONV)


class ConvThenActivation(nn.Module):
    """A Conv1d (batch, 8, 12) output reaching a parameter-free activation module through other
    operations: a scale, a functional ReLU, an in-place ReLU, a learned per-channel gain, a concatenation
    along the length with a second Conv1d."""

    def __init__(self, variant: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.variant = variant
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.act = nn.GELU()
        self.head = nn.Linear(8, CLASSES)
        if variant == "gain":
            self.gain = nn.Parameter(torch.ones(1, 8, 1))
        if variant == "cat":
            self.conv_b = nn.Conv1d(2, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.variant == "scale":
            h = h * 0.5
        elif self.variant == "relu":
            h = torch.relu(h)
        elif self.variant == "relu_":
            h = torch.relu_(h)
        elif self.variant == "gain":
            h = h * self.gain
        elif self.variant == "cat":
            h = torch.cat([h, self.conv_b(x)], 2)
        return self.head(self.act(h).mean(2))


BEFORE_GAIN_1D = (
    "GELU module after a Conv1d output (6, 8, 12) times a learned (1, 8, 1) gain is recorded as "
    "linear-like: 12 neurons (the length) with act_count 96 instead of 8 channels with act_count 12"
)
BEFORE_CAT_1D = (
    "GELU module after torch.cat of two Conv1d outputs along the length, (6, 8, 24), is recorded as "
    "linear-like: 24 neurons (the length) with act_count 96 instead of 8 channels with act_count 12"
)


@pytest.mark.parametrize(
    "variant",
    [
        "scale",
        "plain",
        "relu",
        "relu_",
        pytest.param("gain"),
        pytest.param("cat"),
    ],
)
def test_conv1d_then_an_activation_module(tmp_path: Path, variant: str) -> None:
    g = torch.Generator().manual_seed(12)
    batches = [((torch.randn(6, 2, 12, generator=g),), labels_for(6, i), None) for i in range(2)]
    t, capture = record(ConvThenActivation(variant), batches, tmp_path / "t")
    assert t.layer_info("L_act")["neurons"] == 8
    check_all(t, capture, CONV)


# -- 4. a ViT ---------------------------------------------------------------------------------------------
class TinyViT(nn.Module):
    def __init__(self, size: int = 8, patch: int = 2, d: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.patch = nn.Conv2d(3, d, patch, patch)
        patches = (size // patch) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.randn(1, patches + 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d, 2, 16, 0.1, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)  # (batch, patches, d)
        h = torch.cat([self.cls_token.expand(len(h), -1, -1), h], 1) + self.pos_embed
        return self.head(self.norm(self.encoder(h))[:, 0])


@pytest.mark.parametrize("batch", [6, 17])  # 17 = 16 patches + the class token: steps == batch
def test_vit(tmp_path: Path, batch: int) -> None:
    t, capture = record(TinyViT(), image_batches(batch, 8, 6), tmp_path / "t")
    assert "L_encoder.layers.1.self_attn" in t.layers
    check_all(t, capture, lambda layer, out: "conv" if out.ndim == 4 else 0)


# -- 5. Hugging Face models from configs -----------------------------------------------------------------
def hf_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=mask).logits


def token_batches(batch: int, steps: int, vocab: int, seed: int, padded: bool) -> list[Batch]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(2):
        ids = torch.randint(1, vocab, (batch, steps), generator=g)
        mask = None
        if padded:
            lengths = torch.randint(2, steps + 1, (batch,), generator=g)
            lengths[0] = steps
            mask = (torch.arange(steps) < lengths[:, None]).long()
            ids = ids * mask  # pad id 0
        out.append(((ids, mask), labels_for(batch, 10 + i), mask))
    return out


def hf_layout(*shared: str) -> Layout:
    return lambda layer, out: "shared" if layer in shared else 0


@pytest.mark.parametrize("steps,batch,padded", [(5, 6, False), (6, 6, False), (6, 6, True)])
def test_gpt2_sequence_classification(tmp_path: Path, steps: int, batch: int, padded: bool) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=30, n_positions=16, n_embd=8, n_layer=1, n_head=2, num_labels=CLASSES, pad_token_id=0
    )
    model = transformers.GPT2ForSequenceClassification(config)
    t, capture = record(model, token_batches(batch, steps, 30, 7, padded), tmp_path / "t", forward=hf_forward)
    assert "L_transformer.h.0.mlp.c_fc" in t.layers and "L_score" in t.layers
    check_all(t, capture, hf_layout("L_transformer.wpe"))


@pytest.mark.parametrize("steps,batch,padded", [(6, 6, True), (5, 4, True), (6, 6, False)])
def test_distilbert_sequence_classification(tmp_path: Path, steps: int, batch: int, padded: bool) -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=30,
        max_position_embeddings=16,
        n_layers=1,
        n_heads=2,
        dim=8,
        hidden_dim=16,
        num_labels=CLASSES,
    )
    model = transformers.DistilBertForSequenceClassification(config)
    t, capture = record(model, token_batches(batch, steps, 30, 8, padded), tmp_path / "t", forward=hf_forward)
    assert "L_distilbert.transformer.layer.0.ffn.lin1" in t.layers
    check_all(t, capture, hf_layout("L_distilbert.embeddings.position_embeddings"))


class T5Classifier(nn.Module):
    """T5's encoder from a config and a head on the first token."""

    def __init__(self) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        torch.manual_seed(0)
        config = transformers.T5Config(
            vocab_size=30,
            d_model=8,
            d_kv=4,
            d_ff=16,
            num_layers=1,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
        )
        self.t5 = transformers.T5EncoderModel(config)
        self.head = nn.Linear(8, CLASSES)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.t5(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0])


T5_BIAS = "L_t5.encoder.block.0.layer.0.SelfAttention.relative_attention_bias"
BEFORE_T5_SHARED = (
    f"{T5_BIAS} outputs (query, key, heads) = (6, 6, 2), the same for every sample; with steps == batch == 6 "
    "the model-wide batch_dim 0 labels its query positions as samples: class counts [24, 24, 24] per "
    "epoch instead of 0"
)
BEFORE_T5_MASKED = (
    f"{T5_BIAS} (6, 6, 2) with steps == batch == 6 and a (6, 6) attention mask: the mask is applied to "
    "its (query, key) grid as if it were (sample, position): act_count 56 (the real tokens) instead of "
    "72, and class counts [22, 16, 18] instead of 0"
)


@pytest.mark.parametrize(
    "steps,batch,padded",
    [
        (5, 6, False),
        pytest.param(6, 6, False),
        pytest.param(6, 6, True),
    ],
)
def test_t5_encoder(tmp_path: Path, steps: int, batch: int, padded: bool) -> None:
    t, capture = record(T5Classifier(), token_batches(batch, steps, 30, 3, padded), tmp_path / "t")
    assert "L_t5.encoder.dropout:2" in t.layers  # one Dropout module after the embeddings and at the end
    assert capture.outputs[(0, T5_BIAS)][0][1].shape == (steps, steps, 2)
    if steps == batch:  # (query, key, heads) of the batch's size twice, and no sample flows into it
        assert len(capture.warnings) == 1 and capture.warnings[0].startswith(
            f"{T5_BIAS}: its output (6, 6, 2) has 0 and 1 dimensions of the batch's 6 samples"
        )
        capture.warnings = []
    check_all(t, capture, hf_layout(T5_BIAS))


CONVNEXT_BLOCK = "L_convnext.encoder.stages.0.layers.0"
BEFORE_CHANNELS_LAST = (
    f"ConvNeXt's channels-last (batch, H, W, C) outputs are taken as channel-first: {CONVNEXT_BLOCK}.pwconv1 "
    "(nn.Linear(8, 32), output (6, 8, 8, 32)) is recorded with 8 neurons (H), each the mean over (W, "
    "features), act_count 12 per epoch instead of 32 neurons with act_count 768; the same for its "
    "layernorm, act and pwconv2 and stage 1's (6, 4, 4, 64) Linear (4 neurons); no warning"
)


def test_convnext_channels_last_linears(tmp_path: Path) -> None:
    """Hugging Face's ConvNeXt: depthwise Conv2d, then a permute to (batch, H, W, C) and a LayerNorm,
    Linear, GELU, Linear on the channels-last tensor (as torchvision's CNBlock and Swin)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(
        num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2, patch_size=2, num_labels=CLASSES
    )
    model = transformers.ConvNextForImageClassification(config)
    t, capture = record(
        model, image_batches(6, 16, 13), tmp_path / "t", forward=lambda m, x: m(pixel_values=x).logits
    )

    def layout(layer: str, out: np.ndarray) -> str | int:
        inside = ".layers." in layer and layer.rsplit(".", 1)[1] in ("layernorm", "pwconv1", "act", "pwconv2")
        return 0 if out.ndim < 3 or inside else "conv"

    info = t.layer_info(f"{CONVNEXT_BLOCK}.pwconv1")
    assert info["neurons"] == 32, info
    check_all(t, capture, layout)


# -- 6. torchvision's resnet18 -----------------------------------------------------------------------------
def test_resnet18_every_call(tmp_path: Path) -> None:
    t, capture = record(zoo.resnet18(num_classes=CLASSES, width=8), image_batches(4, 32, 9), tmp_path / "t")
    assert t.layers.index("L_layer1.0.relu:2") == t.layers.index("L_layer1.0.relu") + 1
    assert sum(layer.endswith(".relu:2") for layer in t.layers) == 8  # every BasicBlock
    for epoch in range(EPOCHS):
        first, second = (
            capture.outputs[(epoch, "L_layer1.0.relu")],
            capture.outputs[(epoch, "L_layer1.0.relu:2")],
        )
        assert len(first) == len(second) == 2
        assert not np.allclose(first[0][1].mean((2, 3)), second[0][1].mean((2, 3)))
    check_all(t, capture, CONV)


# -- 7. bf16 autocast -----------------------------------------------------------------------------------------
def small_cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 16),
        nn.GELU(),
        nn.Linear(16, CLASSES),
    )


def test_bf16_autocast_cnn(tmp_path: Path) -> None:
    model = small_cnn()
    dtypes = set()
    for module in model:
        module.register_forward_hook(lambda m, a, o: dtypes.add(o.dtype))
    t, capture = record(model, image_batches(6, 8, 10), tmp_path / "t", autocast=True)
    # the convolutions and Linears ran in bf16; the capture keeps their values in float64
    assert torch.bfloat16 in dtypes
    # the bf16 values are exact in float32 and float64; only the float32 spatial means round
    check_all(t, capture, CONV, rtol=1e-4, atol=1e-4)


# -- 8. torch.compile ----------------------------------------------------------------------------------------
def compile_cnn(inplace: bool) -> nn.Sequential:
    """The depthwise-separable CNN's first stage (conv, BatchNorm, ReLU6), pooled, a Linear head."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, 2, 1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU6(inplace=inplace),
        nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, CLASSES),
    )


BEFORE_COMPILED_IN_PLACE = (
    "compiled (backend='eager') with ReLU6(inplace=True): the BatchNorm2d before it (L_1) records the "
    "ReLU6's values (E_0/L_1 act_mean[0] 0.3989 vs 2.66e-05 captured eagerly: the ReLU6's mean); "
    "the compiled hook keeps the output tensor by reference until the end of the pass"
)


class SharedTanh(nn.Module):
    """One Tanh module called twice per pass: ``L_act`` and ``L_act:2``."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.act, self.head = (
            nn.Linear(3, 8),
            nn.Linear(8, 8),
            nn.Tanh(),
            nn.Linear(8, CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.b(self.act(self.a(x)))))


def conv1d_batches() -> list[Batch]:
    g = torch.Generator().manual_seed(12)
    return [((torch.randn(6, 2, 12, generator=g),), labels_for(6, i), None) for i in range(2)]


def vector_batches() -> list[Batch]:
    return [((x.mean((2, 3)),), y, mask) for (x,), y, mask in image_batches(6, 12, 11)]


#: name: (model factory, batches)
COMPILED = {
    "cnn": (lambda: compile_cnn(False), lambda: image_batches(6, 12, 11)),
    "cnn_inplace": (lambda: compile_cnn(True), lambda: image_batches(6, 12, 11)),
    "shared_tanh": (SharedTanh, vector_batches),
    "conv1d_gelu": (lambda: ConvThenActivation("plain"), conv1d_batches),
}
BEFORE_COMPILED_1D = (
    "compiled (backend='eager'): the GELU module after a Conv1d, output (6, 8, 12), is recorded as "
    "linear-like: 12 neurons (the length) with act_count 96 instead of 8 channels with act_count 12 "
    "(eager: right); compiled passes learn no layer graph, so the activation has no previous layer"
)


@pytest.mark.parametrize(
    "name",
    [
        "cnn",
        "shared_tanh",
        pytest.param("cnn_inplace"),
        pytest.param("conv1d_gelu"),
    ],
)
def test_compiled_model_equals_an_eager_twin(tmp_path: Path, name: str) -> None:
    """The compiled model (backend="eager") against an eager twin trained in lockstep on the same
    batches; the twin carries the capture. No dropout so the two see the same values."""
    dynamo.reset()
    factory, make_batches = COMPILED[name]
    model, twin, batches = factory(), factory(), make_batches()
    capture = Capture(twin)
    optimiser = torch.optim.SGD(twin.parameters(), lr=0.05)
    for epoch in range(EPOCHS):  # the twin: eager, not recorded
        capture.epoch = epoch
        for (x,), y, _ in batches:
            capture.labels(y)
            loss = nn.functional.cross_entropy(twin(x), y)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    capture.remove()
    compiled = torch.compile(model, backend="eager")
    t, _ = record(model, batches, tmp_path / "t", runner=compiled, capture_model=nn.Sequential())
    dynamo.reset()
    if name == "shared_tanh":
        assert t.layers == ["L_a", "L_b", "L_act", "L_act:2", "L_head"]
    check_all(t, capture, CONV)
