"""Save every figure of a trace as PNG, and the staining graph's animation as GIF (used by ``main.py``)."""

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


def figure_names(trace: Trace) -> list[str]:
    """The files ``save_figures`` writes for ``trace``, without their suffix, in order."""
    names = []
    if trace.epochs and trace.num_classes:
        names += ["staining_graph", "brain_scan", "class_means", "stain_evolution", "weight_drift"]
    if trace.epochs:
        names.append("unit_health")
        if not trace.metrics.empty:
            names.append("training_curves")
        if "test_confusion" in trace.run_metrics:
            names.append("confusion")
        if trace.num_classes:
            names.append("staining_graph_animation")
            names += _intervention_figures(trace)
        names += _probe_figures(trace)
    return names


def _probe_figures(trace: Trace) -> list[str]:
    """The representation figures of a run recorded with a probe set (``NetworkTrace(..., probe=)``)."""
    if not trace.meta.get("probe"):
        return []
    from . import probes

    names = ["cka", "cka_epochs", "probe_accuracy", "embeddings"]
    kinds = {c["kind"] for c in probes.probe_contents(trace.path, trace.meta, trace.epochs[-1])}
    if trace.num_classes and "linear_input" in kinds:
        try:
            staining.linear_chain(trace)
            names.append("breadcrumbs")
        except ValueError:
            pass
    if "saliency" in kinds:
        names.append("saliency")
    return names


def _intervention_figures(trace: Trace) -> list[str]:
    """The figures of the run's stored stain effects (``intervene.save_effects``; ``main.py`` stores them)."""
    from .intervene import effects_path

    names = ["effect_matrix", "stain_specificity"] if effects_path(trace).is_file() else []
    if effects_path(trace, "neuron_effects").is_file():
        names.append("causal_staining_graph")
    return names


def save_figures(
    trace: Trace, folder: str | Path, progress: Callable[[str], None] | None = None
) -> list[Path]:
    """Draw the trace's figures into ``folder`` (PNG, and the staining graph over epochs as GIF); returns
    their paths. ``progress(name)`` is called after each one.

    Figures whose data the trace lacks (per-class statistics, metrics, a confusion matrix) are skipped.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not trace.epochs:
        log.info("trace %s has no recorded epochs: no figures", trace.path)
        return []
    draw: dict[str, Callable[[], Figure]] = {}
    stains = None
    if trace.num_classes:
        stains = staining.selectivity(trace)
        last = stains.xs(trace.epochs[-1], level="epoch", drop_level=False)
        draw |= {
            "staining_graph": lambda: plots.plot_staining_graph(trace, -1, stains=last),
            "brain_scan": lambda: plots.plot_brain_scan(trace, -1, stains=last),
            "class_means": lambda: plots.plot_class_means(trace, -1),
            "stain_evolution": lambda: plots.plot_stain_evolution(
                trace, staining.stain_evolution(trace, stains)
            ),
            "weight_drift": lambda: plots.plot_weight_drift(trace, stains=last),
            "effect_matrix": lambda: plots.plot_effect_matrix(trace),
            "stain_specificity": lambda: plots.plot_specificity(trace),
            "causal_staining_graph": lambda: plots.plot_staining_graph(
                trace, -1, stains=last, neuron_rings=_causal_rings(trace)
            ),
        }
    else:
        log.info("trace %s has no per-class statistics: no staining figures", trace.path)
    draw |= {
        "unit_health": lambda: plots.plot_unit_health(trace),
        "training_curves": lambda: plots.plot_training_curves(trace),
        "confusion": lambda: plots.plot_confusion(trace),
        "cka": lambda: plots.plot_cka(trace),
        "cka_epochs": lambda: plots.plot_cka_epochs(trace),
        "probe_accuracy": lambda: plots.plot_probe_accuracy(trace),
        "embeddings": lambda: plots.plot_embeddings(trace),
        "breadcrumbs": lambda: plots.plot_breadcrumbs(trace, 0),
        "saliency": lambda: plots.plot_saliency(trace),
    }
    paths = []
    for name in figure_names(trace):
        if name == "staining_graph_animation":
            path = plots.save_staining_animation(trace, folder / f"{name}.gif", stains=stains)
        else:
            path = folder / f"{name}.png"
            draw[name]().savefig(path, dpi=DPI)
        paths.append(path)
        if progress is not None:
            progress(name)
    return paths


def _causal_rings(trace: Trace):
    """Ring values of the causal staining graph: ``intervene.causal_rings`` of the stored neuron effects."""
    from .intervene import causal_rings, load_effects

    return causal_rings(trace, load_effects(trace, "neuron_effects"))
