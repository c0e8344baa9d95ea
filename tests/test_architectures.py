"""Architectures nobody in this project wrote, recorded with defaults: GPT-2's (inputs, outputs) ``Conv1D``
weights, the layer graph learnt from the forward pass (pathways chain only along real Linear edges,
"dead" judged only before a real ReLU), and a module called twice in one pass recorded per call.

Reference values come from the test's own hooks and the modules' parameters, computed with numpy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nn_staining import NetworkTrace, load_trace

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2ForSequenceClassification  # noqa: E402

CLASSES = 3


def class_data(n: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs whose class c shifts feature c up by 1.5."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % CLASSES
    x = torch.randn(n, features, generator=g)
    x[torch.arange(n), y] += 1.5
    return x, y


# -- (a) weights kept as (inputs, outputs) -------------------------------------------------------------
def tiny_gpt2() -> GPT2ForSequenceClassification:
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2, num_labels=CLASSES, pad_token_id=0
    )
    return GPT2ForSequenceClassification(config)


def test_gpt2_conv1d_weights_are_stored_one_row_per_output_neuron(tmp_path: Path) -> None:
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (24, 6), generator=g)
    y = torch.randint(0, CLASSES, (24,), generator=g)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    conv1d = {
        "L_transformer.h.0.attn.c_attn": model.transformer.h[0].attn.c_attn,  # 16 inputs, 48 outputs
        "L_transformer.h.0.attn.c_proj": model.transformer.h[0].attn.c_proj,  # square: 16 x 16
        "L_transformer.h.0.mlp.c_fc": model.transformer.h[0].mlp.c_fc,  # 16 inputs, 64 outputs
        "L_transformer.h.0.mlp.c_proj": model.transformer.h[0].mlp.c_proj,  # 64 inputs, 16 outputs
    }
    snapshots: list[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
    with NetworkTrace(model, tmp_path / "t", num_classes=CLASSES) as trace:
        for epoch in range(2):
            trace.start_epoch(epoch)
            for start in range(0, 24, 8):
                trace.set_targets(y[start : start + 8])
                loss = model(input_ids=ids[start : start + 8], labels=y[start : start + 8]).loss
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            snapshots.append(
                {
                    key: (
                        m.weight.detach().double().numpy().copy(),
                        m.weight.grad.detach().double().numpy().copy(),
                        m.bias.detach().double().numpy().copy(),
                    )
                    for key, m in conv1d.items()
                }
            )
            trace.end_epoch()
    t = load_trace(tmp_path / "t")
    for key, module in conv1d.items():
        assert t.layer_info(key)["has_weights"], key
        assert t.layer_info(key)["neurons"] == module.nf
        for epoch, snapshot in enumerate(snapshots):
            weight, grad, bias = snapshot[key]  # (inputs, outputs)
            np.testing.assert_array_equal(t.weights(epoch, key), weight.T.astype(np.float32))
            frame = t.query(
                f"E_{epoch}/{key}", columns=["weight_norm", "grad_norm", "bias", "weight_delta_norm"]
            )
            np.testing.assert_allclose(frame["weight_norm"], np.linalg.norm(weight, axis=0), rtol=1e-5)
            np.testing.assert_allclose(frame["grad_norm"], np.linalg.norm(grad, axis=0), rtol=1e-5)
            np.testing.assert_allclose(frame["bias"], bias, rtol=1e-6)
            if epoch:
                delta = np.linalg.norm(weight - snapshots[epoch - 1][key][0], axis=0)
                np.testing.assert_allclose(frame["weight_delta_norm"], delta, rtol=1e-4, atol=1e-7)
