"""Which modules of a model are recorded, and how a module's output maps to neurons.

A *layer* is a module whose output is recorded; its key is ``L_`` + the module's qualified name.
Linear-like outputs ``(batch, ..., features)`` give one neuron per feature (every middle position
an observation); convolution-like outputs ``(batch, channels, *spatial)`` one neuron per channel,
its value per sample the mean over spatial positions.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .records import LayerWeights
from .signature import layer_key

#: Modules whose 3-D output is (batch, channels, length) rather than (batch, steps, features).
CHANNEL_FIRST_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.GroupNorm,
    nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd,
    nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.modules.pooling._AdaptiveAvgPoolNd,
    nn.modules.pooling._LPPoolNd,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
)
#: Modules that act on the last dimension of their input: their outputs are (…, features) at any rank,
#: e.g. a ConvNeXt block's Linear on (batch, height, width, channels).
LAST_DIM_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Bilinear,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.rnn.RNNBase,
    nn.MultiheadAttention,
)
#: Non-leaf modules that compute their output without calling their children's forward.
OPAQUE_TYPES: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
#: Modules that act on each value on its own (activations, dropout, identity): unit k of their output is
#: unit k of their input, so a pathway may pass through them (see :mod:`nn_staining.tap`'s layer graph).
ELEMENTWISE_TYPES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.Tanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Softshrink,
    nn.Hardshrink,
    nn.LogSigmoid,
    nn.Threshold,
    nn.Identity,
    nn.modules.dropout._DropoutNd,
)
#: Modules that only reshape or pass on their input: their output is the previous layer's values again,
#: so they are left out of the default selection (``layers=`` still picks them).
RESHAPE_TYPES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten, nn.Identity)
#: Modules whose ``weight`` rows are not per output neuron.
NO_NEURON_WEIGHTS: tuple[type[nn.Module], ...] = (
    nn.Embedding,
    nn.EmbeddingBag,
    nn.modules.conv._ConvTransposeNd,
)


def select_layers(model: nn.Module, patterns: Sequence[str] | str | None = None) -> dict[str, nn.Module]:
    """Map layer keys to the modules to record.

    By default every leaf module (and opaque ones such as ``MultiheadAttention``) except pure
    reshapes (:data:`RESHAPE_TYPES`, unless nothing else is left); with
    ``patterns``, the modules whose qualified name (or ``L_`` key) equals or matches a name or glob;
    an exact name wins over its glob reading (``"[x]"`` selects the module ``[x]``). A pattern that
    matches nothing, a recorded module whose name no signature can address, and two recorded
    modules with the same key (``x`` and ``L_x``) raise ``ValueError``.
    """
    named = [(name, m) for name, m in model.named_modules() if name]
    if not named:
        return {"L_model": model}
    if patterns is None:
        inside_opaque = {
            f"{name}.{sub}"
            for name, m in named
            if isinstance(m, OPAQUE_TYPES)
            for sub, _ in m.named_modules()
            if sub
        }
        chosen = [
            (name, m)
            for name, m in named
            if name not in inside_opaque
            and (isinstance(m, OPAQUE_TYPES) or not any(True for _ in m.children()))
        ]
        neurons = [(name, m) for name, m in chosen if not isinstance(m, RESHAPE_TYPES)]
        return _keyed(neurons or chosen)
    if isinstance(patterns, str):
        patterns = [patterns]
    keys = {name: _key_or_none(name) for name, _ in named}
    chosen_names: set[str] = set()
    for pattern in patterns:
        hits = [name for name in keys if pattern in (name, keys[name])]
        if not hits:
            hits = [
                name
                for name, key in keys.items()
                if fnmatch.fnmatchcase(name, pattern)
                or (key is not None and fnmatch.fnmatchcase(key, pattern))
            ]
        if not hits:
            names = ", ".join(name for name, _ in named)
            raise ValueError(f"layers pattern {pattern!r} matches no module; module names: {names}")
        chosen_names.update(hits)
    return _keyed([(name, m) for name, m in named if name in chosen_names])


def _key_or_none(name: str) -> str | None:
    """The module's layer key, or None when its name cannot be one."""
    try:
        return layer_key(name)
    except ValueError:
        return None


