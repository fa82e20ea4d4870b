"""``lionopt.hparams``: the AdamW translation, the Amos rule, the equilibrium, parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lionopt import Lion, hparams
from lionopt.hparams import amos, equilibrium_rms, from_adamw, param_groups


def test_from_adamw_default_factor() -> None:
    assert from_adamw(3e-4, 0.1) == pytest.approx({"lr": 1e-4, "weight_decay": 0.3})
    assert from_adamw(1e-3, 0.01, factor=10) == pytest.approx({"lr": 1e-4, "weight_decay": 0.1})
    with pytest.raises(ValueError, match="Invalid weight_decay value"):
        from_adamw(1e-3, -1.0)


@settings(max_examples=50, deadline=None)
@given(lr=st.floats(1e-8, 1.0), weight_decay=st.floats(0.0, 10.0), factor=st.floats(1.0, 100.0))
def test_from_adamw_keeps_the_decay_per_step(lr, weight_decay, factor) -> None:
    lion = from_adamw(lr, weight_decay, factor)
    assert lion["lr"] * lion["weight_decay"] == pytest.approx(lr * weight_decay, rel=1e-12)


def test_amos_bert_base_worked_example() -> None:
    # kexue.fm/archives/9473: d = 768, σ = 1/√d ≈ 0.036, α0 = 1.11e-3 ⇒ lr ≈ 4e-5, λ ≈ 0.015.
    rule = amos(0.036)
    assert rule.lr == pytest.approx(1.11e-3 * 0.036, rel=1e-12)
    assert rule.weight_decay == pytest.approx(1.11e-3 / 0.072, rel=1e-12)
    assert f"{rule.lr:.0e}" == "4e-05"
    assert round(rule.weight_decay, 3) == 0.015
    exact = amos(1 / math.sqrt(768))
    assert f"{exact.lr:.0e}" == "4e-05" and round(exact.weight_decay, 3) == 0.015


def test_amos_is_keyword_arguments_for_lion() -> None:
    rule = amos(0.02, 1e-3)
    assert dict(rule) == {"lr": rule.lr, "weight_decay": rule.weight_decay}
    opt = Lion([nn.Parameter(torch.zeros(2))], **rule)
    assert opt.param_groups[0]["lr"] == rule.lr
    assert opt.param_groups[0]["weight_decay"] == rule.weight_decay
    with pytest.raises(ValueError, match="Invalid sigma"):
        amos(0.0)
    with pytest.raises(ValueError, match="Invalid kappa"):
        amos(0.1, kappa=-1.0)


@settings(max_examples=50, deadline=None)
@given(sigma=st.floats(1e-4, 10.0), alpha0=st.floats(1e-5, 1e-1))
def test_amos_equilibrium_is_sigma(sigma, alpha0) -> None:
    rule = amos(sigma, alpha0)
    assert equilibrium_rms(rule.lr, rule.weight_decay) == pytest.approx(sigma, rel=1e-12)
    assert rule.decay_per_step == pytest.approx(alpha0**2 / 2, rel=1e-12)


def test_amos_inverse_time_decay_maps_onto_lion_decay() -> None:
    # Per step, Lion multiplies θ by 1 − lr_t·λ; the rule asks for ρ_t = α0²/(2(κt + 1)).
    sigma, alpha0, kappa = 0.05, 1e-2, 0.5
    rule = amos(sigma, alpha0, kappa=kappa)
    p = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = Lion([p], **rule)
    scheduler = rule.scheduler(opt)
    for t in range(6):
        assert opt.param_groups[0]["lr"] == pytest.approx(alpha0 * sigma / (kappa * t + 1))
        assert rule.lr_lambda(t) == pytest.approx(1 / (kappa * t + 1))
        before = p.detach().clone()
        p.grad = torch.zeros(3, dtype=torch.float64)  # only the decay acts
        opt.step()
        scheduler.step()
        rho = alpha0**2 / (2 * (kappa * t + 1))
        torch.testing.assert_close(p.detach(), before * (1 - rho), rtol=1e-12, atol=0)
    assert amos(sigma, alpha0).lr_lambda(100) == 1.0


def simulate_noise(betas: tuple[float, float], sigma: float, alpha0: float) -> float:
    """Weight RMS after 5/(lr·λ) Lion steps on pure-noise gradients, starting from 0."""
    rule = amos(sigma, alpha0)
    gen = torch.Generator().manual_seed(0)
    p = nn.Parameter(torch.zeros(8192))
    opt = Lion([p], betas=betas, **rule)
    for _ in range(int(5 / rule.decay_per_step)):
        p.grad = torch.randn(8192, generator=gen)
        opt.step()
    return p.detach().pow(2).mean().sqrt().item()


def test_amos_random_walk_settles_at_sigma() -> None:
    # With independent update signs (β1 = 0), E[θ²] → lr/(λ(2 − lr·λ)) ≈ σ²; 5/(lr·λ) steps
    # are 10 relaxation times of E[θ²] (e^-10), and 8192 coordinates give a ~1% RMS spread.
    # 10% tolerance: λ off by 2x moves the RMS by a factor √2 (−29% or +41%), and fails.
    sigma = 0.02
    rms = simulate_noise((0.0, 0.99), sigma, alpha0=0.05)
    assert rms == pytest.approx(sigma, rel=0.10)


def test_momentum_inflates_the_noise_equilibrium() -> None:
    # Documented caveat: Lion's momentum correlates successive signs over ~1/(1 − β2) steps,
    # so on pure noise the RMS settles well above √(lr/(2λ)) (measured ~6x at (0.9, 0.99)).
    sigma = 0.02
    rms = simulate_noise((0.9, 0.99), sigma, alpha0=0.05)
    assert 3 * sigma < rms < 10 * sigma


def test_equilibrium_rms() -> None:
    assert equilibrium_rms(2e-4, 0.1) == pytest.approx(math.sqrt(1e-3))
    assert equilibrium_rms(1e-4, 0.0) == math.inf
    with pytest.raises(ValueError):
        equilibrium_rms(1e-4, -0.1)


class HandWrittenRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.bag = nn.EmbeddingBag(20, 8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.linear = nn.Linear(8, 8)
        self.layer_norm = nn.LayerNorm(8)
        self.batch_norm = nn.BatchNorm1d(8)
        self.group_norm = nn.GroupNorm(2, 8)
        self.rms_norm = nn.RMSNorm(8)
        self.custom_norm = HandWrittenRMSNorm(8)
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight  # tied: stays an embedding


def test_param_groups_sorts_every_parameter_once() -> None:
    model = Model()
    groups = param_groups(model, 1e-4, 0.1, embedding_lr=1e-5, embedding_weight_decay=0.0)
    by_name = {g["name"]: g for g in groups}
    ids = {name: [id(p) for p in g["params"]] for name, g in by_name.items()}
    assert sorted(ids["decay"]) == sorted(map(id, [model.conv.weight, model.linear.weight]))
    assert sorted(ids["embedding"]) == sorted(map(id, [model.embed.weight, model.bag.weight]))
    no_decay = [
        model.conv.bias,
        model.linear.bias,
        model.layer_norm.weight,
        model.layer_norm.bias,
        model.batch_norm.weight,
        model.batch_norm.bias,
        model.group_norm.weight,
        model.group_norm.bias,
        model.rms_norm.weight,
        model.custom_norm.weight,
        model.scale,
    ]
    assert sorted(ids["no_decay"]) == sorted(map(id, no_decay))
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    listed = [i for name in ids for i in ids[name]]
    assert sorted(listed) == sorted(trainable)  # each once; frozen ones left out
    assert by_name["decay"]["weight_decay"] == 0.1 and by_name["decay"]["lr"] == 1e-4
    assert by_name["no_decay"]["weight_decay"] == 0.0
    assert by_name["embedding"]["lr"] == 1e-5 and by_name["embedding"]["weight_decay"] == 0.0
    Lion(groups)  # Lion accepts them


def test_param_groups_split_embeddings() -> None:
    model = Model()
    groups, embeddings = param_groups(model, 1e-4, 0.1, split_embeddings=True)
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert sorted(map(id, embeddings)) == sorted(map(id, [model.embed.weight, model.bag.weight]))
    Lion(groups)
    torch.optim.AdamW(embeddings, lr=1e-3)
    default = {g["name"]: g for g in param_groups(model, 1e-4, 0.1)}
    assert default["embedding"]["lr"] == 1e-4 and default["embedding"]["weight_decay"] == 0.1


def test_module_docstring_has_the_rules_of_thumb() -> None:
    doc = hparams.__doc__
    for phrase in ("(0.95, 0.98)", "64", "Warmup", "DEFAULT_FACTOR = 3", "1/λ"):
        assert phrase in doc


# --- calibrate and decay_groups ------------------------------------------------------------


def reference_adamw_update_rms(model, batches, lr, wd, steps, betas=(0.9, 0.999), eps=1e-8):
    """AdamW written out in float64; the pooled RMS of m̂/(√v̂ + ε) over ``steps`` steps."""
    params = [p.detach().double().clone().requires_grad_(True) for p in model.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    total, count = 0.0, 0
    for t, (x, y) in enumerate(batches[:steps], start=1):
        w, b = params
        loss = ((x.double() @ w.T + b - y.double()) ** 2).mean()
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g, m_i, v_i in zip(params, grads, m, v):
                m_i.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                v_i.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                u = (m_i / (1 - betas[0] ** t)) / ((v_i / (1 - betas[1] ** t)).sqrt() + eps)
                total += float(u.square().sum())
                count += u.numel()
                p.mul_(1 - lr * wd).sub_(lr * u)
    return math.sqrt(total / count)


def regression_batches(n=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    true = torch.randn(3, 4, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(16, 4, generator=g)
        out.append((x, x @ true.T + 0.3 * torch.randn(16, 3, generator=g)))
    return out


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_calibrate_matches_adamw_written_out_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    batches = regression_batches()
    rng_before = torch.get_rng_state()
    result = hparams.calibrate(model, mse, iter(batches), 1e-2, 0.1, steps=25)
    assert set(result) == {"lr", "weight_decay"}
    rms = reference_adamw_update_rms(model, batches, 1e-2, 0.1, steps=25)
    assert 0.05 < rms < 1.0  # a real ratio, not a degenerate 0 or 1
    assert result["lr"] == pytest.approx(1e-2 * rms, rel=1e-5)
    assert result["lr"] * result["weight_decay"] == pytest.approx(1e-2 * 0.1, rel=1e-12)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng_before)
    # fewer batches than steps: uses what there is
    short = hparams.adamw_update_rms(model, mse, batches[:5], 1e-2, 0.1, steps=100)
    assert short == pytest.approx(
        reference_adamw_update_rms(model, batches, 1e-2, 0.1, 5), rel=1e-5
    )


def test_calibrate_rejects_bad_input() -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="batches is empty"):
        hparams.calibrate(model, mse, [], 1e-3, 0.1)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        hparams.calibrate(model, mse, regression_batches(2), -1.0, 0.1)
    with pytest.raises(ValueError, match="Invalid steps"):
        hparams.calibrate(model, mse, regression_batches(2), 1e-3, 0.1, steps=0)
    with pytest.raises(ValueError, match="the loss is nan"):
        hparams.calibrate(
            model, lambda m, b: mse(m, b) * math.nan, regression_batches(2), 1e-3, 0.0
        )


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.pos = nn.Parameter(torch.zeros(5, 4))
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def test_decay_groups_sort_parameters_as_users_do() -> None:
    model = Tiny()
    groups = {g["name"]: g for g in hparams.decay_groups(model, 0.1)}
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["decay"] == {id(model.emb.weight), id(model.pos), id(model.lin.weight)}
    assert ids["no_decay"] == {id(model.lin.bias), id(model.norm.weight), id(model.norm.bias)}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert all("lr" not in g for g in groups.values())
    other = {g["name"]: g for g in hparams.decay_groups(model, 0.1, embeddings="no_decay")}
    assert id(model.emb.weight) in {id(p) for p in other["no_decay"]["params"]}
    with pytest.raises(ValueError, match="embeddings"):
        hparams.decay_groups(model, 0.1, embeddings="adamw")
    # the groups work as they are in both optimizers, and only the decay group decays
    for make in (lambda g: torch.optim.AdamW(g, lr=0.1), lambda g: Lion(g, lr=0.1)):
        model = Tiny()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(1.0)
        opt = make(hparams.decay_groups(model, 0.5))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        assert torch.allclose(model.lin.weight, torch.full_like(model.lin.weight, 0.95))
        assert torch.equal(model.lin.bias, torch.ones_like(model.lin.bias))
        assert torch.equal(model.norm.weight, torch.ones_like(model.norm.weight))
