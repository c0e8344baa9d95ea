"""Record a DistributedDataParallel run: every rank records its shard, rank 0 writes the merged trace.

    torchrun --standalone --nproc-per-node 2 examples/ddp_digits.py --store results/ddp_digits

Runs on CPUs with the gloo backend (or GPUs with NCCL: pass --backend nccl). ``--no-trace``
trains the same way without recording (benchmarks/ddp_overhead.py compares the two).
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from nn_staining import NetworkTrace


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store", default="results/ddp_digits")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--backend", default="gloo")
    p.add_argument("--no-trace", action="store_true")
    args = p.parse_args()
    dist.init_process_group(args.backend)  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else None

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, shuffle=True, seed=0)  # pads the last batch with repeated samples
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
    model = nn.parallel.DistributedDataParallel(model.to(device) if device else model)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-3)

    trace = None if args.no_trace else NetworkTrace(model, args.store, num_classes=10, overwrite=True)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        if trace:
            trace.start_epoch(epoch)  # every rank calls the same start_epoch / end_epoch
        for xb, yb in DataLoader(data, batch_size=64, sampler=sampler):
            if device:
                xb, yb = xb.to(device), yb.to(device)
            if trace:
                trace.set_targets(yb)
            loss = nn.functional.cross_entropy(model(xb), yb)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if trace:
            trace.end_epoch()  # merges all ranks' statistics; rank 0 writes them
    if trace:
        trace.close()
    if rank == 0:
        print(f"trained {args.epochs} epochs in {time.perf_counter() - start:.2f} s", flush=True)
    dist.barrier()  # both ranks done with the group before either tears it down (gloo may abort)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
