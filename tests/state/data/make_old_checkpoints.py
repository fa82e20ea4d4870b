"""Writes ``old_checkpoints.pt`` with the lionopt on ``PYTHONPATH`` (run once, with the
pre-refactor package at commit eedd063: ``git archive eedd063 src | tar -x -C /tmp/old`` and
``PYTHONPATH=/tmp/old/src python tests/state/data/make_old_checkpoints.py``).

For each case: the parameters and optimizer state dict after 3 steps, one more gradient, and
the parameters and state dict after the 4th step taken by that old code.

``old_pickled_optimizer.pt`` is ``torch.save({"optimizer": opt, "params": params})`` of an
8-bit ``Lion`` (shapes (16, 8) and (64, 80), lr 1e-2, weight decay 0.1, two steps) by the same
old code.
"""

import copy
from pathlib import Path

import torch

import lionopt

CASES = {
    "lion_fp32": lambda ps: lionopt.Lion(ps, lr=1e-2, weight_decay=0.1),
    "lion_bf16_momentum": lambda ps: lionopt.Lion(
        ps, lr=1e-2, weight_decay=0.1, momentum_dtype=torch.bfloat16
    ),
    "lion_int8": lambda ps: lionopt.Lion(ps, lr=1e-2, weight_decay=0.1, momentum_dtype="int8"),
    "lion_rounding": lambda ps: lionopt.Lion(
        ps, lr=1e-2, weight_decay=0.1, stochastic_rounding=True, seed=3
    ),
    "signum": lambda ps: lionopt.Signum(ps, lr=1e-2, weight_decay=0.1),
    "tiger": lambda ps: lionopt.Tiger(ps, lr=1e-2, accum_steps=2),
}


def main() -> None:
    torch.manual_seed(0)
    out = {}
    for name, make in CASES.items():
        dtype = torch.bfloat16 if name == "lion_rounding" else torch.float32
        shape = (64, 80) if name == "lion_int8" else (16, 8)  # 8-bit needs >= 4096 elements
        params = [
            torch.randn(shape, dtype=dtype, requires_grad=True),
            torch.randn(7, dtype=dtype, requires_grad=True),
        ]
        optimizer = make(params)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
        case = {
            "params": [p.detach().clone() for p in params],
            "state_dict": copy.deepcopy(optimizer.state_dict()),
            "grads": [torch.randn_like(p) for p in params],
        }
        for p, g in zip(params, case["grads"]):
            p.grad = g.clone()
        optimizer.step()
        case["params_after"] = [p.detach().clone() for p in params]
        case["state_dict_after"] = copy.deepcopy(optimizer.state_dict())
        out[name] = case
    torch.save(out, Path(__file__).with_name("old_checkpoints.pt"))


if __name__ == "__main__":
    main()