def _keyed(chosen: list[tuple[str, nn.Module]]) -> dict[str, nn.Module]:
    """Key the modules to record; only their names are checked (an excluded module may have any name)."""
    out: dict[str, nn.Module] = {}
    names: dict[str, str] = {}
    for name, module in chosen:
        try:
            key = layer_key(name)
        except ValueError as error:
            raise ValueError(
                f"module {name!r} cannot be recorded: {error}; rename it or leave it out with layers="
            ) from None
        if key in names:
            raise ValueError(
                f"modules {names[key]!r} and {name!r} both have the layer key {key!r}; "
                "rename one or leave one out with layers="
            )
        names[key] = name
        out[key] = module
    for key in out:  # "x:2" is the key of module x's second call in a forward pass
        base, colon, call = key.rpartition(":")
        if colon and call.isascii() and call.isdigit() and int(call) >= 2 and base in out:
            raise ValueError(
                f"module {names[key]!r} has the layer key {key!r}, which is the key of call {int(call)} of "
                f"module {names[base]!r}; rename one or leave one out with layers="
            )
    return out


@dataclass(frozen=True)
class OutputLayout:
    """How one layer's output tensor becomes (observations, neurons) rows."""

    neurons: int
    channel_first: bool
    batch_dim: int = 0

    def width(self, output: Tensor) -> int:
        """The number of neurons ``output`` holds under this layout (a shared module may vary)."""
        if output.dim() <= 1:
            return 1
        return output.shape[1] if self.channel_first else output.shape[-1]

    def rows(self, tensor: Tensor, width: int | None = None, batch_dim: int | None = None) -> Tensor:
        """A linear-like ``tensor`` as (observations, ``width``) rows, sample-major: with the batch in
        dimension ``batch_dim`` (default: the layout's) of a tensor of 3 or more dimensions, it is
        moved first, so each sample's rows are consecutive."""
        batch_dim = self.batch_dim if batch_dim is None else batch_dim
        if batch_dim and tensor.dim() >= 3:
            tensor = tensor.transpose(0, batch_dim)
        return tensor.reshape(-1, self.neurons if width is None else width)

    def spatial_dims(self, output: Tensor) -> tuple[int, ...]:
        """The dimensions a channel-first output is averaged over."""
        return tuple(range(2, output.dim()))


