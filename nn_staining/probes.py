"""Probe recording: a fixed probe set run through the model at each recorded epoch's end.

Per recorded layer the probe keeps the linear Gram matrix ``K = R Rᵀ`` of the per-sample
representations ``R`` (n × neurons; float64 accumulation) always, and ``R`` itself where it fits a
per-epoch byte budget; wider layers keep an evenly spaced subset of their neurons, or none. For
``nn.Linear`` layers it also keeps the per-sample layer inputs (breadcrumbs), and, where the input
fits the budget, the probe inputs, the model's outputs and the saliency ``∂y_true/∂x · x``.

A sample's representation follows :mod:`nn_staining.layers`: a channel-first output (≥4-D, or a
convolution-like module's) gives the per-channel mean over spatial positions; a linear-like output
``(batch, …, features)`` gives the mean over the middle positions (a ``batch_first=False`` output
has the batch in dimension 1).

A module called several times in one forward pass gives one layer per call, keyed as the recorder
keys them (:func:`~nn_staining.signature.call_key`): its first call ``L_x``, its n-th ``L_x:n``.

Store: ``<root>/probes/epoch=<e>/part-0.parquet``, one row per (kind, layer, sample), one row
group per (kind, layer)::

    kind    string   activations | linear_input | gram | input | output | saliency
    layer   string   the layer key; "x" for input and saliency, "model" for output
    sample  int32    the probe sample (row of the matrix)
    width   int32    full width of the row: the layer's neurons (or input features)
    values  list<float32>   the sample's values (activations: only the kept neurons)
    gram    list<float64>   kind "gram": row ``sample`` of the Gram's upper triangle, K[i, i:]

The Gram is stored only for layers whose activations the budget cut (subsampled or dropped); for
the others it is ``R Rᵀ`` of the stored activations, computed by the reader in float64, which
saves n(n+1)/2 × 8 bytes per layer and epoch.

Kept neurons of a subsampled layer are ``(arange(k) * width) // k`` (k = the row length), the same
every epoch. Readers (:func:`read_probe`, :func:`read_probe_gram`, …) need no torch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

if TYPE_CHECKING:
    from torch import nn

log = logging.getLogger(__name__)

#: Bytes of per-sample values (activations, layer inputs, inputs, outputs, saliency) kept per epoch.
DEFAULT_PROBE_BUDGET = 8 * 2**20
#: Device bytes one layer's probe representations may take at once; wider layers are processed in blocks.
PROBE_MEMORY = 256 * 2**20
#: Samples in the forward pass that discovers the layers' widths before the probe passes.
_DISCOVERY_SAMPLES = 8
#: Columns per float64 Gram update (bounds the float64 copy of a wide representation).
_GRAM_CHUNK_BYTES = 64 * 2**20
TABLE = "probes"
KINDS = ("activations", "linear_input", "gram", "input", "output", "saliency")
INPUT_LAYER = "x"
OUTPUT_LAYER = "model"

SCHEMA = pa.schema(
    [
        pa.field("kind", pa.string()),
        pa.field("layer", pa.string()),
        pa.field("sample", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("values", pa.list_(pa.float32())),
        pa.field("gram", pa.list_(pa.float64())),
    ]
)


# -- the probe set -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProbeSet:
    """A validated probe set: inputs ``x`` (a CPU tensor, n samples), integer labels ``y`` (n,),
    the forward batch size and the per-epoch byte budget of per-sample values."""

    x: Any  # torch.Tensor, (n, ...)
    y: np.ndarray
    batch_size: int = 256
    budget_bytes: int = DEFAULT_PROBE_BUDGET

    @property
    def n(self) -> int:
        """Number of probe samples."""
        return len(self.y)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one probe sample."""
        return tuple(self.x.shape[1:])

    @classmethod
    def from_arg(
        cls, probe: Any, *, batch_size: int = 256, budget_bytes: int = DEFAULT_PROBE_BUDGET
    ) -> ProbeSet:
        """Validate ``probe=(x, y)`` (tensors or arrays; ``y`` integer labels ≥ 0, one per sample of ``x``)."""
        import torch

        if isinstance(probe, ProbeSet):
            return probe
        if not isinstance(probe, (tuple, list)) or len(probe) != 2:
            raise ValueError(
                f"probe must be a pair (x, y) of inputs and integer labels, got {_describe(probe)}"
            )
        x, y = probe
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"probe batch_size={batch_size!r} must be a positive int")
        if (
            isinstance(budget_bytes, bool)
            or not isinstance(budget_bytes, (int, np.integer))
            or budget_bytes < 0
        ):
            raise ValueError(f"probe budget_bytes={budget_bytes!r} must be an int >= 0 (0 keeps Grams only)")
        try:
            x = torch.as_tensor(x.detach() if isinstance(x, torch.Tensor) else np.asarray(x))
        except (TypeError, ValueError, RuntimeError) as exc:
            raise ValueError(f"probe x must be a tensor or an array, got {_describe(x)}: {exc}") from None
        if x.dim() < 1 or x.shape[0] < 2:
            raise ValueError(f"probe x must hold at least 2 samples along dim 0, got shape {tuple(x.shape)}")
        if x.is_complex() or x.dtype == torch.bool:
            raise ValueError(f"probe x must be a real float or integer tensor, got {x.dtype}")
        labels = _labels(y, x.shape[0])
        x = x.to("cpu").contiguous()
        return cls(x=x, y=labels, batch_size=int(batch_size), budget_bytes=int(budget_bytes))


