"""The 8-bit blockwise momentum format and the Lion step over it (loop, foreach, fused C++)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from lionopt import Lion
from lionopt.kernels import quantized
from lionopt.kernels.cpu import _build
from lionopt.kernels.cpu import quant as fused_quant_cpu
from lionopt.kernels.hyper import LionHyper
from lionopt.state.int8 import BLOCK, dequantize, quantize

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
floats32 = st.floats(width=32)  # NaN and ±inf too


@settings(max_examples=300, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 3 * BLOCK), elements=floats32))
def test_sign_never_flips_and_zero_stays_zero(values):
    v = torch.from_numpy(values)
    codes, scales = quantize(v)
    d = dequantize(codes, scales)[: v.numel()]
    finite = torch.isfinite(v)
    assert not (torch.sign(d[finite]) * torch.sign(v[finite]) < 0).any()
    assert (d[v == 0] == 0).all()
    assert torch.isnan(d[~finite]).all()  # a non-finite momentum stays non-finite (NaN)


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 2 * BLOCK), elements=finite32))
def test_codes_are_the_nearest_of_the_square_law_map(values):
    v = torch.from_numpy(values)
    codes, scales = quantize(v)
    absmax = torch.where(torch.isfinite(v), v.abs(), 0).double()
    for block in range(scales.numel()):
        part = v[block * BLOCK : (block + 1) * BLOCK].double()
        a = absmax[block * BLOCK : (block + 1) * BLOCK].max().item()
        assert scales[block].item() == a
        if a == 0 or a / 16129 < 1e-38:  # all zero, or a subnormal factor
            continue
        levels = torch.arange(-127, 128, dtype=torch.float64)
        grid = levels * levels.abs() * (a / 16129)
        gaps = (part[:, None] - grid[None, :]).abs()
        got = codes[block * BLOCK : block * BLOCK + part.numel()].double()
        best = gaps.min(dim=1).values
        chosen = gaps.gather(1, (got + 127).long()[:, None]).squeeze(1)
        # nearest up to the fp32 rounding of y = |v| / factor
        assert torch.all(chosen <= best + 1e-6 * a), (chosen - best).max()


def test_extremes_are_exact():
    v = torch.zeros(BLOCK)
    v[:4] = torch.tensor([3.5, -3.5, 1e-30, -2e-6])
    d = dequantize(*quantize(v))
    assert d[0] == 3.5 and d[1] == -3.5  # ±absmax -> ±127 -> exactly ±absmax
    assert d[2] == 0 and d[3] <= 0  # tiny values round to 0 (or keep their sign)


def _make(dtype, sizes=((70, 90), (5000,), (300,)), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in sizes]


def _train(impl, dtype, steps=8, **options):
    params = _make(dtype)
    flags = {
        "loop": dict(foreach=False, fused=False),
        "foreach": dict(foreach=True, fused=False),
        "fused": dict(fused=True),
    }[impl]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 3e-3}]
    optimizer = Lion(groups, lr=1e-2, weight_decay=0.5, momentum_dtype="int8", **flags, **options)
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(dtype)
        optimizer.step()
    return params, optimizer


OPTIONS = [{}, {"maximize": True}, {"cautious_weight_decay": True}, {"cautious": True}]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loop_foreach_fused_are_bitwise_equal(dtype, options, monkeypatch):
    calls = []
    original = fused_quant_cpu.quantized_lion_step
    monkeypatch.setattr(
        fused_quant_cpu, "quantized_lion_step", lambda *a: calls.append(1) or original(*a)
    )
    runs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fused=True with cautious falls back, with a warning
        for impl in ("loop", "foreach", "fused"):
            runs[impl] = _train(impl, dtype, **options)
    assert bool(calls) == (not options.get("cautious") and fused_quant_cpu.available())
    loop_params, loop_opt = runs["loop"]
    for impl in ("foreach", "fused"):
        params, optimizer = runs[impl]
        for p_loop, p in zip(loop_params, params):
            assert torch.equal(p_loop, p), impl
            for key, value in loop_opt.state[p_loop].items():
                assert torch.equal(optimizer.state[p][key], value), (impl, key)


def test_quantised_step_tracks_the_fp32_step():
    """One step from the same momentum: the new momentum is its 8-bit encoding."""
    params = _make(torch.float32, sizes=((64, 64),))
    params[0].grad = torch.randn_like(params[0])
    exact = [torch.nn.Parameter(params[0].detach().clone())]
    exact[0].grad = params[0].grad.clone()
    q = Lion(params, lr=1e-2, momentum_dtype="int8")
    f = Lion(exact, lr=1e-2)
    q.step()
    f.step()
    assert torch.equal(params[0], exact[0])  # m = 0 encodes exactly, so the first step agrees
    codes, scales = quantize(f.state[exact[0]]["exp_avg"])
    assert torch.equal(q.state[params[0]]["exp_avg"], codes)
    assert torch.equal(q.state[params[0]]["exp_avg_scale"], scales)


def test_nan_gradient_poisons_one_coordinate_not_the_block():
    params = _make(torch.float32, sizes=((4096,),))
    optimizer = Lion(params, lr=1e-2, momentum_dtype="int8")
    params[0].grad = torch.randn(4096)
    params[0].grad[5] = math.nan
    optimizer.step()
    momentum = quantized.momentum_tensor(optimizer.state[params[0]], params[0])
    assert torch.isnan(momentum[5]) and torch.isfinite(momentum[torch.arange(4096) != 5]).all()


def test_failed_build_warns_once_and_falls_back(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(_build, "Build", broken)
    monkeypatch.setattr(fused_quant_cpu, "_library", fused_quant_cpu._library.fresh())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        params, _ = _train("fused", torch.float32, steps=3)
    messages = [str(w.message) for w in caught if "could not be built" in str(w.message)]
    assert len(messages) == 1
    expected, _ = _train("foreach", torch.float32, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(params, expected))


def test_kernel_builds_in_a_fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIONOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fused_quant_cpu, "_library", fused_quant_cpu._library.fresh())
    assert fused_quant_cpu.available()
    info = fused_quant_cpu.build_info()
    assert info["compiled"] and info["path"].startswith(str(tmp_path))
    assert "-ffp-contract=off" in _build._compile_flags()


# --- The fused kernel's vector paths against the loop, on edge cases (bitwise) --------------

EDGE_CASES = ["plain", "nan_codes", "non_finite_grads", "subnormal_factor", "zero_blocks"]


def _edge_state(case, dtype, sizes, seed):
    generator = torch.Generator().manual_seed(seed)
    params = [(torch.randn(n, generator=generator) * 0.02).to(dtype) for n in sizes]
    grads = [(torch.randn(n, generator=generator) * 1e-3).to(dtype) for n in sizes]
    scale = 1e-36 if case == "subnormal_factor" else 1e-3  # absmax/16129 below 2**-126
    states = [quantize(torch.randn(n, generator=generator) * scale) for n in sizes]
    for (codes, _scales), grad, n in zip(states, grads, sizes):
        picks = torch.randint(0, n, (n // 50,), generator=generator)
        if case == "nan_codes":
            codes[picks] = -128
        elif case == "non_finite_grads":
            values = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
            grad[picks] = values[torch.arange(picks.numel()) % 3]
        elif case == "subnormal_factor":
            grad.zero_()
        elif case == "zero_blocks":
            codes[: 2 * BLOCK] = 0
            grad[: min(n, 3 * BLOCK)] = 0  # block 2 keeps a momentum, blocks 0 and 1 are 0
    return params, grads, [c for c, _ in states], [s for _, s in states]


@pytest.mark.parametrize("case", EDGE_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "options",
    [{}, {"maximize": True, "cautious_weight_decay": True}, {"rounding": True}],
    ids=["plain", "maximize,cwd", "stochastic"],
)
def test_fused_vector_paths_match_the_loop(case, dtype, options):
    """Whole blocks, a partial last block (tails of 8 and of 1), NaN codes, infinite and NaN
    gradients, subnormal scale factors and all-zero blocks, for fp32 and bf16 weights."""
    if not fused_quant_cpu.available():
        pytest.skip("the fused kernel is not available")
    if options.get("rounding") and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bf16 weights")
    sizes = [4096, 20 * BLOCK + 37, 5003]
    beta2 = 1.0 if case == "subnormal_factor" else 0.99  # keeps the tiny momentum as it is
    hyper = LionHyper(
        lr=[1e-2, 3e-3, 1e-4],
        beta1=0.9,
        beta2=beta2,
        weight_decay=0.5,
        maximize=options.get("maximize", False),
        cautious_weight_decay=options.get("cautious_weight_decay", False),
        rounding_keys=[11, 2**32 - 5, 77] if options.get("rounding") else None,
    )
    runs = []
    for fused in (False, True):
        params, grads, codes, scales = _edge_state(case, dtype, sizes, seed=3)
        for _ in range(3):
            quantized.quantized_lion(
                params, grads, codes, scales, hyper, foreach=False, fused=fused
            )
        runs.append((params, codes, scales))
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.int8: torch.int8}
    for loop_tensors, fused_tensors in zip(*runs):
        for a, b in zip(loop_tensors, fused_tensors):
            assert torch.equal(a.view(bits[a.dtype]), b.view(bits[b.dtype]))


@pytest.mark.parametrize("momentum_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("stochastic", [False, True])
def test_fused_plain_kernel_matches_the_reference_on_non_finite_values(momentum_dtype, stochastic):
    """bf16 weights with a plain momentum (sixteen-wide path, tails of 8 and of 1)."""
    from lionopt.functional import lion

    if not fused_quant_cpu.available():
        pytest.skip("the fused kernel is not available")
    sizes = [4096 + 16 + 8 + 3, 37]
    keys = [9, 2**32 - 1] if stochastic else None
    hyper = LionHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.5, rounding_keys=keys)
    runs = []
    for fused in (False, True):
        generator = torch.Generator().manual_seed(5)
        params = [(torch.randn(n, generator=generator) * 0.02).bfloat16() for n in sizes]
        grads = [(torch.randn(n, generator=generator) * 1e-3).bfloat16() for n in sizes]
        moments = [(torch.randn(n, generator=generator) * 1e-3).to(momentum_dtype) for n in sizes]
        grads[0][::97] = math.inf
        grads[0][5::101] = math.nan
        moments[0][7::89] = -math.inf
        for _ in range(2):
            if fused:
                fused_quant_cpu.lion_step(params, grads, moments, hyper)
            else:
                lion(
                    params,
                    grads,
                    moments,
                    lr=1e-2,
                    beta1=0.9,
                    beta2=0.99,
                    weight_decay=0.5,
                    foreach=False,
                    fused=False,
                    rounding_keys=keys,
                )
        runs.append((params, moments))
    assert torch.isnan(runs[0][1][0]).any()  # the NaN momentum case is exercised
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16}
    for loop_tensors, fused_tensors in zip(*runs):
        for a, b in zip(loop_tensors, fused_tensors):
            nan = torch.isnan(a)
            assert torch.equal(nan, torch.isnan(b))  # NaN payloads are not compared
            assert torch.equal(a[~nan].view(bits[a.dtype]), b[~nan].view(bits[b.dtype]))
