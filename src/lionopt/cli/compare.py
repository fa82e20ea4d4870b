"""``lionopt compare``: does Lion train these real-data tasks as well as AdamW, and at what cost?

For every task and seed, each optimizer trains from the same initial weights on the same batch
sequence (:mod:`lionopt.tasks.protocol`). AdamW runs at the task's standard hyperparameters,
Lion at ``from_adamw`` of them. The report gives final and best validation metric (mean ± std
over seeds), the steps Lion needs to reach AdamW's final metric, optimizer-state bytes and
step times, as a terminal table and, with ``--out``, as JSON, Markdown and PNG curves.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lionopt.cli import _report
from lionopt.cli._runner import (
    Progress,
    add_common_arguments,
    command_line,
    finish,
    load_tasks,
    log,
    setup_device,
    sigterm_as_interrupt,
)
from lionopt.tasks import TASKS, Task, get_task
from lionopt.tasks.protocol import make_plan, mean_std, steps_to_reach, train_run

SCHEMA = "lionopt.compare/1"
DEFAULT_SEEDS, QUICK_SEEDS = 3, 2
DEFAULT_EVALS, QUICK_EVALS = 12, 6
#: ``--quick`` leaves out tasks whose data is optional (they load slowly and train longer).
QUICK_TASKS = ["digits", "charlm"]


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="train real-data tasks with AdamW and Lion and compare the results",
        description="Train real-data tasks with AdamW (standard hyperparameters) and Lion "
        "(from_adamw of them) from the same initial weights and batches, and report accuracy or "
        "bits per char, steps to AdamW's final value, optimizer memory and step time.",
    )
    add_common_arguments(
        parser,
        default_tasks="all; fashion only when its data is installed; --quick: digits,charlm",
        default_seeds=f"{DEFAULT_SEEDS}, --quick: {QUICK_SEEDS}",
    )
    parser.set_defaults(func=run)
    return parser


def resolve_config(args: argparse.Namespace) -> dict:
    tasks = args.tasks or (QUICK_TASKS if args.quick else list(TASKS))
    return {
        "tasks": tasks,
        "optimizers": args.optimizers,
        "seeds": list(range(args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS))),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "evals": args.evals or (QUICK_EVALS if args.quick else DEFAULT_EVALS),
        "factor": args.factor,
        "quick": args.quick,
        "device": args.device,
    }


def task_steps(task: Task, config: dict) -> int:
    return config["steps"] or (task.quick_steps if config["quick"] else task.steps)


def summarize(task: dict, optimizers: list[str]) -> dict:
    """Per-optimizer statistics over the finished runs of one task."""
    runs = task["runs"]
    adamw_final = {r["seed"]: r["final_metric"] for r in runs if r["optimizer"] == "adamw"}
    summary = {}
    for name in optimizers:
        mine = [r for r in runs if r["optimizer"] == name]
        if not mine:
            continue
        entry = {
            "hparams": mine[0]["hparams"],
            "seeds": [r["seed"] for r in mine],
            "diverged": sum(r["diverged"] for r in mine),
            "param_count": mine[0]["param_count"],
            "state_bytes": mine[0]["state_bytes"],
        }
        for key in (
            "final_metric",
            "best_metric",
            "final_val_loss",
            "optimizer_step_ms",
            "train_step_ms",
            "wall_s",
        ):
            entry[key] = mean_std([r[key] for r in mine])
        per_seed = [
            {
                "seed": r["seed"],
                "step": steps_to_reach(
                    r["history"], adamw_final[r["seed"]], task["higher_is_better"]
                ),
            }
            for r in mine
            if adamw_final.get(r["seed"]) is not None
        ]
        reached = [p["step"] for p in per_seed if p["step"] is not None]
        entry["steps_to_adamw_final"] = {
            "per_seed": per_seed,
            "n": len(per_seed),
            "reached": len(reached),
            "mean_steps": sum(reached) / len(reached) if reached else None,
        }
        summary[name] = entry
    return summary


def verdicts(task: dict) -> list[str]:
    """Plain sentences comparing every optimizer with AdamW; they say so when AdamW wins."""
    summary = task["summary"]
    if "adamw" not in summary:
        return []
    metric, hib = task["metric"], task["higher_is_better"]
    base = summary["adamw"]
    lines = []
    for name, s in summary.items():
        if name == "adamw" or s["final_metric"]["n"] == 0 or base["final_metric"]["n"] == 0:
            continue
        mine, theirs = s["final_metric"], base["final_metric"]
        diff = mine["mean"] - theirs["mean"]
        pair = (
            f"{_report.fmt_stat(mine, metric)} vs {_report.fmt_stat(theirs, metric)} "
            f"(final {metric.replace('_', ' ')}, {'higher' if hib else 'lower'} is better)"
        )
        n = min(mine["n"], theirs["n"])
        if n >= 2 and abs(diff) <= max(mine["std"], theirs["std"]):
            text = f"{name} and AdamW finish within seed noise: {pair}."
        else:
            won = diff > 0 if hib else diff < 0
            text = f"{name} {'beats' if won else 'loses to'} AdamW: {pair}"
            text += "." if n >= 2 else " (1 seed: no noise estimate)."
        reach = s["steps_to_adamw_final"]
        if reach["n"]:
            if reach["reached"] == 0:
                text += f" It never reaches AdamW's final value within {task['steps']} steps."
            else:
                text += (
                    f" It reaches AdamW's final value after {reach['mean_steps']:.0f} of "
                    f"{task['steps']} steps ({reach['reached']}/{reach['n']} seeds)."
                )
        if s["diverged"]:
            text += f" Diverged in {s['diverged']} run(s)."
        if base["state_bytes"]:
            text += (
                f" Optimizer state {_report.fmt_bytes(s['state_bytes'])} vs "
                f"{_report.fmt_bytes(base['state_bytes'])} "
                f"({s['state_bytes'] / base['state_bytes']:.2f}x)"
            )
        opt_ms, base_ms = s["optimizer_step_ms"]["mean"], base["optimizer_step_ms"]["mean"]
        step_ms, base_step = s["train_step_ms"]["mean"], base["train_step_ms"]["mean"]
        text += (
            f"; optimizer.step() {opt_ms:.2f} vs {base_ms:.2f} ms, "
            f"whole train step {step_ms:.1f} vs {base_step:.1f} ms."
        )
        lines.append(text)
    return lines


def task_entry(task: Task, status: str, config: dict, reason: str | None = None) -> dict:
    return {
        **task.describe(),
        "status": status,
        "reason": reason,
        "steps": task_steps(task, config),
        "batch_size": config["batch_size"] or task.batch_size,
        "seeds": [],
        "runs": [],
        "summary": {},
        "verdict": [],
    }


def write(report: dict, out: str | None, *, plots: bool) -> None:
    if not out:
        return
    out_dir = Path(out)
    written = _report.compare_plots(report, out_dir) if plots else {}
    _report.write_outputs(out_dir, "compare", report, _report.compare_markdown(report, written))


def train_all(
    report: dict, loaded, entries: dict, config: dict, device, progress: Progress, out
) -> None:
    """Train every (task, seed, optimizer), updating ``entries`` and the files as runs end."""
    seeds, optimizers = config["seeds"], config["optimizers"]
    for task, data in loaded:
        entry = entries[task.name]
        entry["status"] = "running"
        for seed in seeds:
            plan = make_plan(task, data, seed, entry["steps"], entry["batch_size"])
            for name in optimizers:
                progress.describe(f"{task.name} seed {seed} {name}")
                result = train_run(
                    task,
                    data,
                    plan,
                    name,
                    device=device,
                    evals=config["evals"],
                    factor=config["factor"],
                    on_step=progress.update,
                )
                entry["runs"].append(result.to_dict())
                if seed not in entry["seeds"]:
                    entry["seeds"].append(seed)
                entry["summary"] = summarize(entry, optimizers)
                write(report, out, plots=False)
        entry["status"] = "complete"
        entry["verdict"] = verdicts(entry)


def run(args: argparse.Namespace) -> int:
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        log(f"lionopt compare: --out {args.out} exists and is not a directory")
        return 2
    started = time.perf_counter()
    device = setup_device(args)
    config = resolve_config(args)
    report = _report.new_report("compare", SCHEMA, config, device, command_line("compare"))
    loaded, skipped = load_tasks(config["tasks"], args.data_dir, device)
    entries = {t.name: task_entry(t, "pending", config) for t, _ in loaded}
    for name, reason in skipped.items():
        entries[name] = task_entry(get_task(name), "skipped", config, reason)
    report["tasks"] = [entries[name] for name in config["tasks"]]
    if not loaded:
        log("lionopt compare: no task could run")
        print(_report.compare_text(report), end="")
        write(report, args.out, plots=False)
        return 1

    seeds, optimizers = config["seeds"], config["optimizers"]
    total = sum(task_steps(t, config) for t, _ in loaded) * len(seeds) * len(optimizers)
    progress = Progress(total, enabled=not args.no_progress, desc="compare")
    with sigterm_as_interrupt():
        try:
            train_all(report, loaded, entries, config, device, progress, args.out)
        except KeyboardInterrupt:
            report["interrupted"] = True
            log("lionopt compare: interrupted; reporting the runs that finished")
        finally:
            progress.close()
    for entry in report["tasks"]:
        if entry["status"] in ("running", "pending"):
            entry["status"] = "partial" if entry["runs"] else "not run"
            entry["verdict"] = verdicts(entry)
    return finish(
        report, args, started, write, _report.compare_text, "compare.md, compare.json and PNG plots"
    )
