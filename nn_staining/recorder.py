"""``NetworkTrace``: records what happens inside an unmodified PyTorch model while it trains.

Forward hooks copy each recorded layer's output (and, for ``nn.Linear`` layers, its input) into
device buffers; :mod:`nn_staining.stats` reduces them; at each recorded epoch's end the
statistics, weights and biases go to the host once and are written as one Parquet part.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import platform
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .layers import OutputLayout, neuron_weights, output_layout, select_layers
from .stats import PhaseStats
from .store import FORMAT_NAME, FORMAT_VERSION, ROW_GROUP_ROWS, TraceWriter, build_table

log = logging.getLogger(__name__)

EpochIntervals = int | Sequence[int] | None


def epoch_rule(epoch_intervals: EpochIntervals, total_epochs: int | None) -> frozenset[int] | int | None:
    """Validate ``epoch_intervals``: None (every epoch), k > 0 (0, k, 2k, … and the last),
    -1 (the last only; needs ``total_epochs``) or a list of epochs."""
    valid = "None, a positive int k (every k-th epoch), -1 (the last epoch) or a list of epochs >= 0"
    if epoch_intervals is None:
        return None
    if isinstance(epoch_intervals, bool):
        raise ValueError(f"epoch_intervals={epoch_intervals!r} is not valid; use {valid}")
    if isinstance(epoch_intervals, int):
        if epoch_intervals > 0:
            return epoch_intervals
        if epoch_intervals == -1:
            if total_epochs is None:
                raise ValueError("epoch_intervals=-1 (record only the last epoch) needs total_epochs=")
            return frozenset({total_epochs - 1})
        raise ValueError(f"epoch_intervals={epoch_intervals!r} is not valid; use {valid}")
    try:
        epochs = list(epoch_intervals)
    except TypeError:
        raise ValueError(f"epoch_intervals={epoch_intervals!r} is not valid; use {valid}") from None
    bad = [e for e in epochs if isinstance(e, bool) or not isinstance(e, (int, np.integer)) or e < 0]
    if bad or not epochs:
        raise ValueError(f"epoch_intervals={epoch_intervals!r} is not valid ({bad or 'empty'}); use {valid}")
    return frozenset(int(e) for e in epochs)


class NetworkTrace:
    """Record per-epoch, per-layer, per-neuron statistics of ``model`` into a Parquet store.

    Use as a context manager; call :meth:`start_epoch` / :meth:`end_epoch` around each epoch
    (or ``with trace.epoch(e):``) and, optionally, :meth:`set_targets` before each forward pass
    for per-class statistics. Nothing in the model has to change.
    """

    def __init__(
        self,
        model: nn.Module,
        store: str | os.PathLike = "results/run",
        epoch_intervals: EpochIntervals = None,
        drop_batches: bool = True,
        layers: Sequence[str] | str | None = None,
        num_classes: int | None = None,
        *,
        total_epochs: int | None = None,
        record_eval: bool = False,
        record_weights: bool = True,
        class_names: Sequence[str] | None = None,
        overwrite: bool = False,
        config: dict[str, Any] | None = None,
    ) -> None:
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 1):
            raise ValueError(f"num_classes={num_classes!r} must be a positive int or None")
        self.model = model
        self.store = os.fspath(store)
        self._rule = epoch_rule(epoch_intervals, total_epochs)
        self.epoch_intervals = epoch_intervals
        self.total_epochs = total_epochs
        self.drop_batches = drop_batches
        self.record_eval = record_eval
        self.record_weights = record_weights
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.config = dict(config or {})
        self._modules = select_layers(model, layers)
        self._layer_patterns = layers
        self._writer = TraceWriter(self.store, overwrite=overwrite)
        self._layouts: dict[str, OutputLayout] = {}
        self._layer_info: dict[str, dict[str, Any]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._epoch: int | None = None
        self._phases: dict[str, PhaseStats] = {}
        self._targets: Tensor | None = None
        self._last_output: tuple[weakref.ref, str] | None = None
        self._previous_weights: dict[str, np.ndarray] = {}
        self._recorded: dict[str, list[int]] = {"train": [], "eval": []}
        self._metrics: dict[str, dict[str, Any]] = {}
        self._bytes_written = 0

    # -- context management --------------------------------------------------------------------
    def __enter__(self) -> NetworkTrace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook; an epoch left open is discarded (never half-written)."""
        self._detach()
        if self._epoch is not None:
            log.warning("epoch %d was started but not ended; it is not written", self._epoch)
        self._epoch = None
        self._phases = {}
        self._targets = None

    @property
    def layers(self) -> list[str]:
        """The keys of the layers selected for recording."""
        return list(self._modules)

    def is_recorded(self, epoch: int) -> bool:
        """Whether ``epoch`` is recorded under ``epoch_intervals``."""
        rule = self._rule
        if rule is None:
            return True
        if isinstance(rule, int):
            return epoch % rule == 0 or (self.total_epochs is not None and epoch == self.total_epochs - 1)
        return epoch in rule

    # -- training events -----------------------------------------------------------------------
    def start_epoch(self, epoch: int) -> None:
        """Begin ``epoch``: attach the hooks if it is recorded (a non-recorded epoch costs nothing)."""
        if self._epoch is not None:
            raise RuntimeError(
                f"start_epoch({epoch}) called while epoch {self._epoch} is still open; call end_epoch() first"
            )
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        epoch = int(epoch)
        if epoch in self._recorded["train"] or epoch in self._recorded["eval"]:
            raise ValueError(f"epoch {epoch} is already recorded in {self.store!r}")
        self._epoch = epoch
        self._targets = None
        if not self.is_recorded(epoch):
            return
        classes = self.num_classes or 0
        self._phases = {"train": PhaseStats(classes, keep_batches=not self.drop_batches)}
        if self.record_eval:
            self._phases["eval"] = PhaseStats(classes, keep_batches=not self.drop_batches)
        self._attach()

    @contextlib.contextmanager
    def epoch(self, epoch: int) -> Iterator[NetworkTrace]:
        """``with trace.epoch(e):`` — start_epoch on entry, end_epoch on a clean exit."""
        self.start_epoch(epoch)
        try:
            yield self
        except BaseException:
            self._detach()
            self._epoch = None
            self._phases = {}
            raise
        self.end_epoch()

    def set_targets(self, targets: Tensor) -> None:
        """Give the class labels of the next forward pass's batch (enables per-class statistics).

        Accepts (batch,) integer or 0/1 float labels, (batch, 1) or one-hot (batch, classes).
        Labels are checked against ``num_classes`` on the device and reported at ``end_epoch``.
        """
        if not isinstance(targets, Tensor):
            targets = torch.as_tensor(targets)
        if targets.dim() == 2 and targets.shape[1] > 1:
            targets = targets.argmax(1)
        elif targets.dim() > 1:
            targets = targets.reshape(targets.shape[0], -1)[:, 0] if targets.dim() == 2 else targets
        if targets.dim() != 1:
            raise ValueError(f"set_targets expects (batch,) labels, got shape {tuple(targets.shape)}")
        targets = targets.detach()
        if targets.dtype != torch.int64:
            targets = targets.to(torch.int64)
        if self.num_classes is None:
            self.num_classes = max(2, int(targets.max()) + 1) if targets.numel() else 2
            log.info(
                "num_classes inferred from the first labels: %d (pass num_classes= to fix it)",
                self.num_classes,
            )
            for stats in self._phases.values():
                if not stats.moments:
                    stats.num_classes = self.num_classes
        self._targets = targets

    def end_epoch(self) -> None:
        """Reduce the epoch, snapshot weights and biases and write the epoch's Parquet parts."""
        if self._epoch is None:
            raise RuntimeError(
                "end_epoch() called without start_epoch(); call trace.start_epoch(epoch) first"
            )
        epoch, phases = self._epoch, self._phases
        self._detach()
        self._epoch, self._phases, self._targets = None, {}, None
        if not phases:
            return
        invalid = []
        weights = self._weights_snapshot() if any(s.moments for s in phases.values()) else {}
        for phase, stats in phases.items():
            if not stats.moments:
                continue
            outputs, inputs = stats.finish()
            tables = self._epoch_tables(phase, outputs, inputs, weights)
            self._bytes_written += self._writer.write_epoch(epoch, phase, tables)
            self._recorded[phase].append(epoch)
            if stats.invalid_labels is not None:
                invalid.append((phase, int(stats.invalid_labels)))
        if weights:
            self._previous_weights = {k: w["weights"] for k, w in weights.items()}
        self._writer.write_meta(self._meta())
        never = [k for k in self._modules if k not in self._layouts]
        if never and epoch == min(self._recorded["train"] + self._recorded["eval"] or [epoch]):
            log.info("selected modules that produced no tensor output: %s", ", ".join(never))
        bad = [(p, n) for p, n in invalid if n]
        if bad:
            phase, n = bad[0]
            raise ValueError(
                f"epoch {epoch} ({phase}): {n} labels given to set_targets lie outside the classes "
                f"0..{self.num_classes - 1} (num_classes={self.num_classes}); those samples are missing "
                "from the per-class statistics. The epoch was written; pass the right num_classes="
            )

    def log_metrics(self, epoch: int | None = None, **values: Any) -> None:
        """Keep training metrics (loss, accuracy, a confusion matrix…) in ``meta.json`` beside the trace.

        ``epoch=None`` files them under the run as a whole; values must be JSON-serialisable.
        """
        key = "run" if epoch is None else str(int(epoch))
        self._metrics.setdefault(key, {}).update({k: _jsonable(v) for k, v in values.items()})
        if self._recorded["train"] or self._recorded["eval"]:
            self._writer.write_meta(self._meta())

    # -- hooks ---------------------------------------------------------------------------------
    def _attach(self) -> None:
        if self._handles:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward_start))
        self._handles.append(self.model.register_forward_hook(self._on_forward_end))
        for key, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(key)))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last_output = None

    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        phase = "train" if module.training else "eval"
        stats = self._phases.get(phase)
        if stats is not None:
            stats.start_batch(self._targets)

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        self._targets = None
        self._last_output = None

    def _make_hook(self, key: str):
        linear = isinstance(self._modules[key], nn.Linear)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            stats = self._phases.get("train" if module.training else "eval")
            if stats is None:
                return
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(out, Tensor) or not out.is_floating_point() or out.dim() == 0:
                return
            out = out.detach()
            layout = self._layouts.get(key) or self._discover(key, module, out)
            self._check_batch(key, stats, out, layout)
            if layout.channel_first:
                stats.add_mean(key, out, tuple(range(2, out.dim())))
            elif layout.batch_dim == 0:
                stats.add(key, out.reshape(-1, layout.neurons))
            else:
                stats.add(key, out.transpose(0, layout.batch_dim).reshape(-1, layout.neurons))
            if linear and args and isinstance(args[0], Tensor):
                self._record_inputs(key, stats, args[0])
            self._last_output = (weakref.ref(output if isinstance(output, Tensor) else out), key)

        return hook

    def _record_inputs(self, key: str, stats: PhaseStats, inputs: Tensor) -> None:
        stats.add(key, inputs.detach().reshape(-1, inputs.shape[-1]), inputs=True)

    def _check_batch(self, key: str, stats: PhaseStats, out: Tensor, layout: OutputLayout) -> None:
        labels = stats.batch_size_of_labels()
        if labels is None or self._targets is None:
            return
        batch = out.shape[layout.batch_dim] if out.dim() > 1 else out.shape[0]
        if batch != labels:
            self._targets = None
            stats.start_batch(None)
            raise ValueError(
                f"set_targets got {labels} labels but layer {key!r} saw a batch of {batch} samples; "
                "call set_targets(y) with the labels of the batch passed to the model"
            )

    def _discover(self, key: str, module: nn.Module, out: Tensor) -> OutputLayout:
        previous = None
        if self._last_output is not None:
            ref, prev_key = self._last_output
            prev = ref()
            if prev is not None:
                previous = (self._layouts[prev_key], tuple(prev.shape))
        layout = output_layout(module, out, *(previous or (None, None)))
        self._layouts[key] = layout
        weight, bias = neuron_weights(module, layout.neurons)
        self._layer_info[key] = {
            "key": key,
            "module": key[2:] if key != "L_model" else "",
            "type": type(module).__name__,
            "neurons": layout.neurons,
            "kind": "channels" if layout.channel_first else "features",
            "params": {name: list(p.shape) for name, p in module.named_parameters(recurse=False)},
            "in_features": module.in_features if isinstance(module, nn.Linear) else None,
            "has_weights": weight is not None,
            "has_bias": bias is not None,
            "activation": _activation_name(module),
        }
        return layout

    # -- epoch output --------------------------------------------------------------------------
    def _ordered_layers(self) -> list[str]:
        return [k for k in self._modules if k in self._layouts]

    def _weights_snapshot(self) -> dict[str, dict[str, np.ndarray | None]]:
        """Host copies of each recorded layer's per-neuron weights, bias and gradient norms."""
        snapshot = {}
        for key in self._ordered_layers():
            layout = self._layouts[key]
            weight, bias = neuron_weights(self._modules[key], layout.neurons)
            if weight is None and bias is None:
                continue
            entry: dict[str, np.ndarray | None] = {"weights": None, "bias": None, "grad_norm": None}
            with torch.no_grad():
                if weight is not None:
                    w = weight.detach().reshape(layout.neurons, -1).to("cpu", torch.float32)
                    entry["weights"] = w.numpy().copy()
                    if weight.grad is not None:
                        g = weight.grad.detach().reshape(layout.neurons, -1).to(torch.float32)
                        entry["grad_norm"] = torch.linalg.vector_norm(g, dim=1).cpu().numpy()
                if bias is not None:
                    entry["bias"] = bias.detach().to("cpu", torch.float32).numpy().copy()
            snapshot[key] = entry
        return snapshot

    def _epoch_tables(self, phase: str, outputs: dict, inputs: dict, weights: dict) -> dict:
        """Build the epoch's Arrow tables (neurons, classes, inputs, batches) column by column."""
        dictionary = self._ordered_layers()
        order = [k for k in dictionary if k in outputs]
        code = {k: i for i, k in enumerate(dictionary)}
        sizes = [self._layouts[k].neurons for k in order]
        cat = np.concatenate
        neurons: dict[str, Any] = {
            "phase": phase,
            "layer": np.repeat([code[k] for k in order], sizes).astype(np.int32),
            "neuron": cat([np.arange(n, dtype=np.int32) for n in sizes]),
        }
        for column in (
            "act_count",
            "act_mean",
            "act_std",
            "act_min",
            "act_max",
            "act_active_frac",
            "act_nan_count",
        ):
            neurons[column] = cat([outputs[k][column] for k in order])
        neurons.update(self._weight_columns(order, sizes, weights))
        tables = {"neurons": build_table("neurons", neurons, dictionary)}
        if self.num_classes and any("class_mean" in outputs[k] for k in order):
            tables["classes"] = build_table(
                "classes", self._class_columns(phase, order, sizes, outputs, code), dictionary
            )
            if inputs:
                tables["inputs"] = build_table("inputs", self._input_columns(phase, inputs, code), dictionary)
        if not self.drop_batches and any("batches" in outputs[k] for k in order):
            tables["batches"] = build_table(
                "batches", self._batch_columns(phase, order, outputs, code), dictionary
            )
        return tables

    def _weight_columns(self, order: list[str], sizes: list[int], weights: dict) -> dict[str, Any]:
        def column(fn, dtype=np.float32) -> np.ma.MaskedArray:
            parts = []
            for key, n in zip(order, sizes):
                value = fn(key, weights.get(key)) if key in weights else None
                parts.append(np.ma.masked_all(n, dtype) if value is None else np.ma.asarray(value, dtype))
            return np.ma.concatenate(parts)

        def w(key, entry):
            return entry["weights"]

        def stat(reduce):
            return lambda key, e: None if e["weights"] is None else reduce(e["weights"])

        def delta(key, e):
            prev = self._previous_weights.get(key)
            if e["weights"] is None or prev is None or prev.shape != e["weights"].shape:
                return None
            return np.linalg.norm(e["weights"] - prev, axis=1)

        columns: dict[str, Any] = {
            "bias": column(lambda k, e: e["bias"]),
            "weight_norm": column(stat(lambda a: np.linalg.norm(a, axis=1))),
            "weight_mean": column(stat(lambda a: a.mean(axis=1))),
            "weight_delta_norm": column(delta),
            "grad_norm": column(lambda k, e: e["grad_norm"]),
        }
        if self.record_weights and any(weights.get(k, {}).get("weights") is not None for k in order):
            lengths, values, missing = [], [], []
            for key, n in zip(order, sizes):
                wk = weights.get(key, {}).get("weights")
                lengths.append(np.full(n, 0 if wk is None else wk.shape[1], dtype=np.int64))
                missing.append(np.full(n, wk is None))
                if wk is not None:
                    values.append(wk.reshape(-1))
            offsets = np.concatenate([[0], np.cumsum(np.concatenate(lengths))])
            columns["weights"] = (offsets, np.concatenate(values), np.concatenate(missing))
        return columns

    def _class_columns(self, phase, order, sizes, outputs, code) -> dict[str, Any]:
        c = self.num_classes
        cat = np.concatenate
        return {
            "phase": phase,
            "layer": np.repeat([code[k] for k in order], [n * c for n in sizes]).astype(np.int32),
            "neuron": cat([np.repeat(np.arange(n, dtype=np.int32), c) for n in sizes]),
            "class": np.tile(np.arange(c, dtype=np.int32), sum(sizes)),
            "act_count": cat([np.tile(outputs[k]["class_count"], n) for k, n in zip(order, sizes)]),
            "act_mean": cat([outputs[k]["class_mean"].T.reshape(-1) for k in order]),
        }

    def _input_columns(self, phase, inputs, code) -> dict[str, Any]:
        c = self.num_classes
        keys = [k for k in self._ordered_layers() if k in inputs]
        widths = [inputs[k]["class_mean"].shape[1] for k in keys]
        cat = np.concatenate
        return {
            "phase": phase,
            "layer": np.repeat([code[k] for k in keys], [w * c for w in widths]).astype(np.int32),
            "feature": cat([np.repeat(np.arange(w, dtype=np.int32), c) for w in widths]),
            "class": np.tile(np.arange(c, dtype=np.int32), sum(widths)),
            "count": cat([np.tile(inputs[k]["class_count"], w) for k, w in zip(keys, widths)]),
            "mean": cat([inputs[k]["class_mean"].T.reshape(-1) for k in keys]),
        }

    def _batch_columns(self, phase, order, outputs, code) -> dict[str, Any]:
        parts: dict[str, list[np.ndarray]] = {name: [] for name in ("layer", "batch", "neuron", "stats")}
        for key in order:
            stats = outputs[key].get("batches")
            if stats is None:
                continue
            nb, f = stats.shape[1], stats.shape[2]
            parts["layer"].append(np.full(nb * f, code[key], dtype=np.int32))
            parts["batch"].append(np.repeat(np.arange(nb, dtype=np.int32), f))
            parts["neuron"].append(np.tile(np.arange(f, dtype=np.int32), nb))
            parts["stats"].append(stats.reshape(5, -1))
        stats = np.concatenate(parts["stats"], axis=1)
        return {
            "phase": phase,
            "layer": np.concatenate(parts["layer"]),
            "batch": np.concatenate(parts["batch"]),
            "neuron": np.concatenate(parts["neuron"]),
            "act_count": stats[0].astype(np.int64),
            "act_mean": stats[1],
            "act_std": stats[2],
            "act_min": stats[3],
            "act_max": stats[4],
        }

    def _meta(self) -> dict[str, Any]:
        layers, offset = [], 0
        input_offset = 0
        for key in self._ordered_layers():
            info = dict(self._layer_info[key], row_offset=offset)
            offset += info["neurons"]
            if info["in_features"] is not None:
                info["input_offset"] = input_offset
                input_offset += info["in_features"]
            layers.append(info)
        return {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": {"class": type(self.model).__name__, "repr": repr(self.model)[:4000]},
            "layers": layers,
            "num_neurons": offset,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "epochs": {phase: sorted(e) for phase, e in self._recorded.items()},
            "row_group_size": ROW_GROUP_ROWS,
            "metrics": self._metrics,
            "config": {
                "epoch_intervals": self.epoch_intervals
                if not isinstance(self.epoch_intervals, (set, frozenset, tuple))
                else sorted(self.epoch_intervals),
                "total_epochs": self.total_epochs,
                "drop_batches": self.drop_batches,
                "record_eval": self.record_eval,
                "record_weights": self.record_weights,
                "layers": self._layer_patterns,
                **self.config,
            },
            "versions": {
                "nn_staining": __version__,
                "torch": torch.__version__,
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }

    # -- reading back --------------------------------------------------------------------------
    def load(self):
        """The trace written so far (the completed epochs), as :func:`nn_staining.load_trace` gives it."""
        from .trace import load_trace

        return load_trace(self.store)

    def __getitem__(self, signature: str):
        """Answer a signature from the completed epochs, e.g. ``trace["E_0/L_hidden_1/n_20"]``."""
        return self.load()[signature]


Network_Trace = NetworkTrace


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values as plain Python numbers and lists."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _activation_name(module: nn.Module) -> str | None:
    """The activation a module applies, when it is one (used to judge saturation)."""
    names = {
        nn.ReLU: "relu",
        nn.Tanh: "tanh",
        nn.Sigmoid: "sigmoid",
        nn.GELU: "gelu",
        nn.LeakyReLU: "leaky_relu",
        nn.ELU: "elu",
        nn.Softmax: "softmax",
        nn.Hardtanh: "hardtanh",
        nn.SiLU: "silu",
    }
    for cls, name in names.items():
        if isinstance(module, cls):
            return name
    return None
