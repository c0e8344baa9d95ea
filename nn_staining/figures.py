"""Save every figure of a trace as PNG (used by ``main.py``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from matplotlib.figure import Figure

from . import plots, staining
from .trace import Trace

log = logging.getLogger(__name__)

#: Resolution of the saved PNGs.
DPI = 120


def save_figures(trace: Trace, folder: str | Path) -> list[Path]:
    """Draw the trace's figures into ``folder`` as PNG; returns their paths.

    Figures whose data the trace lacks (per-class statistics, metrics, a confusion matrix) are skipped.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not trace.epochs:
        log.info("trace %s has no recorded epochs: no figures", trace.path)
        return []
    figures: list[tuple[str, Callable[[], Figure]]] = []
    if trace.num_classes:
        stains = staining.selectivity(trace)
        last = stains.xs(trace.epochs[-1], level="epoch", drop_level=False)
        figures += [
            ("staining_graph", lambda: plots.plot_staining_graph(trace, -1, stains=last)),
            ("brain_scan", lambda: plots.plot_brain_scan(trace, -1, stains=last)),
            (
                "stain_evolution",
                lambda: plots.plot_stain_evolution(trace, staining.stain_evolution(trace, stains)),
            ),
            ("weight_drift", lambda: plots.plot_weight_drift(trace, stains=last)),
        ]
    else:
        log.info("trace %s has no per-class statistics: no staining figures", trace.path)
    figures.append(("unit_health", lambda: plots.plot_unit_health(trace)))
    if not trace.metrics.empty:
        figures.append(("training_curves", lambda: plots.plot_training_curves(trace)))
    if "test_confusion" in trace.run_metrics:
        figures.append(("confusion", lambda: plots.plot_confusion(trace)))
    paths = []
    for name, draw in figures:
        path = folder / f"{name}.png"
        draw().savefig(path, dpi=DPI)
        paths.append(path)
    return paths
