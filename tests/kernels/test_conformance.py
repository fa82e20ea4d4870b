"""Every registered fused backend against the reference, bitwise, on every case it claims.

For each backend in ``lionopt.kernels.registry`` and each case below (device, momentum kind,
dtypes, options), if the backend says it ``supports`` the group, five steps of
``backend.step`` (fresh gradients each step, weight decay > 0) must equal five steps of
``kernels.reference.single_tensor`` bitwise, parameters and momenta (codes and scales for 8-bit).

``MUST_TAKE`` names, per backend, cases it has to claim, so a backend cannot pass by claiming
nothing; every registered backend must have an entry. Backends that cannot run here (the CUDA
ones on a CPU machine; they are checked under the Triton interpreter in ``test_triton*.py``)
are skipped, except where ``LIONOPT_REQUIRE_FUSED=1`` requires the CPU ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest
import torch

from lionopt.kernels import registry
from lionopt.kernels.group import TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.kernels.reference import single_tensor
from lionopt.kernels.rounding import rounding_key
from lionopt.state.formats import INT8_KIND, PLAIN_KIND
from lionopt.state.int8 import quantize

F32, BF16, F16, F64 = torch.float32, torch.bfloat16, torch.float16, torch.float64
SIZES = (1, 300, 4096, 5000, 17)


@dataclass(frozen=True)
class Case:
    name: str
    kind: str
    param: torch.dtype
    momentum: torch.dtype  # plain momenta; 8-bit cases keep int8 codes
    options: dict = field(default_factory=dict)
    per_tensor_lr: bool = False
    rounding: bool = False
    device: str = "cpu"


CASES = [
    Case("fp32", PLAIN_KIND, F32, F32),
    Case("fp32-maximize", PLAIN_KIND, F32, F32, {"maximize": True}),
    Case("fp32-cautious", PLAIN_KIND, F32, F32, {"cautious": True}),
    Case("fp32-cautious-decay", PLAIN_KIND, F32, F32, {"cautious_weight_decay": True}),
    Case("fp32-lrs", PLAIN_KIND, F32, F32, per_tensor_lr=True),
    Case("fp64", PLAIN_KIND, F64, F64),
    Case("bf16", PLAIN_KIND, BF16, BF16),
    Case("bf16-fp32m", PLAIN_KIND, BF16, F32),
    Case("fp16", PLAIN_KIND, F16, F16),
    Case("fp32-bf16m", PLAIN_KIND, F32, BF16),
    Case("bf16-rounding", PLAIN_KIND, BF16, BF16, rounding=True),
    Case("bf16-fp32m-rounding", PLAIN_KIND, BF16, F32, rounding=True),
    Case("bf16-rounding-lrs", PLAIN_KIND, BF16, F32, rounding=True, per_tensor_lr=True),
    Case("int8-fp32", INT8_KIND, F32, torch.int8),
    Case("int8-fp32-maximize", INT8_KIND, F32, torch.int8, {"maximize": True}),
    Case("int8-fp32-cautious-decay", INT8_KIND, F32, torch.int8, {"cautious_weight_decay": True}),
    Case("int8-fp32-lrs", INT8_KIND, F32, torch.int8, per_tensor_lr=True),
    Case("int8-bf16", INT8_KIND, BF16, torch.int8),
    Case("int8-bf16-rounding", INT8_KIND, BF16, torch.int8, rounding=True),
]
CASE_NAMES = {case.name for case in CASES}

MUST_TAKE = {
    "cpu": [
        "fp32",
        "fp32-maximize",
        "fp32-cautious",
        "fp32-cautious-decay",
        "fp32-lrs",
        "fp64",
        "bf16",
        "bf16-fp32m",
        "fp16",
        "fp32-bf16m",
    ],
    "cpu-rounding": ["bf16-rounding", "bf16-fp32m-rounding", "bf16-rounding-lrs"],
    "cpu-int8": [
        "int8-fp32",
        "int8-fp32-maximize",
        "int8-fp32-cautious-decay",
        "int8-fp32-lrs",
        "int8-bf16",
        "int8-bf16-rounding",
    ],
    # Run under the Triton interpreter in test_triton*.py (they need CUDA here).
    "cuda": ["fp32", "bf16", "bf16-fp32m"],
    "cuda-rounding": ["bf16-rounding", "bf16-fp32m-rounding"],
    "cuda-int8": ["int8-fp32", "int8-bf16", "int8-bf16-rounding"],
}


def _make(case: Case, seed: int):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=gen).to(case.param) for n in SIZES]
    if case.kind == INT8_KIND:
        pairs = [quantize(torch.randn(n, generator=gen) * 0.1) for n in SIZES]
        momenta = [codes for codes, _ in pairs]
        scales = [s for _, s in pairs]
    else:
        momenta = [(torch.randn(n, generator=gen) * 0.1).to(case.momentum) for n in SIZES]
        scales = None
    return params, momenta, scales


def _hyper(case: Case, step: int) -> LionHyper:
    lr = [1e-2 * (i + 1) for i in range(len(SIZES))] if case.per_tensor_lr else 1e-2
    keys = [rounding_key(3, step, i) for i in range(len(SIZES))] if case.rounding else None
    return LionHyper(
        lr=lr, beta1=0.9, beta2=0.99, weight_decay=0.5, rounding_keys=keys, **case.options
    )


def _group(case: Case, params, grads, momenta, scales) -> TensorGroup:
    return TensorGroup(params, grads, momenta, case.kind, scales, list(range(len(params))))


def _claims(backend: registry.Backend, case: Case) -> bool:
    if backend.device != case.device or case.kind not in backend.formats:
        return False
    if case.rounding and case.param == BF16 and not backend.rounding:
        return False
    params, momenta, scales = _make(case, 0)
    grads = [torch.randn_like(p) for p in params]
    return backend.supports(_group(case, params, grads, momenta, scales), _hyper(case, 0))


def _require_available(backend: registry.Backend) -> None:
    if backend.available():
        return
    if backend.device == "cpu" and os.environ.get("LIONOPT_REQUIRE_FUSED") == "1":
        pytest.fail(f"LIONOPT_REQUIRE_FUSED=1 but backend {backend.name} is unavailable")
    pytest.skip(f"backend {backend.name} cannot run here")


BACKENDS = registry.backends()


def test_every_backend_has_a_must_take_list() -> None:
    names = [b.name for b in BACKENDS]
    assert len(names) == len(set(names))
    assert set(names) == set(MUST_TAKE), "add the new backend to MUST_TAKE"
    for cases in MUST_TAKE.values():
        assert cases and set(cases) <= CASE_NAMES


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_backend_claims_its_must_take_cases(backend: registry.Backend) -> None:
    _require_available(backend)
    missing = [
        c.name for c in CASES if c.name in MUST_TAKE[backend.name] and not _claims(backend, c)
    ]
    assert not missing, f"{backend.name} declines {missing}"


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.name)
def test_backend_equals_the_reference_on_every_case_it_claims(backend: registry.Backend) -> None:
    _require_available(backend)
    claimed = [c for c in CASES if _claims(backend, c)]
    assert claimed
    for case in claimed:
        params, momenta, scales = _make(case, 1)
        ref_params = [p.clone() for p in params]
        ref_momenta = [m.clone() for m in momenta]
        ref_scales = None if scales is None else [s.clone() for s in scales]
        gen = torch.Generator().manual_seed(2)
        for step in range(5):
            grads = [torch.randn(p.shape, generator=gen).to(case.param) for p in params]
            hyper = _hyper(case, step)
            group = _group(case, params, grads, momenta, scales)
            assert backend.supports(group, hyper), case.name
            backend.step(group, hyper)
            single_tensor(_group(case, ref_params, grads, ref_momenta, ref_scales), hyper)
        for i, (p, ref) in enumerate(zip(params, ref_params)):
            assert torch.equal(p, ref), (case.name, "param", i)
            assert torch.equal(momenta[i], ref_momenta[i]), (case.name, "momentum", i)
            if scales is not None:
                assert torch.equal(scales[i], ref_scales[i]), (case.name, "scale", i)
