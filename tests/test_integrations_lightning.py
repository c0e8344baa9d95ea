"""StainingCallback under Lightning (CPU): the trace holds what the test's own hooks saw.

The LightningModule captures, with hooks of its own, each layer's outputs per phase and epoch, the
labels of every step and the gradient of each epoch's last optimizer step; numpy computes the
reference statistics. Under ``strategy="ddp_fork"`` (2 CPU processes, gloo) each rank saves its
captures and the test merges them.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from conftest import assert_close, class_means, numpy_stats  # noqa: E402

from nn_staining import load_trace  # noqa: E402
from nn_staining.integrations._common import default_labels  # noqa: E402
from nn_staining.integrations.lightning import StainingCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("0", "1", "2")  # net.0 Linear, net.1 ReLU, net.2 Linear


class Classifier(pl.LightningModule):
    def __init__(self, save_dir: str | None = None) -> None:
        super().__init__()
        self.save_dir = save_dir
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.seen: dict[str, list[np.ndarray]] = {}
        self.last_grad: dict[int, np.ndarray] = {}
        for name in ("0", "1", "2"):
            self.net.get_submodule(name).register_forward_hook(self._capture(name))

    def _capture(self, name: str):
        def hook(module, args, output):
            phase = "train" if module.training else "eval"
            self.seen.setdefault(f"{phase}_{name}_{self.current_epoch}", []).append(
                output.detach().numpy().copy()
            )

        return hook

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(f"train_labels_{self.current_epoch}", []).append(y.numpy().copy())
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)  # reduced only after the epoch ends
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(f"eval_labels_{self.current_epoch}", []).append(y.numpy().copy())
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def on_train_epoch_end(self):
        self.log("epoch_marker", 100.0 + self.current_epoch)

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.is_last_batch:
            self.last_grad[self.current_epoch] = self.net[0].weight.grad.detach().numpy().copy()

    def on_fit_end(self):
        if self.save_dir is not None:
            arrays = {k: np.concatenate(v) for k, v in self.seen.items()}
            arrays.update({f"grad_{e}": g for e, g in self.last_grad.items()})
            np.savez(os.path.join(self.save_dir, f"rank{self.global_rank}.npz"), **arrays)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def data(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 6, generator=g) * 2 + 1, torch.randint(0, 3, (n,), generator=g))


def trainer(epochs: int, callbacks: list, **kwargs) -> pl.Trainer:
    options = dict(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    options.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **options)


@pytest.fixture(scope="module")
def fit_run(tmp_path_factory: pytest.TempPathFactory):
    """2 epochs (50 training samples in batches of 16, 16, 16, 2; 30 validation samples), eval recorded."""
    store = tmp_path_factory.mktemp("lightning") / "trace"
    module = Classifier()
    callback = StainingCallback(store, num_classes=3, record_eval=True)
    trainer(2, [callback]).fit(
        module, DataLoader(data(50, 1), batch_size=16), DataLoader(data(30, 2), batch_size=8)
    )
    return store, module, callback


def check_phase(store: Path, seen: dict, phase: str, epochs: int = 2) -> None:
    t = load_trace(store, phase=phase)
    assert t.epochs == list(range(epochs))
    for epoch in range(epochs):
        labels = np.concatenate(seen[f"{phase}_labels_{epoch}"])
        for name in LAYERS:
            rows = np.concatenate(seen[f"{phase}_{name}_{epoch}"]).astype(np.float64)
            got = t.query(f"E_{epoch}/L_net.{name}")
            for column, expected in numpy_stats(rows).items():
                assert_close(
                    got[column].to_numpy(), expected, err_msg=f"{phase} E_{epoch} net.{name} {column}"
                )
            classes = t.classes(f"E_{epoch}/L_net.{name}")
            counts, means = class_means(rows, labels, 3)
            got_counts = classes["act_count"].to_numpy().reshape(-1, 3)
            assert (got_counts == counts).all(), (phase, epoch, name)  # the real label counts, never 0
            assert_close(classes["act_mean"].to_numpy().reshape(-1, 3), means, rtol=1e-5, atol=1e-5)


def test_training_statistics_match_the_models_own_hooks(fit_run) -> None:
    store, module, _ = fit_run
    check_phase(store, {k: v for k, v in module.seen.items()}, "train")


def test_validation_passes_are_the_eval_phase(fit_run) -> None:
    store, module, _ = fit_run
    check_phase(store, module.seen, "eval")
    assert load_trace(store, phase="eval").query("E_0/L_net.2")["act_count"].iloc[0] == 30


def test_grad_norm_is_the_gradient_of_the_epochs_last_step(fit_run) -> None:
    store, module, _ = fit_run
    t = load_trace(store)
    for epoch in range(2):
        expected = np.linalg.norm(module.last_grad[epoch].astype(np.float64), axis=1)
        got = t.query(f"E_{epoch}/L_net.0")["grad_norm"].to_numpy()
        assert_close(got, expected, rtol=1e-5, atol=1e-7)
    assert module.net[0].weight.grad is None  # Lightning clears gradients before the epoch ends


def test_logged_metrics_are_filed_under_their_epoch(fit_run) -> None:
    store, module, _ = fit_run
    metrics = load_trace(store).metrics
    for epoch in range(2):
        for phase, name in (("eval", "val_loss"), ("train", "train_loss")):
            logits = np.concatenate(module.seen[f"{phase}_2_{epoch}"]).astype(np.float64)
            labels = np.concatenate(module.seen[f"{phase}_labels_{epoch}"])
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            expected = -logp[np.arange(len(labels)), labels].mean()
            assert metrics.loc[epoch, name] == pytest.approx(expected, rel=1e-5), (epoch, name)
        # logged in the module's own on_train_epoch_end, after the callback's: filed all the same
        assert metrics.loc[epoch, "epoch_marker"] == 100 + epoch


def test_the_trace_is_closed_after_fit(fit_run) -> None:
    _, module, callback = fit_run
    assert callback.trace is None
    assert not module._forward_pre_hooks  # the label feeder's pre-hook is gone
    assert len(module.net[0]._forward_hooks) == 1  # only the module's own capture hook is left


def test_default_label_extractor() -> None:
    y = torch.tensor([1, 0])
    assert default_labels((torch.zeros(2, 3), y)) is y
    assert default_labels([torch.zeros(2, 3), y, "extra"]) is y
    assert default_labels({"input_ids": torch.zeros(2, 3), "labels": y}) is y
    assert default_labels({"x": torch.zeros(2, 3), "y": y}) is y
    assert default_labels({"x": torch.zeros(2, 3)}) is None
    assert default_labels(torch.zeros(2, 3)) is None
    assert default_labels((torch.zeros(2, 3), "not a tensor")) is None


class DictClassifier(Classifier):
    """Batches are dicts without a standard label key: labels come from a user label_fn."""

    def training_step(self, batch, batch_idx):
        self.seen.setdefault(f"train_labels_{self.current_epoch}", []).append(batch["kind"].numpy().copy())
        return nn.functional.cross_entropy(self.net(batch["features"]), batch["kind"])


def dict_loader(n: int, seed: int) -> DataLoader:
    ds = data(n, seed)
    rows = [{"features": x, "kind": y} for x, y in zip(*ds.tensors)]
    return DataLoader(rows, batch_size=16)


def test_user_label_fn_and_submodule(tmp_path: Path) -> None:
    module = DictClassifier()
    callback = StainingCallback(
        tmp_path / "t", module="net", label_fn=lambda batch: batch["kind"], num_classes=3
    )
    trainer(1, [callback], limit_val_batches=0).fit(module, dict_loader(40, 3))
    t = load_trace(tmp_path / "t")
    assert t.layers == ["L_0", "L_1", "L_2"]  # the submodule's own names
    labels = np.concatenate(module.seen["train_labels_0"])
    counts = t.classes("E_0/L_2")["act_count"].to_numpy().reshape(-1, 3)[0]
    assert (counts == np.bincount(labels, minlength=3)).all()


def test_batches_without_labels_warn_and_record_no_classes(tmp_path: Path, caplog) -> None:
    module = DictClassifier()
    callback = StainingCallback(tmp_path / "t", module="net")
    with caplog.at_level(logging.WARNING, logger="nn_staining.integrations.lightning"):
        trainer(1, [callback], limit_val_batches=0).fit(module, dict_loader(20, 3))
    assert any("no labels found in a batch of type dict" in r.getMessage() for r in caplog.records)
    t = load_trace(tmp_path / "t")
    assert t.query("E_0/L_2")["act_count"].iloc[0] == 20
    assert t.classes("E_0/L_2").empty


def test_a_module_whose_forward_is_never_called_gets_a_warning(tmp_path: Path, caplog) -> None:
    """DictClassifier's training_step calls self.net(...), not self(...): the LightningModule's own
    forward never runs, so its labels would reach no pass."""
    callback = StainingCallback(tmp_path / "t", label_fn=lambda batch: batch["kind"], num_classes=3)
    with caplog.at_level(logging.WARNING, logger="nn_staining.integrations.lightning"):
        trainer(1, [callback], limit_val_batches=0).fit(DictClassifier(), dict_loader(20, 3))
    warnings = [r.getMessage() for r in caplog.records if "did not call the traced" in r.getMessage()]
    assert (
        len(warnings) == 1
        and "StainingCallback(module=...)" in warnings[0]
        and "children: net" in warnings[0]
    )


def test_unknown_submodule_is_an_error_naming_the_children(tmp_path: Path) -> None:
    callback = StainingCallback(tmp_path / "t", module="backbone")
    with pytest.raises(
        ValueError, match=r"module='backbone' names no submodule of Classifier; its children: net"
    ):
        trainer(1, [callback], limit_val_batches=0).fit(Classifier(), DataLoader(data(8, 0), batch_size=8))


class Crash(pl.Callback):
    """Kills the run in the middle of ``epoch`` (an exception, as a crash or preemption would)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.epoch and batch_idx == 2:
            raise RuntimeError("simulated crash")


