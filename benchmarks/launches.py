"""GPU kernels launched per training batch: plain training, recorded with the fused Triton kernel,
and recorded with the torch-op fallback, counted by torch.profiler over one whole epoch, its
``end_epoch`` included (after a warm-up epoch, so Triton's compilation is not counted).

    python benchmarks/launches.py --workloads digits,deep
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from overhead import WORKLOADS, Workload  # noqa: E402

from nn_staining import NetworkTrace, kernels  # noqa: E402

MODES = {"plain": None, "triton": "triton", "torch-ops": "torch"}


def launches_per_batch(w: Workload, mode: str, store: str) -> tuple[float, int]:
    """CUDA kernels launched per batch over one epoch in ``mode``, and the epoch's batch count."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = w.build().to(device)
    x, y = w.x.to(device), w.y.to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    backend = kernels.using(MODES[mode]) if MODES[mode] else contextlib.nullcontext()
    trace = NetworkTrace(model, store, num_classes=w.classes, overwrite=True) if MODES[mode] else None
    batches = range(0, len(x), w.batch_size)
    counted = 0
    with backend, trace if trace is not None else contextlib.nullcontext():
        for epoch in range(2):
            recorder = profile(activities=[ProfilerActivity.CUDA]) if epoch == 1 else contextlib.nullcontext()
            with recorder as prof:
                if trace is not None:
                    trace.start_epoch(epoch)
                for i in batches:
                    xb, yb = x[i : i + w.batch_size], y[i : i + w.batch_size]
                    if trace is not None:
                        trace.set_targets(yb)
                    loss = nn.functional.cross_entropy(model(xb), yb)
                    optimiser.zero_grad(set_to_none=True)
                    loss.backward()
                    optimiser.step()
                if trace is not None:
                    trace.end_epoch()  # the last chunk's reduction and the host copy, shared by the batches
                torch.cuda.synchronize()
            if epoch == 1:
                counted = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return counted / len(batches), len(batches)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", default="digits,wide,cnn,deep,resnet18")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to count", file=sys.stderr)
        return 1
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}; reduction {kernels.describe()}")
    print("| workload | batches | " + " | ".join(f"{m} launches/batch" for m in MODES) + " |")
    print("| --- | --- |" + " --- |" * len(MODES))
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.workloads.split(","):
            w = WORKLOADS[key]()
            counts = {m: launches_per_batch(w, m, os.path.join(tmp, f"{key}-{m}")) for m in MODES}
            n = next(iter(counts.values()))[1]
            print(
                f"| {w.name} | {n} | " + " | ".join(f"{c[0]:.1f}" for c in counts.values()) + " |", flush=True
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
