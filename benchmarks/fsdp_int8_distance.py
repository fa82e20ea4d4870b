"""Distance of FSDP2 8-bit momentum (blocks per local shard) from the unsharded 8-bit run.

Under FSDP2 the 8-bit momentum is quantised per local shard, in 256-element blocks of the
shard, so where a shard boundary does not fall on a block boundary the blocks (and their
absmax scales) differ from the unsharded run's. This script measures what that changes:
``--world`` gloo processes train the same parameters with identical random gradients for
``--steps`` steps with Lion(momentum_dtype="int8"), sharded and unsharded, and rank 0 prints,
per parameter and in all: the share of coordinates whose final values differ, the largest
difference in units of lr, and the same figures for unsharded 8-bit vs unsharded fp32
momentum (the cost of 8 bits itself), for scale.

    python benchmarks/fsdp_int8_distance.py [--world 2] [--steps 200]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

LR = 1e-3
SHAPES = [(128, 64), (67, 128), (1000, 37), (4096,)]


def _worker(rank, args, port):
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    import lionopt

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=args.world, timeout=datetime.timedelta(seconds=300)
    )
    torch.manual_seed(0)
    root = nn.Module()
    root.layers = nn.ModuleList()
    for shape in SHAPES:
        leaf = nn.Module()
        leaf.weight = nn.Parameter(torch.randn(shape) * 0.05)
        root.layers.append(leaf)
    whole8, whole32 = copy.deepcopy(root), copy.deepcopy(root)
    for leaf in root.layers:
        fully_shard(leaf)
    fully_shard(root)
    runs = {
        "sharded 8-bit": lionopt.Lion(
            root.parameters(), lr=LR, weight_decay=0.1, momentum_dtype="int8"
        ),
        "unsharded 8-bit": lionopt.Lion(
            whole8.parameters(), lr=LR, weight_decay=0.1, momentum_dtype="int8"
        ),
        "unsharded fp32": lionopt.Lion(whole32.parameters(), lr=LR, weight_decay=0.1),
    }
    for step in range(args.steps):
        for i, shape in enumerate(SHAPES):
            gen = torch.Generator().manual_seed(10_000 * step + i)
            # A persistent direction plus noise, so the momentum carries information.
            base = torch.Generator().manual_seed(i)
            g = torch.randn(shape, generator=base) * 0.3 + torch.randn(shape, generator=gen)
            for opt in runs.values():
                p = opt.param_groups[0]["params"][i]
                p.grad = (
                    distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None)
                    if hasattr(p, "device_mesh")
                    else g.clone()
                )
        for opt in runs.values():
            opt.step()
    sharded = [p.detach().full_tensor() for p in root.parameters()]
    if rank == 0:
        print(f"world {args.world}, {args.steps} steps, lr {LR}, shapes {SHAPES}")
        print(
            "| parameter | shard rows | sharded vs unsharded 8-bit: differing, max/lr |"
            " unsharded 8-bit vs fp32: differing, max/lr |"
        )
        print("|---|---|---:|---:|")
        totals = [0, 0, 0.0, 0, 0.0]
        for i, shape in enumerate(SHAPES):
            a, b, c = (
                sharded[i],
                list(whole8.parameters())[i].detach(),
                list(whole32.parameters())[i].detach(),
            )
            d1, d2 = (a - b).abs(), (b - c).abs()
            rows = [len(x) for x in torch.arange(shape[0]).chunk(args.world)]
            print(
                f"| {shape} | {rows} | {(d1 > 0).float().mean():.2%}, {d1.max() / LR:.1f} |"
                f" {(d2 > 0).float().mean():.2%}, {d2.max() / LR:.1f} |"
            )
            totals[0] += a.numel()
            totals[1] += int((d1 > 0).sum())
            totals[2] = max(totals[2], float(d1.max() / LR))
            totals[3] += int((d2 > 0).sum())
            totals[4] = max(totals[4], float(d2.max() / LR))
        print(
            f"| all | | {totals[1] / totals[0]:.2%}, {totals[2]:.1f} |"
            f" {totals[3] / totals[0]:.2%}, {totals[4]:.1f} |"
        )
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(args, port), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
