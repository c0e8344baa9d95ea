"""The default pipeline behind ``main.py``: train a demo model on a bundled data set while recording it."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoints import CHECKPOINTS, checkpoint_epochs
from .data import load_dataset
from .intervene import INTERVENTIONS
from .models import build_model
from .recorder import NetworkTrace

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Every setting of a pipeline run (``python main.py --help`` lists them)."""

    dataset: str = "breast_cancer"
    model: str = "simple"
    epochs: int = 30
    hidden: int = 64
    lr: float = 1e-3
    batch_size: int = 32
    seed: int = 0
    epoch_intervals: int | list[int] | None = None
    keep_batches: bool = False
    record_eval: bool = False
    output_dir: str = "results"
    run_name: str | None = None
    figures: bool = True
    checkpoints: bool = True
    interventions: bool = True
    probe: int = 256  # held-out samples run as the probe set at each recorded epoch (0: none)

    @property
    def store(self) -> Path:
        """``<output_dir>/<run_name>``; the default name is the data set (with ``_cnn`` for the CNN)."""
        default = self.dataset if self.model == "simple" else f"{self.dataset}_{self.model}"
        return Path(self.output_dir) / (self.run_name or default)

    def validate(self) -> None:
        """Raise ``ValueError`` naming a bad setting, before anything on disk is replaced."""
        if self.run_name is not None:
            check_run_name(self.run_name)
        for name in ("epochs", "hidden", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr!r} must be positive")
        if self.probe < 0:
            raise ValueError(f"probe={self.probe!r} must be a sample count >= 0 (0: no probe set)")


def check_run_name(name: str) -> str:
    """``name`` when it is a plain folder name, the run's folder inside ``output_dir``; otherwise a
    ``ValueError`` (an empty name, ``.``, ``..`` or a path would replace or write outside a run)."""
    if not isinstance(name, str) or not name.strip():
        problem = "it is empty"
    elif name in (".", ".."):
        problem = "it names the output folder or its parent"
    elif any(c in name for c in "/\\\0"):
        problem = "it is a path, not a name"
    else:
        return name
    raise ValueError(
        f"run_name {name!r} is not a plain folder name ({problem}); give a name such as 'moons_wide', "
        "which becomes <output-dir>/<run-name>"
    )


@dataclass
class EpochResult:
    """Loss and accuracies of one epoch, handed to the progress callback."""

    epoch: int
    loss: float
    train_acc: float
    test_acc: float
    test_loss: float
    recorded: bool


@dataclass
class RunResult:
    """Where the run's trace is, its per-epoch losses and accuracies, and the held-out confusion matrix."""

    config: RunConfig
    store: Path
    history: list[EpochResult] = field(default_factory=list)
    confusion: np.ndarray | None = None


