"""Lightning: ``configure_optimizers`` returning lionopt.Lion with an lr scheduler, resumed from a
``ModelCheckpoint`` file, equals the uninterrupted run bitwise (weights, momenta, lr)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lionopt

from frameworks import require

L = require("lightning.pytorch", "Trainer", "LightningModule")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

EPOCHS, BATCHES = 4, 4


class Module(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.net(x).squeeze(-1), y)

    def configure_optimizers(self):
        opt = lionopt.Lion(self.parameters(), lr=2e-3, weight_decay=0.05)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _data():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(BATCHES * 8, 5, generator=g), torch.randn(BATCHES * 8, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)


def _fit(root, max_epochs, ckpt_path=None):
    checkpoint = L.callbacks.ModelCheckpoint(
        dirpath=root, every_n_epochs=1, save_top_k=-1, filename="{epoch}"
    )
    trainer = L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint],
        deterministic=True,
    )
    module = Module()
    trainer.fit(module, _data(), ckpt_path=ckpt_path)
    opt = trainer.optimizers[0]
    assert isinstance(opt, lionopt.Lion)
    return module, opt, trainer


def test_lightning_checkpoint_resume_equals_uninterrupted(tmp_path):
    full, full_opt, _ = _fit(tmp_path / "full", EPOCHS)
    ckpt = tmp_path / "full" / "epoch=1.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "full").iterdir())
    resumed, resumed_opt, trainer = _fit(tmp_path / "resumed", EPOCHS, ckpt_path=str(ckpt))
    assert trainer.global_step == EPOCHS * BATCHES
    assert not torch.equal(full.net[0].weight, Module().net[0].weight)  # it trained
    for p, q in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(full_opt.state[p]["exp_avg"], resumed_opt.state[q]["exp_avg"])
    lr = full_opt.param_groups[0]["lr"]
    assert lr == resumed_opt.param_groups[0]["lr"] == 2e-3 / (1 + EPOCHS * BATCHES)
