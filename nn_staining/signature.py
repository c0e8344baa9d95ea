"""Parse and format network signatures such as ``E_30/L_hidden_1/n_20``.

A signature names a slice of a training trace: which epochs, which layer (a module name or a
glob over module names) and which neurons. This module is pure: it imports only the stdlib.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "GRAMMAR",
    "IndexSelection",
    "Signature",
    "call_key",
    "epoch_key",
    "format_signature",
    "is_glob",
    "layer_key",
    "match_layers",
    "neuron_key",
    "parse_key",
    "parse_signature",
]

GRAMMAR = (
    "E_<sel>[/L_<name>[/n_<sel>]] where <sel> is *, 3, 2:5 or 1,4,7 "
    "(a range a:b is half-open and needs a < b; integers are non-negative) "
    "and <name> is a module name or glob such as hidden_1, features.0 or hidden_* "
    "(a module called several times in one forward pass has a layer per call: relu, relu:2, relu:3); "
    "the legacy form E_<sel>-L_<name>-n_<sel> is also accepted"
)

EPOCH_PREFIX = "E_"
LAYER_PREFIX = "L_"
NEURON_PREFIX = "n_"
_GLOB_CHARS = frozenset("*?[")
_INT = re.compile(r"[0-9]+")


def _check_index(value: object, what: str) -> int:
    """Return `value` if it is a non-negative int; raise TypeError/ValueError naming `what`."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be non-negative, got {value}")
    return value


@dataclass(frozen=True)
class IndexSelection:
    """A selection of non-negative integers: everything ('*'), a half-open range or explicit values.

    Explicit values are stored sorted and unique, so equal selections compare equal.
    """

    start: int | None = None
    stop: int | None = None
    values: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.values is not None:
            if self.start is not None or self.stop is not None:
                raise ValueError("IndexSelection takes either start/stop or values, not both")
            if isinstance(self.values, (str, bytes)) or not isinstance(self.values, Iterable):
                raise TypeError(f"values must be a tuple of ints, got {self.values!r}")
            values = tuple(sorted({_check_index(v, "a selected value") for v in self.values}))
            if not values:
                raise ValueError("values must not be empty; use IndexSelection() for '*'")
            object.__setattr__(self, "values", values)
        elif self.start is not None or self.stop is not None:
            if self.start is None or self.stop is None:
                raise ValueError("a range needs both start and stop")
            _check_index(self.start, "range start")
            _check_index(self.stop, "range stop")
            if self.start >= self.stop:
                raise ValueError(f"empty range {self.start}:{self.stop}; need start < stop")

    @property
    def is_all(self) -> bool:
        """True for '*', the selection of everything."""
        return self.values is None and self.start is None

    @property
    def is_single(self) -> bool:
        """True when exactly one value is named, e.g. '3'."""
        return self.values is not None and len(self.values) == 1

    def contains(self, value: int) -> bool:
        """True when the integer `value` belongs to this selection (negatives never do)."""
        if value < 0:
            return False
        if self.values is not None:
            return value in self.values
        if self.start is not None and self.stop is not None:
            return self.start <= value < self.stop
        return True

    def select(self, available: Iterable[int]) -> list[int]:
        """Return the members of `available` this selection keeps, sorted ascending, unique."""
        return sorted({v for v in available if self.contains(v)})

    def __str__(self) -> str:
        if self.values is not None:
            return ",".join(str(v) for v in self.values)
        if self.start is not None:
            return f"{self.start}:{self.stop}"
        return "*"


