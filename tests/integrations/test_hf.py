"""HF ``transformers.Trainer`` with lionopt.Lion: both ways of passing it, resumed == uninterrupted.

A run of 8 steps that saves at step 4 is the reference; a second Trainer resumes from its
``checkpoint-4`` and must end with bitwise the same weights and momenta. The Trainer's default
linear schedule runs on top, so the resume also restores the scheduler.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lionopt

from frameworks import require

transformers = require("transformers", "Trainer", "TrainingArguments")
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

STEPS, SAVE_AT = 8, 4
LION_KWARGS = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)


class TinyRegressor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x, labels=None):
        out = self.body(x).squeeze(-1)
        loss = nn.functional.mse_loss(out, labels)
        return {"loss": loss, "logits": out}


class Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 6, generator=g)
        self.y = torch.randn(64, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def _args(out, max_steps, **extra):
    return transformers.TrainingArguments(
        **extra,
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        save_strategy="steps",
        save_steps=SAVE_AT,
        logging_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        lr_scheduler_type="linear",
        warmup_steps=2,
    )


def _trainer(out, how: str, max_steps: int = STEPS):
    model = TinyRegressor()
    kwargs = {}
    if how == "instance":
        kwargs["optimizers"] = (lionopt.Lion(model.parameters(), **LION_KWARGS), None)
    else:
        kwargs["optimizer_cls_and_kwargs"] = (lionopt.Lion, dict(LION_KWARGS))
    return transformers.Trainer(
        model=model, args=_args(out, max_steps), train_dataset=Pairs(), **kwargs
    )


def _snapshot(trainer):
    opt = trainer.optimizer
    inner = getattr(opt, "optimizer", opt)  # accelerate wraps it
    assert isinstance(inner, lionopt.Lion)
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    momenta = [inner.state[p]["exp_avg"].clone() for p in trainer.model.parameters()]
    return params, momenta, inner.param_groups[0]["lr"]


@pytest.mark.parametrize("how", ["instance", "cls_and_kwargs"])
def test_trainer_resume_equals_uninterrupted(tmp_path, how):
    full = _trainer(tmp_path / "full", how)
    start = {k: v.clone() for k, v in full.model.state_dict().items()}
    full.train()
    params, momenta, lr = _snapshot(full)
    assert any(not torch.equal(start[k], params[k]) for k in params)  # it trained

    resumed = _trainer(tmp_path / "resumed", how)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / f"checkpoint-{SAVE_AT}"))
    params2, momenta2, lr2 = _snapshot(resumed)
    assert resumed.state.global_step == STEPS
    for key in params:
        assert torch.equal(params[key], params2[key]), key
    for m, m2 in zip(momenta, momenta2):
        assert torch.equal(m, m2)
    assert lr == lr2


def test_trainer_torch_compile_flag_trains_with_lion(tmp_path, caplog):
    """``TrainingArguments(torch_compile=True)`` compiles the model; Lion steps it, and the
    LR schedule (a new float lr every step) triggers no recompile storm."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    args = _args(tmp_path, max_steps=6, torch_compile=True)
    model = TinyRegressor()
    start = [p.detach().clone() for p in model.parameters()]
    trainer = transformers.Trainer(
        model=model,
        args=args,
        train_dataset=Pairs(),
        optimizer_cls_and_kwargs=(lionopt.Lion, dict(LION_KWARGS)),
    )
    with caplog.at_level("WARNING"):
        trainer.train()
    assert isinstance(getattr(trainer.optimizer, "optimizer", trainer.optimizer), lionopt.Lion)
    assert all(not torch.equal(a, p.detach()) for a, p in zip(start, model.parameters()))
    assert "recompile_limit" not in caplog.text
    assert counters["stats"]["unique_graphs"] >= 1  # the flag did compile something
