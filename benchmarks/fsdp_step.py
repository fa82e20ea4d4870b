"""Optimizer step time under FSDP2 on CPU: Lion on the local shards vs torch's fused AdamW.

Spawns ``--world`` gloo processes (default 2). Each builds the GPT-like parameter list of
``lionopt.bench.presets`` (default ``gpt``: d=512, 8 layers, vocab 8192, 29.9M parameters),
one module per tensor, ``fully_shard`` on each and on the root, gives every parameter a fixed
random DTensor gradient, and times ``optimizer.step()`` for each optimizer in the same
process, interleaved over ``--rounds`` rounds (round 1 of each, then round 2, ...). Rank 0
prints each optimizer's median step time and the median over rounds of its ratio to torch's
``AdamW(fused=True)`` measured in the same round, on the same shards.

    python benchmarks/fsdp_step.py [--world 2] [--preset gpt] [--steps 10] [--rounds 3]

``--threads`` sets each rank's torch threads (default: cores // world).
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def _optimizers():
    import lionopt

    return {
        "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=True),
        "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, foreach=True),
        "Lion (default)": lambda ps: lionopt.Lion(ps, lr=1e-4, weight_decay=1.0),
        "Lion foreach": lambda ps: lionopt.Lion(ps, lr=1e-4, weight_decay=1.0, foreach=True),
        "Lion bf16 momentum": lambda ps: lionopt.Lion(
            ps, lr=1e-4, weight_decay=1.0, momentum_dtype=torch.bfloat16
        ),
        "Lion 8-bit momentum": lambda ps: lionopt.Lion(
            ps, lr=1e-4, weight_decay=1.0, momentum_dtype="int8"
        ),
    }


def _worker(rank, args, port):
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    from lionopt.bench.presets import PRESETS
    from lionopt.kernels import cpu_dispatch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args.threads)
    dist.init_process_group(
        "gloo", rank=rank, world_size=args.world, timeout=datetime.timedelta(seconds=300)
    )
    cpu_dispatch.wait(120)
    _, shapes = PRESETS[args.preset]
    torch.manual_seed(0)
    root = nn.Module()
    root.layers = nn.ModuleList()
    for shape in shapes:
        leaf = nn.Module()
        leaf.weight = nn.Parameter(torch.randn(shape) * 0.02)
        root.layers.append(leaf)
    for leaf in root.layers:
        fully_shard(leaf)
    fully_shard(root)
    params = list(root.parameters())
    for p in params:
        p.grad = distribute_tensor(
            torch.randn(p.shape) * 1e-3, p.device_mesh, p.placements, src_data_rank=None
        )
    local_numel = sum(p.to_local().numel() for p in params)
    makers = _optimizers()
    optimizers = {name: make(params) for name, make in makers.items()}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_ in range(args.rounds + 1):  # round 0 warms up (state creation)
        for name, opt in optimizers.items():
            snapshot = [p.to_local().clone() for p in params]
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.steps):
                opt.step()
            dist.barrier()
            elapsed = (time.perf_counter() - start) / args.steps
            with torch.no_grad():  # the same starting point for every optimizer
                for p, s in zip(params, snapshot, strict=True):
                    p.to_local().copy_(s)
            if round_:
                times[name].append(elapsed)
    if rank == 0:
        base = times["AdamW fused"]
        print(
            f"FSDP2 world {args.world}, preset {args.preset}: {len(params)} tensors, "
            f"{sum(p.numel() for p in params) / 1e6:.1f}M params, {local_numel / 1e6:.1f}M "
            f"on rank 0; {args.threads} threads/rank; {args.steps} steps x {args.rounds} rounds"
        )
        print("| optimizer | step (ms, median) | vs AdamW fused (same round, median) |")
        print("|---|---:|---:|")
        for name, values in times.items():
            ratio = statistics.median(v / b for v, b in zip(values, base, strict=True))
            print(f"| {name} | {1e3 * statistics.median(values):.2f} | {ratio:.2f}x |")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--preset", default="gpt")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads <= 0:
        args.threads = max(1, (os.cpu_count() or 1) // args.world)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