def output_layout(
    module: nn.Module,
    output: Tensor,
    previous: OutputLayout | None = None,
    previous_shape: tuple[int, ...] | None = None,
    origins: Sequence[tuple[OutputLayout, tuple[int, ...]]] = (),
) -> OutputLayout:
    """Decide the neurons and orientation of ``module``'s ``output``.

    An output of 3 or more dimensions is channel-first (``(batch, channels, *spatial)``) when the
    module is convolution-like, features-last when the module acts on the last dimension (a Linear,
    a norm over features, an embedding, an RNN, attention, GPT-2's ``Conv1D``), as a module's
    ``data_format`` (``"channels_first"`` / ``"channels_last"``) says where it has one; any other module (an
    activation, dropout, a learnt gain) takes the kind of a layer its input comes from (``origins``,
    or ``previous`` / ``previous_shape``: layouts with their output's shape) whose batch and spatial
    (or leading) dimensions its output keeps, e.g. a ReLU after a residual sum or a concatenation of
    convolutions; with none, ≥4-D outputs are channel-first and 3-D ones features-last.
    ``batch_dim`` is the module's own declaration (1 for ``batch_first=False`` RNNs and attention),
    else the batch dimension ``previous`` has when the output keeps its leading dimensions, else 0:
    where labels must find their samples, :func:`find_batch_dim` checks it against the batch's size.
    """
    if previous is not None and previous_shape is not None:
        origins = [(previous, tuple(previous_shape)), *origins]
    declared = own_batch_dim(module)
    shape = tuple(output.shape)
    data_format = getattr(module, "data_format", None)  # Hugging Face's ConvNeXt / Swin norms declare it
    if output.dim() >= 3:
        if isinstance(module, CHANNEL_FIRST_TYPES) or data_format == "channels_first":
            channel_first = True
        elif isinstance(module, LAST_DIM_TYPES) or weight_is_in_out(module) or data_format == "channels_last":
            channel_first = False
        else:
            channel_first = _kind_of_origins(shape, origins)
            if channel_first is None:
                channel_first = output.dim() >= 4
    else:
        channel_first = False
    batch_dim = 0
    if output.dim() >= 3 and declared is not None:
        batch_dim = declared
    elif output.dim() >= 3 and not channel_first:
        batch_dim = next((o.batch_dim for o, s in origins if not o.channel_first and s[:-1] == shape[:-1]), 0)
    if output.dim() <= 1:
        neurons = 1
    else:
        neurons = output.shape[1] if channel_first else output.shape[-1]
    return OutputLayout(neurons=neurons, channel_first=channel_first, batch_dim=batch_dim)


def _kind_of_origins(
    shape: tuple[int, ...], origins: Sequence[tuple[OutputLayout, tuple[int, ...]]]
) -> bool | None:
    """Channel-first (True) or features-last (False) as the first origin of the output's rank whose
    batch size it keeps and either its neurons or its other dimensions (a gain, a residual sum, a
    concatenation along channels or along positions)."""
    for layout, origin_shape in origins:
        if len(origin_shape) != len(shape) or origin_shape[0] != shape[0]:
            continue
        if layout.channel_first and (origin_shape[1] == shape[1] or origin_shape[2:] == shape[2:]):
            return True
        if not layout.channel_first and (origin_shape[-1] == shape[-1] or origin_shape[:-1] == shape[:-1]):
            return False
    return None


def own_batch_dim(module: nn.Module) -> int | None:
    """The batch dimension a module declares for its (…, features) tensors: 0 or 1 from its own
    ``batch_first`` (RNNs, ``MultiheadAttention``, ``nn.Transformer``) or its attention's
    (``TransformerEncoderLayer`` / ``TransformerDecoderLayer`` keep it on ``self_attn``), else None."""
    for owner in (module, getattr(module, "self_attn", None)):
        flag = getattr(owner, "batch_first", None)
        if isinstance(flag, bool):
            return 0 if flag else 1
    return None


def declared_batch_dims(model: nn.Module, modules: dict[str, nn.Module]) -> dict[str, int | None]:
    """Per layer key, the batch dimension its module or the nearest enclosing block declares
    (:func:`own_batch_dim`): a Linear inside a ``batch_first=False`` TransformerEncoderLayer sees
    (steps, batch, features) tensors. None where nothing declares one."""
    names = {id(m): name for name, m in model.named_modules()}
    by_name = dict(model.named_modules())
    declared: dict[str, int | None] = {}
    for key, module in modules.items():
        name = names.get(id(module), "")
        parts = name.split(".") if name else []
        found = None
        for end in range(len(parts), -1, -1):
            owner = by_name.get(".".join(parts[:end]))
            found = None if owner is None else own_batch_dim(owner)
            if found is not None:
                break
        declared[key] = found
    return declared


#: Why :func:`find_batch_dim` found no batch dimension.
SHARED = "shared"
AMBIGUOUS = "ambiguous"


