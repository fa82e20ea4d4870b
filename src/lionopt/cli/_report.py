"""Reports of ``compare`` and ``sweep``: text tables, Markdown, JSON, PNG plots, atomic writes.

Every file is written to a temporary file in the destination folder and then moved into place
with ``os.replace``, so an interrupted run never leaves a truncated report behind.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

# --- atomic writes ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to ``path``; move it onto ``path`` if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def atomic_savefig(fig, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


# --- context -------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def machine_line(m: dict) -> str:
    return (
        f"{m['cpu']} ({m['cpu_count']} CPUs), {m['platform']}, device {m['device']}, "
        f"torch {m['torch']}, {m['torch_threads']} thread(s)"
    )


def wall_line(report: dict) -> str:
    return "in progress" if report["wall_s"] is None else f"{report['wall_s']:.0f} s"


def now_iso() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def new_report(kind: str, schema: str, config: dict, device: torch.device, command: str) -> dict:
    """The skeleton shared by the compare and sweep reports; ``tasks`` is filled in as runs end."""
    return {
        "schema": schema,
        "kind": kind,
        "command": command,
        "created": now_iso(),
        "machine": machine_info(device),
        "config": config,
        "interrupted": False,
        "complete": False,
        "wall_s": None,
        "tasks": [],
    }


# --- formatting ----------------------------------------------------------------------------


def metric_label(metric: str, higher_is_better: bool) -> str:
    arrow = "higher is better" if higher_is_better else "lower is better"
    return f"val {metric.replace('_', ' ')} ({arrow})"


def fmt_value(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if metric == "accuracy" else f"{value:.3f}"


def fmt_stat(stat: dict, metric: str) -> str:
    """``mean ± std`` of a :func:`~lionopt.tasks.protocol.mean_std` dict, in metric units."""
    if not stat or stat.get("mean") is None:
        return "-"
    if metric == "accuracy":
        return f"{100 * stat['mean']:.2f} ± {100 * stat['std']:.2f}%"
    if metric in ("ms", "s"):
        return f"{stat['mean']:.2f} ± {stat['std']:.2f}"
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_number(x: float) -> str:
    return f"{x:.3g}"


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    rule = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join([line, rule, *body])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --- compare -------------------------------------------------------------------------------

COMPARE_HEADERS = [
    "row",
    "lr",
    "wd",
    "final val",
    "best val",
    "steps to AdamW final",
    "opt state",
    "opt.step ms",
    "train step ms",
    "wall s/run",
]


def row_title(row: str, task: dict | None = None) -> str:
    from lionopt.tasks.study import row_title as title

    return title(row, task)


def fmt_reach(reach: dict) -> str:
    if not reach or reach.get("n", 0) == 0:
        return "-"
    if reach["reached"] == 0:
        return "not reached"
    text = f"{reach['mean_steps']:.0f}"
    if reach["reached"] < reach["n"]:
        text += f" ({reach['reached']}/{reach['n']} seeds)"
    return text


def compare_rows(task: dict) -> list[list[str]]:
    rows = []
    for name, s in task["summary"].items():
        hp = s["hparams"]
        rows.append(
            [
                row_title(name, task),
                fmt_number(hp.get("lr", float("nan"))),
                fmt_number(hp.get("weight_decay", float("nan"))),
                fmt_stat(s["final_metric"], task["metric"]),
                fmt_stat(s["best_metric"], task["metric"]),
                fmt_reach(s.get("steps_to_adamw_final")),
                f"{fmt_bytes(s['state_bytes'])} ({s['state_bytes'] / s['param_count']:.2f} B/p)",
                fmt_stat(s["optimizer_step_ms"], "ms"),
                fmt_stat(s["train_step_ms"], "ms"),
                f"{s['wall_s']['mean']:.1f}",
            ]
        )
    return rows


def tuning_lines(task: dict) -> list[str]:
    """One line per tuned optimizer (grid, tune-split metric per point, choice), calibration."""
    lines = []
    metric = task["metric"]
    for name, t in (task.get("tuning") or {}).items():
        if not t.get("tune_metric"):
            continue
        points = ", ".join(
            f"{fmt_number(lr)}: {fmt_value(v, metric) if v is not None else 'diverged'}"
            for lr, v in zip(t["lr_grid"], t["tune_metric"])
        )
        chosen = "none (every point failed)" if t["lr"] is None else fmt_number(t["lr"])
        text = (
            f"Tuning {name} ({t['steps']} steps on the tune split, seeds {t['seeds']}): "
            f"lr {points}; chosen {chosen}"
        )
        if t.get("extensions"):
            text += f" (grid extended {t['extensions']}x at an edge)"
        if t.get("at_edge"):
            text += "; still at the grid's edge: the optimum may lie beyond it"
        lines.append(text + ".")
    cal = task.get("calibration")
    if cal:
        lines.append(
            f"Calibration: {cal['steps']} AdamW steps at lr {fmt_number(cal['adamw_lr'])}: "
            f"RMS of AdamW's update {cal['adamw_update_rms']:.3f}, so Lion lr "
            f"{fmt_number(cal['lr'])} (factor {1 / cal['adamw_update_rms']:.2f}), weight decay "
            f"{fmt_number(cal['weight_decay'])}."
        )
    if task.get("reused_from"):
        lines.append(f"Hyperparameters reused from {task['reused_from']} (no tuning in this run).")
    return lines


def task_heading(task: dict) -> str:
    head = f"{task['name']}: {task['title']}"
    if task["status"] in ("skipped", "not run", "failed") and not task.get("runs"):
        return f"{head} - {task['status']}" + (f": {task['reason']}" if task["reason"] else "")
    seeds = len(task["seeds"])
    return (
        f"{head} - {metric_label(task['metric'], task['higher_is_better'])}; "
        f"{task['steps']} steps, batch {task['batch_size']}, {seeds} seed{'s' * (seeds != 1)}"
        + ("" if task["status"] == "complete" else f" [{task['status']}]")
    )


def _join_with_footer(parts: list[str], report: dict) -> str:
    """The text report's lines, then its wall time and whether it was interrupted."""
    if report.get("wall_s") is not None:
        text = f"Total wall time: {report['wall_s']:.0f} s"
        if report.get("cpu_s") is not None:
            text += f" (CPU time of this process and its workers: {report['cpu_s']:.0f} s)"
        parts.append(text)
    if report["interrupted"]:
        parts.append("INTERRUPTED: the report holds only the runs that finished.")
    return "\n".join(parts).rstrip() + "\n"


