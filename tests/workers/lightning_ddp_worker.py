"""One rank of a 2-process Lightning ``strategy="ddp"`` run (gloo, CPU) recorded by StainingCallback.

    LOCAL_RANK=R MASTER_PORT=P python lightning_ddp_worker.py STORE OUT

Started by tests/test_integrations_lightning.py with LOCAL_RANK set, so Lightning joins the
processes instead of launching its own. The LightningModule's ``training_step`` calls ``self(x)``,
so under DDP Lightning enters the traced module twice per step (its forward redirection, then the
real forward). The rank saves what its own hooks saw (activations per phase, labels, the last
step's gradient) to OUT/rank<R>.npz for the test's whole-data numpy statistics.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from nn_staining.integrations.lightning import StainingCallback


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        self.seen: dict[str, list[np.ndarray]] = {}
        self.last_grad: dict[int, np.ndarray] = {}
        for name in ("0", "1", "2"):
            self.net.get_submodule(name).register_forward_hook(self._capture(name))

    def _capture(self, name: str):
        def hook(module, args, output):
            phase = "train" if module.training else "eval"
            self.seen.setdefault(f"{phase}_{name}_{self.current_epoch}", []).append(
                output.detach().numpy().copy()
            )

        return hook

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(f"train_labels_{self.current_epoch}", []).append(y.numpy().copy())
        return nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(f"eval_labels_{self.current_epoch}", []).append(y.numpy().copy())
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))

    def on_train_epoch_end(self):
        self.log("epoch_marker", 100.0 + self.current_epoch)

    def on_before_optimizer_step(self, optimizer):
        if self.trainer.is_last_batch:
            self.last_grad[self.current_epoch] = self.net[0].weight.grad.detach().numpy().copy()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> int:
    store, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(51, 6, generator=g) * 2 + 1
    y = torch.randint(0, 3, (51,), generator=g)
    data = TensorDataset(x, y)
    module = Classifier()
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[StainingCallback(store, num_classes=3, record_eval=True)],
    )
    trainer.fit(module, DataLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    rank = trainer.global_rank
    arrays = {k: np.concatenate(v) for k, v in module.seen.items()}
    arrays.update({f"grad_{e}": g for e, g in module.last_grad.items()})
    np.savez(os.path.join(out, f"rank{rank}.npz"), **arrays)
    return 0


if __name__ == "__main__":
    sys.exit(main())
