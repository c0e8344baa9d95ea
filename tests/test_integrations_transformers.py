"""StainingTrainerCallback under Hugging Face's Trainer (CPU, tiny BERT and GPT-2 built from configs).

The test's own hooks capture, during the same training, each checked module's outputs per phase,
the ``labels`` and ``attention_mask`` of every forward pass, and the gradients the optimizer steps
with; numpy computes the reference statistics (padding positions excluded, ``-100`` unlabelled).
"""

from __future__ import annotations

import importlib
import logging
import math
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from conftest import assert_close, numpy_stats  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    Trainer,
    TrainingArguments,
)

from nn_staining import load_trace  # noqa: E402
from nn_staining.integrations.transformers import StainingTrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VOCAB, SEQ, CLASSES, BATCH = 60, 8, 3, 8
BERT_LAYERS = {  # module -> whether its output is (batch, seq, features) (token rows) or (batch, features)
    "bert.encoder.layer.0.output.dense": True,
    "bert.encoder.layer.0.intermediate.intermediate_act_fn": True,
    "bert.pooler.dense": False,
    "classifier": False,
}


def token_data(n: int, seed: int, label_every: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token ids with padding (attention_mask 0 at the end) and a class per sequence;
    every ``label_every``-th label is -100 (ignore_index)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, SEQ), generator=g)
    mask = (torch.arange(SEQ) < torch.randint(3, SEQ + 1, (n,), generator=g)[:, None]).long()
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    if label_every:
        labels[::label_every] = -100
    return [{"input_ids": i * m, "attention_mask": m, "labels": y} for i, m, y in zip(ids, mask, labels)]


class Capture:
    """Forward hooks of the test's own: outputs per (phase, epoch) and each pass's labels and mask."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        self.epoch = 0
        self.out: dict[tuple, list[np.ndarray]] = defaultdict(list)
        self.passes: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
        model.register_forward_pre_hook(self._on_pass, with_kwargs=True)
        for name in names:
            model.get_submodule(name).register_forward_hook(self._on_output(name))

    def _on_pass(self, model, args, kwargs) -> None:
        phase = "train" if model.training else "eval"
        self.passes[phase, self.epoch].append(
            (kwargs["labels"].numpy().copy(), kwargs["attention_mask"].numpy())
        )

    def _on_output(self, name: str):
        def hook(module, args, output) -> None:
            out = output[0] if isinstance(output, tuple) else output
            self.out["train" if module.training else "eval", self.epoch, name].append(
                out.detach().double().numpy()
            )

        return hook


class EpochCounter(transformers.TrainerCallback):
    def __init__(self, capture: Capture) -> None:
        self.capture = capture

    def on_epoch_begin(self, args, state, control, **kwargs) -> None:
        self.capture.epoch = math.floor(state.epoch + 1e-6)


def reference(capture: Capture, phase: str, epoch: int, name: str, tokens: bool):
    """(rows, row labels) of the real observations: padding positions dropped, each row carrying its
    sequence's label (-100 stays -100)."""
    rows, labels = [], []
    for out, (y, mask) in zip(capture.out[phase, epoch, name], capture.passes[phase, epoch]):
        if tokens:
            keep = mask.astype(bool)
            rows.append(out[keep])
            labels.append(np.broadcast_to(y[:, None], mask.shape)[keep])
        else:
            rows.append(out)
            labels.append(y)
    return np.concatenate(rows), np.concatenate(labels)


def args(tmp_path: Path, epochs: int = 2, output: str = "hf", **kwargs) -> TrainingArguments:
    options = dict(
        num_train_epochs=epochs,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=BATCH,
        learning_rate=1e-3,
        logging_strategy="epoch",
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    options.update(kwargs)
    return TrainingArguments(str(tmp_path / output), **options)


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=CLASSES,
        id2label={0: "neg", 1: "neutral", 2: "pos"},
    )
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory: pytest.TempPathFactory):
    """Tiny BERT, 2 epochs of 40 padded sequences (every 7th label -100), evaluated on 32 each epoch."""
    tmp = tmp_path_factory.mktemp("bert")
    model = tiny_bert()
    capture = Capture(model, list(BERT_LAYERS))
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps: list[dict[str, np.ndarray]] = []  # the gradients each optimizer step uses
    watched = {"classifier": model.classifier.weight, "bert.pooler.dense": model.bert.pooler.dense.weight}
    optimiser.register_step_pre_hook(
        lambda opt, a, k: steps.append(
            {n: p.grad.detach().double().numpy().copy() for n, p in watched.items()}
        )
    )
    callback = StainingTrainerCallback(tmp / "trace", record_eval=True)
    trainer = Trainer(
        model,
        args(tmp, eval_strategy="epoch"),
        train_dataset=token_data(40, 1, label_every=7),
        eval_dataset=token_data(32, 2),
        optimizers=(optimiser, None),
        callbacks=[callback, EpochCounter(capture)],
    )
    trainer.train()
    return tmp / "trace", capture, steps, callback, model


