"""``Lion(stochastic_rounding=True)``: unbiased, reproducible rounding of bf16 weights."""

from __future__ import annotations

import io
import warnings

import pytest
import torch

from lionopt import Lion
from lionopt.functional import lion
from lionopt.kernels.cpu import quant as fused_quant_cpu
from lionopt.kernels.rounding import element_bits, rounding_key, stochastic_round_bf16
from quant_support import fp32_run, lion_factory, train

SAMPLES = 200_000


@pytest.mark.parametrize("value", [0.5 + 2**-10, -0.3001, 1e-3 + 1e-7, 12345.678, 1e-39])
def test_mean_of_roundings_is_the_fp32_value(value):
    """The mean over many roundings is within 5 standard errors of the fp32 value."""
    x = torch.full((SAMPLES,), value, dtype=torch.float32)
    rounded = stochastic_round_bf16(x, key=rounding_key(7, 3, 1)).double()
    low, high = rounded.min().item(), rounded.max().item()
    assert high > low  # both neighbours occur
    assert x.bfloat16().double()[0].item() in (low, high)
    p = (value - low) / (high - low)  # probability of rounding to `high`
    standard_error = (high - low) * (p * (1 - p) / SAMPLES) ** 0.5
    assert abs(rounded.mean().item() - float(x[0])) < 5 * standard_error


def test_exact_values_nan_and_inf_are_kept():
    x = torch.tensor([0.5, -2.0, 0.0, -0.0, float("inf"), -float("inf"), float("nan")])
    rounded = stochastic_round_bf16(x, key=123)
    assert torch.equal(rounded[:6].float(), x[:6])
    assert torch.isnan(rounded[6])
    assert torch.signbit(rounded[3])


def test_bits_are_reproducible_and_keyed():
    assert torch.equal(element_bits(1000, 5), element_bits(1000, 5))
    assert (element_bits(1000, 5) != element_bits(1000, 6)).float().mean() > 0.99
    bits = element_bits(1 << 16, 9)
    assert bits.min() >= 0 and bits.max() < 2**32
    assert abs((bits & 0xFFFF).double().mean().item() / 65535 - 0.5) < 0.01
    assert rounding_key(0, 1, 2) != rounding_key(0, 2, 1)


def _bf16_weights(stochastic, steps=400):
    """Weights of 0.5 under a constant gradient at lr 1e-4: each step is 1/40 of a bf16 ulp."""
    weights = torch.nn.Parameter(torch.full((10_000,), 0.5, dtype=torch.bfloat16))
    optimizer = Lion([weights], lr=1e-4, stochastic_rounding=stochastic)
    weights.grad = torch.ones_like(weights)
    for _ in range(steps):
        optimizer.step()
    return weights.detach().double()


def test_round_to_nearest_loses_small_steps_and_stochastic_rounding_keeps_them():
    assert torch.all(_bf16_weights(stochastic=False) == 0.5)  # never moves
    moved = _bf16_weights(stochastic=True)
    # expected 0.5 - 400 * 1e-4 = 0.46; the bf16 ulp there is 2**-9, the mean of 10k far tighter
    assert abs(moved.mean().item() - 0.46) < 2e-3


def test_pure_bf16_training_tracks_fp32_only_with_stochastic_rounding():
    reference = fp32_run().final_loss
    stochastic = train(lion_factory(stochastic_rounding=True), dtype=torch.bfloat16).final_loss
    nearest = train(lion_factory(), dtype=torch.bfloat16).final_loss
    assert abs(stochastic - reference) < 0.1 * reference, (stochastic, reference)
    assert nearest > 5 * reference and nearest > 1.0, (nearest, reference)  # it stalls


def _run(impl, momentum_dtype=None, seed=0, steps=6, state_dict=None):
    flags = {
        "loop": dict(foreach=False, fused=False),
        "foreach": dict(foreach=True, fused=False),
        "fused": dict(fused=True),
    }[impl]
    generator = torch.Generator().manual_seed(0)
    params = [
        torch.nn.Parameter(torch.randn(s, generator=generator).bfloat16())
        for s in ((33, 70), (9000,))
    ]
    optimizer = Lion(
        params,
        lr=1e-3,
        weight_decay=0.3,
        stochastic_rounding=True,
        seed=seed,
        momentum_dtype=momentum_dtype,
        **flags,
    )
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).bfloat16()
        optimizer.step()
    return params, optimizer


@pytest.mark.parametrize("momentum_dtype", [None, torch.float32, "int8"])
def test_loop_foreach_fused_are_bitwise_equal(momentum_dtype, monkeypatch):
    calls = []
    for name in ("lion_step", "quantized_lion_step"):
        original = getattr(fused_quant_cpu, name)
        monkeypatch.setattr(fused_quant_cpu, name, lambda *a, f=original: calls.append(1) or f(*a))
    runs = {impl: _run(impl, momentum_dtype) for impl in ("loop", "foreach", "fused")}
    assert calls or not fused_quant_cpu.available()
    for impl in ("foreach", "fused"):
        for a, b in zip(runs["loop"][0], runs[impl][0]):
            assert torch.equal(a, b), impl


def test_seed_changes_the_rounding_and_is_saved():
    (a, _), (b, _) = _run("foreach", seed=0)[0], _run("foreach", seed=0)[0]
    assert torch.equal(a, b)
    params_c, optimizer = _run("foreach", seed=1)
    assert not torch.equal(a, params_c[0])
    assert optimizer.state_dict()["param_groups"][0]["seed"] == 1


def test_resumed_run_rounds_like_an_uninterrupted_one():
    full, _ = _run("foreach", steps=8)
    half, optimizer = _run("foreach", steps=4)
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    copies = [torch.nn.Parameter(p.detach().clone()) for p in half]
    resumed = Lion(copies, lr=1e-3, weight_decay=0.3, stochastic_rounding=True)
    resumed.load_state_dict(torch.load(buffer))
    generator = torch.Generator().manual_seed(0)
    for s in ((33, 70), (9000,)):  # replay the generator to step 4
        torch.randn(s, generator=generator)
    for _ in range(4):
        for p in copies:
            torch.randn(p.shape, generator=generator)
    for _ in range(4):
        for p in copies:
            p.grad = torch.randn(p.shape, generator=generator).bfloat16()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(full, copies))


def test_fp16_weights_are_refused():
    p = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="bfloat16"):
        Lion([p], stochastic_rounding=True).step()
    with pytest.raises(ValueError, match="bfloat16"):
        lion(
            [p],
            [p.grad],
            [torch.zeros_like(p)],
            lr=1e-3,
            beta1=0.9,
            beta2=0.99,
            weight_decay=0.0,
            rounding_keys=[1],
        )


def test_fp32_weights_are_unaffected():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        results = []
        for stochastic in (False, True):
            p = torch.nn.Parameter(torch.linspace(-1, 1, 5000))
            p.grad = torch.sin(torch.arange(5000.0))
            Lion([p], lr=1e-3, stochastic_rounding=stochastic).step()
            results.append(p.detach())
    assert torch.equal(*results)