def compare_text(report: dict) -> str:
    parts = []
    for task in report["tasks"]:
        parts.append(task_heading(task))
        if task.get("summary"):
            parts.append(text_table(COMPARE_HEADERS, compare_rows(task)))
        parts += tuning_lines(task)
        parts += task.get("verdict", [])
        parts.append("")
    return _join_with_footer(parts, report)


def protocol_line(cfg: dict) -> str:
    common = (
        "per seed, every row starts from the same initial weights and sees the same batches in "
        "the same order; same lr schedule (5% linear warmup, cosine to 10%); weight decay "
        + {
            "groups": "on weight matrices and embeddings, not on biases and norm gains "
            "(`lionopt.hparams.decay_groups`)",
            "all": "on every parameter",
            "groups-no-embedding": "on weight matrices only (not on embeddings, biases, norms)",
        }[cfg.get("decay", "all")]
        + ". "
    )
    if cfg.get("no_tune"):
        return (
            "- Protocol (one-shot, `--no-tune`): "
            + common
            + "AdamW uses the task's standard hyperparameters; Lion uses `from_adamw` of them "
            f"(lr / {cfg['factor']:g}, weight decay x {cfg['factor']:g}), not tuned."
        )
    return (
        "- Protocol (tuned): "
        + common
        + "AdamW's lr is tuned on a log grid (extended where the best sits at an edge) on a "
        "tune split held out of the training data, with runs "
        f"{cfg.get('tune_length', 1):g}x the full length; its weight decay is the task's. "
        "Rows, trained on the full training data and scored on the validation split: "
        "**AdamW tuned**; **Lion translated** = `from_adamw` of tuned AdamW "
        f"(factor {cfg['factor']:g}); **Lion calibrated** = `lionopt.hparams.calibrate` "
        "(lr = AdamW lr x RMS of AdamW's update over 100 steps); **Lion tuned** = Lion's own "
        "lr grid on the tune split. Every Lion row keeps AdamW's per-step decay lr·λ. "
        "'Within noise': the difference of the means is at most 2 standard errors."
    )


