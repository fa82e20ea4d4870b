"""What Distributed Lion's vote costs in training quality, without a cluster.

Runs global Lion, MaVo (majority vote), Avg (averaged votes) and AdamW with N virtual workers
(``lionopt.distributed.simulate``, run by ``lionopt.tasks.workers``) at equal tokens on the embedded tasks: each step every
method sees the same global batch of N × b examples (the voting methods as N per-worker batches
of b, the global ones whole), from the same initial weights, with the same lr schedule and
``lionopt compare``'s hyperparameters (Lion's translated from the task's AdamW ones).

    PYTHONPATH=src python benchmarks/distributed_lion_quality.py            # N = 4 and 8
    PYTHONPATH=src python benchmarks/distributed_lion_quality.py --quick    # fewer steps

Writes docs/results/distributed_lion_quality.{json,md} and one PNG of curves per task.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from lionopt.tasks import get_task
from lionopt.tasks.protocol import make_plan, mean_std
from lionopt.tasks.workers import METHODS, train_workers

#: Per-worker batch for each task: at N = 4 the global batch is the task's default.
PER_WORKER_BATCH = {"digits": 32, "charlm": 8}
OUT = Path(__file__).resolve().parents[1] / "docs" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["digits", "charlm"])
    parser.add_argument("--workers", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--quick", action="store_true", help="the tasks' quick step budgets")
    parser.add_argument("--steps", type=int, default=None, help="steps for every task")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)

    results = []
    started = time.perf_counter()
    for task_name in args.tasks:
        task = get_task(task_name)
        data = task.load()
        steps = args.steps or (task.quick_steps if args.quick else task.steps)
        for workers in args.workers:
            batch = PER_WORKER_BATCH.get(task_name, task.batch_size // 4) * workers
            for seed in args.seeds:
                plan = make_plan(task, data, seed, steps, batch)
                for method in args.methods:
                    run = train_workers(task, data, plan, method, workers)
                    row = run.to_dict()
                    row.update(task=task_name, workers=workers, metric=task.metric)
                    results.append(row)
                    print(
                        f"{task_name:7s} N={workers} seed={seed} {method:6s} "
                        f"{task.metric}={row['final_metric']} val_loss={row['final_val_loss']}"
                        f" ({row['wall_s']:.0f} s)",
                        flush=True,
                    )
    report = {
        "command": "python benchmarks/distributed_lion_quality.py "
        + " ".join(__import__("sys").argv[1:]),
        "per_worker_batch": PER_WORKER_BATCH,
        "seconds": time.perf_counter() - started,
        "runs": results,
    }
    (args.out / "distributed_lion_quality.json").write_text(json.dumps(report, indent=1))
    table = _table(results, args)
    (args.out / "distributed_lion_quality.md").write_text(table)
    print(table)
    _plots(results, args)


def _table(results: list[dict], args) -> str:
    lines = [
        "| task | N | global batch | method | final val metric (mean ± sd) | final val loss |",
        "|---|---|---|---|---|---|",
    ]
    for task_name in args.tasks:
        for workers in args.workers:
            for method in args.methods:
                runs = [
                    r
                    for r in results
                    if r["task"] == task_name
                    and r["workers"] == workers
                    and r["optimizer"] == method
                ]
                if not runs:
                    continue
                metric = mean_std([r["final_metric"] for r in runs])
                loss = mean_std([r["final_val_loss"] for r in runs])
                lines.append(
                    f"| {task_name} ({runs[0]['metric']}) | {workers} | {runs[0]['batch_size']} "
                    f"| {method} | {_fmt(metric)} | {_fmt(loss)} |"
                )
    seeds = len(args.seeds)
    lines.append("")
    lines.append(f"{seeds} seed(s) each; diverged runs count as missing (n shows how many remain).")
    return "\n".join(lines) + "\n"


def _fmt(stats: dict) -> str:
    if stats["mean"] is None:
        return "diverged"
    return f"{stats['mean']:.4f} ± {stats['std']:.4f} (n={stats['n']})"


def _plots(results: list[dict], args) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots")
        return
    styles = {"lion": "-", "mavo": "--", "avg": ":", "adamw": "-."}
    for task_name in args.tasks:
        fig, axes = plt.subplots(1, len(args.workers), figsize=(6 * len(args.workers), 4))
        axes = axes if len(args.workers) > 1 else [axes]
        for ax, workers in zip(axes, args.workers):
            for method in args.methods:
                runs = [
                    r
                    for r in results
                    if r["task"] == task_name
                    and r["workers"] == workers
                    and r["optimizer"] == method
                ]
                if not runs:
                    continue
                steps = runs[0]["history"]["step"]
                curves = [r["history"]["val_loss"] for r in runs]
                mean = [
                    sum(c[i] for c in curves if c[i] is not None)
                    / max(1, sum(c[i] is not None for c in curves))
                    if i < min(map(len, curves))
                    else None
                    for i in range(len(steps))
                ]
                ax.plot(steps, mean, styles.get(method, "-"), label=METHODS[method][0])
            ax.set_title(f"{task_name}: N = {workers} workers, equal tokens")
            ax.set_xlabel("step")
            ax.set_ylabel("validation loss")
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / f"distributed_lion_quality_{task_name}.png", dpi=100)
        plt.close(fig)


if __name__ == "__main__":
    main()
