"""``NetworkTrace``: records what happens inside an unmodified PyTorch model while it trains.

Forward hooks copy each recorded layer's output (and, for ``nn.Linear`` layers, its input) into
device buffers; :mod:`nn_staining.stats` reduces them; at each recorded epoch's end the
statistics, weights and biases go to the host once and are written as one Parquet part.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from . import __version__
from .layers import OutputLayout, neuron_weights, output_layout, select_layers
from .stats import ChunkPool, PhaseStats
from .store import FORMAT_NAME, FORMAT_VERSION, ROW_GROUP_ROWS, TraceWriter
from .tables import epoch_tables

if TYPE_CHECKING:
    from .trace import Trace

log = logging.getLogger(__name__)
_NO_PASS = object()  # no forward of the whole model has started in this epoch yet

EpochIntervals = int | Sequence[int] | None
#: Epochs handed to the writer thread and not yet on disk before end_epoch waits for the oldest.
MAX_PENDING_WRITES = 2


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
        background: bool = True,
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
        self.config = {str(k): _jsonable(v) for k, v in (config or {}).items()}
        try:
            json.dumps(self.config)
        except TypeError as exc:
            raise TypeError(f"config values must be JSON-serialisable: {exc}") from None
        self._modules = select_layers(model, layers)
        self._layer_patterns = layers
        self._writer = TraceWriter(self.store, overwrite=overwrite)
        self._layouts: dict[str, OutputLayout] = {}
        self._layer_info: dict[str, dict[str, Any]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._epoch: int | None = None
        self._phases: dict[str, PhaseStats] = {}
        self._targets: Tensor | None = None
        self._last_output: tuple[weakref.ref, str, int] | None = None
        self._current: PhaseStats | None | object = _NO_PASS
        self._fired: dict[str, int] = {}
        self._no_alias: set[tuple[str, str]] = set()
        self._width_warned: set[str] = set()
        self._previous_weights: dict[str, np.ndarray] = {}
        self._recorded: dict[str, list[int]] = {"train": [], "eval": []}
        self._started: set[int] = set()
        self._pool = ChunkPool()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nn_staining") if background else None
        self._jobs: list[Future] = []
        self._write_error: BaseException | None = None
        self._created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._metrics: dict[str, dict[str, Any]] = {}
        # an empty but valid trace from the start: a crash before the first epoch leaves a store
        # that loads (no epochs) and that overwrite=True may replace
        self._writer.write_meta(self._meta())

    # -- context management --------------------------------------------------------------------
    def __enter__(self) -> NetworkTrace:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove every hook and finish writing; an epoch left open is discarded (never half-written)."""
        self._detach()
        if self._epoch is not None:
            log.warning("epoch %d was started but not ended; it is not written", self._epoch)
        self._epoch = None
        self._phases = {}
        self._targets = None
        self._pool = ChunkPool()  # free the device buffers
        try:
            self.flush()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None

    def flush(self) -> None:
        """Wait until every ended epoch is on disk; re-raises an error met while writing one."""
        jobs, self._jobs = self._jobs, []
        for job in jobs:
            job.result()

    def _raise_finished_errors(self) -> None:
        while self._jobs and self._jobs[0].done():
            self._jobs.pop(0).result()

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
        if epoch in self._started:
            raise ValueError(f"epoch {epoch} is already recorded in {self.store!r}")
        self._epoch = epoch
        self._targets = None
        if not self.is_recorded(epoch):
            return
        self._started.add(epoch)
        phases = ("train", "eval") if self.record_eval else ("train",)
        self._phases = {
            phase: PhaseStats(self.num_classes or 0, not self.drop_batches, self._pool) for phase in phases
        }
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

        Accepts (batch,) integer or 0/1 float labels, (batch, 1), or one-hot / probability
        (batch, classes) rows. Negative labels (``ignore_index``) count as unlabelled; labels
        ``>= num_classes`` are counted on the device and reported at ``end_epoch``.
        """
        if not self._phases:  # not a recorded epoch: nothing to do
            return
        if not isinstance(targets, Tensor):
            targets = torch.as_tensor(targets)
        if targets.dim() == 2 and targets.shape[1] == 1:
            targets = targets[:, 0]
        elif targets.dim() == 2:  # one-hot (F.one_hot gives int64) or class probabilities
            targets = targets.argmax(1)
        if targets.dim() != 1:
            raise ValueError(
                f"set_targets expects one label per sample, (batch,) or one-hot (batch, classes); "
                f"got shape {tuple(targets.shape)} of {targets.dtype}"
            )
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
        """Reduce the epoch, snapshot weights and biases, and write the epoch's Parquet parts.

        The statistics reach the host here, once. Labels outside ``num_classes`` raise ``ValueError``
        after the epoch is handed to the writer. Building the tables and writing Parquet runs on a
        worker thread (no tensor work there); :meth:`flush` or :meth:`close` waits for it.
        """
        if self._epoch is None:
            raise RuntimeError(
                "end_epoch() called without start_epoch(); call trace.start_epoch(epoch) first"
            )
        self._check_aliases()
        epoch, phases = self._epoch, {p: s for p, s in self._phases.items() if s.has_rows}
        self._detach()
        self._epoch, self._phases, self._targets = None, {}, None
        self._raise_finished_errors()
        if not phases:
            return
        label_checks = {phase: stats.label_check() for phase, stats in phases.items()}
        results = {phase: stats.finish() for phase, stats in phases.items()}
        results = {phase: result for phase, result in results.items() if result[0]}
        if results:
            weights = self._weights_snapshot()
            while len(self._jobs) >= MAX_PENDING_WRITES:  # back-pressure: memory stays flat
                self._jobs.pop(0).result()
            for phase in results:
                self._recorded[phase].append(epoch)
            # everything the writer needs is handed over: it reads no state the training thread changes
            args = (epoch, results, weights, self._ordered_layers(), self.num_classes or 0, self._meta())
            self._jobs.append(self._submit(self._write_epoch, *args))
        for phase, check in label_checks.items():
            if check is not None and check[0]:
                bad, low, high = check
                raise ValueError(
                    f"epoch {epoch} ({phase}): {bad} labels given to set_targets lie outside the classes "
                    f"0..{self.num_classes - 1} (num_classes={self.num_classes}; labels seen from {low} to "
                    f"{high}); those samples are missing from the per-class statistics. The epoch was "
                    "still written; pass the right num_classes="
                )

    def _submit(self, fn: Callable[..., None], *args: Any) -> Future:
        """Run ``fn`` on the writer thread (inline, raising at once, with ``background=False``).

        After a failed write nothing more is written, so ``meta.json`` never lists an epoch whose
        parts are missing, and every later write reports the first failure.
        """

        def guarded() -> None:
            if self._write_error is not None:
                raise RuntimeError(
                    f"not written: an earlier write to {self.store!r} failed"
                ) from self._write_error
            try:
                fn(*args)
            except BaseException as exc:
                self._write_error = exc
                raise

        if self._executor is None:
            guarded()
            future: Future = Future()
            future.set_result(None)
            return future
        return self._executor.submit(guarded)

    def _write_epoch(
        self,
        epoch: int,
        results: dict[str, tuple[dict, dict]],
        weights: dict[str, dict[str, Tensor | None]],
        dictionary: list[str],
        num_classes: int,
        meta: dict[str, Any],
    ) -> None:
        """Build and write the epoch's tables, then ``meta.json`` (runs on the writer thread)."""
        weights = {
            key: {name: None if t is None else t.numpy() for name, t in entry.items()}
            for key, entry in weights.items()
        }
        for phase, (outputs, inputs) in results.items():
            tables = epoch_tables(
                phase,
                dictionary,
                outputs,
                inputs,
                weights,
                self._previous_weights,
                num_classes,
                self.record_weights,
            )
            self._writer.write_epoch(epoch, phase, tables)
        self._previous_weights = {k: w["weights"] for k, w in weights.items() if w["weights"] is not None}
        self._writer.write_meta(meta)

    def log_metrics(self, epoch: int | None = None, **values: Any) -> None:
        """Keep training metrics (loss, accuracy, a confusion matrix…) in ``meta.json`` beside the trace.

        ``epoch=None`` files them under the run as a whole; values must be JSON-serialisable.
        """
        key = "run" if epoch is None else str(int(epoch))
        converted = {k: _jsonable(v) for k, v in values.items()}
        try:
            json.dumps(converted)
        except TypeError as exc:
            raise TypeError(f"log_metrics values must be JSON-serialisable: {exc}") from None
        self._metrics.setdefault(key, {}).update(converted)
        if self._recorded["train"] or self._recorded["eval"]:
            self._jobs.append(self._submit(self._writer.write_meta, self._meta()))

    # -- hooks ---------------------------------------------------------------------------------
    def _attach(self) -> None:
        if self._handles:
            return
        self._current, self._fired = _NO_PASS, {}
        self._handles.append(self.model.register_forward_pre_hook(self._on_forward_start))
        for key, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(key)))
        # after the layers' hooks: when the model itself is a layer, its hook still sees the pass
        self._handles.append(self.model.register_forward_hook(self._on_forward_end))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._last_output = None

    def _on_forward_start(self, module: nn.Module, args: Any) -> None:
        """A new batch: its phase is the model's mode (a frozen submodule in eval mode stays in the
        training record); the labels given by set_targets serve this one pass."""
        self._check_aliases()
        stats = self._phase_stats(module)
        self._current = stats
        self._fired = {}
        if stats is not None:
            stats.start_batch(self._targets)
        self._targets = None
        self._last_output = None

    def _phase_stats(self, module: nn.Module) -> PhaseStats | None:
        """The statistics of the phase ``module``'s mode selects (None when it is not recorded)."""
        return self._phases.get("train" if module.training else "eval")

    def _on_forward_end(self, module: nn.Module, args: Any, output: Any) -> None:
        """The model's pass is over: modules called on their own from now on make their own batches."""
        self._check_aliases()
        self._current, self._fired = _NO_PASS, {}

    def _make_hook(self, key: str) -> Callable[[nn.Module, tuple, Any], None]:
        """The forward hook of layer ``key``: copy its output (and a Linear's input) into the buffers."""
        linear = isinstance(self._modules[key], nn.Linear)
        layouts = self._layouts

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if _recomputing_in_backward():  # activation checkpointing replays the forward: seen once
                return
            stats = self._current
            direct = stats is _NO_PASS
            if direct:  # a module called outside a forward of the whole model
                stats = self._phase_stats(module)
            if stats is None:
                return
            if direct and (not self._fired or key in self._fired):  # a new call of the submodules
                stats.start_batch(self._targets)
                self._targets, self._fired = None, {}
            raw = output if isinstance(output, Tensor) else _first_tensor(output)
            if raw is None or not raw.is_floating_point() or raw.dim() == 0:
                return
            out = raw.detach()
            layout = layouts.get(key) or self._discover(key, module, out)
            if layout.width(out) != layout.neurons:
                self._warn_width(key, layout, out)
                return
            if stats._pending_labels is not None:
                self._check_batch(key, stats, out, layout)
            if layout.channel_first:
                stats.add_mean(key, out, layout.spatial_dims(out))
            else:
                stats.add(key, layout.rows(out))
            if linear and stats.num_classes and args and isinstance(args[0], Tensor):
                self._record_inputs(key, stats, args[0], alias=not direct)
            self._last_output = (weakref.ref(raw), key, _version(raw))
            self._fired[key] = self._fired.get(key, 0) + 1

        return hook

    def _record_inputs(self, key: str, stats: PhaseStats, inputs: Tensor, alias: bool = True) -> None:
        """Class-conditional input means for pathways; reuses the previous layer's statistics when
        its output, unchanged and produced once this pass, is this layer's input."""
        source = None
        last = self._last_output
        if (
            alias
            and last is not None
            and last[0]() is inputs
            and _version(inputs) == last[2] != -1
            and self._fired.get(last[1]) == 1
            and (key, last[1]) not in self._no_alias
            and not self._layouts[last[1]].channel_first
            and self._layouts[last[1]].batch_dim == 0
        ):
            source = last[1]
        if stats.input_source(key, source) == "copy":  # laid out like the layer's own output rows
            stats.add(key, self._layouts[key].rows(inputs.detach(), inputs.shape[-1]), inputs=True)

    def _check_aliases(self) -> None:
        """After a pass: a source layer that fired twice (a shared module) cannot stand for the
        input of a layer that reused its statistics; that layer loses its input statistics this
        epoch and copies its input from the next epoch on."""
        stats = self._current
        if stats is _NO_PASS or stats is None:
            return
        for layer, source in list(stats.aliases.items()):
            if source is not None and self._fired.get(source, 0) > 1:
                stats.drop_inputs(layer)
                self._no_alias.add((layer, source))
                log.warning(
                    "inputs of %s are not recorded this epoch: %s fired twice in a pass", layer, source
                )

    def _warn_width(self, key: str, layout: OutputLayout, out: Tensor) -> None:
        if key not in self._width_warned:
            self._width_warned.add(key)
            log.warning(
                "%s produced %d neurons where its first output had %d (a module called at several widths); "
                "only calls of the first width are recorded",
                key,
                layout.width(out),
                layout.neurons,
            )

    def _check_batch(self, key: str, stats: PhaseStats, out: Tensor, layout: OutputLayout) -> None:
        labels = stats.pending_labels()
        if labels is None:
            return
        batch = out.shape[layout.batch_dim] if out.dim() > 1 else out.shape[0]
        if batch != labels:
            self._targets = None
            stats.drop_labels()
            raise ValueError(
                f"set_targets got {labels} labels but layer {key!r} saw a batch of {batch} samples; "
                "call set_targets(y) with the labels of the batch passed to the model"
            )

    def _discover(self, key: str, module: nn.Module, out: Tensor) -> OutputLayout:
        previous = None
        if self._last_output is not None:
            ref, prev_key, _ = self._last_output
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

    def _weights_snapshot(self) -> dict[str, dict[str, Tensor | None]]:
        """Host copies of each recorded layer's per-neuron weights, bias and weight-gradient norms."""
        snapshot = {}
        with torch.no_grad():
            for key in self._ordered_layers():
                neurons = self._layouts[key].neurons
                weight, bias = neuron_weights(self._modules[key], neurons)
                if weight is None and bias is None:
                    continue
                entry: dict[str, Tensor | None] = {"weights": None, "bias": None, "grad_norm": None}
                if weight is not None:
                    entry["weights"] = _host_copy(weight.reshape(neurons, -1))
                    if weight.grad is not None:
                        grad = weight.grad.detach().reshape(neurons, -1).to(torch.float32)
                        entry["grad_norm"] = _host_copy(torch.linalg.vector_norm(grad, dim=1))
                if bias is not None:
                    entry["bias"] = _host_copy(bias)
                snapshot[key] = entry
        return snapshot

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
            "created": self._created,
            "updated": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": {"class": type(self.model).__name__, "repr": repr(self.model)[:4000]},
            "layers": layers,
            "num_neurons": offset,
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "epochs": {phase: sorted(e) for phase, e in self._recorded.items()},
            "row_group_size": ROW_GROUP_ROWS,
            "metrics": {key: dict(values) for key, values in self._metrics.items()},
            "config": {
                "epoch_intervals": _jsonable_intervals(self.epoch_intervals),
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
    def load(self) -> Trace:
        """The trace written so far (the completed epochs), as :func:`nn_staining.load_trace` gives it."""
        from .trace import load_trace

        self.flush()
        return load_trace(self.store)

    def __getitem__(self, signature: str) -> Any:
        """Answer a signature from the completed epochs, e.g. ``trace["E_0/L_hidden_1/n_20"]``."""
        return self.load()[signature]


Network_Trace = NetworkTrace


def _version(tensor: Tensor) -> int:
    """The tensor's in-place version counter (-1 for inference tensors, which keep none)."""
    return -1 if tensor.is_inference() else tensor._version


def _recomputing_in_backward() -> bool:
    """Whether autograd's engine is running (a checkpointed forward being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def _first_tensor(output: Any) -> Tensor | None:
    """The first tensor of a tuple output (LSTM, attention), else None."""
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _jsonable_intervals(epoch_intervals: EpochIntervals) -> int | list[int] | None:
    if epoch_intervals is None or isinstance(epoch_intervals, (int, np.integer)):
        return None if epoch_intervals is None else int(epoch_intervals)
    return sorted(int(e) for e in epoch_intervals)


def _host_copy(tensor: Tensor) -> Tensor:
    """A float32 CPU copy that later training steps cannot change."""
    return tensor.detach().to("cpu", torch.float32, copy=True)


def _jsonable(value: Any) -> Any:
    """Tensors and numpy values (also inside lists and dicts) as plain Python numbers and lists."""
    if isinstance(value, Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _activation_name(module: nn.Module) -> str | None:
    """The activation a module applies, when it is one (used to judge saturation)."""
    names = {
        nn.ReLU6: "relu6",
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
