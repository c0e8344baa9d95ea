"""Train 10 epochs recorded by NetworkTrace, saving a checkpoint after each epoch (tests/test_resume.py).

    python resume_worker.py STORE CHECKPOINT MODE

MODE ``full`` trains epochs 0–9 without interruption; ``crash`` kills its own process (SIGKILL)
in the middle of epoch 5; ``resume`` loads the checkpoint of the last finished epoch and goes on
with ``NetworkTrace(..., resume=True)``. Data order and initial weights are seeded per epoch, so
an interrupted and resumed run computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import os
import signal
import sys

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from nn_staining import NetworkTrace

EPOCHS, CRASH_EPOCH = 10, 5


def main() -> int:
    store, checkpoint, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 5, generator=g), torch.randint(0, 3, (96,), generator=g)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    first = 0
    if mode == "resume":
        state = load_file(checkpoint)
        first = int(state.pop("__epoch__").item()) + 1
        model.load_state_dict(state)
    with NetworkTrace(model, store, num_classes=3, resume=(mode == "resume"), total_epochs=EPOCHS) as trace:
        for epoch in range(first, EPOCHS):
            trace.start_epoch(epoch)
            order = torch.randperm(96, generator=torch.Generator().manual_seed(100 + epoch))
            total = 0.0
            for i in range(0, 96, 16):
                if mode == "crash" and epoch == CRASH_EPOCH and i == 48:
                    os.kill(os.getpid(), signal.SIGKILL)
                idx = order[i : i + 16]
                trace.set_targets(y[idx])
                loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                total += float(loss)
            trace.end_epoch()
            trace.log_metrics(epoch, loss=total)
            trace.flush()  # the trace holds the epoch before the checkpoint says it is done
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            save_file(state | {"__epoch__": torch.tensor([epoch])}, checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