@dataclass(frozen=True)
class Signature:
    """A parsed signature: epochs, optionally a layer key (or glob) and optionally neurons."""

    epochs: IndexSelection
    layer: str | None = None
    neurons: IndexSelection | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, IndexSelection):
            raise TypeError(f"epochs must be an IndexSelection, got {self.epochs!r}")
        if self.neurons is not None and not isinstance(self.neurons, IndexSelection):
            raise TypeError(f"neurons must be an IndexSelection or None, got {self.neurons!r}")
        if self.layer is None:
            if self.neurons is not None:
                raise ValueError("a neuron selection needs a layer")
            return
        if not isinstance(self.layer, str):
            raise TypeError(f"layer must be a str or None, got {self.layer!r}")
        problem = _layer_problem(self.layer)
        if problem:
            raise ValueError(problem)

    @property
    def is_cell(self) -> bool:
        """True when the signature names one value: single epoch, literal layer, single neuron."""
        return (
            self.epochs.is_single
            and self.layer is not None
            and not is_glob(self.layer)
            and self.neurons is not None
            and self.neurons.is_single
        )

    def layer_matches(self, key: str) -> bool:
        """True when the layer key (e.g. 'L_hidden_1') equals or matches this signature's layer pattern.

        Uses `fnmatch.fnmatchcase`; a signature without a layer matches every key. To pick layers
        from a list, prefer `matching_layers`, which lets an exact key win over a glob reading.
        """
        return self.layer is None or key == self.layer or fnmatch.fnmatchcase(key, self.layer)

    def matching_layers(self, keys: Iterable[str]) -> list[str]:
        """The keys this signature's layer names, in the order given: every key without a layer part,
        only that key when one equals the layer part exactly (so 'L_[x]' names a module '[x]'),
        else the keys matching it as a glob."""
        keys = list(keys)
        if self.layer is None:
            return keys
        return match_layers(self.layer, keys)

    def __str__(self) -> str:
        parts = [f"{EPOCH_PREFIX}{self.epochs}"]
        if self.layer is not None:
            parts.append(self.layer)
            if self.neurons is not None:
                parts.append(f"{NEURON_PREFIX}{self.neurons}")
        return "/".join(parts)


def _layer_problem(key: str) -> str:
    """Return why `key` is not a valid layer key ('L_' + name), or '' when it is valid."""
    if not key.startswith(LAYER_PREFIX):
        return f"layer part {key!r} does not start with {LAYER_PREFIX!r}"
    name = key[len(LAYER_PREFIX) :]
    if not name:
        return f"layer part {key!r} has an empty name"
    if "/" in name:
        return f"layer part {key!r} contains '/'"
    if any(ch.isspace() for ch in name):
        return f"layer part {key!r} contains whitespace"
    return ""


def _parse_int(text: str) -> int | None:
    """Return the non-negative decimal integer spelled by `text` (ASCII digits), else None."""
    if not _INT.fullmatch(text):
        return None
    try:
        return int(text)
    except ValueError:  # more digits than int() accepts
        return None


def _parse_selection(text: str) -> IndexSelection | None:
    """Return the selection spelled by `text` ('*', '3', '2:5', '1,4,7'), or None if malformed."""
    if text == "*":
        return IndexSelection()
    if ":" in text:
        start_text, _, stop_text = text.partition(":")
        start, stop = _parse_int(start_text), _parse_int(stop_text)
        if start is None or stop is None or start >= stop:
            return None
        return IndexSelection(start=start, stop=stop)
    values = []
    for part in text.split(","):
        value = _parse_int(part)
        if value is None:
            return None
        values.append(value)
    return IndexSelection(values=tuple(values))


def _split_parts(text: str) -> list[str]:
    """Split a signature into its parts, accepting the legacy dash form E_3-L_name-n_5."""
    if "/" in text:
        return text.split("/")
    epoch, dash, rest = text.partition("-")
    if not dash:
        return [epoch]
    if rest.startswith(LAYER_PREFIX):
        layer, dash, neurons = rest.rpartition("-" + NEURON_PREFIX)
        if dash:
            return [epoch, layer, NEURON_PREFIX + neurons]
    return [epoch, rest]


def _malformed(text: str, detail: str) -> ValueError:
    return ValueError(f"malformed signature {text!r}: {detail}; expected {GRAMMAR}")


def _parse_part(text: str, part: str, prefix: str, what: str) -> IndexSelection:
    if not part.startswith(prefix):
        raise _malformed(text, f"{what} part {part!r} does not start with {prefix!r}")
    body = part[len(prefix) :]
    selection = _parse_selection(body)
    if selection is None:
        start, _, stop = body.partition(":")
        if _parse_int(start) is not None and _parse_int(stop) is not None:
            raise _malformed(text, f"{what} part {part!r} is an empty range; need start < stop")
        raise _malformed(text, f"{what} part {part!r} is not a selection")
    return selection


