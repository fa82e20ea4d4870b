"""The C++ dispatch of fused CPU steps (``lionopt.kernels.cpu_dispatch``) and Lion's layouts.

Checked bitwise against the reference loop over many steps with weight decay, and against a
``foreach`` twin through a training run in which everything a layout remembers is changed:
frozen and unfrozen parameters, first gradients, replaced momenta and state dicts, cleared
state, a swapped ``p.data``, a non-contiguous gradient, ``load_state_dict``,
``add_param_group`` and an lr schedule. Spies check that the C++ path really ran.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import pytest
import torch

from lionopt import Lion, functional
from lionopt.kernels.cpu import dispatch as cpu_dispatch
from lionopt.kernels.cpu import plain as fused_cpu
from lionopt.kernels.cpu._build import LazyLibrary
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.reference import single_tensor_lion

SHAPES = [(3,), (17, 5), (0,), (), (40_000,), (127, 129)]


@pytest.fixture(autouse=True)
def dispatch_built() -> None:
    if not cpu_dispatch.wait():
        pytest.skip("the C++ dispatch cannot be built here (see the session fixture)")


@pytest.fixture
def statuses(monkeypatch) -> list[int]:
    """The results of every C++ group step."""
    seen: list[int] = []
    original = cpu_dispatch.group_step

    def spy(*args):
        status = original(*args)
        seen.append(status)
        return status

    monkeypatch.setattr(cpu_dispatch, "group_step", spy)
    return seen


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality; NaNs must sit at the same places."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaNs differ"
    a, e = actual.masked_fill(nan_a, 0), expected.masked_fill(nan_e, 0)
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    assert torch.equal(a.view(bits), e.view(bits)), f"{what}: values differ"


def gradient(shape, step: int, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    g = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
    flat = g.view(-1)
    if step % 6 == 1:
        g.zero_()
    if step == 7 and flat.numel() >= 4:
        flat[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0]).to(dtype)
    return g


OPTIONS = {
    "plain": {},
    "maximize": {"maximize": True},
    "cautious": {"cautious": True},
    "cautious-decay": {"cautious_weight_decay": True},
    "decouple-lr": {"decouple_lr": True, "max_lr": 0.02},
}


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float64, torch.bfloat16, torch.float16],
    ids=["fp32", "fp64", "bf16", "fp16"],
)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_group_step_matches_the_reference_bitwise(dtype, option, statuses) -> None:
    options = OPTIONS[option]
    generator = torch.Generator().manual_seed(7)
    start = [torch.randn(s, generator=generator, dtype=torch.float64).to(dtype) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in start]
    expected = [t.clone() for t in start]
    moms = [torch.zeros_like(t) for t in start]
    lr, decay = 0.01, 0.5
    optimizer = Lion(params, lr=lr, weight_decay=decay, **options)
    applied_decay = decay / options["max_lr"] if options.get("decouple_lr") else decay
    hyper = LionHyper(
        lr=lr,
        beta1=0.9,
        beta2=0.99,
        weight_decay=applied_decay,
        maximize=options.get("maximize", False),
        cautious=options.get("cautious", False),
        cautious_weight_decay=options.get("cautious_weight_decay", False),
    )
    for step in range(30):
        grads = [gradient(s, step, dtype, generator) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        single_tensor_lion(expected, grads, moms, hyper)
    for i, (p, e, m) in enumerate(zip(params, expected, moms)):
        assert_same(p.detach(), e, f"param {i}")
        assert_same(optimizer.state[p]["exp_avg"], m, f"momentum {i}")
    assert statuses == [cpu_dispatch.STEPPED] * 29  # the first step made the layout
    assert not torch.equal(params[-1].detach(), start[-1])


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [{}, {"maximize": True}, {"cautious_weight_decay": True}])
def test_8bit_groups_step_in_one_cpp_call_bitwise_equal_to_python(
    param_dtype, options, statuses
) -> None:
    """8-bit momentum (big tensors) and fp32 momentum (small ones) of one group: the C++ group
    step runs both kernels; the same optimizer on the foreach path must agree bitwise."""
    generator = torch.Generator().manual_seed(5)
    shapes = [(64, 80), (300,), (4096,), (7,), (5000,), (1,)]
    start = [torch.randn(s, generator=generator).to(param_dtype) for s in shapes]
    params = [torch.nn.Parameter(t.clone()) for t in start]
    twins = [torch.nn.Parameter(t.clone()) for t in start]
    kwargs = dict(lr=0.01, weight_decay=0.5, momentum_dtype="int8", **options)
    optimizer = Lion(params, **kwargs)
    python = Lion(twins, foreach=True, **kwargs)
    for step in range(15):
        grads = [gradient(s, step, param_dtype, generator) for s in shapes]
        for p, q, g in zip(params, twins, grads):
            p.grad, q.grad = g, g.clone()
        optimizer.step()
        python.step()
    for i, (p, q) in enumerate(zip(params, twins)):
        assert_same(p.detach(), q.detach(), f"param {i}")
        for key, value in python.state[q].items():
            assert_same(optimizer.state[p][key], value, f"{key} {i}")
    assert optimizer.state[params[0]]["exp_avg"].dtype == torch.int8
    assert statuses == [cpu_dispatch.STEPPED] * 14  # the first step made the layout


def test_8bit_group_step_declines_cautious_and_goes_stale_on_a_new_format(statuses) -> None:
    generator = torch.Generator().manual_seed(6)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(5000,), (30,)]]
    optimizer = Lion(params, lr=0.01, momentum_dtype="int8", cautious=True)
    for step in range(3):
        for p in params:
            p.grad = gradient(tuple(p.shape), step, torch.float32, generator)
        optimizer.step()
    assert statuses == [cpu_dispatch.DECLINED] * 2
    statuses.clear()
    optimizer.param_groups[0]["cautious"] = False
    state = optimizer.state[params[0]]
    del state["exp_avg_scale"]  # a plain momentum now sits where 8 bits belong
    state["exp_avg"] = torch.zeros(5000)
    for step in range(3):
        for p in params:
            p.grad = gradient(tuple(p.shape), step, torch.float32, generator)
        optimizer.step()
    assert statuses == [cpu_dispatch.STALE, cpu_dispatch.STEPPED, cpu_dispatch.STEPPED]
    assert optimizer.state[params[0]]["exp_avg"].dtype == torch.int8


@pytest.mark.parametrize(
    "param_dtype, momentum_dtype",
    [
        (torch.float32, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
    ids=["fp32-bf16", "bf16-fp32", "bf16-bf16", "fp32-fp32"],
)
def test_group_step_with_a_momentum_dtype(param_dtype, momentum_dtype, statuses) -> None:
    """Also from a checkpoint in another format: the first step converts, then C++ steps."""
    generator = torch.Generator().manual_seed(11)
    start = [torch.randn(s, generator=generator).to(param_dtype) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in start]
    expected = [t.clone() for t in start]
    other = torch.float64 if momentum_dtype == torch.float32 else torch.float32
    optimizer = Lion(params, lr=0.01, weight_decay=0.5, momentum_dtype=momentum_dtype)
    for p in params:  # a momentum in another dtype, as a loaded checkpoint may hold
        optimizer.state[p]["exp_avg"] = torch.full_like(p, 0.25, dtype=other)
    moms = [torch.full_like(p, 0.25, dtype=momentum_dtype) for p in start]
    hyper = LionHyper(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.5)
    for step in range(20):
        grads = [gradient(s, step, param_dtype, generator) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g
        if step == 10:  # an exact up-cast, which the step must convert back
            state = optimizer.state[params[1]]
            state["exp_avg"] = state["exp_avg"].to(other)
        optimizer.step()
        single_tensor_lion(expected, grads, moms, hyper)
    for i, (p, e, m) in enumerate(zip(params, expected, moms)):
        assert_same(p.detach(), e, f"param {i}")
        assert_same(optimizer.state[p]["exp_avg"], m, f"momentum {i}")
    assert statuses.count(cpu_dispatch.STALE) == 1
    assert statuses.count(cpu_dispatch.STEPPED) == 18


def test_lists_step_matches_the_reference_with_per_tensor_lrs(monkeypatch) -> None:
    calls = []
    original = cpu_dispatch.lists_step
    monkeypatch.setattr(
        cpu_dispatch, "lists_step", lambda *a: calls.append(original(*a)) or calls[-1]
    )
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(s, generator=generator) for s in SHAPES]
    moms = [torch.zeros_like(p) for p in params]
    expected, expected_moms = [p.clone() for p in params], [m.clone() for m in moms]
    lrs = [1e-3 * (i + 1) for i in range(len(SHAPES))]
    hyper = LionHyper(lr=lrs, beta1=0.9, beta2=0.99, weight_decay=0.3)
    for step in range(20):
        grads = [gradient(s, step, torch.float32, generator) for s in SHAPES]
        functional.lion(params, grads, moms, lr=lrs, beta1=0.9, beta2=0.99, weight_decay=0.3)
        single_tensor_lion(expected, grads, expected_moms, hyper)
    assert calls == [True] * 20
    for i in range(len(SHAPES)):
        assert_same(params[i], expected[i], f"param {i}")
        assert_same(moms[i], expected_moms[i], f"momentum {i}")


def test_layout_survives_everything_that_changes_it(statuses) -> None:
    """A default Lion and a foreach twin, put through the same changes, stay bitwise equal."""
    torch.manual_seed(0)
    shapes = [(64, 32), (32,), (10, 10), (500,), (7,)]
    start = [torch.randn(s) for s in shapes]
    runs = {}
    for name, kwargs in (("default", {}), ("foreach", {"foreach": True})):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = Lion(params[:4], lr=0.01, weight_decay=0.2, **kwargs)
        runs[name] = (params, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 4, 0.5))
    generator = torch.Generator().manual_seed(1)
    saved = {}
    for step in range(30):
        grads = [torch.randn(s, generator=generator) for s in shapes]
        for name, (params, optimizer, scheduler) in runs.items():
            for i, (p, g) in enumerate(zip(params, grads)):
                p.grad = g.clone()
                if i == 2 and step < 5:
                    p.grad = None  # frozen: no state until its first gradient, at step 5
                if i == 1 and 8 <= step < 10:
                    p.grad = None  # frozen again, with state
            if step == 12:
                p0 = params[0]
                optimizer.state[p0]["exp_avg"] = torch.zeros_like(p0)
            if step == 13:
                optimizer.state[params[1]] = {}
            if step == 14:
                del optimizer.state[params[3]]
            if step == 15:
                params[0].data = params[0].data.clone()  # new storage
            if step == 16:
                params[3].grad = torch.randn(1000, generator=torch.Generator().manual_seed(5))[
                    ::2
                ]  # non-contiguous
            if step == 10:
                saved[name] = optimizer.state_dict()
            if step == 18:
                optimizer.load_state_dict(saved[name])
            if step == 20:
                optimizer.add_param_group({"params": [params[4]], "lr": 0.003})
            if step == 23:
                optimizer.state.clear()
            if step == 26:
                optimizer.state = defaultdict(dict)  # a plain dict: Python path from here
            optimizer.step()
            scheduler.step()
        default_params, foreach_params = runs["default"][0], runs["foreach"][0]
        for i, (a, b) in enumerate(zip(default_params, foreach_params)):
            assert torch.equal(a.detach(), b.detach()), f"step {step}: param {i} differs"
    assert statuses.count(cpu_dispatch.STEPPED) >= 12
    assert cpu_dispatch.STALE in statuses and cpu_dispatch.DECLINED in statuses


def test_a_group_the_kernel_cannot_take_is_declined_and_exact(statuses) -> None:
    torch.manual_seed(0)
    mixed = [torch.randn(30), torch.randn(30, dtype=torch.float64)]
    strided = [torch.randn(8, 8).t()]
    for start in (mixed, strided):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        twin = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = Lion(params, lr=0.01, weight_decay=0.1)
        foreach = Lion(twin, lr=0.01, weight_decay=0.1, foreach=True)
        for _ in range(5):
            for p, q in zip(params, twin):
                p.grad = torch.randn_like(p)
                q.grad = p.grad.clone()
            optimizer.step()
            foreach.step()
        for p, q in zip(params, twin):
            assert torch.equal(p.detach(), q.detach())
    assert statuses and set(statuses) == {cpu_dispatch.DECLINED}


def test_a_step_without_gradients_changes_nothing(statuses) -> None:
    params = [torch.nn.Parameter(torch.randn(10)) for _ in range(3)]
    optimizer = Lion(params, lr=0.1, weight_decay=0.5)
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer.step()
    optimizer.zero_grad()
    before = [p.detach().clone() for p in params]
    optimizer.step()
    assert statuses == [cpu_dispatch.NOTHING_TO_DO]
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))


@pytest.mark.parametrize("path", ["c++ group", "c++ lists", "python fused", "8-bit fused"])
def test_steps_bump_version_counters_so_autograd_sees_them(path, monkeypatch) -> None:
    if path == "python fused":
        monkeypatch.setattr(cpu_dispatch, "available", lambda: False)
    w = torch.nn.Parameter(torch.randn(4096))
    if path == "c++ lists":
        m = torch.zeros(4096)
        before = (w._version, m._version)
        functional.lion(
            [w], [torch.randn(4096)], [m], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0
        )
        assert w._version > before[0] and m._version > before[1]
        return
    options = {"momentum_dtype": "int8"} if path == "8-bit fused" else {}
    optimizer = Lion([w], lr=0.1, **options)
    for _ in range(2):  # the second step runs on the layout the first one made
        w.grad = torch.randn(4096)
        optimizer.step()
    loss = (w * w).sum()  # saves w for backward
    w.grad = torch.randn(4096)
    optimizer.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_a_failed_background_build_warns_once_and_steps_stay_exact(monkeypatch) -> None:
    def no_headers():
        raise RuntimeError("Python's headers are not installed")

    failing = LazyLibrary(
        cpu_dispatch._SOURCE,
        "lionopt_test_failing_dispatch",
        check=lambda lib, info: None,
        declare=lambda lib: None,
        description="C++ dispatch of the fused CPU step",
        fallback="steps get ready in Python",
        build=no_headers,
        background=True,
    )
    monkeypatch.setattr(cpu_dispatch, "_library", failing)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(20, 3), (5,)]]
    expected = [p.detach().clone() for p in params]
    moms = [torch.zeros_like(e) for e in expected]
    hyper = LionHyper(lr=0.01, beta1=0.9, beta2=0.99, weight_decay=0.1)
    optimizer = Lion(params, lr=0.01, weight_decay=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_dispatch.wait()
        for _ in range(10):
            grads = [torch.randn_like(e) for e in expected]
            for p, g in zip(params, grads):
                p.grad = g
            optimizer.step()
            single_tensor_lion(expected, grads, moms, hyper)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "C++ dispatch" in messages[0], messages
    assert all(torch.equal(p.detach(), e) for p, e in zip(params, expected))
    assert fused_cpu.available()  # the kernel itself still ran, from Python
