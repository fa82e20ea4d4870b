"""N virtual Distributed Lion workers in one process: what voting costs, without a cluster.

``SimulatedDistributedLion`` keeps one copy of the parameters and one momentum per virtual
worker; ``step(closure)`` calls ``closure(worker)`` once per worker (each computes the loss on
its own batch and calls ``backward()``), then applies the vote exactly as ``DistributedLion``
does on N ranks (the same rule, in the same floating-point order; the tests check both against
an independent simulation).

``train_workers`` runs one of ``METHODS`` on a comparison task (``lionopt.tasks``) at equal
tokens: every method sees the plan's global batch each step; the voting methods split it into
``workers`` equal per-worker batches, the global ones (Lion, AdamW) take it whole. It returns a
``lionopt.tasks.protocol.RunResult``, so reports and plots treat it like any compare run.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["METHODS", "SimulatedDistributedLion", "train_workers"]

#: method -> (what it is, vote or None for a global optimizer of that registry name)
METHODS = {
    "lion": ("global Lion on the whole batch", None),
    "mavo": ("Distributed Lion, majority vote", "majority"),
    "avg": ("Distributed Lion, averaged votes", "average"),
    "adamw": ("global AdamW on the whole batch", None),
}


class SimulatedDistributedLion(Optimizer):
    """Distributed Lion's rule over ``workers`` virtual workers sharing one parameter copy.

    Args are those of ``DistributedLion`` (``lr``, ``betas``, ``weight_decay``, ``vote``),
    plus ``workers``. ``state[p]["exp_avg"]`` is a list of the workers' momenta. A parameter
    with no gradient on a worker has a zero gradient there; with no gradient on any worker it
    is skipped.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        workers: int,
        vote: str = "majority",
    ) -> None:
        from lionopt.distributed.dlion import VOTES, _validate_group

        if vote not in VOTES:
            raise ValueError(f"Invalid vote: {vote!r} (expected one of {', '.join(VOTES)})")
        if not isinstance(workers, int) or workers < 1:
            raise ValueError(f"Invalid workers: {workers!r} (expected an int >= 1)")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))
        for group in self.param_groups:
            _validate_group(group)
        self.workers, self.vote = workers, vote

    @torch.no_grad()
    def step(self, closure: Callable[[int], Any]) -> float:
        """``closure(worker)`` computes worker ``worker``'s loss and calls ``backward()``;
        returns the workers' mean loss."""
        params = [p for group in self.param_groups for p in group["params"]]
        betas = [tuple(group["betas"]) for group in self.param_groups for _ in group["params"]]
        totals: list[Tensor | None] = [None] * len(params)
        missing: list[list[int]] = [[] for _ in params]  # workers without a gradient
        losses = []
        for worker in range(self.workers):
            for p in params:
                p.grad = None
            with torch.enable_grad():
                losses.append(float(closure(worker)))
            for j, p in enumerate(params):
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = [torch.zeros_like(p) for _ in range(self.workers)]
                beta1, beta2 = betas[j]
                m = state["exp_avg"][worker]
                if p.grad is None:
                    s = torch.sign(m * beta1)
                    missing[j].append(worker)
                else:
                    g = p.grad.to(p.dtype)
                    s = torch.sign(m * beta1 + g * (1 - beta1))
                    m.mul_(beta2).add_(g, alpha=1 - beta2)
                totals[j] = s if totals[j] is None else totals[j] + s
        seen = [len(missing[j]) < self.workers for j in range(len(params))]
        for j, p in enumerate(params):
            if seen[j]:  # a zero gradient on the workers that had none
                for worker in missing[j]:
                    self.state[p]["exp_avg"][worker].mul_(betas[j][1]).add_(0.0)
        index = 0
        for group in self.param_groups:
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            for p in group["params"]:
                total = totals[index]
                if seen[index]:
                    update = torch.sign(total) if self.vote == "majority" else total / self.workers
                    if wd != 0:
                        p.mul_(1 - lr * wd)
                    p.add_(update, alpha=-lr)
                index += 1
        for p in params:
            p.grad = None
        return sum(losses) / len(losses)


def train_workers(task, data, plan, method: str, workers: int, *, evals: int = 20, factor=None):
    """Train ``method`` (a key of ``METHODS``) on ``task`` from ``plan`` with ``workers``
    virtual workers at equal tokens; returns a ``RunResult``. The lr schedule and the
    hyperparameters are those of ``lionopt compare`` (Lion's from the task's AdamW ones)."""
    from lionopt.hparams import DEFAULT_FACTOR, from_adamw
    from lionopt.tasks.protocol import RunResult, eval_steps, lr_factor, train_run

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    factor = DEFAULT_FACTOR if factor is None else factor
    vote = METHODS[method][1]
    if vote is None:
        result = train_run(task, data, plan, method, evals=evals, factor=factor)
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
    optimizer = SimulatedDistributedLion(model.parameters(), **hparams, workers=workers, vote=vote)
    peak = optimizer.param_groups[0]["lr"]
    per_worker = plan.batch_size // workers
    checkpoints = set(eval_steps(plan.steps, evals))
    history: dict[str, list] = {"step": [], "train_loss": [], "val_loss": [], "val_metric": []}
    loss_sum, loss_count, diverged, step_time = 0.0, 0, False, 0.0
    for step in range(plan.steps):
        optimizer.param_groups[0]["lr"] = peak * lr_factor(step, plan.steps)
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
            train_loss = loss_sum / loss_count
            for key, value in (
                ("train_loss", train_loss),
                ("val_loss", val_loss),
                ("val_metric", val_metric),
            ):
                history[key].append(value if math.isfinite(value) else None)
            loss_sum, loss_count = 0.0, 0
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
        state_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
        param_count=sum(p.numel() for p in model.parameters()),
        optimizer_step_ms=float("nan"),
        train_step_ms=1000 * step_time / max(1, plan.steps),
        wall_s=time.perf_counter() - start,
    )
