"""Step time and optimizer-state bytes of each momentum dtype, on one GPT-like parameter list.

Builds the parameters of a GPT-like model (token embedding, per layer: qkv, attention output,
4x MLP, two LayerNorms; default d=512, 8 layers, vocab 8192: 29.4M parameters), gives them
fixed random gradients, and times ``optimizer.step()`` for each option in the same process:
AdamW (torch's fastest on the device: ``fused=True``) and Lion with fp32, bf16 and 8-bit
momentum, and pure bf16 weights with round-to-nearest and stochastic rounding. Prints a
markdown table, then the largest model that fits each memory budget (weights + gradients +
optimizer state).

On a shared machine step times drift while the table is measured, so ``--rounds R`` times
every option R times, interleaved (round 1 of every option, then round 2, ...); the table
shows each option's median step time and the median over rounds of its ratio to Lion fp32 and
to fused AdamW measured in the same round.

    python benchmarks/momentum_dtypes.py [--steps 10] [--rounds 3] [--threads N] [--foreach]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lionopt import Lion
from lionopt.memory import GIB, bytes_per_param, max_params, param_count


def gpt_like_shapes(d_model: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-like decoder (tied output embedding)."""
    shapes: list[tuple[int, ...]] = [(vocab, d_model), (1024, d_model)]
    for _ in range(layers):
        shapes += [(d_model,), (d_model,), (3 * d_model, d_model), (3 * d_model,)]
        shapes += [(d_model, d_model), (d_model,), (d_model,), (d_model,)]
        shapes += [(4 * d_model, d_model), (4 * d_model,), (d_model, 4 * d_model), (d_model,)]
    return [*shapes, (d_model,), (d_model,)]


def make_params(shapes, dtype: torch.dtype) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(dtype))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(dtype)
        params.append(p)
    return params


def options(foreach: bool) -> dict[str, tuple[torch.dtype, Callable]]:
    """name -> (weight dtype, optimizer factory)."""
    impl = {"foreach": True} if foreach else {}
    lion = dict(lr=1e-4, weight_decay=0.1, **impl)
    adamw = {"foreach": True} if foreach else {"fused": True}
    return {
        ADAMW: (torch.float32, lambda p: torch.optim.AdamW(p, lr=1e-3, **adamw)),
        "Lion fp32 momentum": (torch.float32, lambda p: Lion(p, **lion)),
        "Lion bf16 momentum": (torch.float32, lambda p: Lion(p, momentum_dtype="bf16", **lion)),
        "Lion 8-bit momentum": (torch.float32, lambda p: Lion(p, momentum_dtype="int8", **lion)),
        "Lion bf16 weights+momentum, nearest": (torch.bfloat16, lambda p: Lion(p, **lion)),
        "Lion bf16 weights+momentum, stochastic": (
            torch.bfloat16,
            lambda p: Lion(p, stochastic_rounding=True, **lion),
        ),
        "Lion bf16 weights, 8-bit momentum, stochastic": (
            torch.bfloat16,
            lambda p: Lion(p, momentum_dtype="int8", stochastic_rounding=True, **lion),
        ),
    }


ADAMW = "AdamW (torch, fp32 weights)"
BASE = "Lion fp32 momentum"


def time_steps(optimizer, steps: int, warmup: int = 2) -> float:
    """Median seconds per step over ``steps`` steps, after ``warmup`` warm-up steps."""
    for _ in range(warmup):
        optimizer.step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--foreach", action="store_true", help="force the foreach paths")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shapes = gpt_like_shapes(args.d_model, args.layers, args.vocab)
    optimizers = {}
    for name, (dtype, factory) in options(args.foreach).items():
        optimizers[name] = (dtype, factory(make_params(shapes, dtype)))
        count = param_count(optimizers[name][1])
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for round_ in range(max(1, args.rounds)):
        for name, (_, optimizer) in optimizers.items():
            times[name].append(time_steps(optimizer, args.steps, warmup=2 if round_ == 0 else 1))
    rows = []
    for name, (dtype, optimizer) in optimizers.items():
        ratios = [
            statistics.median(a / b for a, b in zip(times[name], times[other]))
            for other in (BASE, ADAMW)
        ]
        rows.append(
            (name, dtype, statistics.median(times[name]), *ratios, bytes_per_param(optimizer))
        )

    print(
        f"{count / 1e6:.1f}M parameters, {torch.get_num_threads()} threads, "
        f"{args.steps} steps x {max(1, args.rounds)} rounds"
    )
    print("| option | state B/param | step ms | vs Lion fp32 | vs AdamW |")
    print("|---|---:|---:|---:|---:|")
    for name, _, seconds, vs_base, vs_adamw, per_param in rows:
        print(
            f"| {name} | {per_param:.3f} | {seconds * 1e3:.1f} | {vs_base:.2f}x | {vs_adamw:.2f}x |"
        )

    print("\nLargest model (weights + grads + optimizer state; no activations):")
    print("| option | weights | 24 GiB | 80 GiB |")
    print("|---|---|---:|---:|")
    for name, dtype, _, _, _, per_param in rows:
        width = torch.finfo(dtype).bits // 8
        fits = [max_params(budget * GIB, width, per_param) / 1e9 for budget in (24, 80)]
        print(f"| {name} | {dtype} | {fits[0]:.2f}B | {fits[1]:.2f}B |")


if __name__ == "__main__":
    main()