def test_resume_from_a_checkpoint_continues_the_trace(tmp_path: Path) -> None:
    train, val = DataLoader(data(50, 1), batch_size=16), DataLoader(data(30, 2), batch_size=8)

    def run(store: Path, epochs: int, extra: list, ckpt_path: str | None = None, **kwargs) -> None:
        callback = StainingCallback(store, num_classes=3, record_eval=True)
        trainer(epochs, [callback, *extra], **kwargs).fit(Classifier(), train, val, ckpt_path=ckpt_path)

    run(tmp_path / "full", 4, [])
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, filename="{epoch}")
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "resumed", 4, [checkpoints, Crash(epoch=3)], enable_checkpointing=True)
    assert load_trace(tmp_path / "resumed").epochs == [0, 1, 2]  # epoch 3 died half-way: not written
    # restart from the checkpoint of epoch 1 (as if epoch 2's were lost): the stored epoch 2 is replaced
    run(tmp_path / "resumed", 4, [], ckpt_path=str(tmp_path / "ckpt" / "epoch=1.ckpt"))
    full, resumed = load_trace(tmp_path / "full"), load_trace(tmp_path / "resumed")
    assert resumed.epochs == full.epochs == [0, 1, 2, 3]
    a, b = full.query("E_*/L_*"), resumed.query("E_*/L_*")
    assert b.loc[2, "weight_delta_norm"].notna().loc[["L_net.0", "L_net.2"]].all()
    pd.testing.assert_frame_equal(a, b)
    pd.testing.assert_frame_equal(full.classes("E_*/L_*"), resumed.classes("E_*/L_*"))
    pd.testing.assert_frame_equal(full.metrics, resumed.metrics)


