"""Time ``torch.compile(opt.step)``: the fused kernel as a custom op vs compiled foreach vs eager.

    PYTHONPATH=src python benchmarks/compiled_step.py [--preset gpt] [--steps 15]

Rows, one run, steps interleaved: eager fused (the default ``Lion``), compiled with the custom op
(``lionopt::lion_step_``, the default under compile now), compiled foreach (``fused=False``, what
a compiled step ran before the op). Ratios are to eager fused. Inductor's compile time is
reported separately (first call).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lionopt import Lion
from lionopt.bench.presets import PRESETS
from lionopt.kernels.cpu import dispatch, plain


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="gpt")
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    plain.available()
    dispatch.wait()
    _, shapes = PRESETS[args.preset]
    rows = {}
    for name, options, compiled in [
        ("eager fused", {}, False),
        ("compiled, custom op", {}, True),
        ("compiled, foreach", {"fused": False}, True),
    ]:
        params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = Lion(params, lr=1e-4, weight_decay=0.1, **options)
        step = torch.compile(opt.step) if compiled else opt.step
        start = time.perf_counter()
        step()
        rows[name] = (step, [], time.perf_counter() - start)
    for _ in range(args.steps):
        for _name, (step, times, _) in rows.items():
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    base = statistics.median(rows["eager fused"][1])
    print(f"preset {args.preset}: {PRESETS[args.preset][0]}; {torch.get_num_threads()} threads")
    print(f"{'step':22s} {'ms/step':>8s} {'x eager fused':>14s} {'first call s':>13s}")
    for name, (_, times, first) in rows.items():
        median = statistics.median(times)
        print(f"{name:22s} {median * 1e3:8.2f} {median / base:14.2f} {first:13.1f}")


if __name__ == "__main__":
    main()
