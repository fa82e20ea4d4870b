"""Output of ``lionopt bench``: the terminal table, the JSON document and the bar chart."""

from __future__ import annotations

import dataclasses
import os
import platform
from pathlib import Path

import torch

from lionopt.bench.core import PresetReport


def machine_info(device: str) -> dict:
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
    }
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: PresetReport) -> str:
    header = (
        f"preset {report.preset}: {report.description}\n"
        f"  {report.tensors} tensors, {report.params / 1e6:.2f}M params, {report.dtype} on "
        f"{report.device}; roofline {_fmt(report.roofline_gbps, '.1f')} GB/s "
        f"(ideal Lion step {_fmt(report.roofline_ms, '.2f')} ms)\n"
    )
    columns = [
        ("implementation", 24, "<"),
        ("ms/step", 8, ">"),
        ("GB/s", 6, ">"),
        ("xAdamW loop", 11, ">"),
        ("xAdamW foreach", 14, ">"),
        ("xAdamW fused", 12, ">"),
        ("xroofline", 9, ">"),
        ("extra MB", 8, ">"),
        ("state B/param", 13, ">"),
    ]
    lines = ["  ".join(f"{name:{align}{width}}" for name, width, align in columns)]
    lines.append("  ".join("-" * width for _, width, _ in columns))
    for r in report.results:
        if r.status != "ok":
            lines.append(f"{r.name:<24}  {r.status}: {r.note}")
            continue
        cells = [
            r.name,
            _fmt(r.ms, ".2f"),
            _fmt(r.gbps, ".1f"),
            _fmt(r.x_adamw_loop, ".2f"),
            _fmt(r.x_adamw_foreach, ".2f"),
            _fmt(r.x_adamw_fused, ".2f"),
            _fmt(r.x_roofline, ".2f"),
            _fmt(r.extra_peak_mb, ".1f"),
            _fmt(r.state_bytes_per_param, ".3f"),
        ]
        lines.append("  ".join(f"{c:{a}{w}}" for c, (_, w, a) in zip(cells, columns)))
    return header + "\n".join(lines)


def to_json(reports: list[PresetReport], meta: dict) -> dict:
    presets = []
    for report in reports:
        entry = dataclasses.asdict(report)
        for result in entry["results"]:
            result.pop("times_ms", None)
        presets.append(entry)
    return {**meta, "presets": presets}


def plot(reports: list[PresetReport], path: str | Path, title: str) -> None:
    """Horizontal bars of ms/step per implementation, one panel per preset (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {
        "lionopt": "tab:green",
        "baseline": "tab:gray",
        "torch": "tab:blue",
        "peer": "tab:orange",
    }
    fig, axes = plt.subplots(
        len(reports),
        1,
        figsize=(9, 0.45 * sum(len(r.results) + 2 for r in reports) + 1),
        squeeze=False,
    )
    for ax, report in zip(axes[:, 0], reports):
        rows = [r for r in report.results if r.ms is not None]
        names = [r.name for r in rows] + ["memory roofline (Lion bytes)"]
        values = [r.ms for r in rows] + [report.roofline_ms or 0.0]
        bar_colors = [colors.get(r.group, "tab:gray") for r in rows] + ["black"]
        ax.barh(names, values, color=bar_colors)
        ax.invert_yaxis()
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.1f}", va="center", fontsize=8)
        ax.set_xlabel("ms per step (median, lower is better)")
        ax.set_title(
            f"{report.preset}: {report.tensors} tensors, {report.params / 1e6:.1f}M {report.dtype}"
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=120)
    plt.close(fig)
