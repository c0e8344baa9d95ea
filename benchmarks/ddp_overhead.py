"""DDP overhead: examples/ddp_digits.py under torchrun (2 processes, gloo) with and without recording.

    python benchmarks/ddp_overhead.py --repeats 5 --epochs 10

The two modes alternate in a new random order in each repetition; each time is the training loop
as rank 0 measures it (process start-up excluded); the ratio is the median of per-repetition ratios.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def once(recorded: bool, epochs: int, store: str, nproc: int, backend: str) -> float:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [os.path.join(ROOT, "examples", "ddp_digits.py"), "--store", store, "--epochs", str(epochs)]
    cmd += ["--backend", backend] + ([] if recorded else ["--no-trace"])
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{run.stderr[-3000:]}")
    out = run.stdout
    return float(re.search(r"trained \d+ epochs in ([\d.]+) s", out).group(1))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--backend", default="gloo")
    args = p.parse_args()
    order = random.Random(0)
    times: dict[str, list[float]] = {"plain DDP": [], "nn_staining": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for mode in order.sample(list(times), 2):
                times[mode].append(
                    once(mode == "nn_staining", args.epochs, f"{tmp}/t", args.nproc, args.backend)
                )
    ratios = [r / p for r, p in zip(times["nn_staining"], times["plain DDP"])]
    print(
        f"digits MLP 64-128-128-10 under DDP, {args.nproc} processes ({args.backend}), {args.epochs} epochs: "
        f"plain {statistics.median(times['plain DDP']):.3f} s, nn_staining "
        f"{statistics.median(times['nn_staining']):.3f} s, ratio {statistics.median(ratios):.2f}x "
        f"(per repetition: {', '.join(f'{r:.2f}' for r in ratios)}); machine: {os.cpu_count()} cores"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
