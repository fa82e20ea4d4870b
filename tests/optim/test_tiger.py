"""Tiger: float64 golden math, parity across implementations, accumulation, the guard, state.

The golden model below is Tiger written out from the blog's equations (kexue.fm/archives/9512)
in float64, sharing no code with lionopt. Gradients depend on each run's own parameters, and
the reference is never re-synced, so one wrong update anywhere shows in every later step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lionopt import Lion
from lionopt.optim import Tiger, tiger_param_groups

from support import IMPLEMENTATIONS

pytestmark = pytest.mark.filterwarnings("ignore:lionopt.*fused:RuntimeWarning")

ALPHA, BETA, DECAY, FLOOR, SHRINK = 2e-2, 0.9, 0.5, 1e-3, 0.99
KINDS = ("weight", "zero_weight", "embedding", "bias", "gain")
UPDATES = 20


def make_tensors(dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    rows = torch.logspace(-2, 0, 6, dtype=torch.float64).unsqueeze(1)  # rows of different scales
    return {
        "weight": (torch.randn(5, 4, generator=gen, dtype=torch.float64) * 0.3).to(dtype),
        "zero_weight": torch.zeros(3, 4, dtype=dtype),
        "embedding": (torch.randn(6, 4, generator=gen, dtype=torch.float64) * rows).to(dtype),
        "bias": (torch.randn(4, generator=gen, dtype=torch.float64) * 0.1).to(dtype),
        "gain": torch.ones(4, dtype=dtype),
    }


def gradient(name: str, theta: torch.Tensor, step: int) -> torch.Tensor:
    """A gradient that depends on theta (pull to a target) plus seeded noise."""
    gen = torch.Generator().manual_seed(1000 * step + KINDS.index(name))
    target = torch.full_like(theta, 0.2)
    noise = torch.randn(theta.shape, generator=gen, dtype=torch.float64).to(theta.dtype)
    return (theta - target) + 0.5 * noise


def golden_tiger(
    tensors: dict[str, torch.Tensor], accum: int, micro_steps: int, bad: dict[int, str]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Tiger in float64; ``bad[step] = name`` makes that tensor's gradient NaN at that step."""
    theta = {k: v.clone().double() for k, v in tensors.items()}
    mom = {k: torch.zeros_like(v) for k, v in theta.items()}
    for step in range(micro_steps):
        first, last = step % accum == 0, step % accum == accum - 1
        for name in KINDS:
            g = gradient(name, theta[name], step)
            if bad.get(step) == name:
                g = g.clone()
                g[0] = math.nan
            if not torch.isfinite(g).all():
                centre = 1.0 if name == "gain" else 0.0
                theta[name] = (theta[name] - centre) * SHRINK + centre
                continue
            if first:
                mom[name] = BETA * mom[name]
            mom[name] = mom[name] + (1 - BETA) / accum * g
            if not last:
                continue
            decay = DECAY
            if name in ("bias", "gain"):
                lr, decay = 0.5 * ALPHA, 0.0
            elif name == "embedding":
                rms = theta[name].pow(2).mean(dim=1, keepdim=True).sqrt()
                lr = ALPHA * torch.clamp(rms, min=FLOOR)
            else:
                lr = ALPHA * max(theta[name].pow(2).mean().sqrt().item(), FLOOR)
            theta[name] = theta[name] - lr * (torch.sign(mom[name]) + decay * theta[name])
    return theta, mom


def tiger_groups(params: dict[str, nn.Parameter]) -> list[dict]:
    return [
        {"params": [params["weight"], params["zero_weight"]]},
        {"params": [params["embedding"]], "embedding": True},
        {"params": [params["bias"]], "bias_or_gain": True},
        {"params": [params["gain"]], "bias_or_gain": True, "init_centre": 1.0},
    ]


def run_tiger(
    implementation: str,
    accum: int,
    micro_steps: int,
    bad: dict[int, str] | None = None,
    dtype=torch.float64,
    start: int = 0,
    state: tuple | None = None,
) -> tuple[dict[str, nn.Parameter], Tiger]:
    bad = bad or {}
    if state is None:
        params = {k: nn.Parameter(v) for k, v in make_tensors(dtype).items()}
        opt = Tiger(
            tiger_groups(params),
            lr=ALPHA,
            beta=BETA,
            weight_decay=DECAY,
            accum_steps=accum,
            rms_floor=FLOOR,
            shrink_ratio=SHRINK,
            **IMPLEMENTATIONS[implementation],
        )
    else:
        params, opt = state
    for step in range(start, start + micro_steps):
        for name, p in params.items():
            g = gradient(name, p.detach(), step)
            if bad.get(step) == name:
                g[0] = math.nan
            p.grad = g
        opt.step()
    return params, opt