def find_batch_dim(
    shape: tuple[int, ...], samples: int, channel_first: bool, hints: Sequence[int | None] = ()
) -> tuple[int | None, str]:
    """The dimension of an output of ``shape`` that holds the batch's ``samples``: ``(dim, "")``, or
    ``(None, SHARED)`` when no dimension has that size (an output shared by the batch, such as a
    position embedding of batch size 1) and ``(None, AMBIGUOUS)`` when several have and nothing
    decides.

    Channel-first, 1-D and 2-D outputs keep the batch first. A (…, features) output takes the first
    ``hints`` entry (a declared ``batch_first``, the layout of the layer it continues, the user's
    ``batch_dim``) whose dimension has the batch's size; then one of size 1 in front, with a batch of
    more, is shared by the batch; else the batch is the one dimension before the features that has
    its size."""
    if len(shape) <= 2 or channel_first:
        return (0, "") if shape[0] == samples else (None, SHARED)
    for hint in hints:
        if hint is not None and 0 <= hint < len(shape) - 1 and shape[hint] == samples:
            return hint, ""
    if shape[0] == 1 and samples > 1:  # broadcast over the batch, e.g. a (1, steps, features) embedding
        return None, SHARED
    candidates = [d for d in range(len(shape) - 1) if shape[d] == samples]
    if len(candidates) == 1:
        return candidates[0], ""
    return None, AMBIGUOUS if candidates else SHARED


def unrecordable_reason(output: Any) -> str | None:
    """Why ``output`` cannot be recorded (for the warning that lists skipped modules), or None when
    it can: a layer's output is a floating-point tensor of one or more dimensions, or a tuple or list
    whose first item is one (its width is checked once its layout is known)."""
    value = output[0] if isinstance(output, (tuple, list)) and output else output
    if isinstance(value, Tensor) and value.is_floating_point() and value.dim() > 0:
        return None
    what = _describe_value(value)
    if value is not output:
        return f"{_article(type(output).__name__)} whose first item is {what}"
    return what


def _describe_value(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, Tensor):
        if value.dim() == 0:
            return "a 0-dim tensor"
        return f"{_article(str(value.dtype).removeprefix('torch.'))} tensor"
    return _article(type(value).__name__)


def _article(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def known_width(module: nn.Module) -> int | None:
    """The number of output neurons a module's parameters fix (``out_features`` / ``out_channels``),
    or None when only its output tells."""
    for name in ("out_features", "out_channels"):
        width = getattr(module, name, None)
        if isinstance(width, int) and not isinstance(width, bool):
            return width
    return None


def weight_is_in_out(module: nn.Module) -> bool:
    """Whether the module keeps its ``weight`` as (inputs, outputs): Hugging Face's ``Conv1D`` (GPT-2),
    known by its ``nf`` (outputs) and ``nx`` (inputs) attributes and a weight of shape ``(nx, nf)``."""
    if isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)):
        return False
    weight, nf, nx = getattr(module, "weight", None), getattr(module, "nf", None), getattr(module, "nx", None)
    return (
        isinstance(weight, Tensor)
        and all(isinstance(n, int) and not isinstance(n, bool) for n in (nf, nx))
        and tuple(weight.shape) == (nx, nf)
    )


def _neuron_parameters(module: nn.Module, neurons: int) -> tuple[Tensor | None, bool, Tensor | None]:
    """(weight parameter, whether it is (inputs, outputs), bias) when they belong to the output neurons."""
    if isinstance(module, NO_NEURON_WEIGHTS):
        return None, False, None
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    in_out = weight_is_in_out(module)
    rows = weight.shape[1 if in_out else 0] if isinstance(weight, Tensor) and weight.dim() >= 1 else None
    weight = weight if rows == neurons else None
    bias = bias if isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == neurons else None
    return weight, in_out and weight is not None, bias


def neuron_weights(module: nn.Module, neurons: int) -> tuple[Tensor | None, Tensor | None]:
    """The module's (weight, bias) with one weight row per output neuron (its incoming weights), when
    they belong to its neurons; a (inputs, outputs) weight (GPT-2's ``Conv1D``) comes transposed."""
    weight, in_out, bias = _neuron_parameters(module, neurons)
    return (weight.T if in_out else weight), bias


