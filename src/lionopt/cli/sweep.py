"""``lionopt sweep``: learning-rate x weight-decay grids for AdamW and Lion, and batch sizes.

Each optimizer's grid is centred on its own default (AdamW: the task's standard values; Lion:
``from_adamw`` of them) and every cell is trained with the compare protocol
(:func:`lionopt.tasks.protocol.train_run`) on the task's *tune* split: the training data minus
a held-out part, scored on that part, as ``lionopt compare`` tunes, so the validation split
stays unseen. The report draws the final tune-split metric as a heatmap and gives a
robustness number: the share of cells within 2% (relative) of the optimizer's best cell.
``--batch-sizes`` repeats the grid per batch size at a fixed number of training examples, and
reports each optimizer's best lr per batch size (Lion's moves with the batch far more than
AdamW's).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from lionopt.cli import _report
from lionopt.cli._runner import (
    Progress,
    add_common_arguments,
    command_line,
    finish,
    load_tasks,
    log,
    number_list,
    setup_device,
    sigterm_as_interrupt,
)
from lionopt.tasks import Task, get_task
from lionopt.tasks.optimizers import make_optimizer, optimizer_hparams
from lionopt.tasks.protocol import make_plan, mean_std, train_run

SCHEMA = "lionopt.sweep/1"
LR_MULTIPLIERS = [0.1, 1 / 3, 1.0, 3.0, 10.0]
WD_MULTIPLIERS = [0.1, 1.0, 10.0]
QUICK_LR_MULTIPLIERS = [0.1, 1.0, 10.0]
QUICK_WD_MULTIPLIERS = [0.1, 1.0, 10.0]
DEFAULT_TASKS = ["digits"]
DEFAULT_EVALS = 4
TOLERANCE = 0.02


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "sweep",
        help="lr x weight-decay grid (and batch sizes) for AdamW and Lion",
        description="Train AdamW and Lion over an lr x weight-decay grid centred on each "
        "optimizer's default, draw the final validation metric as heatmaps, and report how much "
        "of the grid is within 2% of each optimizer's best; --batch-sizes repeats it per batch.",
    )
    add_common_arguments(parser, default_tasks=",".join(DEFAULT_TASKS), default_seeds="1")
    parser.add_argument(
        "--lr-multipliers",
        type=number_list(float),
        default=None,
        help="multipliers of each optimizer's default lr (default: 0.1,0.333,1,3,10)",
    )
    parser.add_argument(
        "--wd-multipliers",
        type=number_list(float),
        default=None,
        help="multipliers of each optimizer's default weight decay (default: 0.1,1,10)",
    )
    parser.add_argument(
        "--batch-sizes",
        type=number_list(int),
        default=None,
        help="comma-separated batch sizes for the ablation (default: the task's batch size); "
        "each gets the same number of training examples",
    )
    parser.set_defaults(func=run)
    return parser


def resolve_config(args: argparse.Namespace) -> dict:
    quick = args.quick
    return {
        "tasks": args.tasks or DEFAULT_TASKS,
        "optimizers": args.optimizers,
        "seeds": list(range(args.seeds or 1)),
        "steps": args.steps,
        "batch_sizes": args.batch_sizes or ([args.batch_size] if args.batch_size else None),
        "lr_multipliers": args.lr_multipliers
        or (QUICK_LR_MULTIPLIERS if quick else LR_MULTIPLIERS),
        "wd_multipliers": args.wd_multipliers
        or (QUICK_WD_MULTIPLIERS if quick else WD_MULTIPLIERS),
        "evals": args.evals or DEFAULT_EVALS,
        "factor": args.factor,
        "tolerance": TOLERANCE,
        "split": "tune",
        "decay": "groups",
        "quick": quick,
        "device": args.device,
    }


def block_plan(task: Task, config: dict, batch_size: int | None) -> tuple[int, int]:
    """(batch size, steps) of one ablation block: steps shrink as the batch grows."""
    base_steps = config["steps"] or (task.quick_steps if config["quick"] else task.steps)
    if batch_size is None:
        return task.batch_size, base_steps
    return batch_size, max(1, round(base_steps * task.batch_size / batch_size))


def default_hparams(task: Task, optimizer: str, factor: float) -> dict:
    """The hyperparameters ``optimizer`` derives from the task's AdamW values."""
    probe = torch.zeros(1, requires_grad=True)
    return optimizer_hparams(
        make_optimizer(optimizer, [probe], task.adamw_lr, task.adamw_weight_decay, factor)
    )