def parse_signature(text: str) -> Signature:
    """Parse 'E_<sel>[/L_<name>[/n_<sel>]]' (or the legacy dash form) into a Signature.

    Raises ValueError quoting `text` and the grammar when it is malformed, TypeError for non-str.
    """
    if not isinstance(text, str):
        raise TypeError(f"signature must be a str, got {type(text).__name__}: {text!r}")
    stripped = text.strip()
    if not stripped:
        raise _malformed(text, "it is empty")
    if stripped.endswith("/") or ("/" not in stripped and stripped.endswith("-")):
        raise _malformed(text, f"trailing {stripped[-1]!r}")
    parts = _split_parts(stripped)
    if len(parts) > 3:
        raise _malformed(text, f"{len(parts)} parts, at most 3 allowed")
    epochs = _parse_part(text, parts[0], EPOCH_PREFIX, "epoch")
    if len(parts) == 1:
        return Signature(epochs)
    layer = parts[1]
    if layer.startswith(NEURON_PREFIX):
        raise _malformed(text, f"neuron part {layer!r} needs a layer part L_<name> before it")
    problem = _layer_problem(layer)
    if problem:
        raise _malformed(text, problem)
    if len(parts) == 2:
        return Signature(epochs, layer)
    neurons = _parse_part(text, parts[2], NEURON_PREFIX, "neuron")
    return Signature(epochs, layer, neurons)


def _as_selection(value: int | str | IndexSelection, what: str) -> IndexSelection:
    if isinstance(value, IndexSelection):
        return value
    if isinstance(value, str):
        selection = _parse_selection(value.strip())
        if selection is None:
            raise ValueError(f"{what} {value!r} is not a selection: *, 3, 2:5 or 1,4,7")
        return selection
    return IndexSelection(values=(_check_index(value, what),))


def format_signature(
    epochs: int | str | IndexSelection,
    layer: str | None = None,
    neurons: int | str | IndexSelection | None = None,
) -> str:
    """Return the canonical slash form, e.g. (30, 'hidden_1', 20) -> 'E_30/L_hidden_1/n_20'.

    `epochs`/`neurons`: int, IndexSelection or selection string ('*', '2:5'); `layer`: name or key.
    """
    signature = Signature(
        _as_selection(epochs, "epochs"),
        None if layer is None else layer_key(layer),
        None if neurons is None else _as_selection(neurons, "neurons"),
    )
    return str(signature)


def layer_key(name: str) -> str:
    """Return the layer key 'L_' + module name; a name that already is a key ('L_x') is kept.

    'L_' alone is no key (its name part is empty), so it becomes 'L_L_'. A name with '/' or
    whitespace cannot be addressed by a signature: ValueError naming it.
    """
    if not isinstance(name, str):
        raise TypeError(f"layer name must be a str, got {name!r}")
    if not name:
        raise ValueError(f"invalid layer name {name!r}: it is empty")
    key = name if name.startswith(LAYER_PREFIX) and len(name) > len(LAYER_PREFIX) else LAYER_PREFIX + name
    problem = _layer_problem(key)
    if problem:
        raise ValueError(f"invalid layer name {name!r}: {problem}")
    return key


def call_key(layer: str, call: int) -> str:
    """The layer key of call number ``call`` (1, 2, …, in the order of the forward pass) of the module whose
    key is ``layer``: the key itself for the first call, ``L_x:2`` for the second, and so on."""
    problem = _layer_problem(layer) if isinstance(layer, str) else f"layer {layer!r} is not a str"
    if problem:
        raise ValueError(problem)
    if _check_index(call, "call") < 1:
        raise ValueError(f"call must be 1 or more, got {call}")
    return layer if call == 1 else f"{layer}:{call}"


def match_layers(pattern: str, keys: Iterable[str]) -> list[str]:
    """The members of `keys` that `pattern` names, in order: `pattern` itself when it is one of them
    (an exact key wins over its glob reading), else those matching it as a glob (fnmatchcase)."""
    keys = list(keys)
    if pattern in keys:
        return [pattern]
    return [key for key in keys if fnmatch.fnmatchcase(key, pattern)]


def epoch_key(epoch: int) -> str:
    """Return the key of one epoch, e.g. 3 -> 'E_3'."""
    return f"{EPOCH_PREFIX}{_check_index(epoch, 'epoch')}"


def neuron_key(neuron: int) -> str:
    """Return the key of one neuron, e.g. 20 -> 'n_20'."""
    return f"{NEURON_PREFIX}{_check_index(neuron, 'neuron')}"


def parse_key(prefix: str, key: str) -> int:
    """Return the integer of a key such as parse_key('E_', 'E_3') -> 3; ValueError otherwise."""
    if not isinstance(key, str):
        raise TypeError(f"key must be a str, got {key!r}")
    value = _parse_int(key[len(prefix) :]) if key.startswith(prefix) else None
    if value is None:
        raise ValueError(f"key {key!r} is not of the form {prefix}<int>")
    return value


def is_glob(pattern: str) -> bool:
    """True when `pattern` contains a glob character (*, ? or [) and so may match many keys."""
    return any(ch in _GLOB_CHARS for ch in pattern)
