"""Where a recorded run's extra time goes: one workload of ``benchmarks/overhead.py`` trained plain
and recorded (after a warm-up of each), the recorded run's time split into the batch loop,
``end_epoch`` and closing the trace (waiting for the writer), and its Python profile (the top
functions by own time, on the training thread).

    python benchmarks/profile_recording.py --workloads digits,wide --device cuda
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from overhead import WORKLOADS, train  # noqa: E402

from nn_staining import NetworkTrace  # noqa: E402

SPENT: dict[str, float] = defaultdict(float)


def timed_method(name: str):
    """Wrap ``NetworkTrace.<name>`` so the time spent inside it adds to ``SPENT[name]``."""
    original = getattr(NetworkTrace, name)

    def wrapper(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - start

    setattr(NetworkTrace, name, wrapper)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="digits,wide")
    p.add_argument("--device", default="cpu")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    for name in ("end_epoch", "__exit__", "set_targets"):
        timed_method(name)
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.workloads.split(","):
            w = WORKLOADS[key]()
            for mode in ("plain", "nn_staining"):  # warm-up: allocator, cuDNN, Triton's compilation
                train(w, mode, device, os.path.join(tmp, f"warm-{key}-{mode}"))
            plain = train(w, "plain", device, os.path.join(tmp, f"{key}-plain"))
            SPENT.clear()
            profiler = cProfile.Profile()
            profiler.enable()
            recorded = train(w, "nn_staining", device, os.path.join(tmp, f"{key}-rec"))
            profiler.disable()
            loop = recorded - SPENT["end_epoch"] - SPENT["__exit__"]
            print(
                f"\n## {w.name} on {device}: plain {plain:.3f} s, recorded {recorded:.3f} s (profiled); "
                f"batch loop {loop:.3f} s (set_targets {SPENT['set_targets']:.3f} s), "
                f"end_epoch {SPENT['end_epoch']:.3f} s over {w.epochs} epochs, close {SPENT['__exit__']:.3f} s"
            )
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
            print(out.getvalue()[out.getvalue().find("ncalls") :], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
