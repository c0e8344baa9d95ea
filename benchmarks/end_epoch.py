"""The fixed cost of ``end_epoch``: its wall time and the tensor operations it dispatches.

    python benchmarks/end_epoch.py                       # digits and deep MLP, 40 timed epochs each
    python benchmarks/end_epoch.py --root /tmp/old       # the same for another checkout of nn_staining
    python benchmarks/end_epoch.py --epochs 60 --workloads digits

Each workload (built by ``benchmarks/overhead.py``) trains with everything recorded; only
``end_epoch`` is timed (median and quartiles over the epochs after two warm-up epochs), and within
it ``PhaseStats.finish`` split in two: the reduction of the last chunk (the epoch's own work) and
the step that brings the statistics to the host (the fixed cost). One more epoch runs under
a dispatch mode that counts every aten operation ``end_epoch`` dispatches, and those of ``finish``,
and the copies that leave an accelerator for the host. The Parquet writer runs on its thread as in
training, so the timings include its competition for the GIL.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import sys
import tempfile
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _import(root: str):
    sys.path.insert(0, root)
    import nn_staining  # noqa: PLC0415  (first: overhead.py then finds this one imported)
    from nn_staining import stats  # noqa: PLC0415

    sys.path.insert(1, os.path.dirname(__file__))
    import overhead  # noqa: PLC0415

    return overhead, nn_staining, stats


class CountOps(TorchDispatchMode):
    """Counts aten operations (and copies to the host from another device) while active."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()
        self.to_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.ops[str(func.overloadpacket.__name__)] += 1
        out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten._to_copy, torch.ops.aten.copy_):
            src = args[1] if func.overloadpacket is torch.ops.aten.copy_ else args[0]
            dst = args[0] if func.overloadpacket is torch.ops.aten.copy_ else out
            if isinstance(src, torch.Tensor) and src.device.type != "cpu" and dst.device.type == "cpu":
                self.to_host += 1
        return out


def run(
    overhead, nn_staining, stats, name: str, epochs: int, device: torch.device, flush: bool = False
) -> dict:
    w = overhead.WORKLOADS[name]()
    torch.manual_seed(0)
    model = w.build().to(device)
    x, y = w.x[:2048].to(device), w.y[:2048].to(device)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    finish_times: list[float] = []
    reduce_times: list[float] = []
    original = stats.PhaseStats.finish

    def timed_finish(self, *args, **kwargs):
        start = time.perf_counter()
        self.reduce_pending()  # the last chunk's reduction: work of the epoch, not a fixed cost
        middle = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            reduce_times.append(middle - start)
            finish_times.append(time.perf_counter() - middle)

    stats.PhaseStats.finish = timed_finish
    end_times: list[float] = []
    counts = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            trace = nn_staining.NetworkTrace(model, os.path.join(tmp, "t"), num_classes=w.classes)
            with trace:
                for epoch in range(epochs + 3):
                    trace.start_epoch(epoch)
                    for i in range(0, len(x), w.batch_size):
                        xb, yb = x[i : i + w.batch_size], y[i : i + w.batch_size]
                        trace.set_targets(yb)
                        loss = loss_fn(model(xb), yb)
                        optimiser.zero_grad(set_to_none=True)
                        loss.backward()
                        optimiser.step()
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    if epoch == epochs + 2:  # the last epoch: count, not timed
                        all_ops, finish_ops = CountOps(), CountOps()
                        stats.PhaseStats.finish = lambda self, *args, mode=finish_ops, **kwargs: _counted(
                            mode, timed_finish, self, *args, **kwargs
                        )
                        with all_ops:
                            trace.end_epoch()
                        counts = {
                            "end_epoch ops": sum(all_ops.ops.values()),
                            "finish ops": sum(finish_ops.ops.values()),
                            "finish top": finish_ops.ops.most_common(6),
                            "to host (end_epoch)": all_ops.to_host,
                            "top ops": all_ops.ops.most_common(6),
                        }
                        continue
                    if flush:
                        trace.flush()  # the writer idle: no competition for the GIL
                    start = time.perf_counter()
                    trace.end_epoch()
                    if epoch >= 2:
                        end_times.append(time.perf_counter() - start)
    finally:
        stats.PhaseStats.finish = original
    return {
        "end_epoch": end_times,
        "reduce": reduce_times[2:-1],
        "finish": finish_times[2:-1],
        **counts,
        "layers": len(trace.layers),
    }


def _counted(mode: CountOps, finish, self, *args, **kwargs):
    self.reduce_pending()
    with mode:
        return finish(self, *args, **kwargs)


def _ms(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4)
    return f"{1e3 * statistics.median(values):.2f} ms (quartiles {1e3 * q[0]:.2f}-{1e3 * q[2]:.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", default=os.path.join(os.path.dirname(__file__), ".."))
    parser.add_argument("--workloads", default="digits,deep")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--flush", action="store_true", help="wait for the writer before each end_epoch")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    overhead, nn_staining, stats = _import(os.path.abspath(args.root))
    print(f"nn_staining from {os.path.dirname(nn_staining.__file__)}; load {os.getloadavg()}")
    for name in args.workloads.split(","):
        result = run(overhead, nn_staining, stats, name, args.epochs, torch.device(args.device), args.flush)
        print(f"{name} ({result['layers']} layers):")
        print(f"  end_epoch  {_ms(result['end_epoch'])}")
        print(f"  last chunk {_ms(result['reduce'])} (reduce_pending, part of end_epoch)")
        print(f"  to host    {_ms(result['finish'])} (finish after the reduction)")
        print(
            f"  ops: end_epoch {result['end_epoch ops']} (copies to the host "
            f"{result['to host (end_epoch)']}), most: {result['top ops']}"
        )
        print(f"  ops: to host {result['finish ops']}, most: {result['finish top']}")
    print(f"load {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
