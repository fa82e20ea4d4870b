"""``lionopt bench``: time Lion steps against torch AdamW, peer Lion libraries and the roofline.

Examples::

    lionopt bench                              # the gpt and many-small presets on CPU
    lionopt bench --preset one-large,gpt2-small --steps 10
    lionopt bench --shapes 4096x4096,4096 --dtype bfloat16 --json out.json --plot out.png
    lionopt bench --quick --json -             # tiny preset, 2 steps: a smoke test

The method (interleaved steps, ideal bytes, roofline, peak memory) is described in
``lionopt.bench.core``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys

import torch

_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    from lionopt.bench.presets import DEFAULT_PRESETS, PRESETS

    parser = subparsers.add_parser(
        "bench",
        help="time optimizer steps: Lion paths vs AdamW, peers and the memory roofline",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--preset",
        default=",".join(DEFAULT_PRESETS),
        help=f"comma-separated presets among {', '.join(PRESETS)} (default: %(default)s)",
    )
    parser.add_argument("--numel", type=int, help="benchmark one tensor of N elements instead")
    parser.add_argument("--shapes", help="benchmark these shapes instead, e.g. 4096x4096,4096")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default: 3)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny preset, 2 steps (smoke test)")
    parser.add_argument(
        "--impls",
        help="only implementations whose name contains one of these comma-separated words",
    )
    parser.add_argument("--no-peers", action="store_true", help="skip peer Lion libraries")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON ('-': stdout)")
    parser.add_argument("--plot", metavar="PATH", help="write a bar chart (PNG) of ms/step")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from lionopt.bench import core, impls, presets, report

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("lionopt bench: --device cuda, but CUDA is not available", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        print("lionopt bench: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    steps, warmup = (2, 1) if args.quick else (args.steps, args.warmup)
    try:
        selected = _presets(args, presets)
    except ValueError as exc:
        print(f"lionopt bench: {exc}", file=sys.stderr)
        return 2

    chosen = [
        impl
        for impl in impls.IMPLS
        if not (args.no_peers and impl.group == "peer")
        and (not args.impls or any(w.strip() in impl.name for w in args.impls.split(",")))
    ]
    to_stdout = args.json == "-"
    log = (lambda msg: print(msg, file=sys.stderr)) if to_stdout else print
    meta = {
        "date": datetime.date.today().isoformat(),
        "command": "lionopt " + shlex.join(sys.argv[1:])
        if sys.argv[1:2] == ["bench"]
        else "lionopt bench",
        "machine": report.machine_info(args.device),
        "steps": steps,
        "warmup": warmup,
        "fused_cpu_build": _fused_cpu_build(args.device),
    }
    log(_header(meta))

    reports = []
    for name, description, shapes in selected:
        result = core.run_preset(
            name,
            description,
            shapes,
            chosen,
            dtype=_DTYPES[args.dtype],
            device=args.device,
            steps=steps,
            warmup=warmup,
            memory=not args.no_memory,
            log=log,
        )
        reports.append(result)
        log(report.format_table(result) + "\n")

    document = report.to_json(reports, meta)
    if args.json:
        text = json.dumps(document, indent=2)
        if to_stdout:
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
            log(f"wrote {args.json}")
    if args.plot:
        report.plot(reports, args.plot, f"lionopt bench, {meta['date']}, {meta['machine']['cpu']}")
        log(f"wrote {args.plot}")
    return 0


def _presets(args, presets) -> list[tuple[str, str, list]]:
    if args.quick:
        description, shapes = presets.PRESETS["tiny"]
        return [("tiny", description, shapes)]
    if args.numel is not None:
        if args.numel < 1:
            raise ValueError("--numel must be >= 1")
        return [("custom", f"one tensor of {args.numel} params", [(args.numel,)])]
    if args.shapes:
        shapes = presets.parse_shapes(args.shapes)
        return [("custom", f"{len(shapes)} tensors given by --shapes", shapes)]
    selected = []
    for name in (n.strip() for n in args.preset.split(",")):
        if name not in presets.PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {', '.join(presets.PRESETS)}")
        description, shapes = presets.PRESETS[name]
        selected.append((name, description, shapes))
    return selected


def _fused_cpu_build(device: str) -> dict | None:
    """Build (or load) the fused CPU kernel and its C++ dispatch before timing, and say how
    long that took (the dispatch builds in the background in training; here we wait for it)."""
    if device != "cpu":
        return None
    from lionopt.kernels.cpu import dispatch as cpu_dispatch
    from lionopt.kernels.cpu import plain as fused_cpu

    build = {"available": fused_cpu.available(), **fused_cpu.build_info()}
    build["dispatch"] = {"available": cpu_dispatch.wait(), **cpu_dispatch.build_info()}
    return build


def _header(meta: dict) -> str:
    machine = meta["machine"]
    lines = [
        f"lionopt bench  {meta['date']}  `{meta['command']}`",
        f"machine: {machine['cpu']}, {machine['cpu_count']} cores, {machine['threads']} threads, "
        f"torch {machine['torch']}, device {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else ""),
        f"timing: median of {meta['steps']} interleaved steps after {meta['warmup']} warmup steps",
    ]
    build = meta["fused_cpu_build"]
    if build is not None:
        if not build.get("available"):
            lines.append(
                "fused CPU kernel: NOT available (see the warning); default path is foreach"
            )
        else:
            how = "compiled" if build.get("compiled") else "loaded from cache"
            lines.append(f"fused CPU kernel: {how} in {build.get('seconds', 0.0):.2f} s")
            dispatch = build.get("dispatch", {})
            if not dispatch.get("available"):
                lines.append("C++ dispatch: NOT available (see the warning); Python dispatch")
            else:
                how = "compiled" if dispatch.get("compiled") else "loaded from cache"
                seconds = dispatch.get("seconds", 0.0)
                lines.append(f"C++ dispatch: {how} in {seconds:.2f} s (in the background)")
    return "\n".join(lines)
