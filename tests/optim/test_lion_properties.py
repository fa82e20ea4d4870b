"""Property-based tests: shapes, dtypes and hyperparameters drawn by hypothesis."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lionopt.functional import lion

from golden import golden_lion_step
from support import IMPLEMENTATIONS, fused_available

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

shapes = st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple)
hyperparameters = st.fixed_dictionaries(
    {
        "lr": st.floats(1e-5, 0.3),
        "beta1": st.floats(0.0, 0.999),
        "beta2": st.floats(0.0, 0.999),
        "weight_decay": st.floats(0.0, 2.0),
        "maximize": st.booleans(),
    }
)
PROPERTY_SETTINGS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def random_tensors(shape_list, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in shape_list]


def run_steps(implementation, shape_list, dtype, hyper, seed, steps=6):
    params = random_tensors(shape_list, dtype, seed)
    moms = [torch.zeros_like(p) for p in params]
    for step in range(steps):
        grads = random_tensors(shape_list, dtype, seed + 1000 + step)
        lion(params, grads, moms, **hyper, **IMPLEMENTATIONS[implementation])
    return params, moms


@PROPERTY_SETTINGS
@given(
    shape_list=st.lists(shapes, min_size=1, max_size=4),
    dtype=st.sampled_from(DTYPES),
    hyper=hyperparameters,
    seed=st.integers(0, 2**16),
)
def test_all_implementations_agree_bitwise(shape_list, dtype, hyper, seed):
    names = ["loop", "foreach"] + (["fused"] if fused_available("cpu") else [])
    results = {name: run_steps(name, shape_list, dtype, hyper, seed) for name in names}
    ref_params, ref_moms = results["loop"]
    for name in names[1:]:
        params, moms = results[name]
        for a, b in zip(ref_params + ref_moms, params + moms):
            assert a.dtype == b.dtype == dtype
            assert torch.equal(a, b), name


@PROPERTY_SETTINGS
@given(shape=shapes, hyper=hyperparameters, seed=st.integers(0, 2**16))
def test_float64_matches_the_golden_model(shape, hyper, seed):
    params, moms = run_steps("loop", [shape], torch.float64, hyper, seed, steps=8)
    theta = random_tensors([shape], torch.float64, seed)[0].numpy()
    mom = np.zeros(shape)
    for step in range(8):
        grad = random_tensors([shape], torch.float64, seed + 1000 + step)[0].numpy()
        theta, mom = golden_lion_step(theta, mom, grad, **hyper)
    np.testing.assert_allclose(params[0].numpy(), theta, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(moms[0].numpy(), mom, rtol=1e-12, atol=1e-14)


@PROPERTY_SETTINGS
@given(shape=shapes, hyper=hyperparameters, seed=st.integers(0, 2**16))
def test_each_coordinate_moves_by_exactly_lr_after_decay(shape, hyper, seed):
    """In float64 the step is θ·(1−lr·λ) ± lr or 0: Lion's fixed-size update."""
    theta = random_tensors([shape], torch.float64, seed)[0]
    grad = random_tensors([shape], torch.float64, seed + 1)[0]
    mom = random_tensors([shape], torch.float64, seed + 2)[0]
    decayed = theta * (1 - hyper["lr"] * hyper["weight_decay"])
    lion([theta], [grad], [mom.clone()], **hyper)
    moved = (theta - decayed).abs()
    assert bool(((moved - hyper["lr"]).abs() < 1e-12).logical_or(moved == 0).all())
