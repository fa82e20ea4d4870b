"""The fair comparison protocol: one training loop, shared by ``compare`` and ``sweep``.

For a given task and seed, :func:`make_plan` fixes the model's initial weights and the whole
batch schedule once; :func:`train_run` then trains any optimizer from exactly that plan, so
every optimizer starts from the same weights and sees the same batches in the same order.
The learning-rate schedule (linear warmup over 5% of the steps, cosine decay to 10% of the
peak) is the same for every optimizer; only the peak lr and weight decay differ, and those
come from the optimizer registry's translation of the task's AdamW hyperparameters. Weight
decay applies to every parameter (one parameter group, as ``torch.optim`` does by default).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from lionopt.hparams import DEFAULT_FACTOR
from lionopt.memory import state_bytes
from lionopt.tasks.base import Task, TaskData
from lionopt.tasks.optimizers import make_optimizer, optimizer_hparams

WARMUP_FRACTION = 0.05
FINAL_LR_FRACTION = 0.1


@dataclasses.dataclass
class Plan:
    """Everything that must be identical across optimizers for one (task, seed)."""

    seed: int
    init_state: dict[str, torch.Tensor]
    batches: torch.Tensor  # (steps, batch_size) indices into the training data

    @property
    def steps(self) -> int:
        return int(self.batches.shape[0])

    @property
    def batch_size(self) -> int:
        return int(self.batches.shape[1])


@dataclasses.dataclass
class RunResult:
    """One optimizer trained from one plan. ``history`` holds the curves at evaluation steps."""

    optimizer: str
    seed: int
    hparams: dict
    steps: int
    batch_size: int
    history: dict[str, list[float | None]]
    final_metric: float | None  # None when the run diverged (non-finite loss)
    best_metric: float | None
    final_val_loss: float | None
    diverged: bool
    state_bytes: int
    param_count: int
    optimizer_step_ms: float
    train_step_ms: float
    wall_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_plan(task: Task, data: TaskData, seed: int, steps: int, batch_size: int) -> Plan:
    torch.manual_seed(seed)
    model = task.build_model(data)
    init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    batches = task.batch_indices(data, steps, batch_size, generator)
    return Plan(seed, init_state, batches)


def lr_factor(step: int, steps: int) -> float:
    """Multiplier of the peak lr at 0-based ``step``: linear warmup, then cosine decay."""
    warmup = max(1, round(steps * WARMUP_FRACTION))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))


def eval_steps(steps: int, evals: int) -> list[int]:
    """``evals`` evaluation points spread evenly over the run, always including the last step."""
    evals = max(1, min(evals, steps))
    return sorted({round(steps * (i + 1) / evals) for i in range(evals)})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_run(
    task: Task,
    data: TaskData,
    plan: Plan,
    optimizer_name: str,
    *,
    device: torch.device | str = "cpu",
    evals: int = 20,
    lr_scale: float = 1.0,
    wd_scale: float = 1.0,
    factor: float = DEFAULT_FACTOR,
    on_step: Callable[[], None] | None = None,
) -> RunResult:
    """Train ``optimizer_name`` from ``plan``; ``data`` must already be on ``device``.

    ``lr_scale`` and ``wd_scale`` multiply the task's AdamW hyperparameters before the
    optimizer's own translation (used by the sweep); ``factor`` is the AdamW→Lion factor. ``on_step`` is called after every step.
    """
    device = torch.device(device)
    start = time.perf_counter()
    torch.manual_seed(plan.seed)
    model = task.build_model(data)
    model.load_state_dict(plan.init_state)
    model.to(device).train()
    optimizer = make_optimizer(
        optimizer_name,
        model.parameters(),
        task.adamw_lr * lr_scale,
        task.adamw_weight_decay * wd_scale,
        factor,
    )
    hparams = optimizer_hparams(optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, plan.steps)
    )
    checkpoints = set(eval_steps(plan.steps, evals))
    history: dict[str, list[float]] = {
        "step": [],
        "train_loss": [],
        "val_loss": [],
        "val_metric": [],
    }
    opt_time = step_time = 0.0
    timed = 0
    loss_sum = torch.zeros((), device=device)
    loss_count = 0
    diverged = False
    batches = plan.batches.to(device)
    for step in range(plan.steps):
        _sync(device)
        t0 = time.perf_counter()
        loss = task.loss(model, task.get_batch(data, batches[step]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _sync(device)
        t1 = time.perf_counter()
        optimizer.step()
        _sync(device)
        t2 = time.perf_counter()
        scheduler.step()
        if step > 0:  # the first step allocates optimizer state: not representative
            opt_time += t2 - t1
            step_time += t2 - t0
            timed += 1
        loss_sum += loss.detach()
        loss_count += 1
        if on_step is not None:
            on_step()
        if step + 1 in checkpoints or step + 1 == plan.steps:
            model.eval()
            val_loss, val_metric = task.evaluate(model, data)
            model.train()
            train_loss = loss_sum.item() / loss_count
            history["step"].append(step + 1)
            for key, value in (
                ("train_loss", train_loss),
                ("val_loss", val_loss),
                ("val_metric", val_metric),
            ):
                history[key].append(value if math.isfinite(value) else None)
            loss_sum.zero_()
            loss_count = 0
            if not math.isfinite(train_loss):
                diverged = True
                break
    metrics = [m for m in history["val_metric"] if m is not None]
    best = None if not metrics else (max if task.higher_is_better else min)(metrics)
    return RunResult(
        optimizer=optimizer_name,
        seed=plan.seed,
        hparams=hparams,
        steps=plan.steps,
        batch_size=plan.batch_size,
        history=history,
        final_metric=None if diverged else history["val_metric"][-1],
        best_metric=best,
        final_val_loss=None if diverged else history["val_loss"][-1],
        diverged=diverged,
        state_bytes=state_bytes(optimizer),
        param_count=sum(p.numel() for p in model.parameters()),
        optimizer_step_ms=1000 * opt_time / max(1, timed),
        train_step_ms=1000 * step_time / max(1, timed),
        wall_s=time.perf_counter() - start,
    )


def steps_to_reach(history: dict[str, list[float]], target: float, higher_is_better: bool):
    """First evaluated step whose validation metric reaches ``target``, or ``None``."""
    for step, value in zip(history["step"], history["val_metric"]):
        if value is None:
            continue
        if (value >= target) if higher_is_better else (value <= target):
            return step
    return None


def mean_std(values: list[float | None]) -> dict:
    """Mean, sample standard deviation (0 for one value) and count of the non-``None`` values."""
    values = [v for v in values if v is not None]
    n = len(values)
    if n == 0:
        return {"mean": None, "std": None, "n": 0}
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}
