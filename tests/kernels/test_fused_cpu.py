"""The fused CPU kernel against the reference loop: bitwise, over many steps, every option.

The kernel is built at most once per test session (then cached on disk, see fused_cpu's
docstring); the subprocess tests use either that cache or a compiler that cannot run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from lionopt import Lion
from lionopt.kernels.cpu import dispatch as cpu_dispatch
from lionopt.kernels.cpu import plain as fused_cpu
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.reference import single_tensor_lion

STEPS = 24
# 73k elements in all: above the kernel's one-thread threshold (32768), so two threads split
# the list, with sizes that are not multiples of the vector width and an empty tensor. Each
# tensor stays below ATen's parallel grain, so the reference runs single-threaded and fast.
SHAPES = [(3,), (17,), (100, 33), (0,), (30_000,), (1,), (127, 129), (24_001,)]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not fused_cpu.available():
        if shutil.which(os.environ.get("CXX") or "c++"):
            pytest.fail(
                f"a C++ compiler exists but the kernel did not build: {fused_cpu.build_info()}"
            )
        pytest.skip("no C++ compiler on this machine")


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bitwise equality, signed zeros included; NaNs must sit at the same places."""
    if actual.is_complex():
        actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
    assert actual.dtype == expected.dtype, what
    nan_a, nan_e = actual.isnan(), expected.isnan()
    assert torch.equal(nan_a, nan_e), f"{what}: NaNs differ"
    a, e = actual.masked_fill(nan_a, 0), expected.masked_fill(nan_e, 0)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    diff = (a.view(bits) != e.view(bits)).nonzero()
    assert diff.numel() == 0, f"{what}: {len(diff)} elements differ, first at {diff[0].tolist()}"


def make_grads(step: int, dtype: torch.dtype, generator: torch.Generator) -> list[torch.Tensor]:
    grads = []
    for shape in SHAPES:
        g = torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)
        flat = g.view(-1)
        if step % 5 == 1:
            g.zero_()  # sign(c) may be 0 once momentum is 0 too
        if step == 7 and flat.numel() >= 8:
            flat[:4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0]).to(dtype)
        if flat.numel() >= 40:
            flat[20:40] = 0  # zero gradients on every step: those coordinates only decay
        grads.append(g)
    return grads


def run_both(
    param_dtype: torch.dtype,
    momentum_dtype: torch.dtype,
    *,
    steps: int = STEPS,
    lr: float | list[float] = 3e-3,
    **options,
) -> None:
    """Reference and fused kernel from the same start, each on its own tensors, no re-sync."""
    generator = torch.Generator().manual_seed(1234)
    params = [
        torch.randn(s, generator=generator, dtype=torch.float64).to(param_dtype) for s in SHAPES
    ]
    moms = [torch.zeros(s, dtype=momentum_dtype) for s in SHAPES]
    fused_params = [p.clone() for p in params]
    fused_moms = [m.clone() for m in moms]
    initial = [p.clone() for p in params]
    hyper = LionHyper(
        lr=lr, beta1=0.9, beta2=0.99, weight_decay=options.pop("weight_decay", 0.5), **options
    )
    for step in range(steps):
        grads = make_grads(step, param_dtype, generator)
        single_tensor_lion(params, grads, moms, hyper)
        assert fused_cpu.supports(fused_params, grads, fused_moms, hyper)
        fused_cpu.lion_step(fused_params, grads, fused_moms, hyper)
    for i, (p, fp, m, fm) in enumerate(zip(params, fused_params, moms, fused_moms)):
        assert_same(fp, p, f"param {i} {tuple(p.shape)}")
        assert_same(fm, m, f"momentum {i} {tuple(m.shape)}")
    # The parameters did move, so a wrong update (even of size lr) would have been seen.
    assert not torch.equal(fused_params[-1], initial[-1])


OPTIONS = {
    "plain": {},
    "no-decay": {"weight_decay": 0.0},
    "maximize": {"maximize": True},
    "cautious": {"cautious": True},
    "cautious-decay": {"cautious_weight_decay": True},
    "cautious-both": {"cautious": True, "cautious_weight_decay": True, "maximize": True},
    "per-tensor-lr": {"lr": [1e-3 * (i + 1) for i in range(len(SHAPES))]},
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("option", list(OPTIONS))
def test_bitwise_full_precision(dtype: torch.dtype, option: str) -> None:
    run_both(dtype, dtype, **dict(OPTIONS[option]))


@pytest.mark.parametrize(
    ("param_dtype", "momentum_dtype"),
    [
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float16),
        (torch.float16, torch.float32),
        (torch.float32, torch.bfloat16),
        (torch.float32, torch.float16),
    ],
    ids=["bf16", "bf16-fp32m", "fp16", "fp16-fp32m", "fp32-bf16m", "fp32-fp16m"],
)
@pytest.mark.parametrize("option", ["plain", "cautious-both", "per-tensor-lr"])
def test_bitwise_low_precision(param_dtype, momentum_dtype, option: str) -> None:
    # Larger steps so that bf16/fp16 parameters really move (see lion-notes §4).
    options = dict(OPTIONS[option])
    options.setdefault("lr", 3e-2)
    run_both(param_dtype, momentum_dtype, **options)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_bitwise_complex(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(7)
    shapes = [(5, 7), (12_000,)]
    params = [torch.randn(s, dtype=dtype, generator=generator) for s in shapes]
    moms = [torch.zeros(s, dtype=dtype) for s in shapes]
    fused_params, fused_moms = [p.clone() for p in params], [m.clone() for m in moms]
    hyper = LionHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.3, cautious=True)
    for _ in range(STEPS):
        grads = [torch.randn(s, dtype=dtype, generator=generator) for s in shapes]
        single_tensor_lion(params, grads, moms, hyper)
        fused_cpu.lion_step(fused_params, grads, fused_moms, hyper)
    for p, fp, m, fm in zip(params, fused_params, moms, fused_moms):
        assert_same(fp, p, "complex param")
        assert_same(fm, m, "complex momentum")