def within(value: float, best: float, tolerance: float, higher_is_better: bool) -> bool:
    if higher_is_better:
        return value >= best - tolerance * abs(best)
    return value <= best + tolerance * abs(best)


def summarize_block(task: Task, block: dict, config: dict) -> None:
    """Fill ``grids``, ``best``, ``robustness`` and ``verdict`` of a block from its runs."""
    hib = task.higher_is_better
    block["grids"], block["best"], block["robustness"] = {}, {}, {}
    for name in config["optimizers"]:
        runs = [r for r in block["runs"] if r["optimizer"] == name]
        if not runs:
            continue
        base = default_hparams(task, name, config["factor"])
        values, cells_done = [], 0
        for wd_mult in config["wd_multipliers"]:
            row = []
            for lr_mult in config["lr_multipliers"]:
                cell = [
                    r["final_metric"]
                    for r in runs
                    if r["lr_multiplier"] == lr_mult and r["wd_multiplier"] == wd_mult
                ]
                cells_done += bool(cell)
                row.append(mean_std(cell)["mean"])  # None: not run yet, or diverged
            values.append(row)
        grid = {
            "lr": [base["lr"] * m for m in config["lr_multipliers"]],
            "weight_decay": [base.get("weight_decay", 0.0) * m for m in config["wd_multipliers"]],
            "final_metric": values,
            "cells_done": cells_done,
        }
        block["grids"][name] = grid
        cells = [
            (v, i, j) for i, row in enumerate(values) for j, v in enumerate(row) if v is not None
        ]
        if not cells:
            continue
        best_value, bi, bj = (max if hib else min)(cells, key=lambda cell: cell[0])
        block["best"][name] = {
            "final_metric": best_value,
            "lr": grid["lr"][bj],
            "weight_decay": grid["weight_decay"][bi],
            "lr_multiplier": config["lr_multipliers"][bj],
            "wd_multiplier": config["wd_multipliers"][bi],
        }
        good = sum(within(v, best_value, config["tolerance"], hib) for v, _, _ in cells)
        block["robustness"][name] = good / cells_done
    block["verdict"] = block_verdict(task, block, config)


def block_verdict(task: Task, block: dict, config: dict) -> list[str]:
    lines = []
    edges = (
        {min(config["lr_multipliers"]), max(config["lr_multipliers"])}
        if len(config["lr_multipliers"]) > 1
        else set()
    )
    for name, best in block["best"].items():
        text = (
            f"{name}: best final {task.metric.replace('_', ' ')} "
            f"{_report.fmt_value(best['final_metric'], task.metric)} at lr "
            f"{_report.fmt_number(best['lr'])} (x{_report.fmt_number(best['lr_multiplier'])}), "
            f"wd {_report.fmt_number(best['weight_decay'])} "
            f"(x{_report.fmt_number(best['wd_multiplier'])}); robustness "
            f"{100 * block['robustness'][name]:.0f}% of the grid within "
            f"{100 * config['tolerance']:.0f}% of its best."
        )
        if best["lr_multiplier"] in edges:
            text += " The best lr is on the edge of the grid: the optimum may lie beyond it."
        lines.append(text)
    if "adamw" in block["best"] and len(block["best"]) > 1:
        a = block["best"]["adamw"]["final_metric"]
        for name, best in block["best"].items():
            if name == "adamw":
                continue
            diff = best["final_metric"] - a
            won = diff > 0 if task.higher_is_better else diff < 0
            word = "beats" if won else ("ties" if diff == 0 else "loses to")
            text = f"Best cell against best cell, {name} {word} AdamW"
            if len(config["seeds"]) == 1:
                text += " (1 seed: no noise estimate, small differences may be noise)"
            lines.append(text + ".")
    return lines


def task_verdict(task: Task, entry: dict) -> list[str]:
    """Batch-size ablation: each optimizer's best lr and final metric per batch size."""
    blocks = [b for b in entry["batch_sizes"] if b.get("best")]
    if len(blocks) < 2:
        return []
    parts = []
    for b in blocks:
        bests = ", ".join(
            f"{name} {_report.fmt_value(best['final_metric'], task.metric)} at lr "
            f"{_report.fmt_number(best['lr'])}"
            for name, best in b["best"].items()
        )
        parts.append(f"batch {b['batch_size']}: {bests}")
    lines = ["Batch-size ablation (best cell per batch size): " + "; ".join(parts) + "."]
    for name in entry["batch_sizes"][0].get("best", {}):
        lrs = [b["best"][name]["lr"] for b in blocks if name in b["best"]]
        if len(lrs) >= 2:
            lines.append(
                f"{name}'s best lr across batch sizes: "
                + " -> ".join(_report.fmt_number(v) for v in lrs)
                + f" ({max(lrs) / min(lrs):.3g}x range)."
            )
    return lines