@pytest.mark.parametrize("phase", ["train", "eval"])
def test_bert_statistics_match_own_hooks_without_padding(bert_run, phase: str) -> None:
    store, capture, *_ = bert_run
    t = load_trace(store, phase=phase)
    assert t.epochs == [0, 1]
    for epoch in range(2):
        for name, tokens in BERT_LAYERS.items():
            rows, labels = reference(capture, phase, epoch, name, tokens)
            got = t.query(f"E_{epoch}/L_{name}")
            for column, expected in numpy_stats(rows).items():
                assert_close(
                    got[column].to_numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"{name} {column}"
                )
            classes = t.classes(f"E_{epoch}/L_{name}")
            counts = classes["act_count"].to_numpy().reshape(-1, CLASSES)
            expected_counts = np.array([(labels == c).sum() for c in range(CLASSES)])
            assert (counts == expected_counts).all(), (phase, epoch, name)  # -100 is never a class
            means = np.stack([rows[labels == c].mean(0) for c in range(CLASSES)], axis=1)
            assert_close(classes["act_mean"].to_numpy().reshape(-1, CLASSES), means, rtol=1e-5, atol=1e-6)
        real_tokens = sum(mask.sum() for _, mask in capture.passes[phase, epoch])
        assert got_count(t, epoch, "bert.encoder.layer.0.output.dense") == real_tokens


def got_count(t, epoch: int, name: str) -> int:
    return int(t.query(f"E_{epoch}/L_{name}")["act_count"].iloc[0])


def test_bert_labels_and_class_names_come_from_the_config(bert_run) -> None:
    store, capture, *_ = bert_run
    t = load_trace(store)
    assert t.meta["num_classes"] == CLASSES
    assert t.meta["class_names"] == ["neg", "neutral", "pos"]
    train_labels = np.concatenate([y for y, _ in capture.passes["train", 0]])
    assert (train_labels == -100).sum() == 6  # the case the per-class counts above leave out


def test_batch_shared_outputs_get_no_classes(bert_run) -> None:
    store, capture, *_ = bert_run
    t = load_trace(store)
    name = "L_bert.embeddings.position_embeddings"  # (1, seq, hidden): the same rows for every sample
    assert got_count(t, 0, name[2:]) == SEQ * len(capture.passes["train", 0])
    assert (t.classes(f"E_0/{name}")["act_count"] == 0).all()


def test_bert_grad_norm_is_the_last_steps_gradient(bert_run) -> None:
    store, _, steps, callback, model = bert_run
    t = load_trace(store)
    per_epoch = math.ceil(40 / BATCH)
    assert len(steps) == 2 * per_epoch
    for epoch in range(2):
        for name, grad in steps[(epoch + 1) * per_epoch - 1].items():
            got = t.query(f"E_{epoch}/L_{name}")["grad_norm"].to_numpy()
            assert_close(got, np.linalg.norm(grad, axis=1), rtol=1e-5, atol=1e-8, err_msg=name)
    assert model.classifier.weight.grad is None  # Trainer left no gradient at the epoch's end
    assert not callback._copy_grads  # Trainer sets gradients to None: they were kept by reference


def test_bert_logs_are_filed_per_epoch(bert_run) -> None:
    store, capture, *_ = bert_run
    t = load_trace(store)
    metrics = t.metrics
    for epoch in range(2):
        logits, _ = reference(capture, "eval", epoch, "classifier", tokens=False)
        labels = np.concatenate([y for y, _ in capture.passes["eval", epoch]])
        logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
        assert metrics.loc[epoch, "eval_loss"] == pytest.approx(
            -logp[np.arange(len(labels)), labels].mean(), rel=1e-5
        )
        assert metrics.loc[epoch, "hf_epoch"] == epoch + 1  # Trainer's own fractional epoch, renamed
        assert metrics.loc[epoch, "loss"] > 0
    assert t.run_metrics["train_runtime"] > 0 and "train_loss" in t.run_metrics


def test_the_trace_is_closed_after_training(bert_run) -> None:
    _, _, _, callback, model = bert_run
    assert callback.trace is None
    assert len(model._forward_pre_hooks) == 1  # only the test's own capture pre-hook is left
    assert len(model.classifier._forward_hooks) == 1


