"""Tiger with bf16 and 8-bit momentum and with stochastic rounding: every path, bitwise.

Two kinds of check:

- Tiger's reference, written out here per tensor in fp32 with the storage made explicit
  (8-bit: dequantise, the micro-step's math, requantise with ``lionopt.state.int8``'s codec;
  bf16: fp32 math, one round-to-nearest store; bf16 weights: the counter-based stochastic
  rounding of ``lionopt.kernels.rounding``), against the loop, foreach and fused paths, bitwise,
  over many steps with weight decay, with and without accumulation;
- the loop, foreach and fused paths against each other, bitwise, on every group kind (weight,
  embedding, bias, gain), with a non-finite gradient on one micro-step.
"""

from __future__ import annotations

import math

import pytest
import torch

from lionopt import Tiger
from lionopt.kernels.rounding import rounding_key, stochastic_round_bf16
from lionopt.state.formats import fp32_view
from lionopt.state.int8 import dequantize, quantize, quantize_into

from support import IMPLEMENTATIONS

pytestmark = pytest.mark.filterwarnings("ignore:lionopt.*fused:RuntimeWarning")

ALPHA, BETA, DECAY, FLOOR = 2e-2, 0.9, 0.5, 1e-3
SHAPE = (64, 80)  # 5120 elements: stored in 8 bits (>= 4096)
STEPS = 12


def _grads(dtype: torch.dtype, steps: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randn(SHAPE, generator=gen).to(dtype) for _ in range(steps)]


def _theta0(dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 0.3).to(dtype)


