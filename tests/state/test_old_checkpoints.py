"""Checkpoints written by lionopt before the ``optim/``/``state/`` refactor still load and resume.

``data/old_checkpoints.pt`` was written by the pre-refactor package (commit eedd063, see
``data/make_old_checkpoints.py``): per case the parameters and state dict after 3 steps, a 4th
gradient, and what that old code produced after the 4th step. Loading the old state dict into
today's optimizer and taking the same step must give the same parameters and state, bitwise.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lionopt

DATA = torch.load(Path(__file__).with_name("data") / "old_checkpoints.pt", weights_only=False)

MAKERS = {
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


def _assert_state_equal(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert value.dtype == actual[key].dtype, key
            assert torch.equal(actual[key], value), key
        else:
            assert actual[key] == value, key


@pytest.mark.parametrize("name", sorted(MAKERS))
def test_an_old_checkpoint_loads_and_the_next_step_is_unchanged(name: str) -> None:
    case = DATA[name]
    params = [p.clone().requires_grad_() for p in case["params"]]
    optimizer = MAKERS[name](params)
    optimizer.load_state_dict(copy.deepcopy(case["state_dict"]))
    for p, g in zip(params, case["grads"]):
        p.grad = g.clone()
    optimizer.step()
    for p, expected in zip(params, case["params_after"]):
        assert torch.equal(p.detach(), expected)
    saved = optimizer.state_dict()
    expected_dict = case["state_dict_after"]
    for group, expected_group in zip(saved["param_groups"], expected_dict["param_groups"]):
        # Keys added since are back-filled with their defaults; the old ones are unchanged.
        assert {k: group[k] for k in expected_group} == expected_group
    for key, state in expected_dict["state"].items():
        _assert_state_equal(saved["state"][key], state)


def test_a_whole_optimizer_pickled_before_the_refactor_loads_and_steps() -> None:
    """``torch.save(optimizer)`` by commit eedd063 (an 8-bit Lion): the pickle names
    ``lionopt.lion.Lion`` and ``lionopt.lion._TrackedState``, which still resolve."""
    saved = torch.load(
        Path(__file__).with_name("data") / "old_pickled_optimizer.pt", weights_only=False
    )
    optimizer, params = saved["optimizer"], saved["params"]
    assert isinstance(optimizer, lionopt.Lion)
    assert optimizer.state[params[1]]["exp_avg"].dtype == torch.int8
    twins = [p.detach().clone().requires_grad_() for p in params]
    fresh = lionopt.Lion(twins, lr=1e-2, weight_decay=0.1, momentum_dtype="int8")
    fresh.load_state_dict(optimizer.state_dict())
    for p, q in zip(params, twins):
        p.grad = torch.randn_like(p)
        q.grad = p.grad.clone()
    optimizer.step()
    fresh.step()
    assert all(torch.equal(p, q) for p, q in zip(params, twins))
