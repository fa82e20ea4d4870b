"""Distributed Lion's communication and step time against DDP's fp32 gradient all-reduce.

Wire bytes per rank and step are counted from the sizes of the collectives each step really
issues (``DistributedLion.traffic``), under the ring algorithms: all_reduce 2(N−1)/N × input,
all_gather (N−1) × input, all_to_all (N−1)/N × input. DDP's fp32 all-reduce is
2(N−1)/N × 4 bytes a parameter. Two gradient patterns: random gradients (no exact zero vote,
so signs travel at 1 bit) and a language-model step where the embedding rows of unseen tokens
have exactly zero gradient (zeros must be carried: 2 bits in those buckets).

Step time (N = 2 and 4, gloo on this machine's CPUs): (a) communication + update only, given
gradients: ``DistributedLion.step()`` against a DDP-style bucketed fp32 all-reduce (25 MB
buckets) followed by ``lionopt.Lion.step()``; (b) a whole training step of a small GPT-like
model: ``DDP(model)`` + ``lionopt.Lion`` against the bare model + ``DistributedLion``. Ratios
are from one run; on a shared 2-core machine the absolute times are noisy.

    PYTHONPATH=src python benchmarks/distributed_lion.py

Writes docs/results/distributed_lion.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
TRANSPORTS = ("int8", "packed", "all_gather")


class GPT(nn.Module):
    """A GPT-like decoder: token and position embeddings, pre-norm blocks, tied head."""

    def __init__(self, vocab=8192, dim=256, layers=4, heads=4, context=64):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.context = context

    def forward(self, idx):
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        x = self.norm(self.blocks(x, mask=mask, is_causal=True))
        return x @ self.tok.weight.T


def lm_loss(model, idx):
    logits = model(idx[:, :-1])
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def random_grads(model, rank, step):
    gen = torch.Generator().manual_seed(100 * step + rank)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


def batch(rank, step, vocab, context, size=8):
    gen = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randint(0, vocab // 8, (size, context + 1), generator=gen)  # 1/8 of the vocab


def _timed(fn, repeats):
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _worker(rank, world, port, out, timing):
    from lionopt import Lion
    from lionopt.distributed import DistributedLion

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    torch.manual_seed(0)
    model = GPT()
    params = list(model.parameters())
    count = sum(p.numel() for p in params)
    result = {"N": world, "params": count, "traffic": {}, "time": {}}

    for transport in TRANSPORTS:  # wire bytes: random gradients, then an LM step
        for pattern in ("random", "lm"):
            opt = DistributedLion(params, lr=1e-4, transport=transport, weight_decay=0.1)
            for step in range(3):
                if pattern == "random":
                    random_grads(model, rank, step)
                else:
                    model.zero_grad(set_to_none=True)
                    lm_loss(model, batch(rank, step, 8192, model.context)).backward()
                opt.step()
            result["traffic"][f"{transport}/{pattern}"] = {
                "bytes_per_param": opt.traffic.wire_bytes(world) / count,
                "calls": len(opt.traffic.calls),
            }

    if timing:
        ddp_bytes = 25 * 2**20
        lion = Lion(params, lr=1e-4, weight_decay=0.1)

        def ddp_style():  # bucketed fp32 all-reduce of the gradients, then Lion
            bucket, size = [], 0
            for p in [*params, None]:
                if p is None or size + p.numel() * 4 > ddp_bytes:
                    flat = torch.cat([q.grad.reshape(-1) for q in bucket])
                    dist.all_reduce(flat)
                    flat /= world
                    offset = 0
                    for q in bucket:
                        q.grad.copy_(flat[offset : offset + q.numel()].view_as(q))
                        offset += q.numel()
                    bucket, size = [], 0
                if p is not None:
                    bucket.append(p)
                    size += p.numel() * 4
            lion.step()

        random_grads(model, rank, 0)
        result["time"]["ddp_allreduce+Lion"] = _timed(ddp_style, 7)
        for transport in TRANSPORTS:
            opt = DistributedLion(params, lr=1e-4, transport=transport, weight_decay=0.1)
            random_grads(model, rank, 0)
            opt.step()
            result["time"][f"DistributedLion/{transport}"] = _timed(opt.step, 7)

        from torch.nn.parallel import DistributedDataParallel as DDP

        ddp = DDP(model)
        lion = Lion(model.parameters(), lr=1e-4, weight_decay=0.1)
        steps = iter(range(10**6))

        def ddp_train():
            ddp.zero_grad(set_to_none=True)
            lm_loss(ddp, batch(rank, next(steps), 8192, model.context)).backward()
            lion.step()

        plain = GPT()
        plain.load_state_dict(model.state_dict())
        opt = DistributedLion(plain.parameters(), lr=1e-4, weight_decay=0.1)

        def dlion_train():
            plain.zero_grad(set_to_none=True)
            lm_loss(plain, batch(rank, next(steps), 8192, model.context)).backward()
            opt.step()

        ddp_train()
        dlion_train()
        result["time"]["train_step/DDP+Lion"] = _timed(ddp_train, 5)
        result["time"]["train_step/DistributedLion(auto)"] = _timed(dlion_train, 5)
        result["auto"] = opt.transport_name
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--timing-ranks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.ranks:
            out = os.path.join(tmp, f"{n}.json")
            mp.start_processes(
                _worker,
                args=(n, _free_port(), out, n in args.timing_ranks),
                nprocs=n,
                start_method="spawn",
            )
            with open(out) as f:
                rows.append(json.load(f))
            print(json.dumps(rows[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python benchmarks/distributed_lion.py", "results": rows}
    (args.out / "distributed_lion.json").write_text(json.dumps(report, indent=1))
    table = _table(rows)
    (args.out / "distributed_lion.md").write_text(table)
    print(table)


def _table(rows):
    lines = [
        f"GPT-like model, {rows[0]['params']:,} parameters. Wire bytes a parameter per rank "
        "and step (ring formulas), and the ratio to DDP's fp32 all-reduce (2(N−1)/N × 4 B).",
        "",
        "| N | DDP fp32 | transport | random grads: B/param (ratio) | LM step: B/param (ratio) "
        "| collectives |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        n = row["N"]
        ddp = 2 * (n - 1) / n * 4
        for transport in TRANSPORTS:
            r = row["traffic"][f"{transport}/random"]
            lm = row["traffic"][f"{transport}/lm"]
            lines.append(
                f"| {n} | {ddp:.2f} | {transport} | {r['bytes_per_param']:.4f} "
                f"(1/{ddp / r['bytes_per_param']:.1f}) | {lm['bytes_per_param']:.4f} "
                f"(1/{ddp / lm['bytes_per_param']:.1f}) | {r['calls']} |"
            )
    lines += ["", "Step time (median, gloo on CPU, one thread a rank), same run:", ""]
    lines += ["| N | what | seconds | ratio to the DDP row |", "|---|---|---|---|"]
    for row in rows:
        times = row["time"]
        if not times:
            continue
        base = times["ddp_allreduce+Lion"]
        train_base = times["train_step/DDP+Lion"]
        for name, value in times.items():
            ref = train_base if name.startswith("train_step") else base
            lines.append(f"| {row['N']} | {name} | {value:.4f} | {value / ref:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