def reference_tiger(
    momentum: str, param_dtype: torch.dtype, accum: int, rounding: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One dense weight matrix under Tiger, the storage made explicit (see the module doc)."""
    theta_store = _theta0(param_dtype)
    n = theta_store.numel()
    if momentum == "int8":
        codes, scales = quantize(torch.zeros(SHAPE))
    else:
        m_store = torch.zeros(SHAPE, dtype=torch.bfloat16 if momentum == "bf16" else param_dtype)
    updates = 0
    for step, g in enumerate(_grads(param_dtype, STEPS)):
        first, last = step % accum == 0, step % accum == accum - 1
        g32 = g.float()

        def load() -> torch.Tensor:
            if momentum == "int8":
                return dequantize(codes, scales)
            return m_store.float().reshape(-1)

        def store(values: torch.Tensor) -> None:
            if momentum == "int8":
                quantize_into(values, codes, scales)
            else:
                m_store.copy_(values[:n].view(SHAPE))

        values = load()
        m = values[:n].view(SHAPE)
        share = (1 - BETA) / accum
        if not last:
            if first:
                m.mul_(BETA)
            m.add_(g32, alpha=share)
            store(values)
            continue
        rms = torch._foreach_norm([theta_store], 2, dtype=torch.float32)[0] / math.sqrt(n)
        lr = ALPHA * max(rms.double().item(), FLOOR)
        if first:
            beta1 = beta2 = BETA
        else:
            m.add_(g32, alpha=share)
            store(values)
            values = load()
            m = values[:n].view(SHAPE)
            beta1 = beta2 = 1.0
        theta = theta_store.float()
        direction = torch.sign(m * beta1 + g32 * (1 - beta1))
        theta.mul_(1 - lr * DECAY)
        theta.add_(direction, alpha=-lr)
        m.mul_(beta2).add_(g32, alpha=1 - beta2)
        if rounding and param_dtype == torch.bfloat16:
            theta_store.copy_(stochastic_round_bf16(theta, rounding_key(7, updates, 0)))
        else:
            theta_store.copy_(theta)
        updates += 1
        store(values)
    if momentum == "int8":
        return theta_store, dequantize(codes, scales)[:n].view(SHAPE)
    return theta_store, m_store


def run_tiger(
    implementation: str,
    momentum: str,
    param_dtype: torch.dtype,
    accum: int,
    rounding: bool,
    steps: int = STEPS,
) -> tuple[torch.Tensor, torch.Tensor, Tiger]:
    p = _theta0(param_dtype).requires_grad_()
    momentum_dtype = {"int8": "int8", "bf16": torch.bfloat16, "none": None}[momentum]
    opt = Tiger(
        [p],
        lr=ALPHA,
        beta=BETA,
        weight_decay=DECAY,
        accum_steps=accum,
        rms_floor=FLOOR,
        momentum_dtype=momentum_dtype,
        stochastic_rounding=rounding,
        seed=7,
        **IMPLEMENTATIONS[implementation],
    )
    for g in _grads(param_dtype, steps):
        p.grad = g.clone()
        opt.step()
    return p.detach(), fp32_view(opt.state[p], p), opt


CASES = [
    ("int8", torch.float32, False),
    ("bf16", torch.float32, False),
    ("none", torch.bfloat16, True),
    ("int8", torch.bfloat16, True),
]


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("accum", [1, 3])
@pytest.mark.parametrize(("momentum", "param_dtype", "rounding"), CASES)
def test_matches_the_reference_bitwise(implementation, accum, momentum, param_dtype, rounding):
    theta, m, opt = run_tiger(implementation, momentum, param_dtype, accum, rounding)
    ref_theta, ref_m = reference_tiger(momentum, param_dtype, accum, rounding)
    assert theta.dtype == param_dtype
    assert torch.equal(theta, ref_theta)
    assert torch.equal(m.float(), ref_m.float())
    state = opt.state[opt.param_groups[0]["params"][0]]
    expected = {"int8": torch.int8, "bf16": torch.bfloat16, "none": param_dtype}[momentum]
    assert state["exp_avg"].dtype == expected


def _model_params(param_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    return {
        "weight": (torch.randn(SHAPE, generator=gen) * 0.2).to(param_dtype),
        "embedding": torch.randn(80, 64, generator=gen).to(param_dtype),
        "bias": (torch.randn(64, generator=gen) * 0.1).to(param_dtype),
        "gain": torch.ones(64, dtype=param_dtype),
    }


def _run_groups(implementation, momentum_dtype, param_dtype, accum, rounding):
    params = {k: v.clone().requires_grad_() for k, v in _model_params(param_dtype).items()}
    groups = [
        {"params": [params["weight"]]},
        {"params": [params["embedding"]], "embedding": True},
        {"params": [params["bias"]], "bias_or_gain": True},
        {"params": [params["gain"]], "bias_or_gain": True, "init_centre": 1.0},
    ]
    opt = Tiger(
        groups,
        lr=ALPHA,
        beta=BETA,
        weight_decay=DECAY,
        accum_steps=accum,
        momentum_dtype=momentum_dtype,
        stochastic_rounding=rounding,
        **IMPLEMENTATIONS[implementation],
    )
    gen = torch.Generator().manual_seed(2)
    for step in range(4 * accum):
        for name, p in params.items():
            g = torch.randn(p.shape, generator=gen).to(param_dtype)
            if step == 1 and name == "weight":
                g.view(-1)[3] = math.nan  # the non-finite guard on one micro-step
            p.grad = g
        opt.step()
    return params, opt


@pytest.mark.parametrize("accum", [1, 2])
@pytest.mark.parametrize(
    ("momentum_dtype", "param_dtype", "rounding"),
    [
        ("int8", torch.float32, False),
        (torch.bfloat16, torch.float32, False),
        ("int8", torch.bfloat16, True),
        (None, torch.bfloat16, True),
    ],
)
def test_every_group_kind_is_bitwise_equal_across_paths(
    accum, momentum_dtype, param_dtype, rounding
):
    runs = [
        _run_groups(impl, momentum_dtype, param_dtype, accum, rounding) for impl in IMPLEMENTATIONS
    ]
    ref_params, ref_opt = runs[0]
    for params, opt in runs[1:]:
        for name, p in params.items():
            assert torch.equal(p.detach(), ref_params[name].detach()), name
            state, ref_state = opt.state[p], ref_opt.state[ref_params[name]]
            assert state.keys() == ref_state.keys(), name
            for key in state:
                assert torch.equal(state[key], ref_state[key]), (name, key)
    big = ref_opt.state[ref_params["embedding"]]["exp_avg"]
    if momentum_dtype == "int8":
        assert big.dtype == torch.int8  # the embedding table (5120 elements) is 8-bit


def test_int8_state_dict_round_trip_mid_accumulation() -> None:
    whole, _, whole_opt = run_tiger("foreach", "int8", torch.float32, 3, False, steps=7)
    p = _theta0(torch.float32).requires_grad_()
    first = Tiger(
        [p],
        lr=ALPHA,
        beta=BETA,
        weight_decay=DECAY,
        accum_steps=3,
        rms_floor=FLOOR,
        momentum_dtype="int8",
        seed=7,
        foreach=True,
    )
    grads = _grads(torch.float32, 7)
    for g in grads[:4]:
        p.grad = g.clone()
        first.step()
    saved = first.state_dict()
    q = p.detach().clone().requires_grad_()
    resumed = Tiger(
        [q],
        lr=ALPHA,
        beta=BETA,
        weight_decay=DECAY,
        accum_steps=3,
        rms_floor=FLOOR,
        momentum_dtype="int8",
        seed=7,
        foreach=True,
    )
    resumed.load_state_dict(saved)
    for g in grads[4:]:
        q.grad = g.clone()
        resumed.step()
    assert torch.equal(q.detach(), whole)
    assert torch.equal(
        resumed.state[q]["exp_avg"],
        whole_opt.state[whole_opt.param_groups[0]["params"][0]]["exp_avg"],
    )
