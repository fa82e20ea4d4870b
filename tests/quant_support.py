"""Shared by the momentum-dtype, stochastic-rounding and 8-bit tests: a real small training run.

The task is the 8x8 handwritten digits (``lionopt.tasks.digits``, 1,438 training images) with
an MLP 64-128-128-10 (weight matrices of 8k and 16k elements, so the 8-bit format applies to
them; the biases and the 1,280-element output layer stay fp32). Every run draws the same
batches and initial weights, so runs differ only by the optimizer option under test.
``train`` records, per step and coordinate, the sign of Lion's direction c, and compares the
momentum the optimizer stores with an exact fp32 momentum fed the same gradients (never
re-synced: drift, not one-step error).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from lionopt import Lion
from lionopt.state.formats import fp32_view as momentum_tensor

BETAS = (0.9, 0.99)
BATCH = 128
LR, WEIGHT_DECAY, STEPS = 1e-4, 0.1, 500


def lion_factory(**options):
    """``params -> Lion`` with the runs' shared hyperparameters and ``options``."""
    return lambda params: Lion(params, lr=LR, betas=BETAS, weight_decay=WEIGHT_DECAY, **options)


@cache
def fp32_run() -> Run:
    """The fp32 reference run (fp32 weights and momentum), computed once per session."""
    return train(lion_factory())


def digits() -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised 64-pixel digit images and labels (a structured synthetic set without it)."""
    try:
        from lionopt.tasks.digits import DigitsTask

        data = DigitsTask().load()
        x = data.train_x.float().reshape(len(data.train_x), -1) / 16.0
        y = data.train_y
    except Exception:  # the tasks package or its data is missing: ten Gaussian clusters
        generator = torch.Generator().manual_seed(0)
        centres = torch.randn(10, 64, generator=generator)
        y = torch.arange(1500) % 10
        x = centres[y] + 0.8 * torch.randn(1500, 64, generator=generator)
    return (x - x.mean()) / x.std(), y


def mlp(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    return model.to(dtype)


@dataclass
class Run:
    final_loss: float  # full training-set loss after the last step
    signs: torch.Tensor  # (steps, coordinates) int8 sign of c
    shadow_flips: float = 0.0  # share of (step, coordinate) where sign(c) != exact momentum's
    losses: list[float] = field(default_factory=list)


def train(make_optimizer, steps: int = STEPS, dtype=torch.float32, shadow: bool = False) -> Run:
    """Train the MLP for ``steps`` steps with ``make_optimizer(params)``; see the module doc.

    One thread: these matrices are too small to gain from two, and it keeps runs fast on a
    busy machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(make_optimizer, steps, dtype, shadow)
    finally:
        torch.set_num_threads(threads)


def _train(make_optimizer, steps: int, dtype: torch.dtype, shadow: bool) -> Run:
    x, y = digits()
    model = mlp(dtype)
    params = list(model.parameters())
    optimizer = make_optimizer(params)
    batches = torch.randint(len(y), (steps, BATCH), generator=torch.Generator().manual_seed(1))
    exact = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    signs, flips, losses = [], 0, []
    beta1, beta2 = BETAS
    for batch in batches:
        loss = F.cross_entropy(model(x[batch].to(dtype)).float(), y[batch])
        optimizer.zero_grad()
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            step_signs = []
            for p, m_exact in zip(params, exact):
                g = p.grad.float()
                state = optimizer.state[p]
                m = momentum_tensor(state, p).float() if state else torch.zeros_like(g)
                sign = torch.sign(m * beta1 + g * (1 - beta1))
                step_signs.append(sign.flatten().to(torch.int8))
                if shadow:
                    flips += (sign != torch.sign(m_exact * beta1 + g * (1 - beta1))).sum().item()
                    m_exact.mul_(beta2).add_(g, alpha=1 - beta2)
            signs.append(torch.cat(step_signs))
        optimizer.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x.to(dtype)).float(), y).item()
    all_signs = torch.stack(signs)
    return Run(final, all_signs, flips / all_signs.numel(), losses)