def _describe(value: Any) -> str:
    shape = getattr(value, "shape", None)
    return f"{type(value).__name__}" + (
        f" of shape {tuple(shape)}" if shape is not None else f" {value!r:.80}"
    )


def _labels(y: Any, n: int) -> np.ndarray:
    """Integer labels (n,) from a tensor or array; (n, 1) is squeezed; floats must be integral."""
    if hasattr(y, "detach"):
        y = y.detach().cpu().numpy()
    try:
        labels = np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"probe y must be integer labels, got {_describe(y)}: {exc}") from None
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1 or len(labels) != n:
        raise ValueError(
            f"probe y must hold one integer label per sample of x ({n}), got shape {labels.shape}"
        )
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            bad = labels[~(np.isfinite(labels) & (labels == np.round(labels)))][0]
            raise ValueError(f"probe y must be integer class labels; found {bad!r}")
    elif labels.dtype.kind not in "iub":
        raise ValueError(f"probe y must be integer class labels, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    if (labels < 0).any():
        raise ValueError(f"probe y must be class labels >= 0; found {int(labels.min())}")
    return labels


def probe_meta(probe: ProbeSet) -> dict[str, Any]:
    """JSON-safe description of the probe set (``meta.json["probe"]``): n, labels, input shape, budget."""
    return {
        "n": probe.n,
        "labels": [int(v) for v in probe.y],
        "input_shape": [int(s) for s in probe.input_shape],
        "batch_size": probe.batch_size,
        "budget_bytes": probe.budget_bytes,
        "kept_neurons": "(arange(k) * width) // k",
    }


# -- what one epoch's probe holds ----------------------------------------------------------------
@dataclass
class LayerProbe:
    """One layer's probe record: full ``width``, kept activations ``(n, k)`` float32 (None when
    dropped), for ``nn.Linear`` the layer's inputs ``(n, in)``, and the Gram matrix ``(n, n)``
    float64, computed on the device only where the activations were cut (``stored_gram``)."""

    width: int
    stored_gram: np.ndarray | None = None
    activations: np.ndarray | None = None
    inputs: np.ndarray | None = None

    @property
    def gram(self) -> np.ndarray:
        """``R Rᵀ`` of the layer's full representation (from the activations when they are complete)."""
        if self.stored_gram is not None:
            return self.stored_gram
        return gram_of(self.activations)

    @property
    def neurons(self) -> np.ndarray | None:
        """The neuron ids of the kept activation columns."""
        return None if self.activations is None else kept_neurons(self.width, self.activations.shape[1])


@dataclass
class ProbeRecord:
    """One epoch's probe: per-layer records, and (when kept) the inputs, outputs and saliency, flattened."""

    n: int
    layers: dict[str, LayerProbe] = field(default_factory=dict)
    input: np.ndarray | None = None
    output: np.ndarray | None = None
    saliency: np.ndarray | None = None
    seconds: float = 0.0

    def nbytes(self) -> int:
        """Bytes of the arrays held (Grams at float64)."""
        arrays = [self.input, self.output, self.saliency]
        for lp in self.layers.values():
            arrays += [lp.stored_gram, lp.activations, lp.inputs]
        return sum(a.nbytes for a in arrays if a is not None)


def gram_of(values: np.ndarray) -> np.ndarray:
    """``A Aᵀ`` in float64, exactly symmetric: how readers and records turn activations into a Gram."""
    values = np.asarray(values, dtype=np.float64)
    gram = values @ values.T
    return (gram + gram.T) / 2


def kept_neurons(width: int, k: int) -> np.ndarray:
    """The ``k`` evenly spaced neuron ids of a ``width``-neuron layer a subsampled probe keeps."""
    return (np.arange(k, dtype=np.int64) * width) // max(k, 1)


def allocate(sizes: dict[str, tuple[int, bool]], budget: int, row_bytes: int) -> dict[str, int]:
    """Split ``budget`` bytes over items ``{name: (columns, divisible)}`` of ``row_bytes`` per column.

    Water-filling from the smallest item: each takes all its columns when they fit its fair share of
    what is left; a divisible item takes as many columns as fit, an indivisible one none. What an
    indivisible item left unused then goes, smallest first, to dropped indivisible items that fit
    whole, and to cut divisible ones. Returns the columns kept per item.
    """
    kept: dict[str, int] = {}
    remaining = budget
    row_bytes = max(row_bytes, 1)
    order = sorted(sizes, key=lambda name: sizes[name][0])
    for i, name in enumerate(order):
        columns, divisible = sizes[name]
        share = remaining // (len(order) - i)
        if columns * row_bytes <= share:
            kept[name] = columns
        elif divisible:
            kept[name] = min(columns, share // row_bytes)
        else:
            kept[name] = 0
        remaining -= kept[name] * row_bytes
    for name in order:  # the second pass: leftovers, whole items first
        columns, divisible = sizes[name]
        if not divisible and not kept[name] and columns * row_bytes <= remaining:
            kept[name] = columns
            remaining -= columns * row_bytes
    for name in order:
        columns, divisible = sizes[name]
        if divisible and kept[name] < columns:
            extra = min(columns - kept[name], remaining // row_bytes)
            kept[name] += extra
            remaining -= extra * row_bytes
    return kept


# -- recording (training thread) -----------------------------------------------------------------
def run_probe(
    model: nn.Module,
    modules: dict[str, nn.Module],
    probe: ProbeSet,
    batch_dims: dict[str, int | None] | None = None,
    input_batch_dim: int = 0,
) -> ProbeRecord:
    """Run the probe set through ``model`` (eval mode, no gradients, in batches on its device) and
    return each layer's representations; the modules' training flags and the torch RNG state are
    restored afterwards, so training goes on exactly as without the probe. ``batch_dims``: per layer
    (or module) key, the batch dimension the recorder knows (see :func:`nn_staining.layers.find_batch_dim`);
    a layer whose output has no dimension of the probe batch's size, or several that nothing
    decides, is left out (it is not one row per sample). The probe's ``x`` holds its samples along
    dim 0; each batch is fed with them moved to ``input_batch_dim`` (1 for a time-major model)."""
    import torch

    start = time.perf_counter()
    modes = {m: m.training for m in model.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = (
        torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    )
    handles: list[Any] = []
    try:
        model.eval()
        record = _ProbeRun(model, modules, probe, handles, batch_dims or {}, input_batch_dim).run()
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
    record.seconds = time.perf_counter() - start
    return record


class _ProbeRun:
    """One epoch's probe passes: discover the layers' widths, plan the budget, then collect."""

    def __init__(
        self,
        model: nn.Module,
        modules: dict[str, nn.Module],
        probe: ProbeSet,
        handles: list,
        batch_dims: dict[str, int | None],
        input_batch_dim: int = 0,
    ) -> None:
        import torch

        self.input_batch_dim = input_batch_dim
        self.batch_dims = batch_dims
        self.unplaced: dict[str, str] = {}  # layers whose output is not one row per sample, and why
        self.torch = torch
        self.model, self.modules, self.probe, self.handles = model, modules, probe, handles
        param = next(model.parameters(), None)
        self.device = param.device if param is not None else torch.device("cpu")
        self.dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        self.n = probe.n
        self.layouts: dict[str, Any] = {}
        self.in_width: dict[str, int] = {}
        self.mode = "discover"
        self.round = 0
        self.batch: tuple[int, int] = (0, 0)

    # -- hooks ------------------------------------------------------------------------------------
    def _attach(self) -> None:
        self.last: tuple[Any, tuple[int, ...]] | None = None
        self.calls: dict[str, int] = {}
        self.handles.append(self.model.register_forward_pre_hook(self._on_start))
        for key, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(key)))

    def _on_start(self, module: Any, args: Any) -> None:
        self.last = None
        self.calls = {}  # per module key: its calls so far in this pass

    def _hook(self, module_key: str):
        """Module ``module_key``'s hook: its n-th call in a pass is the layer ``call_key(module_key, n)``,
        as the recorder keys it."""
        from torch import Tensor, nn

        from .layers import find_batch_dim, output_layout
        from .signature import call_key

        linear = isinstance(self.modules[module_key], nn.Linear)

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            call = self.calls[module_key] = self.calls.get(module_key, 0) + 1
            key = call_key(module_key, call)
            raw = output if isinstance(output, Tensor) else _first_tensor(output)
            if raw is None or not raw.is_floating_point() or raw.dim() == 0:
                return
            out = raw.detach()
            if self.mode == "discover":
                if key not in self.layouts and key not in self.unplaced:
                    layout = output_layout(module, out, *(self.last or (None, None)))
                    hints = (self.batch_dims.get(key), self.batch_dims.get(module_key))
                    dim, why = find_batch_dim(tuple(out.shape), self.discovery_n, layout.channel_first, hints)
                    if dim is None:
                        self.unplaced[key] = why
                        return
                    self.layouts[key] = replace(layout, batch_dim=dim)
                    if linear and args and isinstance(args[0], Tensor):
                        self.in_width[key] = int(args[0].shape[-1])
                if key in self.layouts:
                    self.last = (self.layouts[key], tuple(out.shape))
                return
            layout = self.layouts.get(key)
            if layout is None or layout.width(out) != layout.neurons or (self.round and key not in self.wide):
                return
            self._collect(key, _per_sample(out, layout), args[0] if linear and args else None, layout)

        return hook

    # -- plan ---------------------------------------------------------------------------------------
    def _plan(self) -> None:
        n, budget = self.n, self.probe.budget_bytes
        self.widths = {k: layout.neurons for k, layout in self.layouts.items()}
        features = int(np.prod(self.probe.input_shape)) if self.probe.input_shape else 1
        self.saliency_ok = self.probe.x.is_floating_point() and self._output_is_logits
        items: dict[str, tuple[int, bool]] = {f"act:{k}": (w, True) for k, w in self.widths.items()}
        items |= {f"in:{k}": (w, False) for k, w in self.in_width.items() if k in self.widths}
        items["x"] = (features * (2 if self.saliency_ok else 1), False)
        if self.output_width:
            items["out"] = (self.output_width, False)
        kept = allocate(items, budget, 4 * n)
        self.kept = {k: kept[f"act:{k}"] for k in self.widths}
        self.keep_inputs = {k for k in self.in_width if kept.get(f"in:{k}")}
        self.keep_x = bool(kept["x"])
        self.keep_out = bool(kept.get("out"))
        self.saliency_ok = self.saliency_ok and self.keep_x
        dropped = [k for k, w in self.widths.items() if self.kept[k] < w]
        if dropped:
            log.info(
                "probe: activations of %s exceed the budget of %d bytes for %d samples; kept %s neurons "
                "(the Gram matrices are complete)",
                ", ".join(dropped),
                budget,
                n,
                ", ".join(f"{self.kept[k]}/{self.widths[k]}" for k in dropped),
            )
        # layers whose full representation does not fit PROBE_MEMORY are done in blocks of samples
        # the Gram is computed where the activations are cut (readers compute R Rᵀ for the others);
        # those whose full representation does not fit PROBE_MEMORY are done in blocks of samples
        self.need_gram = {k for k, w in self.widths.items() if self.kept[k] < w}
        self.wide = {k for k in self.need_gram if 4 * n * self.widths[k] > PROBE_MEMORY}
        if self.wide:
            block = min(max(1, PROBE_MEMORY // (4 * self.widths[k])) for k in self.wide)
            self.step = min(self.probe.batch_size, block)
        else:
            self.step = self.probe.batch_size

    # -- collection --------------------------------------------------------------------------------
    def _collect(self, key: str, rep: Any, inputs: Any, layout: Any) -> None:
        torch = self.torch
        lo, hi = self.batch
        if self.round == 0:
            k = self.kept[key]
            if k:
                ids = kept_neurons(self.widths[key], k)
                cols = rep if k == rep.shape[1] else rep[:, torch.as_tensor(ids, device=rep.device)]
                self.acts[key][lo:hi] = cols
            if key in self.keep_inputs and inputs is not None:
                self.inputs[key][lo:hi] = _per_sample(inputs.detach(), _linear(layout, inputs.shape[-1]))
            if key in self.reps:
                self.reps[key][lo:hi] = rep
        if key in self.wide:
            if lo == self.block[0]:
                self.block_rep[key] = rep.to(torch.float32, copy=True)
            b_lo, b_hi = self.block
            part = _gram_block(self.block_rep[key], rep, torch)
            self.grams[key][b_lo:b_hi, lo:hi] = part
            self.grams[key][lo:hi, b_lo:b_hi] = part.T

    def run(self) -> ProbeRecord:
        torch = self.torch
        probe, n = self.probe, self.n
        self._attach()
        self.discovery_n = min(n, _DISCOVERY_SAMPLES)
        with torch.no_grad():
            out = self.model(self._inputs(0, self.discovery_n))
        if self.unplaced:
            log.info(
                "probe: left out, their outputs are not one row per sample: %s",
                ", ".join(
                    f"{k} ({'shared by the batch' if why == 'shared' else 'batch dimension unknown'})"
                    for k, why in self.unplaced.items()
                ),
            )
        self._output_is_logits = isinstance(out, torch.Tensor) and out.dim() == 2 and out.is_floating_point()
        self.output_width = int(out.shape[1]) if self._output_is_logits else 0
        self._plan()
        dev = self.device
        self.acts = {k: torch.empty(n, c, device=dev) for k, c in self.kept.items() if c}
        self.inputs = {k: torch.empty(n, self.in_width[k], device=dev) for k in self.keep_inputs}
        self.reps = {k: torch.empty(n, self.widths[k], device=dev) for k in self.need_gram - self.wide}
        self.grams = {k: torch.empty(n, n, dtype=torch.float64, device=dev) for k in self.wide}
        self.block_rep: dict[str, Any] = {}
        outputs = torch.empty(n, self.output_width, device=dev) if self.keep_out else None
        starts = list(range(0, n, self.step))
        self.mode = "collect"
        with torch.no_grad():
            for r, block_start in enumerate(starts if self.wide else starts[:1]):
                self.round = r
                self.block = (block_start, min(block_start + self.step, n))
                for lo in starts[r:]:
                    hi = min(lo + self.step, n)
                    self.batch = (lo, hi)
                    result = self.model(self._inputs(lo, hi))
                    if r == 0 and outputs is not None:
                        outputs[lo:hi] = result.detach().to(torch.float32)
        self.mode = "off"
        record = ProbeRecord(n=n)
        for key in self.layouts:
            gram = None
            if key in self.need_gram:
                gram = self.grams[key] if key in self.wide else _gram(self.reps[key], torch)
                gram = ((gram + gram.T) / 2).cpu().numpy()  # exactly symmetric, as stored
            record.layers[key] = LayerProbe(
                width=self.widths[key],
                stored_gram=gram,
                activations=self.acts[key].cpu().numpy() if key in self.acts else None,
                inputs=self.inputs[key].cpu().numpy() if key in self.inputs else None,
            )
        if self.keep_x:
            record.input = probe.x.reshape(n, -1).to(torch.float32).numpy().copy()
        if outputs is not None:
            record.output = outputs.cpu().numpy()
        if self.saliency_ok:
            record.saliency = self._saliency()
        return record

    def _inputs(self, lo: int, hi: int) -> Any:
        x = self.probe.x[lo:hi]
        if self.input_batch_dim:
            x = x.movedim(0, self.input_batch_dim)
        if x.is_floating_point():
            x = x.to(self.dtype)
        return x.to(self.device)

    def _saliency(self) -> np.ndarray | None:
        """Input gradient × input of the true class's output (zero baseline), from autograd.grad on the
        inputs alone, so no parameter's ``.grad`` is touched."""
        torch = self.torch
        if torch.is_inference_mode_enabled():
            log.info("probe: no saliency under torch.inference_mode")
            return None
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        labels = torch.as_tensor(self.probe.y)
        parts = []
        with torch.enable_grad():
            for lo in range(0, self.n, self.probe.batch_size):
                hi = min(lo + self.probe.batch_size, self.n)
                x = self._inputs(lo, hi).detach().requires_grad_(True)
                out = self.model(x)
                y = labels[lo:hi].to(out.device)
                if int(y.max()) >= out.shape[1]:
                    log.info("probe: labels beyond the model's %d outputs: no saliency", out.shape[1])
                    return None
                chosen = out.gather(1, y[:, None]).sum()
                (grad,) = torch.autograd.grad(chosen, x)
                values = (grad * x).detach().movedim(self.input_batch_dim, 0)
                parts.append(values.reshape(hi - lo, -1).to(torch.float32).cpu())
        return torch.cat(parts).numpy()


def _first_tensor(output: Any) -> Any:
    if isinstance(output, (tuple, list)) and output and hasattr(output[0], "is_floating_point"):
        return output[0]
    return None


def _linear(layout: Any, width: int) -> Any:
    """The layout of a Linear layer's input: linear-like, batch where the output has it."""
    from .layers import OutputLayout

    return OutputLayout(neurons=width, channel_first=False, batch_dim=layout.batch_dim)


def _per_sample(out: Any, layout: Any) -> Any:
    """One row per sample (float32): spatial means of channel-first outputs, the mean over middle
    positions of linear-like ones."""
    import torch

    if out.dim() == 1:
        return out.to(torch.float32)[:, None]
    if layout.channel_first:
        return out.to(torch.float32).mean(dim=layout.spatial_dims(out)) if out.dim() > 2 else out.float()
    if layout.batch_dim and out.dim() >= 3:
        out = out.transpose(0, layout.batch_dim)
    return out.to(torch.float32).reshape(out.shape[0], -1, out.shape[-1]).mean(1)


def _gram(rep: Any, torch: Any) -> Any:
    """R Rᵀ accumulated in float64 over column chunks."""
    n, w = rep.shape
    gram = torch.zeros(n, n, dtype=torch.float64, device=rep.device)
    step = max(1, _GRAM_CHUNK_BYTES // (8 * max(n, 1)))
    for c in range(0, w, step):
        part = rep[:, c : c + step].to(torch.float64)
        gram += part @ part.T
    return gram


def _gram_block(a: Any, b: Any, torch: Any) -> Any:
    """A Bᵀ in float64 over column chunks."""
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    step = max(1, _GRAM_CHUNK_BYTES // (8 * max(a.shape[0] + b.shape[0], 1)))
    for c in range(0, a.shape[1], step):
        out += a[:, c : c + step].to(torch.float64) @ b[:, c : c + step].to(torch.float64).T
    return out


# -- writing (writer thread: numpy and pyarrow only) ----------------------------------------------
def probe_part(root: str | os.PathLike, epoch: int) -> Path:
    """Where the probe part of ``epoch`` lives."""
    return Path(root) / TABLE / f"epoch={int(epoch)}" / "part-0.parquet"


def probe_table(record: ProbeRecord, layer_order: Sequence[str]) -> list[pa.Table]:
    """The probe record as Arrow tables, one per (kind, layer) block, in layer order."""
    blocks = []
    order = [k for k in layer_order if k in record.layers] + [
        k for k in record.layers if k not in layer_order
    ]
    for key in order:
        lp = record.layers[key]
        if lp.stored_gram is not None:  # else readers compute R Rᵀ from the complete activations
            blocks.append(_gram_rows(key, lp.stored_gram, lp.width))
        if lp.activations is not None:
            blocks.append(_value_rows("activations", key, lp.activations, lp.width))
        if lp.inputs is not None:
            blocks.append(_value_rows("linear_input", key, lp.inputs, lp.inputs.shape[1]))
    for kind, layer, values in (
        ("input", INPUT_LAYER, record.input),
        ("output", OUTPUT_LAYER, record.output),
        ("saliency", INPUT_LAYER, record.saliency),
    ):
        if values is not None:
            blocks.append(_value_rows(kind, layer, values, values.shape[1]))
    return blocks


def _value_rows(kind: str, layer: str, values: np.ndarray, width: int) -> pa.Table:
    n, k = values.shape
    if n * k >= 2**31:
        raise ValueError(
            f"the probe's {kind} of {layer!r} hold {n * k:,} values, more than a Parquet list takes"
        )
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel())
    offsets = pa.array((np.arange(n + 1, dtype=np.int64) * k).astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, flat)
    return _block(kind, layer, n, width, lists, pa.nulls(n, SCHEMA.field("gram").type))


def _gram_rows(layer: str, gram: np.ndarray, width: int) -> pa.Table:
    n = gram.shape[0]
    rows, cols = np.triu_indices(n)
    flat = pa.array(np.asarray(gram, dtype=np.float64)[rows, cols])
    lengths = n - np.arange(n, dtype=np.int64)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    lists = pa.ListArray.from_arrays(offsets, flat)
    return _block("gram", layer, n, width, pa.nulls(n, SCHEMA.field("values").type), lists)


def _block(kind: str, layer: str, n: int, width: int, values: pa.Array, gram: pa.Array) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.repeat(pa.scalar(kind, pa.string()), n),
            pa.repeat(pa.scalar(layer, pa.string()), n),
            pa.array(np.arange(n, dtype=np.int32)),
            pa.array(np.full(n, width, dtype=np.int32)),
            values,
            gram,
        ],
        schema=SCHEMA,
    )


def write_probe(root: str | os.PathLike, epoch: int, record: ProbeRecord, layer_order: Sequence[str]) -> None:
    """Write ``record`` as ``<root>/probes/epoch=<epoch>/part-0.parquet`` (a dot-prefixed temporary
    name renamed into place), one row group per (kind, layer)."""
    path = probe_part(root, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with pq.ParquetWriter(
            tmp,
            SCHEMA,
            compression="snappy",
            use_dictionary=["kind", "layer"],
            write_statistics=["kind", "layer", "sample"],
        ) as writer:
            for block in probe_table(record, layer_order):
                writer.write_table(block, row_group_size=max(block.num_rows, 1))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


# -- reading (no torch) ---------------------------------------------------------------------------
def probe_info(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta.json["probe"]``; a clear error when the trace was recorded without a probe."""
    info = meta.get("probe")
    if not info:
        raise KeyError("this trace has no probe set; record it with NetworkTrace(..., probe=(x, y))")
    return info


def _check(root: str | os.PathLike, meta: dict[str, Any], epoch: int, layer: str | None) -> Path:
    probe_info(meta)
    from .catalog import read_commits

    epochs = sorted(read_commits(root, meta)["train"])
    if epoch not in epochs:
        raise KeyError(f"epoch {epoch} not in trace; recorded epochs: {epochs}")
    layers = [info["key"] for info in meta.get("layers", [])]
    if layer is not None and layer not in layers:
        raise KeyError(f"layer {layer!r} not in trace; layers: {', '.join(layers)}")
    path = probe_part(root, epoch)
    if not path.exists():
        raise FileNotFoundError(f"the probe part of epoch {epoch} is missing: {str(path)!r}")
    return path


def probe_blocks(path: str | os.PathLike) -> list[tuple[str, str]] | None:
    """The (kind, layer) of each row group of a probe part, from its footer's statistics alone (None
    when a row group lacks them, e.g. a part rewritten by another tool)."""
    md = pq.ParquetFile(path).metadata
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    kind, layer = names.index("kind"), names.index("layer")
    blocks = []
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        stats = [group.column(kind).statistics, group.column(layer).statistics]
        if any(st is None or not st.has_min_max or st.min != st.max for st in stats):
            return None
        blocks.append((_text(stats[0].min), _text(stats[1].min)))
    return blocks


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _read(path: Path, kind: str, layer: str, columns: list[str]) -> pa.Table:
    """The rows of one (kind, layer) block, by sample: only its row group is read."""
    blocks = probe_blocks(path)
    if blocks is None:
        filt = (pc.field("kind") == kind) & (pc.field("layer") == layer)
        table = pq.read_table(path, columns=["sample", "width", *columns], filters=filt)
    else:
        groups = [g for g, block in enumerate(blocks) if block == (kind, layer)]
        if not groups:
            return SCHEMA.empty_table().select(["sample", "width", *columns])
        table = pq.ParquetFile(path).read_row_groups(groups, columns=["sample", "width", *columns])
    if table.num_rows:
        order = pc.sort_indices(table, [("sample", "ascending")])
        table = table.take(order)
    return table


def _matrix(table: pa.Table, n: int, what: str) -> np.ndarray:
    if table.num_rows != n:
        raise ValueError(f"the probe's {what} has {table.num_rows} rows, expected {n} (a damaged part?)")
    values = table.column("values").combine_chunks()
    flat = values.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(n, -1) if n else flat.reshape(0, 0)


def read_probe(root: str | os.PathLike, meta: dict[str, Any], epoch: int, layer: str) -> np.ndarray:
    """The per-sample activations ``(n, k)`` of ``layer`` at ``epoch`` (k < neurons when subsampled:
    see :func:`read_probe_neurons`); a KeyError says when the budget dropped them."""
    path = _check(root, meta, epoch, layer)
    n = int(probe_info(meta)["n"])
    table = _read(path, "activations", layer, ["values"])
    if not table.num_rows:
        gram = _read(path, "gram", layer, [])
        width = int(gram.column("width")[0].as_py()) if gram.num_rows else "?"
        raise KeyError(
            f"the activations of {layer!r} at epoch {epoch} were not kept ({n} samples × {width} neurons "
            f"did not fit the probe budget of {probe_info(meta).get('budget_bytes')} bytes); its Gram "
            "matrix is (probe_gram)"
        )
    return _matrix(table, n, f"activations of {layer!r}")


def read_probe_neurons(root: str | os.PathLike, meta: dict[str, Any], epoch: int, layer: str) -> np.ndarray:
    """The neuron ids of the columns :func:`read_probe` returns (all neurons unless subsampled)."""
    path = _check(root, meta, epoch, layer)
    table = _read(path, "activations", layer, ["values"])
    if not table.num_rows:
        return np.arange(0)
    width = int(table.column("width")[0].as_py())
    return kept_neurons(width, len(table.column("values")[0]))


def read_probe_gram(root: str | os.PathLike, meta: dict[str, Any], epoch: int, layer: str) -> np.ndarray:
    """The probe Gram matrix ``K = R Rᵀ`` (n × n, float64) of ``layer`` at ``epoch``: stored for layers
    whose activations the budget cut, computed from the activations (float64) for the others."""
    path = _check(root, meta, epoch, layer)
    n = int(probe_info(meta)["n"])
    table = _read(path, "gram", layer, ["gram"])
    if not table.num_rows:
        acts = _read(path, "activations", layer, ["values"])
        if not acts.num_rows:
            raise KeyError(
                f"the probe has no record of {layer!r} at epoch {epoch} (it did not run in the probe pass)"
            )
        return gram_of(_matrix(acts, n, f"activations of {layer!r}"))
    if table.num_rows != n:
        raise ValueError(
            f"the probe Gram of {layer!r} at epoch {epoch} has {table.num_rows} rows, expected {n}"
        )
    flat = table.column("gram").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    if len(flat) != n * (n + 1) // 2:
        raise ValueError(
            f"the probe Gram of {layer!r} at epoch {epoch} holds {len(flat)} values, expected {n * (n + 1) // 2}"
        )
    gram = np.zeros((n, n))
    rows, cols = np.triu_indices(n)
    gram[rows, cols] = flat
    gram[cols, rows] = flat
    return gram


def read_probe_inputs(root: str | os.PathLike, meta: dict[str, Any], epoch: int, layer: str) -> np.ndarray:
    """The per-sample inputs ``(n, in_features)`` of the ``nn.Linear`` layer ``layer`` at ``epoch``."""
    path = _check(root, meta, epoch, layer)
    table = _read(path, "linear_input", layer, ["values"])
    if not table.num_rows:
        raise KeyError(
            f"the inputs of {layer!r} at epoch {epoch} were not kept (not an nn.Linear, or over the budget)"
        )
    return _matrix(table, int(probe_info(meta)["n"]), f"inputs of {layer!r}")


def _read_global(root: str | os.PathLike, meta: dict[str, Any], epoch: int, kind: str) -> np.ndarray:
    path = _check(root, meta, epoch, None)
    table = _read(path, kind, OUTPUT_LAYER if kind == "output" else INPUT_LAYER, ["values"])
    if not table.num_rows:
        reason = {
            "input": "the probe inputs did not fit the probe budget",
            "output": "the model's output is not a (batch, classes) tensor, or it did not fit the budget",
            "saliency": "saliency needs float inputs that fit the budget and a (batch, classes) output",
        }[kind]
        raise KeyError(f"the probe has no {kind} at epoch {epoch}: {reason}")
    return _matrix(table, int(probe_info(meta)["n"]), kind)


def read_probe_input(root: str | os.PathLike, meta: dict[str, Any], epoch: int) -> np.ndarray:
    """The probe inputs, flattened to ``(n, features)`` (float32)."""
    return _read_global(root, meta, epoch, "input")


def read_probe_output(root: str | os.PathLike, meta: dict[str, Any], epoch: int) -> np.ndarray:
    """The model's outputs on the probe set ``(n, classes)`` at ``epoch``."""
    return _read_global(root, meta, epoch, "output")


def read_saliency(root: str | os.PathLike, meta: dict[str, Any], epoch: int) -> np.ndarray:
    """Saliency ``x · ∂y_true/∂x`` per probe sample at ``epoch``, flattened ``(n, features)``
    (reshape with ``meta["probe"]["input_shape"]``)."""
    return _read_global(root, meta, epoch, "saliency")


def probe_contents(root: str | os.PathLike, meta: dict[str, Any], epoch: int) -> list[dict[str, Any]]:
    """What the probe part of ``epoch`` holds: one dict per (kind, layer) with rows, width and values kept."""
    path = _check(root, meta, epoch, None)
    table = pq.read_table(path, columns=["kind", "layer", "width", "values"])
    out: dict[tuple[str, str], dict[str, Any]] = {}
    lengths = pc.list_value_length(table.column("values")).to_numpy(zero_copy_only=False)
    for kind, layer, width, length in zip(
        table.column("kind").to_pylist(),
        table.column("layer").to_pylist(),
        table.column("width").to_pylist(),
        lengths,
    ):
        entry = out.setdefault(
            (kind, layer), {"kind": kind, "layer": layer, "rows": 0, "width": width, "kept": 0}
        )
        entry["rows"] += 1
        entry["kept"] = 0 if np.isnan(length) else int(length)
    return list(out.values())
