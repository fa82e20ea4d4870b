"""``lionopt compare``: should I switch to Lion, and with which hyperparameters?

The default is the tuned protocol of :mod:`lionopt.tasks.study`: AdamW's lr is tuned on a
tune split held out of each task's training data, then four rows run on the validation split
with every seed, from the same initial weights and batches: AdamW tuned, Lion translated
(``from_adamw`` of tuned AdamW), Lion calibrated (``lionopt.hparams.calibrate``) and Lion
tuned on its own grid. ``--no-tune`` is the one-shot run at the task's AdamW values.
``--task FILE.py:NAME`` (or ``module:NAME``) adds the user's own task. Independent runs go to
``--jobs`` worker processes. The report gives who won per task against the seed spread, the
lr each row used, memory and step times, as a terminal table and, with ``--out``, as JSON,
Markdown and PNG curves.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from lionopt.cli import _report
from lionopt.cli._runner import (
    Progress,
    add_common_arguments,
    command_line,
    finish,
    log,
    positive_int,
    setup_device,
    sigterm_as_interrupt,
)
from lionopt.tasks import TASKS, TaskUnavailable, resolve_task
from lionopt.tasks.study import Study, register_task, run_jobs, summarize, verdicts

SCHEMA = "lionopt.compare/2"
DEFAULT_SEEDS, QUICK_SEEDS = 3, 2
DEFAULT_EVALS, QUICK_EVALS = 12, 6
DEFAULT_TUNE_LENGTH = 0.5
#: ``--quick`` leaves out tasks whose data is optional (they load slowly and train longer).
QUICK_TASKS = ["digits", "charlm"]


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {value}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "compare",
        help="tune AdamW, then compare it with Lion (translated, calibrated, tuned)",
        description="Tune AdamW's lr on a held-out tune split of each task, then train AdamW "
        "tuned, Lion translated (from_adamw of tuned AdamW), Lion calibrated and Lion tuned "
        "from the same initial weights and batches over several seeds, and report who won "
        "against the seed spread, the lr each used, optimizer memory and step time.",
    )
    add_common_arguments(
        parser,
        default_tasks="all; fashion only when its data is installed; --quick: digits,charlm",
        default_seeds=f"{DEFAULT_SEEDS}, --quick: {QUICK_SEEDS}",
    )
    parser.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="FILE.py:NAME",
        help="your own task: FILE.py:NAME or module:NAME, a lionopt.tasks.Task (subclass) or a "
        "callable returning one, e.g. a lionopt.tasks.TensorTask; repeatable. Without --tasks "
        "only these run",
    )
    parser.add_argument(
        "--no-tune",
        action="store_true",
        help="one-shot run: every optimizer at the task's AdamW values (Lion: from_adamw), "
        "no tuning",
    )
    parser.add_argument(
        "--tune-length",
        type=fraction,
        default=DEFAULT_TUNE_LENGTH,
        help="tuning runs' length as a fraction of the full run "
        f"(default {DEFAULT_TUNE_LENGTH}; 1 checks that the chosen lr holds at full length)",
    )
    parser.add_argument(
        "--tune-only",
        action="store_true",
        help="run the tuning only (AdamW's grid, then Lion's), no final rows: with "
        "--tune-length 1, the check that the chosen lr holds at full length",
    )
    parser.add_argument(
        "--tune-seeds", type=positive_int, default=1, help="seeds per tuning point (default 1)"
    )
    parser.add_argument(
        "--reuse-tuning",
        metavar="COMPARE.json",
        default=None,
        help="skip tuning: take every row's lr and weight decay from an earlier report "
        "(e.g. for the doubled-steps check with --steps)",
    )
    parser.add_argument(
        "--decay",
        choices=("groups", "all", "groups-no-embedding"),
        default="groups",
        help="weight decay on weight matrices and embeddings, not biases and norm gains "
        "(groups, default; lionopt.hparams.decay_groups), on every parameter (all), or "
        "groups without decay on embeddings",
    )
    parser.add_argument(
        "--jobs",
        type=positive_int,
        default=None,
        help="worker processes for independent runs, 1 torch thread each unless --threads "
        f"(default: the machine's cores, {os.cpu_count()}); 1 runs everything in this process",
    )
    parser.add_argument(
        "--from-json",
        metavar="COMPARE.json",
        default=None,
        help="no training: print (and with --out, write) the report of an earlier run again, "
        "with this version's summaries, verdicts and plots",
    )
    parser.set_defaults(func=run)
    return parser


def render(args: argparse.Namespace) -> int:
    try:
        report = json.loads(Path(args.from_json).read_text())
    except (OSError, ValueError) as exc:
        log(f"lionopt compare: --from-json {args.from_json}: cannot read it: {exc}")
        return 2
    for entry in report.get("tasks", []):
        if entry.get("rows"):
            entry["summary"] = summarize(entry)
            entry["verdict"] = verdicts(entry)
    written = write(report, args.out, plots=True)
    print(_report.compare_text(report), end="")
    if args.out:
        print(f"Report written to {args.out}/: {', '.join(written)}.")
    return 0


def resolve_config(args: argparse.Namespace) -> dict:
    if args.tasks is not None:
        tasks = list(args.tasks)
    elif args.task:
        tasks = []
    else:
        tasks = QUICK_TASKS if args.quick else list(TASKS)
    return {
        "tasks": tasks + list(args.task),
        "optimizers": args.optimizers,
        "seeds": list(range(args.seeds or (QUICK_SEEDS if args.quick else DEFAULT_SEEDS))),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "evals": args.evals or (QUICK_EVALS if args.quick else DEFAULT_EVALS),
        "factor": args.factor,
        "quick": args.quick,
        "device": args.device,
        "no_tune": args.no_tune,
        "tune_length": args.tune_length,
        "tune_seeds": list(range(args.tune_seeds)),
        "tune_only": args.tune_only,
        "reuse_tuning": args.reuse_tuning,
        "decay": args.decay,
        "jobs": args.jobs or os.cpu_count() or 1,
        "threads": args.threads,
    }


def task_entry(task, spec: str, status: str, reason: str | None = None) -> dict:
    return {
        **task.describe(),
        "spec": spec,
        "status": status,
        "reason": reason,
        "steps": None,
        "batch_size": None,
        "seeds": [],
        "runs": [],
        "summary": {},
        "verdict": [],
        "rows": {},
        "tuning": {},
        "errors": [],
    }


def reused_rows(path: str, name: str) -> tuple[dict, dict]:
    """The rows (optimizer, lr, weight decay) and tuning record of task ``name`` in a report."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--reuse-tuning {path}: cannot read it: {exc}") from None
    for entry in report.get("tasks", []):
        if entry.get("name") != name:
            continue
        # rows are fixed as soon as tuning ends, so a report still running can be reused
        rows = {
            row: {
                "optimizer": spec["optimizer"],
                "how": spec["how"],
                "lr": spec["lr"],
                "weight_decay": spec.get("weight_decay") or 0.0,
            }
            for row, spec in (entry.get("rows") or {}).items()
            if spec.get("lr") is not None
        }
        if rows:
            return rows, {
                "tuning": entry.get("tuning", {}),
                "calibration": entry.get("calibration"),
            }
    raise ValueError(f"--reuse-tuning {path}: no tuned rows for task {name!r} in it")


