"""nn_staining: record what happens inside a PyTorch network while it trains, and analyse it.

``NetworkTrace`` records (it imports torch); ``load_trace`` reads a trace without torch. Each is
imported when first used, so recording does not import pandas (about 45 MiB resident).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # for type checkers; at run time each is imported when first used (below)
    from .recorder import NetworkTrace
    from .trace import Trace, load_trace

__all__ = ["NetworkTrace", "Network_Trace", "Trace", "load_trace", "plots", "staining", "__version__"]


def __getattr__(name: str):
    """Import the recorder (and torch), the reader (and pandas) or the analysis modules only when they are used."""
    if name in ("NetworkTrace", "Network_Trace"):
        from .recorder import NetworkTrace

        return NetworkTrace
    if name in ("Trace", "load_trace"):
        from . import trace

        return getattr(trace, name)
    if name in ("staining", "plots"):
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'nn_staining' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