def assert_matches_golden(params, opt, theta, mom, atol=1e-12) -> None:
    for name, p in params.items():
        torch.testing.assert_close(p.detach(), theta[name], rtol=0, atol=atol, msg=name)
        torch.testing.assert_close(opt.state[p]["exp_avg"], mom[name], rtol=0, atol=atol, msg=name)


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("accum", [1, 3])
def test_golden_float64(implementation: str, accum: int) -> None:
    micro_steps = UPDATES * accum
    params, opt = run_tiger(implementation, accum, micro_steps)
    theta, mom = golden_tiger(make_tensors(), accum, micro_steps, bad={})
    assert_matches_golden(params, opt, theta, mom)
    # The zero-initialised matrix moved thanks to the floor.
    assert params["zero_weight"].abs().min() > 0


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("accum", [1, 3])
def test_golden_with_nonfinite_gradients(implementation: str, accum: int) -> None:
    # NaNs on a first, a middle and a last micro-step, in tensors of every kind.
    bad = {0: "weight", 4: "gain", 5: "embedding", 7: "bias", 9: "zero_weight", 11: "gain"}
    micro_steps = 8 * accum
    params, opt = run_tiger(implementation, accum, micro_steps, bad=bad)
    theta, mom = golden_tiger(make_tensors(), accum, micro_steps, bad=bad)
    assert_matches_golden(params, opt, theta, mom)


@pytest.mark.parametrize("accum", [1, 2])
def test_implementations_bitwise_equal_float32(accum: int) -> None:
    runs = [run_tiger(impl, accum, 10 * accum, dtype=torch.float32) for impl in IMPLEMENTATIONS]
    (ref_params, ref_opt), *others = runs
    for params, opt in others:
        for name, p in params.items():
            assert torch.equal(p, ref_params[name]), name
            assert torch.equal(opt.state[p]["exp_avg"], ref_opt.state[ref_params[name]]["exp_avg"])


def test_nonfinite_guard_keeps_momentum_and_shrinks_to_centre() -> None:
    weight = nn.Parameter(torch.randn(3, 3))
    gain = nn.Parameter(torch.full((3,), 2.0))
    healthy = nn.Parameter(torch.randn(3, 3))
    opt = Tiger(
        [
            {"params": [weight, healthy]},
            {"params": [gain], "bias_or_gain": True, "init_centre": 1.0},
        ],
        lr=1e-2,
    )
    for p in (weight, gain, healthy):
        p.grad = torch.randn_like(p)
    opt.step()
    before = {id(p): (p.detach().clone(), opt.state[p]["exp_avg"].clone()) for p in opt.state}
    weight.grad = torch.randn_like(weight)
    weight.grad[1, 1] = math.inf
    gain.grad = torch.full_like(gain, math.nan)
    healthy.grad = torch.randn_like(healthy)
    opt.step()
    for p, centre in ((weight, 0.0), (gain, 1.0)):
        theta0, m0 = before[id(p)]
        assert torch.equal(opt.state[p]["exp_avg"], m0)
        torch.testing.assert_close(p.detach(), (theta0 - centre) * 0.99 + centre)
    assert not torch.equal(healthy.detach(), before[id(healthy)][0])