def write(report: dict, out: str | None, *, plots: bool) -> list[str]:
    if not out:
        return []
    out_dir = Path(out)
    written = _report.compare_plots(report, out_dir) if plots else {}
    _report.write_outputs(out_dir, "compare", report, _report.compare_markdown(report, written))
    return ["compare.md", "compare.json", *written.values()]


def prepare(config: dict, device) -> tuple[list[Study], dict[str, dict]]:
    """Load every task once (skips and broken tasks become entries) and build its Study."""
    studies, entries = [], {}
    for spec in config["tasks"]:
        try:
            task = resolve_task(spec)
        except ValueError as exc:
            log(f"lionopt compare: {exc}")
            entries[spec] = {
                "name": spec, "title": spec, "spec": spec, "status": "failed",
                "reason": str(exc), "metric": "", "higher_is_better": True, "runs": [],
                "summary": {}, "verdict": [], "seeds": [], "errors": [str(exc)],
            }  # fmt: skip
            continue
        if task.name in {e["name"] for e in entries.values()}:
            raise SystemExit(f"lionopt compare: two tasks are named {task.name!r}")
        try:
            data = task.load(config.get("data_dir"))
            model = task.build_model(data)
            param_count = sum(p.numel() for p in model.parameters())
        except TaskUnavailable as exc:
            log(f"lionopt: skipping task {task.name}: {exc}")
            entries[spec] = task_entry(task, spec, "skipped", str(exc))
            continue
        except Exception as exc:  # a user's task that cannot load: say so, run the others
            reason = f"task {task.name!r}: {type(exc).__name__} while loading: {exc}"
            log(f"lionopt compare: {reason}")
            entries[spec] = task_entry(task, spec, "failed", reason)
            entries[spec]["errors"].append(reason)
            continue
        if spec not in TASKS:
            register_task(spec, task)  # jobs=1 uses this very object
        entry = task_entry(task, spec, "pending")
        entry["param_count"] = param_count
        task_config = dict(config)
        if config["reuse_tuning"] and not config["no_tune"]:
            rows, record = reused_rows(config["reuse_tuning"], task.name)
            task_config["reuse"] = rows
        studies.append(Study(spec, task, task_config, entry))
        if config["reuse_tuning"] and not config["no_tune"]:
            entry["tuning"] = record["tuning"]
            entry["calibration"] = record["calibration"]
            entry["reused_from"] = config["reuse_tuning"]
        entries[spec] = entry
    return studies, entries


