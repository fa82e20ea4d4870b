"""Shared machinery of ``compare`` and ``sweep``: arguments, device, task loading, progress.

The training itself is :func:`lionopt.tasks.protocol.train_run`; this module only turns
command-line choices into calls of it and keeps the user informed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable

import torch

from lionopt.hparams import DEFAULT_FACTOR
from lionopt.tasks import TASKS, Task, TaskData, TaskUnavailable, get_task
from lionopt.tasks.optimizers import OPTIMIZERS


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def name_list(choices_fn):
    """argparse type: a comma-separated list of names, each one of ``choices_fn()``."""

    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        choices = list(choices_fn())
        if not names:
            raise argparse.ArgumentTypeError("expected at least one name")
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}"
            )
        return list(dict.fromkeys(names))

    return parse


def number_list(kind):
    """argparse type: a comma-separated list of positive ``kind`` (int or float) values."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError("expected a comma-separated list of numbers")
        values = []
        for part in parts:
            try:
                value = kind(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"not a {kind.__name__}: {part!r}") from None
            if not value > 0 or value == float("inf"):
                raise argparse.ArgumentTypeError(f"expected positive finite values, got {part}")
            values.append(value)
        return values

    return parse


def add_common_arguments(
    parser: argparse.ArgumentParser, *, default_tasks: str, default_seeds: str
) -> None:
    parser.add_argument(
        "--tasks",
        type=name_list(lambda: TASKS),
        default=None,
        help=f"comma-separated tasks from {', '.join(TASKS)} (default: {default_tasks})",
    )
    parser.add_argument(
        "--optimizers",
        type=name_list(lambda: OPTIMIZERS),
        default=["adamw", "lion"],
        help=f"comma-separated optimizers from {', '.join(OPTIMIZERS)} (default: adamw,lion)",
    )
    parser.add_argument(
        "--seeds",
        type=positive_int,
        default=None,
        help=f"number of seeds (default: {default_seeds})",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=None, help="steps per run (default: per task)"
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="batch size (default: per task)"
    )
    parser.add_argument(
        "--evals", type=positive_int, default=None, help="validation evaluations per run"
    )
    parser.add_argument(
        "--factor",
        type=positive_float,
        default=DEFAULT_FACTOR,
        help="AdamW -> Lion factor: Lion's lr = AdamW's / factor, weight decay x factor "
        f"(default: lionopt.hparams.DEFAULT_FACTOR = {DEFAULT_FACTOR:g})",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch intra-op CPU threads (default: 1; the models are small, and on a shared "
        "2-core CPU two threads measured 5-10x slower than one)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with optional datasets, e.g. Fashion-MNIST IDX files "
        "(default: $LIONOPT_DATA_DIR, then system locations)",
    )
    parser.add_argument("--out", default=None, help="write JSON, Markdown and PNG plots here")
    parser.add_argument("--quick", action="store_true", help="short smoke run (under a minute)")
    parser.add_argument(
        "--json", action="store_true", help="print the JSON report instead of the table"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def setup_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("lionopt: --device cuda requested but CUDA is not available")
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def command_line(subcommand: str) -> str:
    """The command as typed, or just ``lionopt SUBCOMMAND`` when called from Python."""
    argv = sys.argv[1:] if sys.argv[1:2] == [subcommand] else [subcommand]
    return shlex.join(["lionopt", *argv])


def finish(
    report: dict,
    args: argparse.Namespace,
    started: float,
    write: Callable[..., list[str]],
    text: Callable[[dict], str],
) -> int:
    """Close a report: final files, the table (or JSON) on stdout; 130 when interrupted.

    ``write(report, out, plots=True)`` returns the names of the files it wrote; the last line
    lists exactly those (no "PNG plots" when matplotlib was missing).
    """
    report["complete"] = not report["interrupted"]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    written = write(report, args.out, plots=True)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(text(report), end="")
        if args.out:
            print(f"Report written to {args.out}/: {', '.join(written)}.")
    return 130 if report["interrupted"] else 0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_tasks(
    names: list[str], data_dir: str | None, device: torch.device
) -> tuple[list[tuple[Task, TaskData]], dict[str, str]]:
    """Load each task's data onto ``device``; unavailable ones are returned as name -> reason."""
    loaded, skipped = [], {}
    for name in names:
        task = get_task(name)
        try:
            loaded.append((task, task.load(data_dir).to(device)))
        except TaskUnavailable as exc:
            skipped[name] = str(exc)
            log(f"lionopt: skipping task {name}: {exc}")
    return loaded, skipped


class Progress:
    """A tqdm bar on stderr, or nothing when stderr is not a terminal or it is disabled."""

    def __init__(self, total: int, enabled: bool, desc: str, unit: str = "step"):
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:  # progress is optional: the [compare] extra installs tqdm
                return
            self.bar = tqdm(total=total, desc=desc, file=sys.stderr, unit=unit, leave=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def add(self, n: int) -> None:
        """More work became known (the tuned protocol adds runs as tuning finishes)."""
        if self.bar is not None:
            self.bar.total += n
            self.bar.refresh()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Treat SIGTERM like Ctrl-C inside the block, so a killed job still writes its report."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
