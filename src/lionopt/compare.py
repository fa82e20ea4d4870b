"""``lionopt.compare.run``: the ``lionopt compare`` protocol for a model trained in your own loop.

(The command line lives in :mod:`lionopt.cli.compare`; this module is the library recipe.)
You keep your data pipeline and your step; the protocol owns the optimizer, its lr schedule
and the seeds::

    import lionopt.compare

    def make_model():                        # called after torch.manual_seed(seed)
        return MyNet()

    def make_batches(seed, split):           # same batches for every optimizer of a seed
        loader = my_loader(train_part(split), shuffle_seed=seed)
        return itertools.cycle(loader)       # "tune": training data minus your held-out part

    def train_step(model, optimizer, batch): # your loop's body
        optimizer.zero_grad()
        loss = my_loss(model, batch)
        loss.backward()
        optimizer.step()
        return loss

    def evaluate(model, split):              # "tune": your held-out part; "val": validation
        return my_accuracy(model, split)

    report = lionopt.compare.run(make_model, make_batches, train_step, evaluate,
                                 steps=2000, adamw_lr=1e-3, adamw_weight_decay=0.05)
    print(lionopt.compare.text(report))

The report is the JSON of ``lionopt compare`` (rows ``adamw``, ``lion-translated``,
``lion-calibrated``, ``lion-tuned``; tuning grids; verdicts). The optimizer's lr is set by a
per-step scheduler (5% warmup, cosine to 10%): do not add your own. Runs are sequential in
this process. ``out="dir"`` also writes compare.json, compare.md and PNG curves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from lionopt.hparams import DEFAULT_FACTOR
from lionopt.tasks.base import Task, TaskData
from lionopt.tasks.study import Study, register_task, run_jobs, summarize, verdicts

__all__ = ["CallbackTask", "run", "text"]


class CallbackTask(Task):
    """A :class:`~lionopt.tasks.Task` whose data, step and evaluation are the user's callables."""

    def __init__(
        self,
        make_model: Callable[[], nn.Module],
        make_batches: Callable[[int, str], Iterable[Any]],
        train_step: Callable[[nn.Module, torch.optim.Optimizer, Any], Any],
        evaluate: Callable[[nn.Module, str], float | tuple[float, float]],
        *,
        name: str,
        steps: int,
        adamw_lr: float,
        adamw_weight_decay: float,
        higher_is_better: bool,
        metric: str,
    ):
        for key, fn in (("make_model", make_model), ("make_batches", make_batches),
                        ("train_step", train_step), ("evaluate", evaluate)):  # fmt: skip
            if not callable(fn):
                raise ValueError(f"lionopt.compare.run: {key} must be callable")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(
                f"lionopt.compare.run: steps must be a positive integer, got {steps!r}"
            )
        self._make_model, self._make_batches = make_model, make_batches
        self._train_step, self._evaluate = train_step, evaluate
        self._batches = None
        self.name, self.title, self.metric = name, name, metric
        self.higher_is_better = bool(higher_is_better)
        self.steps = self.quick_steps = steps
        self.batch_size = 1
        self.adamw_lr, self.adamw_weight_decay = float(adamw_lr), float(adamw_weight_decay)
        self.source, self.licence = "user callables", "-"

    def load(self, data_dir: str | None = None) -> TaskData:
        marker = torch.zeros(1)
        return TaskData(marker, None, marker, None, {"split": "val"})

    def tune_data(self, data: TaskData) -> TaskData:
        return TaskData(data.train_x, None, data.val_x, None, {"split": "tune"})

    def build_model(self, data: TaskData) -> nn.Module:
        model = self._make_model()
        if not isinstance(model, nn.Module):
            raise ValueError(f"make_model() must return an nn.Module, got {type(model).__name__}")
        return model

    def batch_indices(self, data, steps, batch_size, generator):
        return torch.zeros(steps, 1, dtype=torch.long)

    def start_run(self, data: TaskData, seed: int) -> None:
        self._batches = iter(self._make_batches(seed, data.info["split"]))

    def train_step(self, model, optimizer, data, indices, step):
        try:
            batch = next(self._batches)
        except StopIteration:
            raise ValueError(f"make_batches ran out of batches after {step} steps") from None
        loss = self._train_step(model, optimizer, batch)
        return torch.as_tensor(float(loss))

    def evaluate(self, model, data):
        value = self._evaluate(model, data.info["split"])
        if isinstance(value, tuple):
            return float(value[0]), float(value[1])
        return float("nan"), float(value)


