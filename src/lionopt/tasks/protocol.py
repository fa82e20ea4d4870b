"""The fair comparison protocol: one training loop, shared by ``compare`` and ``sweep``.

For a given task and seed, :func:`make_plan` fixes the model's initial weights and the whole
batch schedule once; :func:`train_run` then trains any optimizer from exactly that plan, so
every optimizer starts from the same weights and sees the same batches in the same order.
The learning-rate schedule (linear warmup over 5% of the steps, cosine decay to 10% of the
peak) is the same for every optimizer; only the peak lr and weight decay differ, and those
are given explicitly (the tuned protocol of ``lionopt compare``) or come from the optimizer
registry's translation of the task's AdamW hyperparameters. Weight decay goes to weight
matrices and embeddings, not to biases and norm gains (``decay="groups"``, the default; see
:func:`lionopt.hparams.decay_groups`), or to every parameter (``decay="all"``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch

from lionopt.hparams import DEFAULT_FACTOR, decay_groups
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
    cpu_s: float = 0.0  # CPU time of the process during the run (all its threads)
    error: str | None = None  # the task raised or its metric was NaN (see train_run)

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


class _StepTimer:
    """Times ``optimizer.step()`` through the optimizer's step hooks (works inside any loop)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.device, self.total, self.count, self.skip, self._t0 = device, 0.0, 0, 1, 0.0
        self.handles = [
            optimizer.register_step_pre_hook(self._pre),
            optimizer.register_step_post_hook(self._post),
        ]

    def _pre(self, *args) -> None:
        _sync(self.device)
        self._t0 = time.perf_counter()

    def _post(self, *args) -> None:
        _sync(self.device)
        if self.skip:  # the first step allocates optimizer state: not representative
            self.skip -= 1
            return
        self.total += time.perf_counter() - self._t0
        self.count += 1

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def optimizer_params(model: torch.nn.Module, decay: str) -> list:
    """``model``'s parameters as one group (``decay="all"``) or as decay groups.

    ``"groups"``: :func:`lionopt.hparams.decay_groups` (weight matrices and embeddings decay,
    biases and norm gains do not); the decay group carries no ``weight_decay`` of its own, so
    it takes the optimizer's (translated) value.
    """
    if decay == "all":
        return list(model.parameters())
    if decay not in ("groups", "groups-no-embedding"):
        raise ValueError(f"Invalid decay choice: {decay!r}")
    embeddings = "decay" if decay == "groups" else "no_decay"
    groups = decay_groups(model, 0.0, embeddings=embeddings)
    for group in groups:
        if group["name"] == "decay":
            del group["weight_decay"]
    return groups


def train_run(
    task: Task,
    data: TaskData,
    plan: Plan,
    optimizer_name: str,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    device: torch.device | str = "cpu",
    evals: int = 20,
    lr_scale: float = 1.0,
    wd_scale: float = 1.0,
    factor: float = DEFAULT_FACTOR,
    decay: str = "groups",
    on_step: Callable[[], None] | None = None,
) -> RunResult:
    """Train ``optimizer_name`` from ``plan``; ``data`` must already be on ``device``.

    With ``lr`` (and ``weight_decay``) the optimizer gets exactly these values. Without, it gets
    the task's AdamW hyperparameters times ``lr_scale`` and ``wd_scale``, through the
    optimizer's own translation with ``factor`` (AdamW→Lion). ``decay``: see
    :func:`optimizer_params`. ``on_step`` is called after every step.

    An exception inside the task (model, loss, metric) or a NaN metric does not propagate: the
    result's ``error`` names the task, optimizer, seed and step, and holds the curves so far.
    A non-finite training loss is a divergence (``diverged``), not an error.
    """
    device = torch.device(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    where = f"task {task.name!r}, {optimizer_name} seed {plan.seed}"
    step = 0
    history: dict[str, list[float]] = {
        "step": [],
        "train_loss": [],
        "val_loss": [],
        "val_metric": [],
    }
    hparams: dict = {}
    error = None
    diverged = False
    timer = None
    param_count = 0
    optimizer = None
    step_time, timed = 0.0, 0
    try:
        torch.manual_seed(plan.seed)
        model = task.build_model(data)
        model.load_state_dict(plan.init_state)
        model.to(device).train()
        param_count = sum(p.numel() for p in model.parameters())
        params = optimizer_params(model, decay)
        if lr is not None:
            native_wd = 0.0 if weight_decay is None else weight_decay
            optimizer = make_optimizer(optimizer_name, params, lr, native_wd, 1.0)
        else:
            optimizer = make_optimizer(
                optimizer_name,
                params,
                task.adamw_lr * lr_scale,
                task.adamw_weight_decay * wd_scale,
                factor,
            )
        hparams = optimizer_hparams(optimizer)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, plan.steps))
        timer = _StepTimer(optimizer, device)
        task.start_run(data, plan.seed)
        checkpoints = set(eval_steps(plan.steps, evals))
        loss_sum = torch.zeros((), device=device)
        loss_count = 0
        batches = plan.batches.to(device)
        for step in range(plan.steps):
            _sync(device)
            t0 = time.perf_counter()
            loss = task.train_step(model, optimizer, data, batches[step], step)
            _sync(device)
            if step > 0:
                step_time += time.perf_counter() - t0
                timed += 1
            scheduler.step()
            loss_sum += torch.as_tensor(loss, dtype=torch.float32).detach().to(device)
            loss_count += 1
            if on_step is not None:
                on_step()
            if step + 1 in checkpoints or step + 1 == plan.steps:
                train_loss = loss_sum.item() / loss_count
                loss_sum.zero_()
                loss_count = 0
                if not math.isfinite(train_loss):
                    history["step"].append(step + 1)
                    for key in ("train_loss", "val_loss", "val_metric"):
                        history[key].append(None)
                    diverged = True
                    break
                model.eval()
                val_loss, val_metric = task.evaluate(model, data)
                model.train()
                val_loss, val_metric = float(val_loss), float(val_metric)
                history["step"].append(step + 1)
                for key, value in (
                    ("train_loss", train_loss),
                    ("val_loss", val_loss),
                    ("val_metric", val_metric),
                ):
                    history[key].append(value if math.isfinite(value) else None)
                if not math.isfinite(val_metric):
                    error = (
                        f"{where}: the metric returned {val_metric} at step {step + 1} "
                        f"(training loss {train_loss:.4g} is finite)"
                    )
                    break
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a broken task must not take the other runs down
        error = f"{where}: {type(exc).__name__} at step {step + 1}: {exc}"
    finally:
        if timer is not None:
            timer.remove()
    failed = diverged or error is not None
    metrics = [m for m in history["val_metric"] if m is not None]
    best = None if not metrics else (max if task.higher_is_better else min)(metrics)
    return RunResult(
        optimizer=optimizer_name,
        seed=plan.seed,
        hparams=hparams,
        steps=plan.steps,
        batch_size=plan.batch_size,
        history=history,
        final_metric=None if failed else history["val_metric"][-1],
        best_metric=best,
        final_val_loss=None if failed else history["val_loss"][-1],
        diverged=diverged,
        state_bytes=state_bytes(optimizer) if optimizer is not None else 0,
        param_count=param_count,
        optimizer_step_ms=1000 * timer.total / max(1, timer.count) if timer else 0.0,
        train_step_ms=1000 * step_time / max(1, timed),
        wall_s=time.perf_counter() - start,
        cpu_s=time.process_time() - cpu_start,
        error=error,
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