def compare_markdown(report: dict, plots: dict[str, str]) -> str:
    cfg = report["config"]
    wall = wall_line(report)
    if report.get("cpu_s") is not None:
        wall += f" (CPU time of this process and its workers: {report['cpu_s']:.0f} s)"
    lines = [
        "# Lion vs AdamW: `lionopt compare`",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['created']}",
        f"- Machine: {machine_line(report['machine'])}; {cfg.get('jobs', 1)} worker process(es)",
        f"- Wall time: {wall}",
        f"- Optimizers: {', '.join(cfg['optimizers'])}; seeds: {cfg['seeds']}",
        protocol_line(cfg),
        "- 'Steps to AdamW final' is the first evaluation step at which the row's validation "
        "metric reaches AdamW's final value for the same seed (mean over the seeds that reach "
        "it). Step times are means over all steps but the first; 'opt state' is the summed "
        "`nbytes` of `optimizer.state`.",
    ]
    if report.get("assembled_from"):
        note = report["assembled_from"]
        lines.append(f"- Assembled: {note['note']} Commands: " + "; ".join(
            f"`{c}`" for c in note["commands"]) + ".")  # fmt: skip
    if report["interrupted"]:
        lines += ["", "**Interrupted: this report holds only the runs that finished.**"]
    for task in report["tasks"]:
        lines += ["", f"## {task_heading(task)}", ""]
        if task["status"] in ("skipped", "not run", "failed") and not task.get("runs"):
            continue
        lines += [f"Data: {task['source']} (licence: {task['licence']}).", ""]
        if task.get("summary"):
            lines += [markdown_table(COMPARE_HEADERS, compare_rows(task)), ""]
        lines += [f"- {v}" for v in tuning_lines(task)]
        lines += [f"- {v}" for v in task.get("verdict", [])]
        if task["name"] in plots:
            lines += ["", f"![{task['name']} curves]({plots[task['name']]})"]
    return "\n".join(lines) + "\n"


def _plt():
    """matplotlib's pyplot on the Agg backend, or ``None`` (with a note) when not installed."""
    try:
        import matplotlib
    except ImportError:
        print(
            "lionopt: matplotlib is not installed, so no PNG plots "
            '(pip install "lionopt[compare]"); JSON and Markdown are still written',
            file=sys.stderr,
        )
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def compare_plots(report: dict, out_dir: Path) -> dict[str, str]:
    """One PNG per task: train loss and validation metric, mean over seeds with min/max band."""
    plt = _plt()
    written: dict[str, str] = {}
    if plt is None:
        return written
    for task in report["tasks"]:
        if not task.get("summary"):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for name in task["summary"]:
            runs = [
                r
                for r in task["runs"]
                if not r.get("error")
                and not r.get("diverged")
                and r.get("row", r.get("optimizer")) == name
            ]
            if not runs:
                continue
            steps = runs[0]["history"]["step"]
            for ax, key in zip(axes, ("train_loss", "val_metric")):
                curves = torch.tensor(
                    [[float("nan") if v is None else v for v in r["history"][key]] for r in runs],
                    dtype=torch.float64,
                )
                lr = task["summary"][name].get("lr")
                label = row_title(name, task) + ("" if lr is None else f" (lr {fmt_number(lr)})")
                (line,) = ax.plot(steps, curves.mean(0).tolist(), label=label)
                if len(runs) > 1:
                    ax.fill_between(
                        steps,
                        curves.amin(0).tolist(),
                        curves.amax(0).tolist(),
                        color=line.get_color(),
                        alpha=0.2,
                    )
        axes[0].set_title("train loss (mean since previous evaluation)")
        axes[1].set_title(metric_label(task["metric"], task["higher_is_better"]))
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"{task['title']} ({len(task['seeds'])} seeds, band = min/max)")
        name = f"compare_{task['name']}.png"
        atomic_savefig(fig, out_dir / name)
        plt.close(fig)
        written[task["name"]] = name
    return written


# --- sweep ---------------------------------------------------------------------------------


def sweep_text(report: dict) -> str:
    parts = []
    for task in report["tasks"]:
        parts.append(task_heading_sweep(task))
        for block in task.get("batch_sizes", []):
            parts.append(f"  batch {block['batch_size']}, {block['steps']} steps")
            for name in block.get("grids", {}):
                parts.append(text_table(*grid_table(task, block, name)))
            parts += [f"  {line}" for line in block.get("verdict", [])]
            parts.append("")
        parts += task.get("verdict", [])
        parts.append("")
    return _join_with_footer(parts, report)


def task_heading_sweep(task: dict) -> str:
    head = f"{task['name']}: {task['title']}"
    if task["status"] == "skipped":
        return f"{head} - skipped: {task['reason']}"
    return f"{head} - final {metric_label(task['metric'], task['higher_is_better'])}" + (
        "" if task["status"] == "complete" else f" [{task['status']}]"
    )


def grid_table(task: dict, block: dict, name: str) -> tuple[list[str], list[list[str]]]:
    grid = block["grids"][name]
    headers = [f"{name}: wd \\ lr"] + [fmt_number(lr) for lr in grid["lr"]]
    rows = []
    for wd, values in zip(grid["weight_decay"], grid["final_metric"]):
        rows.append([fmt_number(wd)] + [fmt_value(v, task["metric"]) for v in values])
    return headers, rows