class Crash(transformers.TrainerCallback):
    """Raises in the middle of ``epoch`` (as a crash or preemption would end the run)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        if state.epoch >= self.epoch + 0.5:
            raise RuntimeError("simulated crash")


def test_resume_from_a_checkpoint_continues_the_trace(tmp_path: Path) -> None:
    train, val = token_data(40, 1, label_every=7), token_data(16, 2)

    def run(name: str, extra: list, resume_from: str | None = None) -> StainingTrainerCallback:
        callback = StainingTrainerCallback(tmp_path / name, record_eval=True)
        options = dict(eval_strategy="epoch", save_strategy="epoch", output=f"{name}_ckpt")
        trainer = Trainer(
            tiny_bert(),
            args(tmp_path, epochs=3, **options),
            train_dataset=train,
            eval_dataset=val,
            callbacks=[callback, *extra],
        )
        try:
            trainer.train(resume_from_checkpoint=resume_from)
        finally:  # a crash ends the process; Trainer has no exception event, so close the trace here
            if callback.trace is not None:
                callback.trace.close()
        return callback

    run("full", [])
    with pytest.raises(RuntimeError, match="simulated crash"):
        run("resumed", [Crash(epoch=2)])
    assert load_trace(tmp_path / "resumed").epochs == [0, 1]  # epoch 2 died half-way: not written
    run("resumed", [], resume_from=str(tmp_path / "resumed_ckpt" / "checkpoint-10"))  # 5 steps an epoch
    for phase in ("train", "eval"):
        full, resumed = (
            load_trace(tmp_path / "full", phase=phase),
            load_trace(tmp_path / "resumed", phase=phase),
        )
        assert resumed.epochs == full.epochs == [0, 1, 2]
        pd.testing.assert_frame_equal(full.query("E_*/L_*"), resumed.query("E_*/L_*"))
        pd.testing.assert_frame_equal(full.classes("E_*/L_*"), resumed.classes("E_*/L_*"))
    weight_delta = resumed.query("E_2/L_classifier")["weight_delta_norm"]  # against the stored epoch 1
    assert weight_delta.notna().all() and (weight_delta > 0).all()
    assert list(load_trace(tmp_path / "resumed").metrics.index) == [0, 1, 2]


def tiny_gpt2_config(**kwargs) -> GPT2Config:
    return GPT2Config(
        vocab_size=VOCAB,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
        **kwargs,
    )


def test_gpt2_language_model_token_labels_give_no_classes(tmp_path: Path, caplog) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(tiny_gpt2_config())
    data = token_data(24, 3)
    for row in data:  # language modelling: the labels are the tokens, -100 at the padding
        row["labels"] = row["input_ids"].masked_fill(row["attention_mask"] == 0, -100)
    capture = Capture(model, ["transformer.h.0.mlp.act", "lm_head"])
    with caplog.at_level(logging.WARNING, logger="nn_staining.integrations._common"):
        Trainer(
            model,
            args(tmp_path, epochs=1),
            train_dataset=data,
            callbacks=[StainingTrainerCallback(tmp_path / "trace"), EpochCounter(capture)],
        ).train()
    assert any("give one label per position" in r.getMessage() for r in caplog.records)
    t = load_trace(tmp_path / "trace")
    assert t.meta["num_classes"] is None
    assert t.classes("E_0/L_lm_head").empty
    for name in ("transformer.h.0.mlp.act", "lm_head"):
        rows = np.concatenate(
            [
                out[mask.astype(bool)]
                for out, (_, mask) in zip(capture.out["train", 0, name], capture.passes["train", 0])
            ]
        )
        got = t.query(f"E_0/L_{name}")
        for column, expected in numpy_stats(rows).items():
            assert_close(got[column].to_numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=f"{name} {column}")


def test_gpt2_sequence_classification_counts_real_labels(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(tiny_gpt2_config(num_labels=CLASSES, pad_token_id=0))
    data = token_data(24, 4, label_every=5)
    capture = Capture(model, ["score"])
    Trainer(
        model,
        args(tmp_path, epochs=1),
        train_dataset=data,
        callbacks=[StainingTrainerCallback(tmp_path / "trace"), EpochCounter(capture)],
    ).train()
    t = load_trace(tmp_path / "trace")
    assert t.meta["num_classes"] == CLASSES  # config.num_labels
    passes = capture.passes["train", 0]
    tokens_per_class = [sum(int(mask[y == c].sum()) for y, mask in passes) for c in range(CLASSES)]
    assert sum(tokens_per_class) < sum(int(mask.sum()) for _, mask in passes)  # some labels are -100
    for name in ("transformer.h.0.mlp.c_fc", "score"):  # score runs on every position: token rows too
        counts = t.classes(f"E_0/L_{name}")["act_count"].to_numpy().reshape(-1, CLASSES)[0]
        assert list(counts) == tokens_per_class, name


def readme_block(heading: str, index: int) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[index]


def test_readme_hugging_face_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(readme_block("Training with Lightning or Hugging Face", 1), "README.md", "exec"), namespace)
    t = load_trace(tmp_path / "results" / "hf_run")
    assert t.epochs == load_trace(tmp_path / "results" / "hf_run", phase="eval").epochs == [0, 1]
    mask, labels = namespace["mask"], namespace["labels"]
    dense = "E_0/L_bert.encoder.layer.1.output.dense"
    assert t.query(dense)["act_count"].iloc[0] == int(mask.sum())  # real tokens only
    counts = t.classes(dense)["act_count"].to_numpy().reshape(-1, 2)[0]
    assert list(counts) == [int(mask[labels == c].sum()) for c in range(2)]
    assert t.query("E_1/L_classifier")["grad_norm"].notna().all()
    assert "eval_loss" in t.metrics.columns


def test_importing_without_transformers_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "nn_staining.integrations.transformers")
    with pytest.raises(
        ImportError, match=r"needs Hugging Face transformers.*pip install transformers accelerate"
    ):
        importlib.import_module("nn_staining.integrations.transformers")