@settings(max_examples=25, deadline=None)
@given(
    accum=st.integers(1, 5),
    beta=st.floats(0.5, 0.99),
    seed=st.integers(0, 2**16),
)
def test_accumulation_equals_one_step_on_the_mean_gradient(accum, beta, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    accumulating = Tiger([a], lr=1e-2, beta=beta, weight_decay=0.1, accum_steps=accum)
    plain = Tiger([b], lr=1e-2, beta=beta, weight_decay=0.1)
    for _ in range(6):
        grads = torch.randn(accum, 4, 6, generator=gen, dtype=torch.float64)
        for i in range(accum):
            before = a.detach().clone()
            a.grad = grads[i]
            accumulating.step()
            if i < accum - 1:  # no update before the last micro-step
                assert torch.equal(a.detach(), before)
        b.grad = grads.mean(0)
        plain.step()
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(
            accumulating.state[a]["exp_avg"], plain.state[b]["exp_avg"], rtol=0, atol=1e-14
        )


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_bias_group_is_lion_with_half_lr_bitwise(implementation: str) -> None:
    init = torch.randn(64)
    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    tiger = Tiger(
        [{"params": [a], "bias_or_gain": True}],
        lr=1e-2,
        beta=0.95,
        weight_decay=0.3,
        **IMPLEMENTATIONS[implementation],
    )
    lion = Lion([b], lr=5e-3, betas=(0.95, 0.95), **IMPLEMENTATIONS[implementation])
    for _ in range(20):
        g = torch.randn(64)
        a.grad, b.grad = g, g.clone()
        tiger.step()
        lion.step()
    assert torch.equal(a, b)
    assert torch.equal(tiger.state[a]["exp_avg"], lion.state[b]["exp_avg"])


@pytest.mark.parametrize("implementation", list(IMPLEMENTATIONS))
def test_state_dict_round_trip_mid_accumulation(implementation: str) -> None:
    accum, total, split = 3, 30, 13  # split inside an accumulation window
    whole, whole_opt = run_tiger(implementation, accum, total, dtype=torch.float32)

    first, first_opt = run_tiger(implementation, accum, split, dtype=torch.float32)
    saved = copy.deepcopy(first_opt.state_dict())
    params = {k: nn.Parameter(v.detach().clone()) for k, v in first.items()}
    fresh = Tiger(tiger_groups(params), lr=0.5, beta=0.5, accum_steps=accum)
    fresh.load_state_dict(saved)
    assert [g["micro_step"] for g in fresh.param_groups] == [split % accum] * 4
    resumed, resumed_opt = run_tiger(
        implementation, accum, total - split, start=split, state=(params, fresh)
    )
    for name, p in resumed.items():
        assert torch.equal(p, whole[name]), name
        assert torch.equal(resumed_opt.state[p]["exp_avg"], whole_opt.state[whole[name]]["exp_avg"])


def test_zero_initialised_tensor_moves_by_the_floor() -> None:
    p = nn.Parameter(torch.zeros(10))
    p2 = nn.Parameter(torch.zeros(2, 5))
    opt = Tiger([p, p2], lr=1e-2, rms_floor=1e-3)
    p.grad = torch.ones(10)
    p2.grad = -torch.ones(2, 5)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((10,), -1e-5))
    torch.testing.assert_close(p2.detach(), torch.full((2, 5), 1e-5))


def test_bfloat16_parameters_follow_the_float32_run() -> None:
    params, _ = run_tiger("foreach", 2, 8, dtype=torch.bfloat16)
    reference, _ = run_tiger("foreach", 2, 8, dtype=torch.float32)
    for name, p in params.items():
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p.float(), reference[name], rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": -1.0}, "Invalid learning rate: -1.0"),
        ({"lr": math.nan}, "Invalid learning rate"),
        ({"beta": 1.0}, "Invalid beta value: 1.0"),
        ({"beta": -0.1}, "Invalid beta value: -0.1"),
        ({"weight_decay": -0.1}, "Invalid weight_decay value: -0.1"),
        ({"accum_steps": 0}, "Invalid accum_steps value: 0"),
        ({"accum_steps": 2.0}, "Invalid accum_steps value: 2.0"),
        ({"accum_steps": True}, "Invalid accum_steps value: True"),
        ({"rms_floor": 0.0}, "Invalid rms_floor value: 0.0"),
        ({"shrink_ratio": 1.5}, "Invalid shrink_ratio value: 1.5"),
        ({"foreach": True, "fused": True}, "cannot be `True` together"),
    ],
)
def test_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        Tiger([nn.Parameter(torch.zeros(2))], **kwargs)


def test_group_validation() -> None:
    p = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="both `embedding` and `bias_or_gain`"):
        Tiger([{"params": [p], "embedding": True, "bias_or_gain": True}])
    opt = Tiger([p])
    with pytest.raises(ValueError, match="Invalid beta value: 2"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "beta": 2})


class HandWrittenRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def test_tiger_param_groups_marks_kinds() -> None:
    embed = nn.Embedding(10, 8)
    linear = nn.Linear(8, 8)
    norm = nn.LayerNorm(8)
    rms = HandWrittenRMSNorm(8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = embed.weight  # tied
    model = nn.Sequential(embed, linear, norm, rms, head)
    groups = {g["name"]: g for g in tiger_param_groups(model)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["weight"] == {id(linear.weight)}
    assert ids["embedding"] == {id(embed.weight)} and groups["embedding"]["embedding"]
    assert ids["bias"] == {id(linear.bias), id(norm.bias)} and groups["bias"]["bias_or_gain"]
    assert ids["gain"] == {id(norm.weight), id(rms.weight)}
    assert groups["gain"]["init_centre"] == 1.0 and groups["gain"]["bias_or_gain"]
    opt = Tiger(tiger_param_groups(model), lr=1e-3)
    model(torch.arange(10)).sum().backward()
    opt.step()
