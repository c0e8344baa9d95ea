"""Recording overhead: plain training vs nn_staining vs the TensorBoard practice, alternated in one run.

    python benchmarks/overhead.py                # the five workloads, median of 3
    python benchmarks/overhead.py --repeats 5 --workloads digits,deep --modes plain,nn_staining,torch-ops
    python benchmarks/overhead.py --compile      # every mode's model under torch.compile
    python benchmarks/overhead.py --device cuda --sync-debug

Workloads: digits MLP, wide MLP, CNN, deep MLP 8x(Linear 256, BatchNorm1d, GELU) with 20 classes,
and torchvision's resnet18 (rebuilt in tests/zoo.py). nn_staining records everything: every
neurons column, per-class statistics, input class means for pathways, a weights snapshot and every
epoch. "torch-ops" is the same with the CPU chunk reductions done by the torch-op fallback instead
of the fused C++ kernel (side by side with "nn_staining", which uses the kernel where it is built).
"skip" is nn_staining attached with no epoch selected for recording (the cost of a non-recorded
epoch). "tensorboard" writes ``add_histogram`` of every parameter and every layer's last-batch
activation once per epoch. Ratios are against "plain" measured in the same run; the modes run in a
new random order in each repetition. With --compile the batch that compiles is not timed and the
last odd-sized batch of each epoch is dropped (it would compile again).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nn_staining import NetworkTrace, kernels  # noqa: E402


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    epochs: int
    batch_size: int = 128
    classes: int = 10


def digits_mlp() -> Workload:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor((d.data - d.data.mean(0)) / (d.data.std(0) + 1e-6), dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    return Workload("digits MLP 64-128-128-10, 20 epochs", build, x, y, epochs=20)


def wide_mlp() -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16384, 784, generator=g)
    y = torch.randint(0, 10, (16384,), generator=g)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    return Workload("wide MLP 784-1024-1024-10, 2 epochs", build, x, y, epochs=2)


def cnn() -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (4096,), generator=g)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(9216, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    return Workload("CNN conv32-conv64-pool-fc128-fc10, 2 epochs", build, x, y, epochs=2)


def deep_mlp() -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8192, 256, generator=g)
    y = torch.randint(0, 20, (8192,), generator=g)

    def build() -> nn.Module:
        blocks = [m for _ in range(8) for m in (nn.Linear(256, 256), nn.BatchNorm1d(256), nn.GELU())]
        return nn.Sequential(*blocks, nn.Linear(256, 20))

    return Workload(
        "deep MLP 8x(Linear 256, BatchNorm1d, GELU), 20 classes, 3 epochs", build, x, y, epochs=3, classes=20
    )


def resnet18() -> Workload:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from zoo import resnet18 as build_resnet18  # torchvision's resnet18, module for module

    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)
    return Workload(
        "resnet18 (torchvision's), 512 images 32x32, 1 epoch", build_resnet18, x, y, epochs=1, batch_size=64
    )


WORKLOADS = {"digits": digits_mlp, "wide": wide_mlp, "cnn": cnn, "deep": deep_mlp, "resnet18": resnet18}
MODES = ("plain", "nn_staining", "torch-ops", "skip", "tensorboard")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(
    w: Workload, mode: str, device: torch.device, store: str, sync_debug: bool = False, compiled: bool = False
) -> float:
    """Train ``w`` once in ``mode``; returns wall seconds (model build and data transfer excluded;
    with ``compiled``, the model runs under ``torch.compile`` and its first batch, which compiles, is
    left out too)."""
    torch.manual_seed(0)
    model = w.build().to(device)
    runner = torch.compile(model) if compiled else model
    x, y = w.x.to(device), w.y.to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    n = len(x)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).to(device)
    trace = None
    writer = None
    if mode in ("nn_staining", "torch-ops", "skip"):
        intervals = [10**9] if mode == "skip" else None
        trace = NetworkTrace(model, store, epoch_intervals=intervals, num_classes=w.classes, overwrite=True)
    elif mode == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(store)
        last: dict[str, torch.Tensor] = {}
        for name, module in model.named_modules():
            if name:
                module.register_forward_hook(lambda m, a, o, name=name: last.__setitem__(name, o.detach()))
    guard = torch.cuda.set_sync_debug_mode if (sync_debug and device.type == "cuda") else None
    if compiled:
        torch._dynamo.reset()  # a fresh model each run: no cache entries pile up to the recompile limit
    sync(device)
    start = time.perf_counter()
    with trace if trace is not None else contextlib.nullcontext():
        for epoch in range(w.epochs):
            if trace is not None:
                trace.start_epoch(epoch)
            if guard:
                guard("error")
            for i in range(
                0, n - n % w.batch_size if compiled else n, w.batch_size
            ):  # compiled: no odd batch
                idx = order[i : i + w.batch_size]
                xb, yb = x[idx], y[idx]
                if trace is not None:
                    trace.set_targets(yb)
                loss = loss_fn(runner(xb), yb)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                if compiled and epoch == 0 and i == 0:  # the batch that compiled is not timed
                    sync(device)
                    start = time.perf_counter()
            if guard:
                guard("default")
            if trace is not None:
                trace.end_epoch()
            if writer is not None:
                for name, p in model.named_parameters():
                    writer.add_histogram(f"param/{name}", p.detach(), epoch)
                for name, act in last.items():
                    writer.add_histogram(f"act/{name}", act, epoch)
    if writer is not None:
        writer.close()
    sync(device)
    return time.perf_counter() - start


def timed(
    w: Workload, mode: str, device: torch.device, store: str, sync_debug: bool, compiled: bool
) -> float:
    """One run of ``mode``; ``torch-ops`` is nn_staining with its CPU chunks reduced by the torch-op
    fallback instead of the fused kernel (the same as ``nn_staining`` where the kernel is absent or
    the device is a GPU)."""
    backend = kernels.using("torch") if mode == "torch-ops" else contextlib.nullcontext()
    with backend:
        return train(w, mode, device, store, sync_debug, compiled)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument(
        "--workloads", default="digits,wide,cnn,deep,resnet18", help="comma list of: " + ", ".join(WORKLOADS)
    )
    p.add_argument("--modes", default=",".join(MODES), help="comma list of: " + ", ".join(MODES))
    p.add_argument("--device", default="cpu")
    p.add_argument("--compile", action="store_true", help="run every mode's model under torch.compile")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's); 1 on a shared 2-core machine, where spinning "
        "OpenMP threads of compiled kernels wait for each other (a compiled digits epoch: 2.7 s with 2, 16 ms with 1)",
    )
    p.add_argument(
        "--sync-debug", action="store_true", help="CUDA: raise on any host sync inside the batch loop"
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    modes = args.modes.split(",")
    if "plain" not in modes:
        modes.insert(0, "plain")
    if "tensorboard" in modes:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            print("tensorboard not installed (make bench installs it); skipping that column", file=sys.stderr)
            modes.remove("tensorboard")
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
        + f"; CPU reduction: {kernels.describe()}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.workloads.split(","):
            w = WORKLOADS[key]()
            # warm-up (allocator, kernels); on CUDA every mode, as Triton compiles its kernels on first use
            for m in modes if device.type == "cuda" else ["plain"]:
                timed(w, m, device, os.path.join(tmp, f"warm-{m}"), False, args.compile)
            times: dict[str, list[float]] = {m: [] for m in modes}
            order = random.Random(0)
            for r in range(args.repeats):
                # a new random order each repetition: no mode always runs first, or right after another
                # (a rotation would keep plain right after tensorboard, whose writer thread lingers)
                for m in order.sample(modes, len(modes)):
                    gc.collect()
                    path = os.path.join(tmp, f"{key}-{m}-{r}")
                    times[m].append(timed(w, m, device, path, args.sync_debug, args.compile))
            med = {m: statistics.median(t) for m, t in times.items()}
            # each repetition's ratio against the plain run of the same repetition, then the median:
            # neighbouring runs share the machine's state, which drifts on a shared VM
            ratio = {m: statistics.median(t / p for t, p in zip(times[m], times["plain"])) for m in modes}
            rows.append((w.name, med, ratio))
            cells = "  ".join(f"{m} {med[m]:.3f}s ({ratio[m]:.3f}x)" for m in modes)
            print(f"{w.name}: {cells}", flush=True)
    print()
    header = (
        "| workload | "
        + " | ".join(f"{m} s" for m in modes)
        + " | "
        + " | ".join(f"{m} ×" for m in modes[1:])
        + " |"
    )
    print(header)
    print("|" + " --- |" * (1 + 2 * len(modes) - 1))
    for name, med, ratio in rows:
        secs = " | ".join(f"{med[m]:.3f}" for m in modes)
        ratios = " | ".join(f"{ratio[m]:.3f}" for m in modes[1:])
        print(f"| {name} | {secs} | {ratios} |")
    print(
        f"\nseconds: median of {args.repeats} repetitions, modes in random order; ×: median of the "
        f"per-repetition ratios to plain; numpy {np.__version__}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