def test_ddp_two_processes_merge_into_whole_data_statistics(tmp_path: Path) -> None:
    """strategy="ddp_fork": 2 forked CPU ranks (gloo), each seeing half of 51 samples padded to 52.
    training_step calls self(x), so Lightning enters the LightningModule twice per step."""
    module = Classifier(save_dir=str(tmp_path))
    callback = StainingCallback(tmp_path / "trace", num_classes=3, record_eval=True)
    ddp = trainer(2, [callback], devices=2, strategy="ddp_fork")
    ddp.fit(module, DataLoader(data(51, 1), batch_size=8), DataLoader(data(51, 1), batch_size=8))
    ranks = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(2)]
    merged = {key: [r[key] for r in ranks] for key in ranks[0] if not key.startswith("grad_")}
    assert sum(len(r["train_labels_0"]) for r in ranks) == 52
    for phase in ("train", "eval"):
        check_phase(tmp_path / "trace", merged, phase)
        assert load_trace(tmp_path / "trace", phase=phase).query("E_0/L_net.0")["act_count"].iloc[0] == 52
    t = load_trace(tmp_path / "trace")
    for epoch in range(2):  # gradients are averaged over the ranks: the same on both
        np.testing.assert_array_equal(ranks[0][f"grad_{epoch}"], ranks[1][f"grad_{epoch}"])
        expected = np.linalg.norm(ranks[0][f"grad_{epoch}"].astype(np.float64), axis=1)
        assert_close(t.query(f"E_{epoch}/L_net.0")["grad_norm"].to_numpy(), expected, rtol=1e-5, atol=1e-7)
    assert not list((tmp_path / "trace").rglob(".*"))  # no temporary left behind


def readme_block(heading: str, language: str = "python", index: int = 0) -> str:
    """The ``index``-th fenced code block of README.md's section ``heading``."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, re.S)[index]


def test_readme_lightning_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(
        compile(readme_block("Training with Lightning or Hugging Face", index=0), "README.md", "exec"),
        namespace,
    )
    t = load_trace(tmp_path / "results" / "lightning_run")
    assert t.epochs == load_trace(tmp_path / "results" / "lightning_run", phase="eval").epochs == [0, 1, 2]
    classes = t.classes("E_0/L_net.0")["act_count"].to_numpy().reshape(-1, 2)[0]
    assert classes.sum() == 200 and (classes > 0).all()
    assert t.query("E_2/L_net.0")["grad_norm"].notna().all()
    assert "val_loss" in t.metrics.columns


def test_importing_without_lightning_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)  # import of a None entry raises ImportError
    monkeypatch.delitem(sys.modules, "nn_staining.integrations.lightning")
    with pytest.raises(ImportError, match=r"needs Lightning.*pip install lightning"):
        importlib.import_module("nn_staining.integrations.lightning")