def run(
    make_model: Callable[[], nn.Module],
    make_batches: Callable[[int, str], Iterable[Any]],
    train_step: Callable[[nn.Module, torch.optim.Optimizer, Any], Any],
    evaluate: Callable[[nn.Module, str], float | tuple[float, float]],
    *,
    steps: int,
    adamw_lr: float,
    adamw_weight_decay: float = 0.01,
    higher_is_better: bool = True,
    metric: str = "metric",
    name: str = "model",
    seeds: int = 3,
    tune: bool = True,
    tune_length: float = 0.5,
    lr_grid: Iterable[float] | None = None,
    evals: int = 10,
    factor: float = DEFAULT_FACTOR,
    decay: str = "groups",
    optimizers: Iterable[str] = ("adamw", "lion"),
    out: str | None = None,
) -> dict:
    """Run the tuned protocol (or, with ``tune=False``, the one-shot run) on your own loop.

    ``make_model()`` builds the model (torch is seeded first); ``make_batches(seed, split)``
    returns an iterable of at least ``steps`` batches, ``split`` being ``"tune"`` (train on
    your training data minus a held-out part) or ``"val"`` (the full training data);
    ``train_step(model, optimizer, batch)`` does one step and returns the loss;
    ``evaluate(model, split)`` returns the metric (or ``(loss, metric)``) on the held-out
    part (``"tune"``) or the validation data (``"val"``). ``lr_grid``: AdamW's grid (default:
    4 points of the 1-3-10 sequence around ``adamw_lr``). Returns the report dict.
    """
    if int(seeds) < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if not 0 < tune_length <= 1:
        raise ValueError(f"tune_length must be in (0, 1], got {tune_length}")
    task = CallbackTask(make_model, make_batches, train_step, evaluate, name=name, steps=steps,
                        adamw_lr=adamw_lr, adamw_weight_decay=adamw_weight_decay,
                        higher_is_better=higher_is_better, metric=metric)  # fmt: skip
    if lr_grid is not None:
        task.adamw_lr_grid = tuple(sorted(float(v) for v in lr_grid))
    optimizers = list(optimizers)
    if tune and "adamw" not in optimizers:
        raise ValueError("the tuned protocol compares with AdamW tuned: include 'adamw'")
    config = {
        "tasks": [name], "optimizers": optimizers, "seeds": list(range(int(seeds))),
        "steps": steps, "batch_size": None, "evals": evals, "factor": factor, "quick": False,
        "device": "cpu", "no_tune": not tune, "tune_length": tune_length, "tune_seeds": [0],
        "reuse_tuning": None, "decay": decay, "jobs": 1, "threads": torch.get_num_threads(),
    }  # fmt: skip
    from lionopt.cli import _report  # formatting only; the protocol lives in lionopt.tasks

    started = time.perf_counter()
    report = _report.new_report("compare", "lionopt.compare/2", config, torch.device("cpu"),
                                "lionopt.compare.run(...)")  # fmt: skip
    spec = f"<callbacks {name}>"
    register_task(spec, task)
    entry = {**task.describe(), "spec": spec, "status": "running", "reason": None, "seeds": [],
             "runs": [], "summary": {}, "verdict": [], "param_count": 1}  # fmt: skip
    study = Study(spec, task, config, entry)
    report["tasks"] = [entry]
    try:
        run_jobs([study], jobs=1)
    except KeyboardInterrupt:
        report["interrupted"] = True
    if entry["status"] == "running":
        entry["status"] = "partial" if entry["runs"] else "not run"
    entry["summary"] = summarize(entry)
    entry["verdict"] = verdicts(entry)
    report["complete"] = not report["interrupted"]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if out is not None:
        from pathlib import Path

        written = _report.compare_plots(report, Path(out))
        _report.write_outputs(out, "compare", report, _report.compare_markdown(report, written))
    return report


def text(report: dict) -> str:
    """The terminal summary of a report (tables, tuning, verdicts)."""
    from lionopt.cli import _report

    return _report.compare_text(report)
