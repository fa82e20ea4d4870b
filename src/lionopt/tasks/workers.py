"""Simulated data-parallel training on the comparison tasks: what Distributed Lion's vote costs.

``train_workers`` runs one of ``METHODS`` at equal tokens: every method sees the plan's global
batch each step; the voting methods (``lionopt.distributed.simulate.SimulatedDistributedLion``)
split it into ``workers`` equal per-worker batches, the global ones (Lion, AdamW) take it whole.
It returns a ``RunResult``, so reports and plots treat it like any ``lionopt compare`` run.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from lionopt.distributed.simulate import SimulatedDistributedLion
from lionopt.hparams import DEFAULT_FACTOR, from_adamw
from lionopt.memory import state_bytes
from lionopt.tasks.protocol import (
    RunResult,
    eval_steps,
    lr_factor,
    optimizer_params,
    train_run,
)

__all__ = ["METHODS", "train_workers"]

#: method -> (what it is, vote or None for a global optimizer of that registry name)
METHODS = {
    "lion": ("global Lion on the whole batch", None),
    "mavo": ("Distributed Lion, majority vote", "majority"),
    "avg": ("Distributed Lion, averaged votes", "average"),
    "adamw": ("global AdamW on the whole batch", None),
}


def train_workers(
    task, data, plan, method: str, workers: int, *, evals: int = 20, factor=None, decay="groups"
):
    """Train ``method`` (a key of ``METHODS``) on ``task`` from ``plan`` with ``workers``
    virtual workers at equal tokens; returns a ``RunResult``. The lr schedule, the
    hyperparameters and the weight-decay groups (``decay``, as ``train_run``'s) are those of
    ``lionopt compare`` (Lion's from the task's AdamW ones). One worker voting alone is
    exactly global Lion."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    factor = DEFAULT_FACTOR if factor is None else factor
    vote = METHODS[method][1]
    if vote is None:
        result = train_run(task, data, plan, method, evals=evals, factor=factor, decay=decay)
        result.optimizer = method
        return result
    if plan.batch_size % workers:
        raise ValueError(f"batch size {plan.batch_size} does not split into {workers} workers")
    start = time.perf_counter()
    torch.manual_seed(plan.seed)
    model = task.build_model(data)
    model.load_state_dict(plan.init_state)
    model.train()
    hparams = from_adamw(task.adamw_lr, task.adamw_weight_decay, factor)
    optimizer = SimulatedDistributedLion(
        optimizer_params(model, decay), **hparams, workers=workers, vote=vote
    )
    task.start_run(data, plan.seed)
    peaks = [group["lr"] for group in optimizer.param_groups]
    per_worker = plan.batch_size // workers
    checkpoints = set(eval_steps(plan.steps, evals))
    history: dict[str, list] = {"step": [], "train_loss": [], "val_loss": [], "val_metric": []}
    loss_sum, loss_count, diverged, step_time = torch.zeros(()), 0, False, 0.0
    for step in range(plan.steps):
        for group, peak in zip(optimizer.param_groups, peaks):  # as train_run's LambdaLR
            group["lr"] = peak * lr_factor(step, plan.steps)
        batch = plan.batches[step]

        def closure(worker: int, batch=batch) -> Tensor:
            rows = batch[worker * per_worker : (worker + 1) * per_worker]
            loss = task.loss(model, task.get_batch(data, rows))
            loss.backward()
            return loss.detach()

        t0 = time.perf_counter()
        loss_sum += optimizer.step(closure)
        step_time += time.perf_counter() - t0
        loss_count += 1
        if step + 1 in checkpoints:
            model.eval()
            val_loss, val_metric = task.evaluate(model, data)
            model.train()
            history["step"].append(step + 1)
            train_loss = loss_sum.item() / loss_count
            for key, value in (
                ("train_loss", train_loss),
                ("val_loss", val_loss),
                ("val_metric", val_metric),
            ):
                history[key].append(value if math.isfinite(value) else None)
            loss_sum, loss_count = torch.zeros(()), 0
            if not math.isfinite(train_loss):
                diverged = True
                break
    metrics = [m for m in history["val_metric"] if m is not None]
    best = None if not metrics else (max if task.higher_is_better else min)(metrics)
    return RunResult(
        optimizer=method,
        seed=plan.seed,
        hparams={**hparams, "workers": workers, "vote": vote},
        steps=plan.steps,
        batch_size=plan.batch_size,
        history=history,
        final_metric=None if diverged else history["val_metric"][-1],
        best_metric=best,
        final_val_loss=None if diverged else history["val_loss"][-1],
        diverged=diverged,
        # one worker's optimizer state (its momentum), as a rank would hold it
        state_bytes=state_bytes(optimizer) // workers,
        param_count=sum(p.numel() for p in model.parameters()),
        optimizer_step_ms=None,  # step() includes the workers' forward and backward passes
        train_step_ms=1000 * step_time / max(1, plan.steps),
        wall_s=time.perf_counter() - start,
    )
