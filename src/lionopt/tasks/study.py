"""The tuned comparison protocol of ``lionopt compare`` and the worker pool that runs it.

Per task a :class:`Study` is a small state machine that emits independent jobs (one training
run or one calibration each) and reacts to their results:

1. AdamW's lr is tuned on a log grid (1-3-10 values, at least 4 points, extended by one point
   while the best sits at an edge, at most twice) on the *tune* split: the task's training
   data minus a held-out part, scored on that part. Tuning runs are ``tune_length`` of the
   full length (default 0.5) and use ``tune_seeds`` seeds.
2. With AdamW's tuned lr ``A`` (weight decay ``w``, the task's):
   - **adamw**: AdamW at ``A``, ``w``;
   - **lion-translated**: ``from_adamw(A, w, factor)``, what a user does on day one;
   - **lion-calibrated**: :func:`lionopt.hparams.calibrate` on the tune split's training data
     (the same rule: 100 AdamW steps from seed 0's initial weights, through the task's own
     training step);
   - **lion-tuned**: Lion's own lr grid, ``A`` times 1, 1/3, 1/10, 1/30 (factors 1-30, same
     extension rule), each point with ``lr·λ = A·w`` (the per-step decay kept);
   - any other optimizer of ``--optimizers``: its registry translation of ``A``, ``w``.
3. Every row trains on the full training data, is scored on the validation split and runs
   with every seed; per seed, all rows share the initial weights, batches and schedule.

``no_tune`` gives the one-shot protocol (every optimizer at the task's AdamW values, through
its translation); ``reuse`` takes the rows' hyperparameters from an earlier report.

Jobs run in the calling process (``jobs=1``) or in ``jobs`` worker processes (spawned, one
torch thread each). Workers rebuild tasks from their spec (a shipped name, ``FILE.py:NAME``
or ``module:NAME``), so nothing but plain dicts crosses a process boundary.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import math
import multiprocessing
import signal
import sys
import time
from collections.abc import Callable

import torch

from lionopt.hparams import DEFAULT_FACTOR, from_adamw, measure_adamw_update_rms
from lionopt.tasks.base import Task, TaskData
from lionopt.tasks.grid import default_grid, neighbour, nice
from lionopt.tasks.loader import resolve_task
from lionopt.tasks.protocol import make_plan, mean_std, steps_to_reach, train_run

#: Lion's grid as AdamW→Lion factors of AdamW's tuned lr (Lion lr = A / factor).
LION_FACTORS = (1.0, 3.0, 10.0, 30.0)
MAX_EXTENSIONS = 2
CALIBRATION_STEPS = 100
#: Row keys of the tuned protocol, in report order.
ROWS = ("adamw", "lion-translated", "lion-calibrated", "lion-tuned")
ROW_TITLES = {
    "adamw": "AdamW tuned",
    "lion-translated": "Lion translated",
    "lion-calibrated": "Lion calibrated",
    "lion-tuned": "Lion tuned",
}


@dataclasses.dataclass
class Job:
    """One unit of work for a worker; plain data, so it pickles."""

    task: str  # spec, see lionopt.tasks.loader
    kind: str  # "train" or "calibrate"
    split: str  # "tune" or "val"
    row: str  # row key, or "tune:<optimizer>" for tuning runs
    optimizer: str
    seed: int
    steps: int
    batch_size: int
    evals: int
    decay: str
    lr: float | None = None  # native lr (None: the task's AdamW values, translated)
    weight_decay: float | None = None
    lr_scale: float = 1.0
    factor: float = DEFAULT_FACTOR
    cost: float = 1.0

    def label(self) -> str:
        what = "calibration" if self.kind == "calibrate" else self.row
        lr = "" if self.lr is None else f" lr {self.lr:.3g}"
        return f"{self.task} {what}{lr} seed {self.seed} ({self.split})"


# --- worker side ---------------------------------------------------------------------------

_TASKS: dict[str, Task] = {}
_DATA: dict[tuple[str, str], TaskData] = {}
_PLANS: dict[tuple, object] = {}
_CONTEXT = {"device": "cpu", "data_dir": None}


def register_task(spec: str, task: Task) -> None:
    """Make ``task`` available under ``spec`` in this process (used with ``jobs=1``)."""
    _TASKS[spec] = task
    for key in [k for k in _DATA if k[0] == spec]:
        del _DATA[key]
    for key in [k for k in _PLANS if k[0] == spec]:
        del _PLANS[key]


def _data(spec: str, split: str) -> tuple[Task, TaskData]:
    if spec not in _TASKS:
        _TASKS[spec] = resolve_task(spec)
    task = _TASKS[spec]
    if (spec, "val") not in _DATA:
        _DATA[spec, "val"] = task.load(_CONTEXT["data_dir"]).to(_CONTEXT["device"])
    if split == "tune" and (spec, "tune") not in _DATA:
        _DATA[spec, "tune"] = task.tune_data(_DATA[spec, "val"])
    return task, _DATA[spec, split]


def _plan(task: Task, data: TaskData, job: Job):
    key = (job.task, job.split, job.seed, job.steps, job.batch_size)
    if key not in _PLANS:
        if len(_PLANS) > 16:
            _PLANS.clear()
        _PLANS[key] = make_plan(task, data, job.seed, job.steps, job.batch_size)
    return _PLANS[key]


def execute(job: Job, on_step: Callable[[], None] | None = None) -> dict:
    """Run one job here; always returns a dict (``"error"`` set when the task failed)."""
    start = time.perf_counter()
    what = job.row if job.split == "val" else f"{job.row} lr {job.lr:.3g}"
    where = f"task {job.task!r}, {what} seed {job.seed}"
    try:
        task, data = _data(job.task, job.split)
        where = f"task {task.name!r}, {what} seed {job.seed}"
        plan = _plan(task, data, job)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        return {"error": f"{where}: {type(exc).__name__} while preparing: {exc}", "wall_s": 0.0}
    if job.kind == "calibrate":
        try:
            torch.manual_seed(plan.seed)
            model = task.build_model(data)
            model.load_state_dict(plan.init_state)
            model.to(_CONTEXT["device"])
            task.start_run(data, plan.seed)

            def step_fn(work, optimizer, i):
                loss = float(task.train_step(work, optimizer, data, plan.batches[i], i))
                if not math.isfinite(loss):
                    raise ValueError(f"the loss is {loss} at AdamW step {i + 1}")

            rms = measure_adamw_update_rms(model, step_fn, job.lr, job.weight_decay, plan.steps)
            hp = {"lr": job.lr * rms, "weight_decay": job.weight_decay / rms}
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            return {"error": f"{where}: calibration failed: {type(exc).__name__}: {exc}"}
        return {
            **hp,
            "adamw_lr": job.lr,
            "adamw_weight_decay": job.weight_decay,
            "adamw_update_rms": hp["lr"] / job.lr,
            "steps": plan.steps,
            "seed": plan.seed,
            "wall_s": time.perf_counter() - start,
            "error": None,
        }
    result = train_run(
        task,
        data,
        plan,
        job.optimizer,
        lr=job.lr,
        weight_decay=job.weight_decay,
        lr_scale=job.lr_scale,
        factor=job.factor,
        device=_CONTEXT["device"],
        evals=job.evals,
        decay=job.decay,
        on_step=on_step,
    )
    if result.error is not None:
        result.error = result.error.replace(
            f"task {task.name!r}, {job.optimizer} seed {job.seed}", where, 1
        )
    return result.to_dict()


def _init_worker(threads: int, device: str, data_dir: str | None, path: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    for entry in reversed(path):
        if entry not in sys.path:
            sys.path.insert(0, entry)
    torch.set_num_threads(threads)
    _CONTEXT.update(device=device, data_dir=data_dir)


def run_jobs(
    studies: list[Study],
    *,
    jobs: int = 1,
    threads: int = 1,
    device: str = "cpu",
    data_dir: str | None = None,
    on_done: Callable[[Job, dict], None] | None = None,
    on_step: Callable[[], None] | None = None,
    on_submit: Callable[[int], None] | None = None,
) -> None:
    """Run every study to completion; ``on_done(job, result)`` after each job.

    ``jobs=1`` runs in this process (``on_step`` is called after every training step); more
    runs ``jobs`` spawned workers, longest jobs first. ``on_submit(n)`` when n jobs are added. KeyboardInterrupt propagates after the
    workers are stopped; a crashed worker fails the jobs it held and the rest.
    """
    _CONTEXT.update(device=str(device), data_dir=data_dir)
    by_task = {s.spec: s for s in studies}
    pending: list[Job] = [job for s in studies for job in s.start()]
    if on_submit is not None:
        on_submit(len(pending))

    def take() -> Job:
        # tuning first (it unblocks the rest), then the most expensive, then the lowest seed
        def key(i: int):
            job = pending[i]
            return (job.split == "tune", job.cost, -job.seed)

        best = max(range(len(pending)), key=key)
        return pending.pop(best)

    def done(job: Job, result: dict) -> None:
        new = by_task[job.task].record(job, result)
        pending.extend(new)
        if on_submit is not None and new:
            on_submit(len(new))
        if on_done is not None:
            on_done(job, result)

    if jobs <= 1:
        while pending:
            job = take()
            done(job, execute(job, on_step))
        return
    context = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(
        max_workers=jobs,
        mp_context=context,
        initializer=_init_worker,
        initargs=(threads, str(device), data_dir, list(sys.path)),
    )
    running: dict[cf.Future, Job] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                job = take()
                running[pool.submit(execute, job)] = job
            finished, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in finished:
                job = running.pop(future)
                try:
                    result = future.result()
                except cf.process.BrokenProcessPool as exc:
                    result = {"error": f"task {job.task!r}: a worker process died ({exc})"}
                    pending.clear()
                done(job, result)
    except BaseException:
        for future in running:
            future.cancel()
        for process in list(getattr(pool, "_processes", {}).values()):
            process.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)


# --- the protocol --------------------------------------------------------------------------


def _better(hib: bool):
    return (lambda a, b: a > b) if hib else (lambda a, b: a < b)


class Study:
    """The protocol for one task; see the module docstring. ``entry`` is its report dict."""

    def __init__(self, spec: str, task: Task, config: dict, entry: dict):
        self.spec, self.task, self.config, self.entry = spec, task, config, entry
        self.steps = config["steps"] or (task.quick_steps if config["quick"] else task.steps)
        self.batch_size = config["batch_size"] or task.batch_size
        self.tune_steps = max(1, round(self.steps * config.get("tune_length", 0.5)))
        self.cost = float(self.steps) * max(1, entry.get("param_count") or 1)
        self.waiting: dict[str, int] = {}
        entry.update(
            steps=self.steps,
            batch_size=self.batch_size,
            decay=config["decay"],
            protocol="one-shot"
            if config["no_tune"]
            else ("reused" if config.get("reuse") else "tuned"),
            rows={},
            tuning={},
            calibration=None,
            tune_runs=[],
            errors=[],
        )

    # jobs

    def _job(self, row, optimizer, seed, split, steps, evals, **kw) -> Job:
        return Job(
            task=self.spec,
            kind=kw.pop("kind", "train"),
            split=split,
            row=row,
            optimizer=optimizer,
            seed=seed,
            steps=steps,
            batch_size=self.batch_size,
            evals=evals,
            decay=self.config["decay"],
            factor=self.config["factor"],
            cost=self.cost * steps / self.steps,
            **kw,
        )

    def _final_jobs(self, row: str) -> list[Job]:
        spec = self.entry["rows"][row]
        kw = {"lr": spec["lr"], "weight_decay": spec["weight_decay"]}
        if spec.get("lr_scale") is not None:
            kw = {"lr_scale": spec["lr_scale"]}
        return [
            self._job(row, spec["optimizer"], seed, "val", self.steps, self.config["evals"], **kw)
            for seed in self.config["seeds"]
        ]

    def _add_row(self, row: str, optimizer: str, how: str, **hp) -> list[Job]:
        self.entry["rows"][row] = {"optimizer": optimizer, "how": how, **hp}
        self.waiting[row] = len(self.config["seeds"])
        return self._final_jobs(row)

    def _tune_jobs(self, optimizer: str, lr: float) -> list[Job]:
        wd = self._tune_wd(optimizer, lr)
        return [
            self._job(f"tune:{optimizer}", optimizer, seed, "tune", self.tune_steps, 1, lr=lr,
                      weight_decay=wd)
            for seed in self.config["tune_seeds"]
        ]  # fmt: skip

    def _tune_wd(self, optimizer: str, lr: float) -> float:
        if optimizer == "adamw":
            return self.task.adamw_weight_decay
        a = self.entry["tuning"]["adamw"]["lr"]
        return a * self.task.adamw_weight_decay / lr  # lr·λ kept at AdamW's

    def start(self) -> list[Job]:
        cfg, task = self.config, self.task
        if cfg["no_tune"]:
            jobs = []
            for name in cfg["optimizers"]:
                how = (
                    "the task's AdamW values"
                    if name == "adamw"
                    else f"its translation of the task's AdamW values (factor {cfg['factor']:g})"
                )
                jobs += self._add_row(name, name, how, lr=None, weight_decay=None,
                                      lr_scale=1.0)  # fmt: skip
            return jobs
        if cfg.get("reuse"):
            jobs = []
            for row, spec in cfg["reuse"].items():
                jobs += self._add_row(row, spec["optimizer"], f"reused: {spec['how']}",
                                      lr=spec["lr"], weight_decay=spec["weight_decay"])  # fmt: skip
            return jobs
        grid = list(task.adamw_lr_grid or default_grid(task.adamw_lr))
        self.entry["tuning"]["adamw"] = self._new_tuning(grid, "adamw")
        return [j for lr in grid for j in self._tune_jobs("adamw", lr)]

    def _new_tuning(self, grid, optimizer) -> dict:
        return {
            "lr_grid": sorted(grid),
            "weight_decay": [],
            "tune_metric": [],
            "per_seed": {},
            "lr": None,
            "extensions": 0,
            "at_edge": False,
            "steps": self.tune_steps,
            "seeds": list(self.config["tune_seeds"]),
            "optimizer": optimizer,
        }

    # results

    def record(self, job: Job, result: dict) -> list[Job]:
        error = result.get("error")
        if error:
            self.entry["errors"].append(error)
            print(f"lionopt: {error}", file=sys.stderr, flush=True)
        if job.kind == "calibrate":
            return self._calibrated(result)
        if job.split == "tune":
            return self._tuned_point(job, result)
        self.entry["runs"].append({**result, "row": job.row})
        if job.seed not in self.entry["seeds"]:
            self.entry["seeds"].append(job.seed)
            self.entry["seeds"].sort()
        self.waiting[job.row] -= 1
        self.entry["summary"] = summarize(self.entry)
        if not any(self.waiting.values()) and self.entry["status"] == "running":
            failed = self.entry["errors"] or any(
                t["lr"] is None for t in self.entry["tuning"].values()
            )
            self.entry["status"] = "partial" if failed else "complete"
            self.entry["verdict"] = verdicts(self.entry)
        return []

    def _tuned_point(self, job: Job, result: dict) -> list[Job]:
        name = job.optimizer
        tuning = self.entry["tuning"][name]
        self.entry["tune_runs"].append(
            {k: result.get(k) for k in ("optimizer", "seed", "hparams", "final_metric",
                                        "diverged", "error", "wall_s", "steps")}
        )  # fmt: skip
        tuning["per_seed"].setdefault(repr(job.lr), []).append(result.get("final_metric"))
        if any(len(tuning["per_seed"].get(repr(lr), [])) < len(tuning["seeds"])
               for lr in tuning["lr_grid"]):  # fmt: skip
            return []
        hib = self.task.higher_is_better
        grid = tuning["lr_grid"]
        scores = []
        for lr in grid:
            values = tuning["per_seed"][repr(lr)]
            scores.append(None if any(v is None for v in values) else sum(values) / len(values))
        tuning["tune_metric"] = scores
        tuning["weight_decay"] = [self._tune_wd(name, lr) for lr in grid]
        finite = [(s, i) for i, s in enumerate(scores) if s is not None]
        if not finite:
            tuning["lr"] = None
            if name == "lion":
                self.waiting["lion-tuned"] = 0
            self.entry["errors"].append(
                f"task {self.task.name!r}: every {name} lr of the grid {grid} diverged or "
                "failed on the tune split; its rows are not run"
            )
            return self._maybe_finish()
        better = _better(hib)
        best_i = finite[0][1]
        for s, i in finite:
            if better(s, scores[best_i]):
                best_i = i
        edge = 0 if best_i == 0 else (1 if best_i == len(grid) - 1 else None)
        if edge is not None and tuning["extensions"] < MAX_EXTENSIONS:
            new_lr = neighbour(grid[best_i], -1 if edge == 0 else 1)
            tuning["extensions"] += 1
            tuning["lr_grid"] = sorted([*grid, new_lr])
            return self._tune_jobs(name, new_lr)
        tuning["at_edge"] = edge is not None
        tuning["lr"] = grid[best_i]
        tuning["chosen_weight_decay"] = tuning["weight_decay"][best_i]
        tuning["chosen_tune_metric"] = scores[best_i]
        return self._tuning_done(name)

    def _maybe_finish(self) -> list[Job]:
        if not any(self.waiting.values()) and self.entry["status"] == "running":
            self.entry["status"] = "partial" if self.entry["runs"] else "failed"
            self.entry["verdict"] = verdicts(self.entry)
        return []

    def _tuning_done(self, name: str) -> list[Job]:
        cfg, task = self.config, self.task
        tuning = self.entry["tuning"][name]
        if cfg.get("tune_only"):  # the check mode: grids only, no final rows
            jobs = []
            if name == "adamw" and "lion" in cfg["optimizers"]:
                grid = sorted(nice(tuning["lr"] / f) for f in LION_FACTORS)
                self.entry["tuning"]["lion"] = self._new_tuning(grid, "lion")
                jobs = [j for lr in grid for j in self._tune_jobs("lion", lr)]
            if not jobs and self.entry["status"] == "running":
                self.entry["status"] = "complete"
            return jobs
        if name != "adamw":
            return self._add_row("lion-tuned", "lion", f"tuned on its own lr grid ({len(tuning['lr_grid'])} points)",
                                 lr=tuning["lr"], weight_decay=tuning["chosen_weight_decay"])  # fmt: skip
        a, w = tuning["lr"], task.adamw_weight_decay
        jobs = self._add_row("adamw", "adamw", f"tuned on its lr grid ({len(tuning['lr_grid'])} points)",
                             lr=a, weight_decay=w)  # fmt: skip
        if "lion" in cfg["optimizers"]:
            hp = from_adamw(a, w, cfg["factor"])
            jobs += self._add_row("lion-translated", "lion",
                                  f"from_adamw(tuned AdamW, factor {cfg['factor']:g})", **hp)  # fmt: skip
            self.waiting["lion-calibrated"] = len(cfg["seeds"])
            self.waiting["lion-tuned"] = len(cfg["seeds"])
            steps = min(CALIBRATION_STEPS, self.tune_steps)
            jobs.append(self._job("lion-calibrated", "adamw", cfg["tune_seeds"][0], "tune", steps, 1,
                                  kind="calibrate", lr=a, weight_decay=w))  # fmt: skip
            grid = sorted(nice(a / f) for f in LION_FACTORS)
            self.entry["tuning"]["lion"] = self._new_tuning(grid, "lion")
            jobs += [j for lr in grid for j in self._tune_jobs("lion", lr)]
        for name in cfg["optimizers"]:
            if name not in ("adamw", "lion"):
                jobs += self._add_row(name, name, "its translation of tuned AdamW", lr=None,
                                      weight_decay=None, lr_scale=a / task.adamw_lr)  # fmt: skip
        return jobs

    def _calibrated(self, result: dict) -> list[Job]:
        if result.get("error"):
            self.waiting["lion-calibrated"] = 0
            return self._maybe_finish()
        self.entry["calibration"] = result
        self.waiting.pop("lion-calibrated", None)
        return self._add_row("lion-calibrated", "lion", "calibrate() from 100 AdamW steps",
                             lr=result["lr"], weight_decay=result["weight_decay"])  # fmt: skip


# --- summaries and verdicts ----------------------------------------------------------------


def row_title(row: str, entry: dict | None = None) -> str:
    """A row's name in reports; AdamW is "tuned" only where the task's protocol tuned it."""
    if row == "adamw" and entry is not None and entry.get("protocol") == "one-shot":
        return "AdamW (task values)"
    return ROW_TITLES.get(row, row)


def summarize(entry: dict) -> dict:
    """Per-row statistics over the finished final runs of one task, in row order."""
    runs = [r for r in entry["runs"] if not r.get("error")]
    base = "adamw"
    adamw_final = {r["seed"]: r["final_metric"] for r in runs if r["row"] == base}
    summary = {}
    for row, spec in entry["rows"].items():
        mine = [r for r in runs if r["row"] == row]
        if not mine:
            continue
        item = {
            "optimizer": spec["optimizer"],
            "how": spec["how"],
            "hparams": mine[0]["hparams"],
            "lr": mine[0]["hparams"].get("lr"),
            "weight_decay": mine[0]["hparams"].get("weight_decay"),
            "seeds": [r["seed"] for r in mine],
            "diverged": sum(r["diverged"] for r in mine),
            "param_count": mine[0]["param_count"],
            "state_bytes": mine[0]["state_bytes"],
        }
        for key in ("final_metric", "best_metric", "final_val_loss", "optimizer_step_ms",
                    "train_step_ms", "wall_s", "cpu_s"):  # fmt: skip
            item[key] = mean_std([r.get(key) for r in mine])
        per_seed = [
            {"seed": r["seed"],
             "step": steps_to_reach(r["history"], adamw_final[r["seed"]], entry["higher_is_better"])}
            for r in mine
            if adamw_final.get(r["seed"]) is not None
        ]  # fmt: skip
        reached = [p["step"] for p in per_seed if p["step"] is not None]
        item["steps_to_adamw_final"] = {
            "per_seed": per_seed,
            "n": len(per_seed),
            "reached": len(reached),
            "mean_steps": sum(reached) / len(reached) if reached else None,
        }
        summary[row] = item
    return summary


def difference(a: dict, b: dict) -> dict:
    """``a - b`` of two mean_std dicts, its standard error and whether it is within noise.

    Within noise: |difference| ≤ 2 standard errors, √(s_a²/n_a + s_b²/n_b); undecided (None)
    with fewer than 2 seeds on either side.
    """
    diff = a["mean"] - b["mean"]
    if a["n"] < 2 or b["n"] < 2:
        return {"diff": diff, "se": None, "noise": None}
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    return {"diff": diff, "se": se, "noise": abs(diff) <= 2 * se}


def fmt_metric(value: float, metric: str) -> str:
    """A difference of two metric values (accuracy: in percentage points)."""
    if metric == "accuracy":
        return f"{100 * value:.2f} points"
    return f"{value:.3f}"


def fmt_stat(stat: dict, metric: str) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    if metric == "accuracy":
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}%"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def headline(entry: dict) -> str | None:
    """Who won the task, by how much, against the seed spread."""
    summary = {r: s for r, s in entry.get("summary", {}).items() if s["final_metric"]["n"]}
    if len(summary) < 2:
        return None
    metric, hib = entry["metric"], entry["higher_is_better"]
    sign = 1 if hib else -1
    ranked = sorted(summary, key=lambda r: -sign * summary[r]["final_metric"]["mean"])
    first, second = ranked[0], ranked[1]
    d = difference(summary[first]["final_metric"], summary[second]["final_metric"])
    text = (
        f"Best: {row_title(first, entry)} ({fmt_stat(summary[first]['final_metric'], metric)}), "
        f"ahead of {row_title(second, entry)} ({fmt_stat(summary[second]['final_metric'], metric)}) "
        f"by {fmt_metric(abs(d['diff']), metric)}"
    )
    if d["noise"] is None:
        return text + " (1 seed: no noise estimate)."
    if d["noise"]:
        return text + f": within noise (2 standard errors = {fmt_metric(2 * d['se'], metric)})."
    return text + f", more than the noise (2 standard errors = {fmt_metric(2 * d['se'], metric)})."


def verdicts(entry: dict) -> list[str]:
    """Plain sentences: the headline, then every row against AdamW (they say when AdamW wins)."""
    summary = entry.get("summary", {})
    lines = []
    top = headline(entry)
    if top:
        lines.append(top)
    if "adamw" not in summary:
        return lines + [f"Error: {e}" for e in entry.get("errors", [])]
    metric, hib = entry["metric"], entry["higher_is_better"]
    base = summary["adamw"]
    for row, s in summary.items():
        if row == "adamw" or s["final_metric"]["n"] == 0 or base["final_metric"]["n"] == 0:
            continue
        mine, theirs = s["final_metric"], base["final_metric"]
        d = difference(mine, theirs)
        pair = (
            f"{fmt_stat(mine, metric)} vs {fmt_stat(theirs, metric)} (final "
            f"{metric.replace('_', ' ')}, {'higher' if hib else 'lower'} is better; lr "
            f"{s['lr']:.3g} vs {base['lr']:.3g})"
        )
        name, adamw = row_title(row, entry), row_title("adamw", entry)
        if d["noise"]:
            text = f"{name} and {adamw} finish within seed noise: {pair}."
        else:
            won = d["diff"] > 0 if hib else d["diff"] < 0
            text = f"{name} {'beats' if won else 'loses to'} {adamw} by "
            text += f"{fmt_metric(abs(d['diff']), metric)}: {pair}"
            text += "." if d["noise"] is not None else " (1 seed: no noise estimate)."
        reach = s["steps_to_adamw_final"]
        if reach["n"]:
            if reach["reached"] == 0:
                text += f" It never reaches AdamW's final value within {entry['steps']} steps."
            else:
                text += (
                    f" It reaches AdamW's final value after {reach['mean_steps']:.0f} of "
                    f"{entry['steps']} steps ({reach['reached']}/{reach['n']} seeds)."
                )
        if s["diverged"]:
            text += f" Diverged in {s['diverged']} run(s)."
        if base["state_bytes"]:
            text += (
                f" Optimizer state {s['state_bytes'] / base['state_bytes']:.2f}x AdamW's; "
                f"optimizer.step() {s['optimizer_step_ms']['mean']:.2f} vs "
                f"{base['optimizer_step_ms']['mean']:.2f} ms, whole train step "
                f"{s['train_step_ms']['mean']:.1f} vs {base['train_step_ms']['mean']:.1f} ms."
            )
        lines.append(text)
    return lines + [f"Error: {e}" for e in entry.get("errors", [])]