def sweep_markdown(report: dict, plots: dict[str, str]) -> str:
    cfg = report["config"]
    lines = [
        "# Lion vs AdamW: `lionopt sweep`",
        "",
        f"- Command: `{report['command']}`",
        f"- Date: {report['created']}",
        f"- Machine: {machine_line(report['machine'])}",
        f"- Wall time: {wall_line(report)}",
        f"- Grid: lr x {cfg['lr_multipliers']}, weight decay x {cfg['wd_multipliers']} around "
        "each optimizer's default (AdamW: the task's standard values; Lion: `from_adamw` of "
        f"them); seeds: {cfg['seeds']}; "
        f"batch sizes: {cfg['batch_sizes'] or 'the task default'} (same number of "
        "training examples at every batch size, so larger batches take fewer steps).",
        "- Split: every cell trains on the tune split (the training data minus a held-out "
        "part) and is scored on that held-out part, as `lionopt compare` tunes; the "
        "validation split is not used. Weight decay skips biases and norm gains.",
        "- Robustness: the share of grid cells whose final tune-split metric is within "
        f"{100 * cfg['tolerance']:.0f}% (relative) of that optimizer's best cell. "
        "A cell shown as '-' diverged (non-finite loss) or has not run yet.",
    ]
    if report["interrupted"]:
        lines += ["", "**Interrupted: this report holds only the runs that finished.**"]
    for task in report["tasks"]:
        lines += ["", f"## {task_heading_sweep(task)}"]
        for block in task.get("batch_sizes", []):
            lines += ["", f"### batch {block['batch_size']}, {block['steps']} steps", ""]
            for name in block.get("grids", {}):
                lines += [markdown_table(*grid_table(task, block, name)), ""]
            lines += [f"- {v}" for v in block.get("verdict", [])]
            key = f"{task['name']}/{block['batch_size']}"
            if key in plots:
                lines += ["", f"![{key} heatmap]({plots[key]})"]
        if task.get("verdict"):
            lines += ["", *[f"- {v}" for v in task["verdict"]]]
    return "\n".join(lines) + "\n"


def sweep_heatmaps(report: dict, out_dir: Path) -> dict[str, str]:
    """One PNG per (task, batch size): a heatmap of the final metric per optimizer."""
    plt = _plt()
    written: dict[str, str] = {}
    if plt is None:
        return written
    for task in report["tasks"]:
        for block in task.get("batch_sizes", []):
            grids = block.get("grids", {})
            if not grids:
                continue
            fig, axes = plt.subplots(
                1, len(grids), figsize=(5.4 * len(grids), 3.8), squeeze=False, layout="constrained"
            )
            cmap = "viridis" if task["higher_is_better"] else "viridis_r"
            finite = [
                v for g in grids.values() for row in g["final_metric"] for v in row if v is not None
            ]
            vmin, vmax = (min(finite), max(finite)) if finite else (None, None)
            for ax, (name, grid) in zip(axes[0], grids.items()):
                values = [
                    [float("nan") if v is None else v for v in row] for row in grid["final_metric"]
                ]
                image = ax.imshow(
                    values, cmap=cmap, aspect="auto", origin="lower", vmin=vmin, vmax=vmax
                )
                ax.set_xticks(range(len(grid["lr"])), [fmt_number(x) for x in grid["lr"]])
                ax.set_yticks(
                    range(len(grid["weight_decay"])), [fmt_number(x) for x in grid["weight_decay"]]
                )
                ax.set_xlabel("lr")
                ax.set_ylabel("weight decay")
                robust = block["robustness"].get(name)
                title = name if robust is None else f"{name} (robustness {100 * robust:.0f}%)"
                ax.set_title(title)
                for i, row in enumerate(grid["final_metric"]):
                    for j, v in enumerate(row):
                        shade = image.norm(v) if v is not None else 0.0
                        bright = shade > 0.5 if task["higher_is_better"] else shade < 0.5
                        ax.text(
                            j,
                            i,
                            "n/a" if v is None else fmt_value(v, task["metric"]),
                            ha="center",
                            va="center",
                            fontsize=7,
                            color="black" if bright else "white",
                        )
                fig.colorbar(image, ax=ax, fraction=0.046)
            fig.suptitle(
                f"{task['title']}: final {metric_label(task['metric'], task['higher_is_better'])}, "
                f"batch {block['batch_size']}"
            )
            name = f"sweep_{task['name']}_bs{block['batch_size']}.png"
            atomic_savefig(fig, out_dir / name)
            plt.close(fig)
            written[f"{task['name']}/{block['batch_size']}"] = name
    return written


def write_outputs(out_dir: str | os.PathLike, stem: str, report: dict, markdown: str) -> None:
    out = Path(out_dir)
    atomic_write_json(out / f"{stem}.json", report)
    atomic_write_text(out / f"{stem}.md", markdown)