def write(report: dict, out: str | None, *, plots: bool) -> list[str]:
    if not out:
        return []
    out_dir = Path(out)
    written = _report.sweep_heatmaps(report, out_dir) if plots else {}
    _report.write_outputs(out_dir, "sweep", report, _report.sweep_markdown(report, written))
    return ["sweep.md", "sweep.json", *written.values()]


def train_all(
    report: dict, loaded, entries: dict, config: dict, grid, device, progress: Progress, out
) -> None:
    """Train every (task, batch size, seed, optimizer, cell), updating ``entries`` and files."""
    for task, full in loaded:
        data = task.tune_data(full)  # tune on held-out training data, never on validation
        entry = entries[task.name]
        entry["status"] = "running"
        for block in entry["batch_sizes"]:
            for seed in config["seeds"]:
                plan = make_plan(task, data, seed, block["steps"], block["batch_size"])
                for name in config["optimizers"]:
                    for lr_mult, wd_mult in grid:
                        progress.describe(f"{task.name} bs {block['batch_size']} {name}")
                        result = train_run(
                            task,
                            data,
                            plan,
                            name,
                            device=device,
                            evals=config["evals"],
                            factor=config["factor"],
                            lr_scale=lr_mult,
                            wd_scale=wd_mult,
                            decay=config["decay"],
                            on_step=progress.update,
                        )
                        record = result.to_dict()
                        record.update(lr_multiplier=lr_mult, wd_multiplier=wd_mult)
                        block["runs"].append(record)
                        summarize_block(task, block, config)
                        write(report, out, plots=False)
        entry["status"] = "complete"
        entry["verdict"] = task_verdict(task, entry)


def run(args: argparse.Namespace) -> int:
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        log(f"lionopt sweep: --out {args.out} exists and is not a directory")
        return 2
    started = time.perf_counter()
    device = setup_device(args)
    config = resolve_config(args)
    report = _report.new_report("sweep", SCHEMA, config, device, command_line("sweep"))
    loaded, skipped = load_tasks(config["tasks"], args.data_dir, device)
    entries = {}
    for task, _ in loaded:
        blocks = []
        for bs in config["batch_sizes"] or [None]:
            batch_size, steps = block_plan(task, config, bs)
            blocks.append({"batch_size": batch_size, "steps": steps, "runs": []})
        entries[task.name] = {
            **task.describe(),
            "status": "pending",
            "reason": None,
            "batch_sizes": blocks,
            "verdict": [],
        }
    for name, reason in skipped.items():
        entries[name] = {
            **get_task(name).describe(),
            "status": "skipped",
            "reason": reason,
            "batch_sizes": [],
            "verdict": [],
        }
    report["tasks"] = [entries[name] for name in config["tasks"]]
    if not loaded:
        log("lionopt sweep: no task could run")
        write(report, args.out, plots=False)
        return 1

    grid = [(lr, wd) for wd in config["wd_multipliers"] for lr in config["lr_multipliers"]]
    per_cell = len(config["seeds"]) * len(config["optimizers"]) * len(grid)
    total = sum(b["steps"] * per_cell for e in entries.values() for b in e["batch_sizes"])
    progress = Progress(total, enabled=not args.no_progress, desc="sweep")
    with sigterm_as_interrupt():
        try:
            train_all(report, loaded, entries, config, grid, device, progress, args.out)
        except KeyboardInterrupt:
            report["interrupted"] = True
            log("lionopt sweep: interrupted; reporting the runs that finished")
        finally:
            progress.close()
    for task, _ in loaded:
        entry = entries[task.name]
        if entry["status"] in ("running", "pending"):
            has_runs = any(b["runs"] for b in entry["batch_sizes"])
            entry["status"] = "partial" if has_runs else "not run"
            entry["verdict"] = task_verdict(task, entry)
    return finish(report, args, started, write, _report.sweep_text)
