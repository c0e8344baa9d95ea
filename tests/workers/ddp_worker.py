"""One rank of a 2-process gloo run recorded by NetworkTrace (started by tests/test_distributed.py).

    python ddp_worker.py RANK WORLD PORT STORE OUT MODE

It trains a small MLP under DistributedDataParallel with a DistributedSampler, records it into
STORE, and saves the activations its own hooks captured (with the labels) to OUT/rank<R>.npz so
the test can compute whole-data statistics with numpy. MODE: ``ok``, ``classes`` (rank 1 passes
another num_classes), ``epoch`` (rank 1 ends another epoch).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from nn_staining import NetworkTrace


def main() -> int:
    rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    store, out, mode = sys.argv[4], sys.argv[5], sys.argv[6]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(51, 6, generator=g) * 2 + 1
    y = torch.randint(0, 3, (51,), generator=g)
    data = TensorDataset(x, y)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)  # pads 51 -> 52
    ddp = nn.parallel.DistributedDataParallel(model)
    optimiser = torch.optim.SGD(ddp.parameters(), lr=0.05)
    seen: dict[str, list[np.ndarray]] = {}
    for name in ("0", "1", "2"):
        module = model.get_submodule(name)
        module.register_forward_hook(
            lambda m, a, o, name=name: seen.setdefault(name, []).append(o.detach().numpy().copy())
        )
    classes = 4 if (mode == "classes" and rank == 1) else 3
    labels, inputs = [], []
    try:
        with NetworkTrace(ddp, store, num_classes=classes, overwrite=True) as trace:
            for epoch in range(2):
                sampler.set_epoch(epoch)
                trace.start_epoch(epoch + 1 if (mode == "epoch" and rank == 1) else epoch)
                for xb, yb in DataLoader(data, batch_size=8, sampler=sampler):
                    trace.set_targets(yb)
                    loss = nn.functional.cross_entropy(ddp(xb), yb)
                    optimiser.zero_grad()
                    loss.backward()
                    optimiser.step()
                    labels.append(yb.numpy())
                    inputs.append(xb.numpy())
                trace.end_epoch()
    except RuntimeError as exc:
        print(f"rank {rank} error: {exc}", flush=True)
        # leave without tearing the group down: the peer may already be gone, and gloo's teardown
        # against a departed peer can abort the process ("terminate called without an active exception")
        os._exit(3)
    np.savez(
        f"{out}/rank{rank}.npz",
        labels=np.concatenate(labels),
        inputs=np.concatenate(inputs),
        **{f"act_{k}": np.concatenate(v) for k, v in seen.items()},
        weight=model[2].weight.detach().numpy(),
    )
    dist.barrier()  # both ranks are done with the group
    # and leave without gloo's teardown: one rank closing its pairs while the other is still in its own
    # destroy_process_group aborted rank 1 now and then ("terminate called without an active exception"),
    # after all its work was saved
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
