"""Lion as a torch.optim.Optimizer: validation, groups, state dicts, hooks, copies, AMP, compile."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
from torch import nn

import lionopt
from lionopt import Lion, SparseGradientError
from lionopt.functional import lion

from official_lion import OfficialLion
from support import IMPLEMENTATIONS


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def batches(count: int, seed: int = 99) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=gen), torch.randn(16, 3, generator=gen)) for _ in range(count)
    ]


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, data) -> None:
    for x, y in data:
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def assert_models_equal(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


# --- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(lr=-0.01), "Invalid learning rate: -0.01"),
        (dict(lr=float("nan")), "Invalid learning rate: nan"),
        (dict(lr=float("inf")), "Invalid learning rate: inf"),
        (dict(lr=torch.tensor(-1.0)), "Invalid learning rate"),
        (dict(betas=(1.0, 0.99)), "Invalid beta parameter at index 0: 1.0"),
        (dict(betas=(0.9, 1.0)), "Invalid beta parameter at index 1: 1.0"),
        (dict(betas=(-0.1, 0.99)), "Invalid beta parameter at index 0: -0.1"),
        (dict(betas=(0.9, float("nan"))), "Invalid beta parameter at index 1: nan"),
        (dict(betas=(0.9,)), "Invalid betas"),
        (dict(weight_decay=-1), "Invalid weight_decay value: -1"),
        (dict(weight_decay=float("inf")), "Invalid weight_decay value: inf"),
        (dict(decouple_lr=True, max_lr=0.0), "Invalid max_lr value: 0.0"),
        (dict(maximize="yes"), "Invalid maximize value"),
        (dict(foreach=True, fused=True), "`fused` and `foreach` cannot be `True` together."),
    ],
)
def test_invalid_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("`", ".")):
        Lion(make_model().parameters(), **kwargs)


def test_invalid_param_group_is_rejected_on_add():
    model = make_model()
    opt = Lion(model[0].parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        opt.add_param_group({"params": model[2].parameters(), "lr": -1})
    assert len(opt.param_groups) == 1


def test_sparse_gradient_raises_a_clear_error_at_step():
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = Lion(embedding.parameters(), lr=1e-3)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = embedding.weight.detach().clone()
    with pytest.raises(SparseGradientError, match="sparse gradients"):
        opt.step()
    assert isinstance(SparseGradientError("x"), ValueError)
    assert torch.equal(embedding.weight, before)


# --- torch.optim conventions -----------------------------------------------------------------


def test_param_groups_have_their_own_hyperparameters():
    model = make_model()
    opt = Lion(
        [
            {"params": model[0].parameters(), "lr": 0.1, "weight_decay": 0.5},
            {"params": model[2].parameters(), "betas": (0.5, 0.6)},
        ],
        lr=1e-3,
    )
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["betas"] == (0.9, 0.99)
    assert opt.param_groups[1]["lr"] == 1e-3 and opt.param_groups[1]["betas"] == (0.5, 0.6)


def test_tiny_lr_group_stays_unchanged_while_another_trains():
    model = make_model()
    frozen_ish = [p.detach().clone() for p in model[0].parameters()]
    trained = [p.detach().clone() for p in model[2].parameters()]
    opt = Lion(
        [{"params": model[0].parameters(), "lr": 1e-30}, {"params": model[2].parameters()}],
        lr=1e-2,
        weight_decay=0.1,
    )
    train_steps(model, opt, batches(10))
    for before, p in zip(frozen_ish, model[0].parameters()):
        assert torch.equal(before, p)
    for before, p in zip(trained, model[2].parameters()):
        assert not torch.equal(before, p)


def test_add_param_group_trains_the_new_group():
    model = make_model()
    opt = Lion(model[0].parameters(), lr=1e-2)
    opt.add_param_group({"params": model[2].parameters(), "lr": 5e-3})
    before = model[2].weight.detach().clone()
    train_steps(model, opt, batches(2))
    assert (model[2].weight - before).abs().max() > 0
    assert opt.param_groups[1]["lr"] == 5e-3 and opt.param_groups[1]["betas"] == (0.9, 0.99)


def test_closure_is_called_with_grad_enabled_and_loss_returned():
    model = make_model()
    opt = Lion(model.parameters(), lr=1e-2)
    x, y = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.requires_grad


def test_zero_gradient_step_without_decay_is_a_no_op(implementation):
    model = make_model()
    opt = Lion(model.parameters(), lr=0.1, weight_decay=0.0, **IMPLEMENTATIONS[implementation])
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


def test_parameters_without_grad_are_untouched_and_get_no_state():
    model = make_model()
    opt = Lion(model.parameters(), lr=0.1, weight_decay=0.5)
    before = model[2].weight.detach().clone()
    model[0](torch.randn(2, 6)).sum().backward()
    opt.step()
    assert torch.equal(model[2].weight, before)
    assert model[2].weight not in opt.state and model[0].weight in opt.state


def test_zero_dim_parameter():
    scalar = nn.Parameter(torch.tensor(0.5))
    opt = Lion([scalar], lr=0.125, weight_decay=0.0)
    scalar.grad = torch.tensor(-3.0)
    opt.step()
    assert scalar.item() == 0.625
    assert opt.state[scalar]["exp_avg"].shape == ()


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128], ids=str)
def test_complex_parameters_match_their_real_view_bitwise(implementation, dtype):
    torch.manual_seed(5)
    complex_param = nn.Parameter(torch.randn(4, 5, dtype=dtype))
    real_param = nn.Parameter(torch.view_as_real(complex_param.detach()).clone())
    kwargs = dict(lr=0.05, weight_decay=0.2, **IMPLEMENTATIONS[implementation])
    opt_c, opt_r = Lion([complex_param], **kwargs), Lion([real_param], **kwargs)
    for _ in range(12):
        grad = torch.randn(4, 5, dtype=dtype)
        complex_param.grad, real_param.grad = grad, torch.view_as_real(grad).clone()
        opt_c.step()
        opt_r.step()
    assert torch.equal(torch.view_as_real(complex_param.detach()), real_param)
    assert torch.equal(
        torch.view_as_real(opt_c.state[complex_param]["exp_avg"]),
        opt_r.state[real_param]["exp_avg"],
    )


@pytest.mark.parametrize("lr_dtype", [torch.float32, torch.float64], ids=str)
def test_tensor_lr_matches_float_lr(implementation, lr_dtype):
    lr_tensor = torch.tensor(0.0123, dtype=lr_dtype)
    kwargs = dict(weight_decay=0.3, **IMPLEMENTATIONS[implementation])
    model_t, model_f = make_model(), make_model()
    opt_t = Lion(model_t.parameters(), lr=lr_tensor, **kwargs)
    opt_f = Lion(model_f.parameters(), lr=lr_tensor.item(), **kwargs)
    data = batches(12)
    train_steps(model_t, opt_t, data)
    train_steps(model_f, opt_f, data)
    assert_models_equal(model_t, model_f)
    assert isinstance(opt_t.param_groups[0]["lr"], torch.Tensor)


def test_lr_scheduler_drives_the_lr():
    model = make_model()
    opt = Lion(model.parameters(), lr=0.1, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    lrs = []
    for x, y in batches(4):
        lrs.append(opt.param_groups[0]["lr"])
        train_steps(model, opt, [(x, y)])
        scheduler.step()
    assert lrs == [0.1, 0.05, 0.025, 0.0125]


def test_lr_scheduler_matches_manual_lr_changes():
    model_s, model_m = make_model(), make_model()
    opt_s = Lion(model_s.parameters(), lr=0.1, weight_decay=0.1)
    opt_m = Lion(model_m.parameters(), lr=0.1, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt_s, T_max=10)
    for step, (x, y) in enumerate(batches(10)):
        for model, opt in ((model_s, opt_s), (model_m, opt_m)):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
        opt_m.param_groups[0]["lr"] = 0.05 * (1 + math.cos(math.pi * step / 10))
        opt_s.step()
        opt_m.step()
        scheduler.step()
    for p, q in zip(model_s.parameters(), model_m.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    assert not torch.equal(model_s[0].weight, make_model()[0].weight)


# --- state dicts, hooks, copies ----------------------------------------------------------


def test_state_dict_round_trip_then_training_is_bitwise_equal(implementation):
    kwargs = dict(lr=1e-2, weight_decay=0.2, **IMPLEMENTATIONS[implementation])
    data = batches(20)
    model = make_model()
    opt = Lion(model.parameters(), **kwargs)
    train_steps(model, opt, data[:10])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    assert set(saved_opt["state"][0]) == {"exp_avg"}

    train_steps(model, opt, data[10:])

    resumed = make_model(seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = Lion(resumed.parameters(), lr=0.5, **IMPLEMENTATIONS[implementation])
    resumed_opt.load_state_dict(saved_opt)
    assert resumed_opt.param_groups[0]["lr"] == 1e-2
    train_steps(resumed, resumed_opt, data[10:])
    assert_models_equal(model, resumed)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], resumed_opt.state[q]["exp_avg"])


def test_load_state_dict_rejects_a_mismatched_checkpoint():
    opt = Lion(make_model().parameters(), lr=1e-3)
    other = Lion([nn.Parameter(torch.zeros(2))], lr=1e-3)
    with pytest.raises(ValueError):
        opt.load_state_dict(other.state_dict())


def test_load_state_dict_rejects_a_momentum_of_the_wrong_shape():
    model = make_model()
    opt = Lion(model.parameters(), lr=1e-2)
    train_steps(model, opt, batches(1))
    state = copy.deepcopy(opt.state_dict())
    state["state"][0]["exp_avg"] = torch.zeros(7)
    fresh = Lion(model.parameters(), lr=1e-2)
    with pytest.raises(ValueError, match=r"exp_avg has shape \(7,\), the parameter \(12, 6\)"):
        fresh.load_state_dict(state)
    assert len(fresh.state) == 0


def test_optimizer_hooks_are_called():
    model = make_model()
    opt = Lion(model.parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    opt.register_state_dict_pre_hook(lambda o: calls.append("sd_pre"))

    def add_marker(o, state_dict):
        calls.append("sd_post")
        state_dict["marker"] = 7
        return state_dict

    opt.register_state_dict_post_hook(add_marker)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load_pre"))
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load_post"))
    train_steps(model, opt, batches(1))
    state = opt.state_dict()
    assert state["marker"] == 7
    state.pop("marker")
    opt.load_state_dict(state)
    assert calls == ["pre", "post", "sd_pre", "sd_post", "load_pre", "load_post"]


def test_deepcopy_and_pickle_keep_state_and_keep_training_identically():
    model = make_model()
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    train_steps(model, opt, batches(3))
    clone = copy.deepcopy({"model": model, "opt": opt})
    pickled = pickle.loads(pickle.dumps({"model": model, "opt": opt}))
    for pair in (clone, pickled):
        assert pair["opt"].param_groups[0]["weight_decay"] == 0.1
        assert len(pair["opt"].state) == len(opt.state)
    data = batches(5, seed=5)
    train_steps(model, opt, data)
    train_steps(clone["model"], clone["opt"], data)
    train_steps(pickled["model"], pickled["opt"], data)
    assert_models_equal(model, clone["model"])
    assert_models_equal(model, pickled["model"])


def test_repr_is_readable():
    text = repr(Lion(make_model().parameters(), lr=3e-4, weight_decay=0.1))
    assert text.startswith("Lion (") and "lr: 0.0003" in text and "weight_decay: 0.1" in text


# --- checkpoint interop ------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["official_to_lionopt", "lionopt_to_official"])
def test_checkpoints_move_between_official_and_lionopt(direction):
    source_cls, target_cls = (
        (OfficialLion, Lion) if direction == "official_to_lionopt" else (Lion, OfficialLion)
    )
    data = batches(16)
    model = make_model()
    source = source_cls(model.parameters(), lr=1e-2, weight_decay=0.3)
    train_steps(model, source, data[:8])

    resumed = copy.deepcopy(model)
    target = target_cls(resumed.parameters(), lr=1.0)
    target.load_state_dict(copy.deepcopy(source.state_dict()))

    train_steps(model, source, data[8:])
    train_steps(resumed, target, data[8:])
    assert_models_equal(model, resumed)


def test_official_and_lionopt_train_identically():
    data = batches(15)
    model_a, model_b = make_model(), make_model()
    train_steps(model_a, OfficialLion(model_a.parameters(), lr=1e-2, weight_decay=0.3), data)
    train_steps(model_b, Lion(model_b.parameters(), lr=1e-2, weight_decay=0.3), data)
    assert_models_equal(model_a, model_b)


# --- AMP and torch.compile ----------------------------------------------------------------


def test_grad_scaler_steps_and_skips_non_finite_steps():
    model, reference = make_model(), make_model()
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = Lion(reference.parameters(), lr=1e-2, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for x, y in batches(4):
        opt.zero_grad()
        scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
    assert_models_equal(model, reference)

    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    scaler.scale(nn.functional.mse_loss(model(x), y)).backward()
    model[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    for b, p in zip(before, model.parameters()):
        assert torch.equal(b, p)


def test_torch_compile_of_a_training_step():
    model, reference = make_model(), make_model()
    opt = Lion(model.parameters(), lr=1e-2, weight_decay=0.1)
    ref_opt = Lion(reference.parameters(), lr=1e-2, weight_decay=0.1, foreach=False, fused=False)

    @torch.compile
    def train_step(x, y):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for x, y in batches(3):
        train_step(x, y)
        ref_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        ref_opt.step()
    # Inductor may reorder and fuse float ops: a few ULP, and the same signs.
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[0].weight, make_model()[0].weight)


# --- functional API -----------------------------------------------------------------------


def test_functional_lion_is_public_and_updates_in_place():
    theta = torch.tensor([1.0, -1.0, 0.5])
    momentum = torch.tensor([0.0, 0.0, 1.0])
    grad = torch.tensor([2.0, -2.0, 0.0])
    lionopt.functional.lion(
        [theta], [grad], [momentum], lr=0.5, beta1=0.9, beta2=0.99, weight_decay=0.0
    )
    assert theta.tolist() == [0.5, -0.5, 0.0]
    torch.testing.assert_close(momentum, torch.tensor([0.02, -0.02, 0.99]))


def test_functional_rejects_mismatched_lists():
    with pytest.raises(ValueError, match="same length"):
        lion([torch.zeros(1)], [], [], lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)


def test_stochastic_rounding_of_fp16_fails_before_any_counter_moves() -> None:
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float16))
    p.grad = torch.ones(3, dtype=torch.float16)
    opt = Lion([p], lr=1e-3, stochastic_rounding=True)
    for _ in range(2):
        with pytest.raises(ValueError, match="not float16"):
            opt.step()
    assert "step" not in opt.state[p]
    assert torch.equal(p.detach(), torch.ones(3, dtype=torch.float16))
