"""``Lion(momentum_dtype=...)``: options, state layout, drift over a real training run, and
checkpoints that convert between formats."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from lionopt import Lion
from lionopt.kernels import quantized
from quant_support import STEPS, fp32_run, lion_factory, train

# Drift bounds over 500 steps (measured: 8-bit 1.3% / 1.7% sign flips and +1.6% final loss;
# bf16 0.07% / 0.12% and 0.0%).
LOSS_TOLERANCE = {"bf16": 0.02, "int8": 0.05}  # relative, final training-set loss
SHADOW_FLIPS = {"bf16": 0.005, "int8": 0.03}  # vs an exact momentum along the same run
RUN_FLIPS = {"bf16": 0.01, "int8": 0.05}  # vs the fp32 run


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (torch.float32, torch.float32),
        ("fp32", torch.float32),
        (torch.bfloat16, torch.bfloat16),
        ("BF16", torch.bfloat16),
        ("int8", "int8"),
        ("8bit", "int8"),
        (torch.int8, "int8"),
    ],
)
def test_momentum_dtype_is_normalised(value, expected):
    optimizer = Lion([torch.nn.Parameter(torch.zeros(3))], momentum_dtype=value)
    assert optimizer.param_groups[0]["momentum_dtype"] == expected


@pytest.mark.parametrize("value", ["fp16", torch.float16, "int4", 8, torch.float64])
def test_invalid_momentum_dtype_raises(value):
    with pytest.raises(ValueError, match="Invalid momentum_dtype value"):
        Lion([torch.nn.Parameter(torch.zeros(3))], momentum_dtype=value)
    optimizer = Lion([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="Invalid momentum_dtype value"):
        optimizer.add_param_group(
            {"params": [torch.nn.Parameter(torch.zeros(2))], "momentum_dtype": value}
        )


def _stepped(momentum_dtype, shapes=((64, 80), (10,)), dtype=torch.float32, steps=1):
    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in shapes]
    optimizer = Lion(params, lr=1e-3, momentum_dtype=momentum_dtype)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
    return optimizer, params


@pytest.mark.parametrize(
    ("momentum_dtype", "param_dtype", "expected"),
    [
        (None, torch.float32, torch.float32),
        (None, torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.bfloat16, torch.float32),
        (torch.bfloat16, torch.float32, torch.bfloat16),
    ],
)
def test_float_momentum_dtypes(momentum_dtype, param_dtype, expected):
    optimizer, params = _stepped(momentum_dtype, dtype=param_dtype)
    for p in params:
        state = optimizer.state[p]
        assert state["exp_avg"].dtype == expected and state["exp_avg"].shape == p.shape
        assert "exp_avg_scale" not in state


def test_int8_state_layout():
    optimizer, (big, small) = _stepped("int8", shapes=((64, 80), (100,)))
    state = optimizer.state[big]
    assert state["exp_avg"].dtype == torch.int8
    assert state["exp_avg"].shape == (quantized.padded_numel(64 * 80),)  # 5120 = 20 blocks
    assert state["exp_avg_scale"].dtype == torch.float32
    assert state["exp_avg_scale"].shape == (20,)
    # below MIN_NUMEL the momentum stays fp32
    assert optimizer.state[small]["exp_avg"].dtype == torch.float32
    assert "exp_avg_scale" not in optimizer.state[small]


@pytest.mark.parametrize("momentum_dtype", ["bf16", "int8"])
def test_drift_over_training_stays_bounded(momentum_dtype):
    """500 steps on real data: final loss and sign(c) agreement against fp32 momentum."""
    reference = fp32_run()
    run = train(lion_factory(momentum_dtype=momentum_dtype), shadow=True)
    assert run.signs.shape[0] == STEPS
    assert reference.final_loss < 0.5  # the task is learnt at all
    relative = abs(run.final_loss - reference.final_loss) / reference.final_loss
    assert relative < LOSS_TOLERANCE[momentum_dtype], (run.final_loss, reference.final_loss)
    assert 0 < run.shadow_flips < SHADOW_FLIPS[momentum_dtype], run.shadow_flips
    run_flips = (run.signs != reference.signs).float().mean().item()
    assert run_flips < RUN_FLIPS[momentum_dtype], run_flips


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _train_steps(optimizer, params, steps, seed):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)
        optimizer.step()


def _fresh(params, **options):
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    return Lion(copies, lr=1e-3, **options), copies


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_int8_state_dict_round_trip_is_exact_and_training_continues_bitwise(param_dtype):
    options = dict(momentum_dtype="int8", stochastic_rounding=param_dtype == torch.bfloat16)
    start = [
        torch.nn.Parameter(torch.randn(64, 80).to(param_dtype)),
        torch.nn.Parameter(torch.randn(7)),
    ]
    uninterrupted, params_a = _fresh(start, **options)
    _train_steps(uninterrupted, params_a, 5, seed=1)
    saved = _roundtrip(uninterrupted.state_dict())
    resumed, params_b = _fresh([p.detach() for p in params_a], **options)
    resumed.load_state_dict(saved)
    for pa, pb in zip(params_a, params_b):
        for key, value in uninterrupted.state[pa].items():
            assert torch.equal(resumed.state[pb][key], value), key
            assert resumed.state[pb][key].dtype == value.dtype
    _train_steps(uninterrupted, params_a, 5, seed=2)
    _train_steps(resumed, params_b, 5, seed=2)
    for pa, pb in zip(params_a, params_b):
        assert torch.equal(pa, pb)
        for key, value in uninterrupted.state[pa].items():
            assert torch.equal(resumed.state[pb][key], value), key


def test_fp32_checkpoint_loads_into_int8_optimizer_quantised():
    source, params = _stepped(None, steps=3)
    target, _ = _fresh(params, momentum_dtype="int8")
    target.load_state_dict(_roundtrip(source.state_dict()))
    assert target.param_groups[0]["momentum_dtype"] == "int8"  # the optimizer's, not the file's
    big, small = target.param_groups[0]["params"]
    codes, scales = quantized.quantize(source.state[params[0]]["exp_avg"])
    assert torch.equal(target.state[big]["exp_avg"], codes)
    assert torch.equal(target.state[big]["exp_avg_scale"], scales)
    assert torch.equal(target.state[small]["exp_avg"], source.state[params[1]]["exp_avg"])
    for p in target.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    target.step()  # and it trains on


@pytest.mark.parametrize("target_dtype", [None, torch.float32, torch.bfloat16])
def test_int8_checkpoint_loads_into_float_optimizer_dequantised(target_dtype):
    source, params = _stepped("int8", steps=3)
    target, _ = _fresh(params, momentum_dtype=target_dtype)
    target.load_state_dict(_roundtrip(source.state_dict()))
    big = target.param_groups[0]["params"][0]
    state = source.state[params[0]]
    expected = quantized.dequantize(state["exp_avg"], state["exp_avg_scale"])[: big.numel()]
    loaded = target.state[big]
    assert "exp_avg_scale" not in loaded
    assert loaded["exp_avg"].dtype == (target_dtype or torch.float32)
    assert loaded["exp_avg"].shape == big.shape
    assert torch.equal(loaded["exp_avg"], expected.view(big.shape).to(loaded["exp_avg"].dtype))


def test_fp32_momentum_of_bf16_weights_survives_load():
    """torch.optim would cast the state to the parameter's dtype (bf16); the hook keeps fp32."""
    source, params = _stepped(torch.float32, dtype=torch.bfloat16, steps=3)
    target, _ = _fresh(params, momentum_dtype=torch.float32)
    target.load_state_dict(_roundtrip(source.state_dict()))
    for p_source, p_target in zip(params, target.param_groups[0]["params"]):
        assert torch.equal(target.state[p_target]["exp_avg"], source.state[p_source]["exp_avg"])
        assert target.state[p_target]["exp_avg"].dtype == torch.float32


def test_user_load_state_dict_hooks_still_run_and_copies_convert():
    source, params = _stepped(None, steps=2)
    target, _ = _fresh(params, momentum_dtype="int8")
    calls = []
    target.register_load_state_dict_pre_hook(lambda opt, sd: calls.append("pre"))
    target.register_load_state_dict_post_hook(lambda opt: calls.append("post"))
    duplicate = copy.deepcopy(target)  # hooks re-registered after unpickling
    target.load_state_dict(source.state_dict())
    duplicate.load_state_dict(source.state_dict())
    assert calls == ["pre", "post"]
    for optimizer in (target, duplicate):
        big = optimizer.param_groups[0]["params"][0]
        assert optimizer.state[big]["exp_avg"].dtype == torch.int8


def test_changing_the_option_converts_state_on_the_next_step():
    optimizer, (big, _) = _stepped("int8", steps=2)
    optimizer.param_groups[0]["momentum_dtype"] = torch.float32
    big.grad = torch.zeros_like(big)
    before = quantized.momentum_tensor(optimizer.state[big], big).clone()
    optimizer.step()
    assert optimizer.state[big]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(optimizer.state[big]["exp_avg"], before * 0.99, rtol=1e-6, atol=0)