def test_thread_count_does_not_change_results() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run_both(torch.float32, torch.float32, steps=20)
    finally:
        torch.set_num_threads(before)


def test_default_lion_uses_the_fused_kernel(monkeypatch) -> None:
    """Without the C++ dispatch (test_cpu_dispatch covers it), one kernel call per step."""
    monkeypatch.setattr(cpu_dispatch, "available", lambda: False)
    calls = []
    original = fused_cpu.lion_step

    def spy(params, grads, exp_avgs, hyper):
        calls.append(len(params))
        original(params, grads, exp_avgs, hyper)

    monkeypatch.setattr(fused_cpu, "lion_step", spy)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(64, 32), (32,), (1000,)]]
    expected = [p.detach().clone() for p in params]
    moms = [torch.zeros_like(p) for p in expected]
    optimizer = Lion(params, lr=1e-2, weight_decay=0.1)
    hyper = LionHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
    for _ in range(20):
        grads = [torch.randn_like(p) for p in params]
        for p, g in zip(params, grads):
            p.grad = g
        optimizer.step()
        single_tensor_lion(expected, grads, moms, hyper)
    assert calls == [3] * 20  # one call per step for the whole group
    for p, e in zip(params, expected):
        assert_same(p.detach(), e, "Lion() default path")
    for p, m in zip(params, moms):
        assert_same(optimizer.state[p]["exp_avg"], m, "Lion() default momentum")


def test_supports_declines_what_it_cannot_do() -> None:
    hyper = LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)
    p = torch.randn(8, 6)
    assert fused_cpu.supports([p], [torch.randn(8, 6)], [torch.zeros(8, 6)], hyper)
    ints = torch.zeros(3, dtype=torch.int32)
    assert not fused_cpu.supports([ints], [ints], [ints], hyper)
    half_grad = ([p], [torch.randn(8, 6, dtype=torch.float16)], [torch.zeros(8, 6)])
    assert not fused_cpu.supports(*half_grad, hyper)
    assert not fused_cpu.supports([p], [p, p], [p], hyper)
    bf16 = torch.zeros(4, dtype=torch.bfloat16)
    assert fused_cpu.supports([bf16], [bf16], [bf16], hyper)
    rounded = LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, rounding_keys=[1])
    assert not fused_cpu.supports([bf16], [bf16], [bf16], rounded)


def test_tensors_the_kernel_cannot_take_go_to_foreach() -> None:
    hyper = LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0)
    cautious = LionHyper(lr=1e-3, beta1=0.9, beta2=0.99, weight_decay=0.0, cautious=True)
    ok = torch.zeros(8, 6)
    strided = torch.zeros(6, 8).t()
    conj = torch.zeros(4, dtype=torch.complex64).conj()
    assert fused_cpu._check([ok, strided], [ok, ok], [ok, ok], hyper, 0)[0] == {1}
    assert fused_cpu._check([ok, ok], [ok, torch.zeros(3)], [ok, ok], hyper, 0)[0] == {1}
    c = torch.zeros(4, dtype=torch.complex64)
    assert fused_cpu._check([c, c], [c, conj], [c, c], hyper, 0)[0] == {1}
    # Cautious on a huge fp32 tensor: the reference's fp32 mask sum is not exact there.
    big = torch.empty(2**24 + 1)
    assert fused_cpu._check([ok, big], [ok, big], [ok, big], hyper, 0)[0] == set()
    assert fused_cpu._check([ok, big], [ok, big], [ok, big], cautious, 0)[0] == {1}
    doubles = [torch.empty(2**24 + 1, dtype=torch.float64)] * 3
    assert fused_cpu._check(doubles, doubles, doubles, cautious, 1)[0] == set()
    meta = torch.empty(8, 6, device="meta")  # a pointer from another device must never be read
    assert fused_cpu._check([ok, ok], [ok, meta], [ok, ok], hyper, 0)[0] == {1}