def run(args: argparse.Namespace) -> int:
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        log(f"lionopt compare: --out {args.out} exists and is not a directory")
        return 2
    if args.from_json:
        return render(args)
    started = time.perf_counter()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    device = setup_device(args)
    config = resolve_config(args)
    config["data_dir"] = args.data_dir
    if not config["no_tune"] and "adamw" not in config["optimizers"]:
        log("lionopt compare: the tuned protocol compares with AdamW tuned: add adamw to "
            "--optimizers, or use --no-tune")  # fmt: skip
        return 2
    report = _report.new_report("compare", SCHEMA, config, device, command_line("compare"))
    try:
        studies, entries = prepare(config, device)
    except ValueError as exc:
        log(f"lionopt compare: {exc}")
        return 2
    report["tasks"] = [entries[spec] for spec in config["tasks"]]
    if not studies:
        log("lionopt compare: no task could run")
        print(_report.compare_text(report), end="")
        write(report, args.out, plots=False)
        return 1

    progress = Progress(0, enabled=not args.no_progress, desc="compare", unit="run")
    for study in studies:
        study.entry["status"] = "running"

    def on_done(job, result) -> None:
        progress.update()
        progress.describe(job.label())
        write(report, args.out, plots=False)

    with sigterm_as_interrupt():
        try:
            run_jobs(
                studies,
                jobs=config["jobs"],
                threads=args.threads,
                device=str(device),
                data_dir=args.data_dir,
                on_done=on_done,
                on_submit=progress.add,
            )
        except KeyboardInterrupt:
            report["interrupted"] = True
            log("lionopt compare: interrupted; reporting the runs that finished")
        finally:
            progress.close()
    for entry in report["tasks"]:
        if entry["status"] in ("running", "pending"):
            entry["status"] = "partial" if entry["runs"] else "not run"
        if "rows" in entry and entry["status"] not in ("skipped", "failed"):
            entry["summary"] = summarize(entry)
            entry["verdict"] = verdicts(entry)
    self_cpu = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    report["cpu_s"] = round(
        self_cpu.ru_utime + self_cpu.ru_stime - cpu_start.ru_utime - cpu_start.ru_stime
        + children.ru_utime + children.ru_stime, 1
    )  # fmt: skip
    code = finish(report, args, started, write, _report.compare_text)
    if code == 0 and any(e["status"] in ("failed", "partial") for e in report["tasks"]):
        return 1
    return code
