"""Chunk reductions: the fused C++ kernel against the torch-op path, in one run.

    python benchmarks/kernel.py                  # wide and deep MLP, median of 5
    python benchmarks/kernel.py --repeats 7 --samples 4096 --threads 1

Each repetition trains one recorded epoch per path (10 classes, every statistic and the Linear
inputs' class means, as the recorder does by default) and one plain epoch, in a new random order,
and times the recorder's chunk reductions on the training thread. The ratios are medians of the
per-repetition ratios, so a shared machine's drift cancels out.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nn_staining import NetworkTrace, kernels  # noqa: E402
from nn_staining.stats import DEFAULT_CHUNK_BYTES, MAX_BATCHES_PER_CHUNK, Moments, PhaseStats  # noqa: E402


def wide_mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def deep_mlp() -> nn.Module:
    blocks = [m for _ in range(8) for m in (nn.Linear(256, 256), nn.BatchNorm1d(256), nn.GELU())]
    return nn.Sequential(*blocks, nn.Linear(256, 10))


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "wide MLP 784-1024-1024-10": (wide_mlp, 784),
    "deep MLP 8×(Linear 256, BatchNorm1d, GELU)": (deep_mlp, 256),
}


def chunk_layers(model: nn.Module, width: int) -> tuple[int, list[tuple[int, bool]]]:
    """The rows of one chunk as the recorder buffers it (batches of 128 until ``DEFAULT_CHUNK_BYTES``)
    and each recorded layer's (width, is a Linear's input)."""
    layers = [(m.in_features, True) for m in model if isinstance(m, nn.Linear)]
    widths, feeding = [], width
    for m in model:
        feeding = m.out_features if isinstance(m, nn.Linear) else feeding
        widths.append((feeding, False))
    layers += widths
    per_row = 4 * sum(w for w, _ in layers)
    batches = min(-(-DEFAULT_CHUNK_BYTES // (128 * per_row)), MAX_BATCHES_PER_CHUNK)
    return 128 * batches, layers


def chunk_seconds(
    rows: list[torch.Tensor], labels: torch.Tensor, layers: list[tuple[int, bool]], path: str
) -> float:
    """Seconds to fold one chunk of every layer by ``path`` (fresh Moments, shift already taken)."""
    moments = [Moments(w, 10, torch.device("cpu"), class_only=inputs) for w, inputs in layers]
    with kernels.using(path):
        for m, r in zip(moments, rows):
            m.update(r, labels)  # the first chunk also takes the shift
        start = time.perf_counter()
        for m, r in zip(moments, rows):
            m.update(r, labels)
        return time.perf_counter() - start


class ReductionTimer:
    """Seconds spent in PhaseStats' chunk reductions while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = PhaseStats._reduce_chunk

    def __enter__(self) -> ReductionTimer:
        original, timer = self._original, self

        def timed(stats: PhaseStats) -> None:
            start = time.perf_counter()
            original(stats)
            timer.seconds += time.perf_counter() - start

        PhaseStats._reduce_chunk = timed
        return self

    def __exit__(self, *exc: object) -> None:
        PhaseStats._reduce_chunk = self._original


def epoch(
    build: Callable[[], nn.Module], x: torch.Tensor, y: torch.Tensor, mode: str, store: str
) -> tuple[float, float]:
    """One epoch in ``mode`` (plain, cpp or torch); (epoch seconds, reduction seconds)."""
    torch.manual_seed(0)
    model = build()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    trace = None if mode == "plain" else NetworkTrace(model, store, num_classes=10, overwrite=True)
    with ReductionTimer() as timer, kernels.using("torch" if mode == "plain" else mode):
        start = time.perf_counter()
        if trace is not None:
            trace.start_epoch(0)
        for i in range(0, len(x), 128):
            xb, yb = x[i : i + 128], y[i : i + 128]
            if trace is not None:
                trace.set_targets(yb)
            loss = loss_fn(model(xb), yb)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        if trace is not None:
            trace.end_epoch()
        seconds = time.perf_counter() - start
        if trace is not None:
            trace.close()
    return seconds, timer.seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--samples", type=int, default=8192, help="samples per epoch (batches of 128)")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    chosen = kernels.backend()
    if chosen.ops is None:
        print(f"the C++ kernel is not available: {chosen.why}")
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads; kernel {chosen.why}")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rng = random.Random(0)
    chunk_rows = [
        "| workload | chunk rows × values | torch ops ms | C++ ms | torch ns/value | C++ ns/value | torch/C++ × |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, (build, width) in WORKLOADS.items():
        n, layers = chunk_layers(build(), width)
        g = torch.Generator().manual_seed(0)
        data = [torch.randn(n, w, generator=g) for w, _ in layers]
        labels = torch.randint(0, 11, (n,), generator=g)
        times: dict[str, list[float]] = {"torch": [], "cpp": []}
        for _ in range(args.repeats):
            for path in rng.sample(list(times), 2):
                times[path].append(chunk_seconds(data, labels, layers, path))
        values = n * sum(w for w, _ in layers)
        t, c = statistics.median(times["torch"]), statistics.median(times["cpp"])
        ratio = statistics.median([a / b for a, b in zip(times["torch"], times["cpp"])])
        chunk_rows.append(
            f"| {name} | {n} × {values // n} | {t * 1e3:.1f} | {c * 1e3:.1f} | {t / values * 1e9:.2f} | "
            f"{c / values * 1e9:.2f} | {ratio:.2f} |"
        )
    print(f"one chunk of every recorded layer (random rows, 10 classes), median of {args.repeats}:")
    print("\n".join(chunk_rows))
    rows = [
        "| workload | plain epoch s | reduction s, torch ops | reduction s, cpp | torch/cpp × | "
        "reduction / plain, torch | reduction / plain, cpp | epoch × plain, torch | epoch × plain, cpp |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name, (build, width) in WORKLOADS.items():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.samples, width, generator=g)
            y = torch.randint(0, 10, (args.samples,), generator=g)
            epoch(build, x[:512], y[:512], "cpp", os.path.join(tmp, "warm"))  # first-touch costs
            runs: dict[str, list[tuple[float, float]]] = {"plain": [], "torch": [], "cpp": []}
            for _ in range(args.repeats):
                modes = list(runs)
                rng.shuffle(modes)
                for mode in modes:
                    runs[mode].append(epoch(build, x, y, mode, os.path.join(tmp, mode)))
            plain = [s for s, _ in runs["plain"]]

            def med(values: list[float]) -> float:
                return statistics.median(values)

            speedup = med([t[1] / c[1] for t, c in zip(runs["torch"], runs["cpp"])])
            cells = [
                name,
                f"{med(plain):.3f}",
                f"{med([r for _, r in runs['torch']]):.3f}",
                f"{med([r for _, r in runs['cpp']]):.3f}",
                f"{speedup:.2f}",
                *(f"{med([r / p for (_, r), p in zip(runs[m], plain)]):.1%}" for m in ("torch", "cpp")),
                *(f"{med([s / p for (s, _), p in zip(runs[m], plain)]):.2f}" for m in ("torch", "cpp")),
            ]
            rows.append("| " + " | ".join(cells) + " |")
    print(
        f"one recorded epoch per path: {args.samples} samples, batch 128, 10 classes, median of {args.repeats}:"
    )
    print("\n".join(rows))
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
