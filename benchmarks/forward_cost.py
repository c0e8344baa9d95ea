"""What recording adds to one forward pass, per workload of ``benchmarks/overhead.py``: a recorded
model and an identical plain copy run the same labelled batch in alternation, in one process and
one open epoch, and the added time is the median of the per-round differences. Much steadier on a
shared VM than whole training runs (which also pay the backward pass, the optimiser and the
epoch's end), so it shows what a change to the hooks or the kernel does.

    python benchmarks/forward_cost.py --workloads deep,digits,wide --threads 1
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from overhead import WORKLOADS  # noqa: E402

from nn_staining import NetworkTrace  # noqa: E402


def passes(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, n: int, trace: NetworkTrace | None
) -> float:
    """Mean seconds of ``n`` forward passes (with autograd, as in training), labelled when recorded."""
    start = time.perf_counter()
    for _ in range(n):
        if trace is not None:
            trace.set_targets(y)
        model(x)
    return (time.perf_counter() - start) / n


def measure(key: str, rounds: int, n: int) -> tuple[str, float, float]:
    """(workload name, plain µs per pass, added µs per pass)."""
    w = WORKLOADS[key]()
    torch.manual_seed(0)
    recorded = w.build()
    plain = copy.deepcopy(recorded)
    x, y = w.x[: w.batch_size], w.y[: w.batch_size]
    with tempfile.TemporaryDirectory() as tmp:
        trace = NetworkTrace(recorded, os.path.join(tmp, "t"), num_classes=w.classes)
        with trace:
            trace.start_epoch(0)
            passes(recorded, x, y, n, trace)  # learns the layer graph, plans the hooks, builds the kernel
            passes(plain, x, y, n, None)
            plain_s, added = [], []
            for _ in range(rounds):
                a = passes(plain, x, y, n, None)
                b = passes(recorded, x, y, n, trace)
                plain_s.append(a)
                added.append(b - a)
            trace.end_epoch()
    return w.name, statistics.median(plain_s) * 1e6, statistics.median(added) * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="digits,wide,cnn,deep,resnet18")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--passes", type=int, default=20, help="forward passes per timing")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, median of {args.rounds} rounds")
    print("| workload | plain forward µs | recording adds µs | × forward |")
    print("| --- | --- | --- | --- |")
    for key in args.workloads.split(","):
        name, plain, added = measure(key, args.rounds, args.passes)
        print(f"| {name} | {plain:,.0f} | {added:,.0f} | {1 + added / plain:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
