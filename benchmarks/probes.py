"""Probe cost: time per recorded epoch and bytes per epoch of ``NetworkTrace(..., probe=(x, y))``, n = 512.

    python benchmarks/probes.py                       # every workload, median of 3
    python benchmarks/probes.py --workloads digits --n 256 --repeats 5

For each workload the probe set is the first ``n`` samples. ``run_probe`` (training thread: the
probe passes, the Gram matrices, saliency, restoring modes and RNG) and ``write_probe`` (writer
thread) are timed on their own, and set against one training epoch of the same workload measured
in the same run. Bytes are the epoch's probe part on disk with the default budget
(``probes.DEFAULT_PROBE_BUDGET``); "stored" says which layers keep all their activations. The
"1M-neuron layer" workload (run once: its float64 Gram is n² × 2^20 multiply-adds) shows a layer
far wider than the budget: the part stays within the budget plus its Gram, and the Gram is built in
blocks of samples within ``probes.PROBE_MEMORY``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nn_staining import probes  # noqa: E402
from nn_staining.layers import select_layers  # noqa: E402


@dataclass
class Workload:
    name: str
    build: Callable[[], nn.Module]
    x: torch.Tensor
    y: torch.Tensor
    batch_size: int = 128
    train_epoch: bool = True


def digits_mlp() -> Workload:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor((d.data - d.data.mean(0)) / (d.data.std(0) + 1e-6), dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    return Workload("digits MLP 64-128-128-10 (1,797 samples)", build, x, y)


def wide_mlp() -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16384, 784, generator=g)
    y = torch.randint(0, 10, (16384,), generator=g)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
        )

    return Workload("wide MLP 784-1024-1024-10 (16,384 samples)", build, x, y)


def cnn() -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (4096,), generator=g)

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 14 * 14, 128),
            nn.ReLU(),
            nn.Linear(128, 10),
        )

    return Workload("CNN conv32-conv64-pool-fc128-fc10 (4,096 28×28 samples)", build, x, y)


def million() -> Workload:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = torch.randint(0, 10, (512,), generator=g)

    def build() -> nn.Module:
        return nn.Sequential(nn.Linear(16, 2**20), nn.ReLU(), nn.Linear(2**20, 10))

    return Workload("1M-neuron layer 16-1,048,576-10 (probe only)", build, x, y, train_epoch=False)


WORKLOADS = {"digits": digits_mlp, "wide": wide_mlp, "cnn": cnn, "million": million}


def epoch_seconds(w: Workload, model: nn.Module) -> float:
    """One plain training epoch (Adam, cross-entropy) of the workload."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for i in range(0, len(w.x), w.batch_size):
        xb, yb = w.x[i : i + w.batch_size], w.y[i : i + w.batch_size]
        loss = nn.functional.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - start


def measure(w: Workload, n: int, repeats: int) -> dict[str, object]:
    torch.manual_seed(0)
    model = w.build()
    probe = probes.ProbeSet.from_arg((w.x[:n], w.y[:n]))
    modules = select_layers(model)
    record = probes.run_probe(model, modules, probe)  # warm-up
    run, write, train, size = [], [], [], 0
    with tempfile.TemporaryDirectory() as root:
        for _ in range(repeats):
            if w.train_epoch:
                train.append(epoch_seconds(w, model))
            start = time.perf_counter()
            record = probes.run_probe(model, modules, probe)
            run.append(time.perf_counter() - start)
            start = time.perf_counter()
            probes.write_probe(root, 0, record, list(modules))
            write.append(time.perf_counter() - start)
            size = probes.probe_part(root, 0).stat().st_size
    full = [
        k
        for k, lp in record.layers.items()
        if lp.activations is not None and lp.activations.shape[1] == lp.width
    ]
    cut = [
        f"{k} {0 if lp.activations is None else lp.activations.shape[1]}/{lp.width}"
        for k, lp in record.layers.items()
        if k not in full
    ]
    return {
        "workload": w.name,
        "layers": len(record.layers),
        "run_s": statistics.median(run),
        "write_s": statistics.median(write),
        "epoch_s": statistics.median(train) if train else float("nan"),
        "bytes": size,
        "saliency": record.saliency is not None,
        "cut": ", ".join(cut) or "none",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=512, help="probe samples (default 512)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: small ops spin-wait on a busy VM)",
    )
    parser.add_argument(
        "--workloads", default=",".join(WORKLOADS), help=f"comma list of {', '.join(WORKLOADS)}"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"# probe cost, n = {args.n}, budget {probes.DEFAULT_PROBE_BUDGET / 2**20:g} MiB per epoch, median of "
        f"{args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores\n"
    )
    print(
        "| workload | layers | run_probe s | write_probe s | training epoch s | probe / epoch | "
        "bytes per epoch | saliency | activations cut by the budget |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in args.workloads.split(","):
        if name not in WORKLOADS:
            parser.error(f"workload {name!r} is not one of {', '.join(WORKLOADS)}")
        workload = WORKLOADS[name]()
        r = measure(workload, args.n, args.repeats if workload.train_epoch else 1)
        ratio = r["run_s"] / r["epoch_s"] if r["epoch_s"] == r["epoch_s"] else float("nan")
        print(
            f"| {r['workload']} | {r['layers']} | {r['run_s']:.3f} | {r['write_s']:.3f} | {r['epoch_s']:.3f} | "
            f"{ratio:.1%} | {r['bytes'] / 2**20:.2f} MiB | {'yes' if r['saliency'] else 'no'} | {r['cut']} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
