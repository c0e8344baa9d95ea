"""Model checkpoints beside a trace: ``<store>/checkpoints/epoch=<e>/model.safetensors``.

One safetensors file per recorded epoch holds the model's ``state_dict`` (no pickle: opening a
checkpoint never runs code from it). A file is written under a dot-prefixed temporary name in
its own folder and renamed into place, so a crash never leaves a half-written checkpoint and no
glob picks up a temporary file. ``intervene.load_checkpoint`` restores one into a model.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
FILENAME = "model.safetensors"
_EPOCH_DIR = re.compile(r"^epoch=(\d+)$")


def _root(store: Any) -> Path:
    """The store folder of a path or of a loaded ``Trace`` (its ``.path``)."""
    return Path(getattr(store, "path", store))


def checkpoint_path(store: str | os.PathLike | Any, epoch: int) -> Path:
    """Where epoch ``epoch``'s checkpoint lives: ``<store>/checkpoints/epoch=<e>/model.safetensors``."""
    return _root(store) / CHECKPOINTS / f"epoch={int(epoch)}" / FILENAME


def write_checkpoint(store: str | os.PathLike | Any, epoch: int, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (a ``state_dict``) as epoch ``epoch``'s checkpoint, atomically.

    The file is written under a dot-prefixed temporary name in the same folder, then renamed."""
    import torch
    from safetensors.torch import save_file

    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"checkpoint epoch must be a non-negative int, got {epoch!r}")
    bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise TypeError(f"checkpoint values must be tensors; not tensors: {', '.join(map(str, bad))}")
    seen: set[tuple[int, int]] = set()
    plain: dict[str, torch.Tensor] = {}
    for name, value in tensors.items():
        value = value.detach().cpu().contiguous()
        key = (value.untyped_storage().data_ptr(), value.untyped_storage().nbytes())
        if value.numel() and key in seen:  # safetensors refuses tensors that share memory
            value = value.clone()
        seen.add(key)
        plain[name] = value
    path = checkpoint_path(store, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(plain, str(tmp), metadata={"format": "nn_staining.checkpoint", "epoch": str(epoch)})
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.debug("wrote checkpoint %s (%d tensors)", path, len(plain))


def checkpoint_epochs(store: str | os.PathLike | Any) -> list[int]:
    """The epochs that have a complete checkpoint in ``store``, ascending (empty when none)."""
    folder = _root(store) / CHECKPOINTS
    if not folder.is_dir():
        return []
    epochs = []
    for entry in folder.iterdir():
        match = _EPOCH_DIR.match(entry.name)
        if match and (entry / FILENAME).is_file():
            epochs.append(int(match.group(1)))
    return sorted(epochs)


def read_checkpoint(store: str | os.PathLike | Any, epoch: int) -> dict[str, torch.Tensor]:
    """Epoch ``epoch``'s stored ``state_dict`` as CPU tensors; a negative epoch counts from the last
    checkpoint. A ``KeyError`` names the epochs that have checkpoints when this one has none."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    epochs = checkpoint_epochs(store)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise TypeError(f"checkpoint epoch must be an int, got {epoch!r}")
    if epoch < 0 and epochs and -epoch <= len(epochs):
        epoch = epochs[epoch]
    if epoch not in epochs:
        have = (
            ", ".join(map(str, epochs))
            if epochs
            else "none (record with NetworkTrace(..., record_checkpoints=True))"
        )
        raise KeyError(
            f"no checkpoint for epoch {epoch} in {str(_root(store))!r}; epochs with checkpoints: {have}"
        )
    path = checkpoint_path(store, epoch)
    try:
        return load_file(str(path))
    except SafetensorError as exc:
        raise ValueError(f"checkpoint {str(path)!r} is damaged or not a safetensors file: {exc}") from exc
