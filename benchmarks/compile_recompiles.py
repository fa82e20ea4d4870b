"""Count the graphs ``torch.compile`` makes of an optimizer step under a per-step LambdaLR.

    python benchmarks/compile_recompiles.py adamw    # torch's AdamW: 2 graphs (one recompile)
    python benchmarks/compile_recompiles.py lion     # lionopt.Lion (float lr): 2 graphs
    python benchmarks/compile_recompiles.py lion-tensor-lr   # 1 graph

One graph per lr value would mean a recompile per step (8 is torch's ``recompile_limit``).
"""

from __future__ import annotations

import sys

import torch
from torch._dynamo.utils import counters

import lionopt


def main(which: str, steps: int = 12) -> int:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    if which == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    elif which == "lion-tensor-lr":
        opt = lionopt.Lion(model.parameters(), lr=torch.tensor(1e-3), weight_decay=0.1)
    else:
        opt = lionopt.Lion(model.parameters(), lr=1e-3, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    step = torch.compile(opt.step)
    for _ in range(steps):
        model(torch.randn(3, 8)).sum().backward()
        step()
        opt.zero_grad()
        sched.step()
    graphs = counters["stats"]["unique_graphs"]
    print(f"{which}: {graphs} graph(s) for {steps} lr values")
    return graphs


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "lion")