@pytest.mark.parametrize("option", ["plain", "cautious-both", "per-tensor-lr"])
def test_mixed_group_is_exact(option: str) -> None:
    """A group with non-contiguous params and grads: the kernel takes the rest."""
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(40, 30, dtype=torch.complex64, generator=generator)
    params = [
        torch.randn(50, dtype=torch.complex64, generator=generator),
        base.t(),  # non-contiguous
        torch.randn(33_000, dtype=torch.complex64, generator=generator),
    ]
    moms = [torch.zeros_like(p) for p in params]
    fused_params = [p.clone() for p in params]  # clone keeps the transposed strides
    fused_moms = [m.clone() for m in moms]
    assert not fused_params[1].is_contiguous()
    options = dict(OPTIONS[option])
    lr = options.pop("lr", 1e-2)
    lr = lr[: len(params)] if isinstance(lr, list) else lr
    hyper = LionHyper(lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.2, **options)
    for _ in range(STEPS):
        grads = [torch.randn(p.shape, dtype=p.dtype, generator=generator) for p in params]
        grads[2] = torch.randn(66_000, dtype=torch.complex64, generator=generator)[::2]
        single_tensor_lion(params, grads, moms, hyper)
        assert fused_cpu.supports(fused_params, grads, fused_moms, hyper)
        fused_cpu.lion_step(fused_params, grads, fused_moms, hyper)
    for i, (p, fp, m, fm) in enumerate(zip(params, fused_params, moms, fused_moms)):
        assert_same(fp, p, f"param {i}")
        assert_same(fm, m, f"momentum {i}")


def test_stream_kernel_touches_every_element() -> None:
    p, g, m = torch.ones(70_001), torch.full((70_001,), 2.0), torch.zeros(70_001)
    fused_cpu.stream_step([p], [g], [m])
    assert torch.equal(p, torch.full_like(p, 3.0)) and torch.equal(m, torch.full_like(m, -2.0))


def _run_python(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_second_process_loads_the_cached_build_and_import_builds_nothing() -> None:
    code = """
        import lionopt
        from lionopt.kernels.cpu import dispatch as cpu_dispatch
        from lionopt.kernels.cpu import plain as fused_cpu
        assert fused_cpu._library.state is None, "importing lionopt built or loaded the kernel"
        assert cpu_dispatch._library._thread is None, "importing lionopt started a build"
        assert fused_cpu.available()
        assert cpu_dispatch.wait(), "the C++ dispatch did not load from the cache"
        assert not cpu_dispatch.build_info()["compiled"], cpu_dispatch.build_info()
        info = fused_cpu.build_info()
        assert not info["compiled"], info
        assert info["seconds"] < 1.0, info
        print("OK", info["seconds"])
    """
    result = _run_python(code, {})  # same environment, so the same cache as this session
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_a_background_build_outlives_a_short_process(tmp_path) -> None:
    """A process that exits while the C++ dispatch builds still leaves the build cached."""
    code = """
        from lionopt.kernels.cpu import dispatch as cpu_dispatch
        assert not cpu_dispatch.available()  # building in the background; exit at once
        print("OK")
    """
    result = _run_python(code, {"LIONOPT_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
    deadline = time.monotonic() + 240
    while not list(tmp_path.rglob("lion_cpu_dispatch.so")) and time.monotonic() < deadline:
        time.sleep(1)
    assert list(tmp_path.rglob("lion_cpu_dispatch.so")), list(tmp_path.rglob("*"))
    code = """
        from lionopt.kernels.cpu import dispatch as cpu_dispatch
        assert cpu_dispatch.wait(60) and not cpu_dispatch.build_info()["compiled"]
        print("OK")
    """
    result = _run_python(code, {"LIONOPT_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]


def test_no_compiler_falls_back_with_one_warning(tmp_path) -> None:
    code = """
        import warnings
        import torch
        from lionopt import Lion
        from lionopt.kernels.hyper import LionHyper
        from lionopt.kernels.reference import single_tensor_lion

        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s)) for s in [(30, 20), (7,)]]
        expected = [p.detach().clone() for p in params]
        moms = [torch.zeros_like(e) for e in expected]
        hyper = LionHyper(lr=1e-2, beta1=0.9, beta2=0.99, weight_decay=0.1)
        optimizer = Lion(params, lr=1e-2, weight_decay=0.1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(20):
                grads = [torch.randn_like(e) for e in expected]
                for p, g in zip(params, grads):
                    p.grad = g
                optimizer.step()
                single_tensor_lion(expected, grads, moms, hyper)
        runtime = [w for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(runtime) == 1, [str(w.message) for w in caught]
        assert "fused CPU" in str(runtime[0].message)
        assert all(torch.equal(p.detach(), e) for p, e in zip(params, expected))
        print("OK")
    """
    result = _run_python(code, {"CXX": "/nonexistent/c++", "LIONOPT_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-2000:]
    assert not any(tmp_path.rglob("*.so"))