def run_pipeline(config: RunConfig, on_epoch: Callable[[EpochResult], None] | None = None) -> RunResult:
    """Train ``config.model`` on ``config.dataset``, recording it into ``config.store`` (replacing
    a run already there, its figures included)."""
    config.validate()
    torch.manual_seed(config.seed)
    data = load_dataset(config.dataset, seed=config.seed)
    x_train, x_test = data.x_train, data.x_test
    if config.model == "cnn":
        if data.image_shape is None:
            raise ValueError(
                f"model 'cnn' needs an image data set; {config.dataset!r} is tabular (use digits)"
            )
        x_train, x_test = x_train.reshape(-1, *data.image_shape), x_test.reshape(-1, *data.image_shape)
    model = build_model(config.model, data.num_features, data.num_classes, config.hidden)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(config.seed)
    result = RunResult(config, config.store)
    replacing = (config.store / "meta.json").exists()
    trace = NetworkTrace(
        model,
        config.store,
        epoch_intervals=config.epoch_intervals,
        drop_batches=not config.keep_batches,
        num_classes=data.num_classes,
        total_epochs=config.epochs,
        record_eval=config.record_eval,
        class_names=data.class_names,
        overwrite=True,
        record_checkpoints=config.checkpoints,
        probe=(x_test[: config.probe], data.y_test[: config.probe]) if config.probe else None,
        config={
            "pipeline": _config_dict(config),
            "feature_names": data.feature_names,
            "image_shape": list(data.image_shape) if data.image_shape else None,
        },
    )
    if replacing:  # figures, checkpoints and interventions of the replaced run
        for folder in ("figures", CHECKPOINTS, INTERVENTIONS):
            shutil.rmtree(config.store / folder, ignore_errors=True)
    with trace:
        for epoch in range(config.epochs):
            trace.start_epoch(epoch)
            model.train()
            order = torch.randperm(len(x_train), generator=generator)
            total_loss, correct = 0.0, 0
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                xb, yb = x_train[idx], data.y_train[idx]
                trace.set_targets(yb)
                logits = model(xb)
                loss = loss_fn(logits, yb)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total_loss += loss.detach() * len(idx)
                correct += (logits.argmax(1) == yb).sum()
            test_loss, test_acc, predictions = _evaluate(model, x_test, data.y_test, loss_fn, trace)
            trace.end_epoch()
            epoch_result = EpochResult(
                epoch,
                float(total_loss) / len(order),
                float(correct) / len(order),
                test_acc,
                test_loss,
                trace.is_recorded(epoch),
            )
            trace.log_metrics(
                epoch,
                loss=epoch_result.loss,
                train_acc=epoch_result.train_acc,
                test_loss=test_loss,
                test_acc=test_acc,
            )
            result.history.append(epoch_result)
            if on_epoch is not None:
                on_epoch(epoch_result)
        result.confusion = _confusion(predictions, data.y_test.numpy(), data.num_classes)
        trace.log_metrics(None, test_confusion=result.confusion, dataset=config.dataset)
    if config.interventions:
        measure_interventions(model, config.store, x_test, data.y_test, over_training=config.checkpoints)
    return result


def measure_interventions(
    model: nn.Module, store: Path, x: torch.Tensor, y: torch.Tensor, over_training: bool = True
) -> None:
    """The causal check of the stains on held-out ``(x, y)``, stored in ``<store>/interventions/``:
    ``stain_effects`` at up to ``MAX_EFFECT_EPOCHS`` evenly spaced epochs with a checkpoint (the first
    and the last among them; or the last epoch alone), ``neuron_effects`` at the last."""
    from . import intervene
    from .trace import load_trace

    t = load_trace(store)
    if not t.num_classes or not t.epochs:
        return
    saved = checkpoint_epochs(t)
    epochs = _spread(saved, MAX_EFFECT_EPOCHS) if over_training and saved else -1
    intervene.save_effects(t, intervene.stain_effects(model, t, x, y, epoch=epochs))
    intervene.save_effects(t, intervene.neuron_effects(model, t, x, y), name="neuron_effects")


#: Each epoch of the causal check ablates every layer's stains and controls; a few epochs show the trend.
MAX_EFFECT_EPOCHS = 8


def _spread(epochs: list[int], most: int) -> list[int]:
    """At most ``most`` of ``epochs``, evenly spaced, always with the first and the last."""
    if len(epochs) <= most:
        return list(epochs)
    picks = sorted({round(i * (len(epochs) - 1) / (most - 1)) for i in range(most)})
    return [epochs[i] for i in picks]


def _evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn, trace: NetworkTrace):
    """Held-out loss, accuracy and predictions (eval mode: recorded only with record_eval)."""
    model.eval()
    with torch.no_grad():
        trace.set_targets(y)
        logits = model(x)
    model.train()
    predictions = logits.argmax(1)
    return float(loss_fn(logits, y)), float((predictions == y).float().mean()), predictions.numpy()


def _confusion(predictions: np.ndarray, labels: np.ndarray, classes: int) -> np.ndarray:
    matrix = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


def _config_dict(config: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(config).items()}