def describe_layer(
    key: str,
    module: nn.Module,
    layout: OutputLayout,
    call: int = 1,
    first_call: str | None = None,
    module_name: str | None = None,
) -> dict[str, Any]:
    """The layer's ``meta.json`` entry (row offsets are added by :func:`nn_staining.rows.assign_offsets`).

    A later call of a module (``call`` 2, 3…) names its ``first_call``'s key, under which the module's
    weights and bias are stored once (it has none of its own)."""
    weight, bias = neuron_weights(module, layout.neurons) if call == 1 else (None, None)
    module_key = key if call == 1 else first_call
    extra = {} if call == 1 else {"call": call, "first_call": first_call}
    return {
        "key": key,
        "module": module_name
        if module_name is not None
        else module_key[2:]
        if module_key != "L_model"
        else "",
        **extra,
        "type": type(module).__name__,
        "neurons": layout.neurons,
        "kind": "channels" if layout.channel_first else "features",
        "params": {name: list(p.shape) for name, p in module.named_parameters(recurse=False)},
        "in_features": module.in_features if isinstance(module, nn.Linear) else None,
        "has_weights": weight is not None,
        "has_bias": bias is not None,
        "activation": activation_name(module),
    }


def snapshot_weights(
    modules: dict[str, nn.Module], layouts: dict[str, OutputLayout]
) -> dict[str, LayerWeights]:
    """Host float32 copies of each layer's per-neuron weights, bias and weight-gradient norms,
    which later training steps cannot change."""
    snapshot = {}
    with torch.no_grad():
        for key, layout in layouts.items():
            if key not in modules:  # a later call of a module: its weights are stored under its first call
                continue
            weight, in_out, bias = _neuron_parameters(modules[key], layout.neurons)
            if weight is None and bias is None:
                continue
            matrix = grad_norm = None
            if weight is not None:
                rows = weight.T if in_out else weight
                matrix = _host(rows.reshape(layout.neurons, -1))
                if weight.grad is not None:
                    grad = weight.grad.T if in_out else weight.grad
                    grad_norm = _host(_row_norms(grad.detach().reshape(layout.neurons, -1)))
            snapshot[key] = LayerWeights(matrix, None if bias is None else _host(bias), grad_norm)
    return snapshot


#: Rows of a gradient turned to float64 at once for their norms (bounds the temporary at width).
NORM_BLOCK_ROWS = 65_536


def _row_norms(rows: Tensor) -> Tensor:
    """Each row's Euclidean norm, summed in float64 (no overflow) a block of rows at a time, so a
    million-neuron layer needs no float64 copy of its whole gradient. The blocks share one buffer:
    a fresh float64 block per step fragments the C heap (each is freed below the next result), and
    a 1M-neuron layer's norms then kept about 120 MiB more resident."""
    n = rows.shape[0]
    norms = torch.empty(n, dtype=torch.float64, device=rows.device)
    block = torch.empty((min(n, NORM_BLOCK_ROWS), rows.shape[1]), dtype=torch.float64, device=rows.device)
    for i in range(0, n, NORM_BLOCK_ROWS):
        part = rows[i : i + NORM_BLOCK_ROWS]
        widened = block[: part.shape[0]].copy_(part)
        torch.linalg.vector_norm(widened, dim=1, out=norms[i : i + part.shape[0]])
    return norms


def _host(tensor: Tensor) -> np.ndarray:
    return tensor.detach().to("cpu", torch.float32, copy=True).numpy()


_ACTIVATIONS: dict[type[nn.Module], str] = {
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


def activation_name(module: nn.Module) -> str | None:
    """The activation a module applies, when it is one (used to judge dead and saturated units)."""
    for cls, name in _ACTIVATIONS.items():
        if isinstance(module, cls):
            return name
    return None
