"""``lionopt.memory``: optimizer-state bytes per parameter, measured on a real model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lionopt import Lion
from lionopt.memory import GIB, bytes_per_param, max_params, param_count, state_bytes

LIMITS = {None: 4.0, "bf16": 2.0, "int8": 1.05}


def _transformer() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512, batch_first=True)
    return nn.Sequential(nn.Embedding(1000, 128), nn.TransformerEncoder(layer, num_layers=2))


def _stepped(make_optimizer) -> torch.optim.Optimizer:
    model = _transformer()
    optimizer = make_optimizer(model.parameters())
    tokens = torch.randint(1000, (4, 16))
    model(tokens).square().mean().backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("momentum_dtype", list(LIMITS))
def test_lion_state_bytes_per_param(momentum_dtype):
    per_param = bytes_per_param(_stepped(lambda p: Lion(p, momentum_dtype=momentum_dtype)))
    adamw = bytes_per_param(_stepped(lambda p: torch.optim.AdamW(p)))
    assert adamw >= 8.0
    assert per_param <= LIMITS[momentum_dtype]
    # the 8-bit format costs at least 1 + 4/256 per quantised parameter
    floor = {None: 4.0, "bf16": 2.0, "int8": 1 + 4 / 256}[momentum_dtype]
    assert per_param >= floor


def test_state_bytes_counts_each_storage_once():
    p = nn.Parameter(torch.zeros(10))
    optimizer = Lion([p])
    shared = torch.zeros(10)
    optimizer.state[p] = {"exp_avg": shared, "alias": shared[:5], "step": 3}
    assert state_bytes(optimizer) == 40
    assert param_count(optimizer) == 10


def test_max_params_formula():
    # weights + grads in fp32 (8 B) + AdamW's 8 B = 16 B/param: 24 GiB holds 1.61e9
    assert max_params(24 * GIB, 4, 8.0) == 24 * GIB // 16
    assert max_params(80 * GIB, 2, 1.0) == int(80 * GIB // 5)


def test_state_bytes_counts_tensors_held_in_lists() -> None:
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.SGD([p], lr=0.1)
    opt.state[p] = {"exp_avg": [torch.zeros(10), torch.zeros(10)], "step": 3}
    assert state_bytes(opt) == 2 * 10 * 4
