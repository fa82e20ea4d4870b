"""Hyperparameter rules for Lion: translating AdamW settings, calibration, Amos, and groups.

- ``from_adamw(lr, wd)``: the factor rule (lr / 3, wd x 3); right when AdamW's lr is tuned.
- ``calibrate(model, loss_fn, batches, adamw_lr, adamw_wd)``: measures the factor on your
  model from ~100 AdamW steps on a copy (Lion lr = AdamW lr x RMS of AdamW's update).
- ``decay_groups(model, wd)``: decay for weight matrices (and embeddings), none for biases
  and norm gains, for AdamW and Lion alike; ``param_groups`` adds Lion-specific options.

Rules of thumb (Chen et al. 2023, arXiv 2302.06675, and the analysis at kexue.fm/archives/9473):

- **lr and weight decay.** Every coordinate of Lion's update has magnitude 1, larger than
  AdamW's, so Lion's lr is 3-10x smaller and its weight decay λ 3-10x larger, keeping the
  per-step decay lr·λ unchanged. Initial, peak and final lr all scale by the same factor;
  schedule, clipping and warmup stay as they were. ``from_adamw`` does this with
  ``DEFAULT_FACTOR = 3``, the low end of the paper's range. Why not 10: the factor is the ratio
  of Lion's per-coordinate step (1) to AdamW's, and AdamW's step m̂/√v̂ is ≈ 1 while gradients
  are consistent and ≈ √((1−β1)/(1+β1)) ≈ 0.23 (β1 = 0.9) once they are noise-dominated, so
  the factor runs from ~1 to ~4.4. The official README's worked pairs all use 10x (ViT-B/16
  1e-4/10 vs AdamW 1e-3/1.0; diffusion 3e-5/0.1 vs 3e-4/0.01; 7.5B LM 1e-4/0.01), for long
  runs at batch 4096 and more; on ``lionopt compare``'s short CPU runs 10x lost badly to AdamW
  and the sweeps put the best factor near 1. Pass ``factor=10`` for long large-batch runs.
- **Betas.** (0.9, 0.99) by default; (0.95, 0.98) for language models ("reducing β2 improves
  stability").
- **Batch size.** Lion prefers large batches and is reported no better than AdamW below 64;
  gradient accumulation is a valid way to get there (``lionopt.Tiger`` accumulates for free).
- **Warmup** helps when the loss rises or diverges early.
- **The 1/λ box.** If lr·λ ≤ 1, |θ_i| ≤ 1/λ is invariant and reached in ~1/(lr·λ) steps by any
  coordinate whose update keeps one sign: rare embedding rows (their momentum decays but keeps
  its sign) drift to ±1/λ. ``param_groups(..., split_embeddings=True)`` lets you put
  embeddings under another optimizer (AdamW), or give them their own lr and decay.
- **Equilibrium.** With uncorrelated update signs (a random walk against decay), the weight
  RMS settles at ``equilibrium_rms(lr, λ) = √(lr/(2λ))``. Lion's momentum correlates
  successive signs, so on gradient *noise* the RMS settles higher (about 6x for β = (0.9, 0.99),
  measured); the figure is a scale, not a prediction. ``lionopt.diagnostics.lion_stats`` reports
  both.
- **Amos rule** (``amos``): with σ the init std of a weight matrix and α0 ≈ 1e-3 the relative
  change per step, lr = α0·σ and λ = α0/(2σ), so √(lr/(2λ)) = σ: the equilibrium is the init
  scale.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "DEFAULT_FACTOR",
    "AmosRule",
    "adamw_update_rms",
    "amos",
    "calibrate",
    "classify_parameters",
    "decay_groups",
    "equilibrium_rms",
    "from_adamw",
    "measure_adamw_update_rms",
    "param_groups",
]

#: Default AdamW -> Lion factor: the low end of the paper's 3-10x range (see the module
#: docstring for why, and when to use 10).
DEFAULT_FACTOR = 3.0

#: Module types whose parameters are normalisation gains and biases (never decayed).
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,  # BatchNorm*, InstanceNorm*, SyncBatchNorm
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)

#: Module types whose weight is an embedding table (looked up by rows).
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


def _check_positive_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"Invalid {name}: {value}")
    return value


def _check_weight_decay(weight_decay: float) -> float:
    weight_decay = float(weight_decay)
    if not math.isfinite(weight_decay) or weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    return weight_decay


def from_adamw(lr: float, weight_decay: float = 0.0, factor: float = DEFAULT_FACTOR) -> dict:
    """Translate AdamW's ``lr`` and ``weight_decay`` to Lion's.

    Returns ``{"lr": lr / factor, "weight_decay": weight_decay * factor}``, ready to be passed as
    keyword arguments: ``Lion(params, **from_adamw(1e-3, 0.01))``.

    The rule assumes ``lr`` is AdamW's *tuned* lr, and inherits any error in it. Evidence
    (``lionopt compare``, lr tuned on a held-out split, 3 seeds, docs/results/compare.md): on
    both shipped tasks AdamW's tuned lr was 1e-2, 10x the 1e-3 they used untuned, so
    ``from_adamw`` of the untuned value handed Lion an lr 30x below AdamW's optimum and the
    old untuned comparison said "AdamW wins" partly for that reason. From the tuned lr,
    factor 3 came within noise of AdamW on digits (97.77 ± 1.69% vs 98.79 ± 0.16%) and lost
    0.17 bits/char on the char LM (2.630 vs 2.460). When you do not know whether your AdamW lr
    is tuned, ``calibrate`` measures the factor on your model from ~100 AdamW steps.
    """
    lr = _check_positive_finite("learning rate", lr)
    factor = _check_positive_finite("factor", factor)
    weight_decay = _check_weight_decay(weight_decay)
    return {"lr": lr / factor, "weight_decay": weight_decay * factor}


def equilibrium_rms(lr: float, weight_decay: float) -> float:
    """√(lr/(2λ)): the weight RMS at which decay balances a random walk of sign steps of size lr.

    Each step adds lr² to E[θ²] and decay removes ≈ 2·lr·λ·E[θ²]. ``inf`` when λ = 0.
    """
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0.0:
        raise ValueError(f"Invalid learning rate: {lr}")
    weight_decay = _check_weight_decay(weight_decay)
    if weight_decay == 0.0:
        return math.inf
    return math.sqrt(lr / (2.0 * weight_decay))


@dataclass(frozen=True)
class AmosRule(Mapping):
    """Lion hyperparameters from the Amos-derived rule; see ``amos``.

    A mapping with the keys ``lr`` and ``weight_decay``, so ``Lion(params, **rule)`` works.
    """

    lr: float
    weight_decay: float
    kappa: float | None = None

    def __getitem__(self, key: str) -> float:
        if key not in ("lr", "weight_decay"):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(("lr", "weight_decay"))

    def __len__(self) -> int:
        return 2

    def lr_lambda(self, step: int) -> float:
        """The lr multiplier at ``step``: 1/(κ·step + 1), or 1 without κ (for ``LambdaLR``)."""
        return 1.0 if self.kappa is None else 1.0 / (self.kappa * step + 1.0)

    def scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        """A ``LambdaLR`` applying the inverse-time decay to every group's lr."""
        return torch.optim.lr_scheduler.LambdaLR(optimizer, self.lr_lambda)

    @property
    def decay_per_step(self) -> float:
        """ρ = lr·λ = α0²/2 at step 0: the weight_decay to pass with ``Lion(decouple_lr=True)``."""
        return self.lr * self.weight_decay


def amos(sigma: float, alpha0: float = 1.11e-3, *, kappa: float | None = None) -> AmosRule:
    """Lion's lr and weight decay from the Amos-derived rule (kexue.fm/archives/9473, 9344).

    Writing a step as θ ← θ − (α_t·u_t + ρ_t·θ) with u_t = sign(c) and ‖u_t‖ = √n, the rule
    asks for a relative change α0 per step: α_t = α0·σ/(κt + 1), ρ_t = α0²/(2(κt + 1)), where
    σ is the init std of the weight matrix (σ² its init variance). In Lion's terms lr = α_t and
    the decay rate λ = ρ_t/α_t = α0/(2σ), constant in t. So:

    - lr = α0·σ and weight_decay = α0/(2σ); the equilibrium √(lr/(2λ)) is σ.
    - With ``kappa``, only the lr follows 1/(κt + 1) (``rule.scheduler(opt)``, a ``LambdaLR``).
      Lion's decoupled decay per step is lr_t·λ, so it follows 1/(κt + 1) too, which is the
      rule's ρ_t. Dividing λ by (κt + 1) as well would make lr·λ fall as 1/(κt + 1)², twice
      as fast as the rule; do not.
    - With ``Lion(decouple_lr=True)`` the per-step decay is weight_decay·lr_t/max_lr, so pass
      ``weight_decay=rule.decay_per_step`` (α0²/2) instead of ``rule.weight_decay``.

    Worked example (BERT-base, d = 768, σ = 1/√d ≈ 0.036, α0 = 1.11e-3): lr ≈ 4e-5, λ ≈ 0.015.
    The rule suits weight matrices; give biases and norm gains no decay (``param_groups``).
    """
    sigma = _check_positive_finite("sigma", sigma)
    alpha0 = _check_positive_finite("alpha0", alpha0)
    if kappa is not None:
        kappa = float(kappa)
        if not math.isfinite(kappa) or kappa < 0.0:
            raise ValueError(f"Invalid kappa: {kappa}")
    return AmosRule(lr=alpha0 * sigma, weight_decay=alpha0 / (2.0 * sigma), kappa=kappa)


def _is_norm_module(module: nn.Module) -> bool:
    # Custom norms (e.g. a hand-written RMSNorm) are matched by class name.
    return isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__


def classify_parameters(model: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Sort the trainable parameters of ``model`` into four kinds, each parameter once.

    - ``"embedding"``: weights of ``nn.Embedding`` / ``nn.EmbeddingBag`` (also when tied to an
      output layer);
    - ``"gain"``: weights of normalisation modules (LayerNorm, BatchNorm, GroupNorm, RMSNorm,
      InstanceNorm, or any module whose class name contains "Norm"): initialised at 1;
    - ``"bias"``: every other parameter with fewer than 2 dimensions (biases, scalars);
    - ``"weight"``: everything else (matrices and convolution kernels).
    """
    kinds: dict[int, str] = {}
    params: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad:
                continue
            if isinstance(module, EMBEDDING_TYPES) and name == "weight":
                kind = "embedding"
            elif _is_norm_module(module) and name == "weight":
                kind = "gain"
            elif param.ndim < 2:
                kind = "bias"
            else:
                kind = "weight"
            # An embedding tied to an output layer stays an embedding.
            if kinds.get(id(param)) != "embedding":
                kinds[id(param)] = kind
            params[id(param)] = param
    result: dict[str, list[nn.Parameter]] = {"weight": [], "bias": [], "gain": [], "embedding": []}
    for key, kind in kinds.items():
        result[kind].append(params[key])
    return result


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    *,
    embedding_lr: float | None = None,
    embedding_weight_decay: float | None = None,
    split_embeddings: bool = False,
) -> list[dict[str, Any]] | tuple[list[dict[str, Any]], list[nn.Parameter]]:
    """Parameter groups for Lion: decay for weight matrices only, embeddings on their own.

    Returns a list of group dicts (empty groups left out), each with a ``"name"``:

    - ``"decay"``: weight matrices, with ``lr`` and ``weight_decay``;
    - ``"no_decay"``: biases, norm gains and other parameters with < 2 dims, weight_decay 0;
    - ``"embedding"``: embedding tables, with ``embedding_lr`` (default ``lr``) and
      ``embedding_weight_decay`` (default ``weight_decay``).

    With ``split_embeddings=True`` returns ``(groups, embedding_params)`` instead, the groups
    without the embedding group, so the embeddings can go to another optimizer, e.g.
    ``groups, emb = param_groups(model, 1e-4, 0.1, split_embeddings=True);
    opts = [Lion(groups), torch.optim.AdamW(emb, lr=1e-3)]``. Lion moves every coordinate by lr
    whenever sign(c) ≠ 0, so rarely seen rows, whose momentum keeps its sign while it decays,
    drift to ±1/λ; an adaptive optimizer does not move them.
    """
    lr = _check_positive_finite("learning rate", lr)
    weight_decay = _check_weight_decay(weight_decay)
    kinds = classify_parameters(model)
    groups = [
        {"name": "decay", "params": kinds["weight"], "lr": lr, "weight_decay": weight_decay},
        {
            "name": "no_decay",
            "params": kinds["bias"] + kinds["gain"],
            "lr": lr,
            "weight_decay": 0.0,
        },
    ]
    embedding_group = {
        "name": "embedding",
        "params": kinds["embedding"],
        "lr": lr if embedding_lr is None else _check_positive_finite("learning rate", embedding_lr),
        "weight_decay": (
            weight_decay
            if embedding_weight_decay is None
            else _check_weight_decay(embedding_weight_decay)
        ),
    }
    groups = [group for group in groups if group["params"]]
    if split_embeddings:
        return groups, kinds["embedding"]
    if embedding_group["params"]:
        groups.append(embedding_group)
    return groups


def decay_groups(
    model: nn.Module, weight_decay: float, *, embeddings: str = "decay"
) -> list[dict[str, Any]]:
    """Parameter groups for any optimizer: decay weight matrices, not biases or norm gains.

    Returns ``[{"name": "decay", "params": [...], "weight_decay": weight_decay},
    {"name": "no_decay", "params": [...], "weight_decay": 0.0}]`` (empty groups left out), with
    no ``lr`` key, so the optimizer's own ``lr`` and any scheduler apply to every group:
    ``torch.optim.AdamW(decay_groups(model, 0.1), lr=3e-3)`` or
    ``Lion(decay_groups(model, 0.3), lr=1e-3)``. Kinds are those of ``classify_parameters``.

    ``embeddings`` decides the embedding tables (``nn.Embedding``/``EmbeddingBag``):
    ``"decay"`` (default) puts them with the weight matrices, ``"no_decay"`` with the biases.
    The default is deliberate for Lion: Lion moves every coordinate by lr whenever the sign of
    its momentum is non-zero, so a rarely seen row, whose momentum decays but keeps its sign,
    keeps walking; weight decay is what bounds it (|θ| ≤ 1/λ). Users report embedding norms
    that grow under Lion until training breaks, and that Adam-type optimizers keep stable
    (kexue.fm/archives/9473, comments); without decay nothing stops that growth. If decay is
    not enough on your model, move the embeddings to AdamW with
    ``param_groups(..., split_embeddings=True)``.
    """
    weight_decay = _check_weight_decay(weight_decay)
    if embeddings not in ("decay", "no_decay"):
        raise ValueError(f"Invalid embeddings choice: {embeddings!r} (use 'decay' or 'no_decay')")
    kinds = classify_parameters(model)
    decay = kinds["weight"] + (kinds["embedding"] if embeddings == "decay" else [])
    no_decay = (
        kinds["bias"] + kinds["gain"] + (kinds["embedding"] if embeddings == "no_decay" else [])
    )
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def measure_adamw_update_rms(
    model: nn.Module,
    step_fn: Callable[[nn.Module, torch.optim.Optimizer, int], Any],
    adamw_lr: float,
    adamw_wd: float = 0.0,
    steps: int = 100,
) -> float:
    """``adamw_update_rms`` for a training loop of your own: ``step_fn(model, optimizer, i)``
    performs step ``i`` (forward, backward, ``optimizer.step()``) on the copy it is given, and
    may return ``False`` to stop early (no more data)."""
    adamw_lr = _check_positive_finite("learning rate", adamw_lr)
    adamw_wd = _check_weight_decay(adamw_wd)
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"Invalid steps: {steps}")
    work = copy.deepcopy(model)
    work.train()
    params = [p for p in work.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=adamw_lr, weight_decay=adamw_wd)
    beta1, beta2 = optimizer.defaults["betas"]
    eps = optimizer.defaults["eps"]
    square_sum, count, done = 0.0, 0, 0
    devices = [] if not torch.cuda.is_available() else None
    with torch.random.fork_rng(devices=devices):
        for i in range(int(steps)):
            if step_fn(work, optimizer, i) is False:
                break
            done += 1
            for p in params:
                state = optimizer.state.get(p)
                if not state:
                    continue  # no gradient yet
                t = float(state["step"])
                m_hat = state["exp_avg"] / (1 - beta1**t)
                v_hat = state["exp_avg_sq"] / (1 - beta2**t)
                update = m_hat / (v_hat.sqrt() + eps)
                square_sum += float(update.double().square().sum())
                count += update.numel()
    if done == 0:
        raise ValueError("calibrate: batches is empty")
    if count == 0:
        raise ValueError("calibrate: no parameter received a gradient")
    return math.sqrt(square_sum / count)


def adamw_update_rms(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    adamw_lr: float,
    adamw_wd: float = 0.0,
    steps: int = 100,
) -> float:
    """RMS of AdamW's per-coordinate update m̂/(√v̂ + ε) over its first ``steps`` steps.

    Trains a deep copy of ``model`` with ``torch.optim.AdamW(lr=adamw_lr,
    weight_decay=adamw_wd)`` on the first ``steps`` batches of ``batches`` (fewer if it ends
    sooner) and pools the squared update of every coordinate of every step. ``model``, its
    gradients and the global RNG state are left as they were. Lion's step has RMS 1, so this
    is the ratio of AdamW's step size to Lion's at the same lr.
    """
    iterator = iter(batches)

    def step_fn(work, optimizer, i):
        batch = next(iterator, _END)
        if batch is _END:
            return False
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(work, batch)
        if not torch.isfinite(loss):
            raise ValueError(f"calibrate: the loss is {loss.item()} at AdamW step {i + 1}")
        loss.backward()
        optimizer.step()
        return True

    return measure_adamw_update_rms(model, step_fn, adamw_lr, adamw_wd, steps)


_END = object()


def calibrate(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    adamw_lr: float,
    adamw_wd: float,
    steps: int = 100,
) -> dict[str, float]:
    """Lion's lr and weight decay for ``model``, measured from ``steps`` AdamW steps.

    ``loss_fn(model, batch)`` returns the scalar loss of one batch; ``batches`` is an iterable
    of at least one batch (the first ``steps`` are used). AdamW runs on a deep copy, so
    ``model`` is untouched. Returns ``{"lr": adamw_lr * rms, "weight_decay": adamw_lr *
    adamw_wd / lr}``: Lion's lr is AdamW's lr times the RMS of AdamW's per-coordinate update
    (``adamw_update_rms``), so both take steps of the same size, and the per-step decay lr·λ
    stays AdamW's. ``lionopt compare`` reports this "Lion calibrated" row next to Lion tuned
    on its own lr grid. The implied factor 1/rms lies between ~1 (consistent gradients) and
    ~4.4 (noise-dominated ones), see this module's docstring; it measured 4.3 (digits) and
    4.1 (char LM) at AdamW's tuned lr.
    """
    rms = adamw_update_rms(model, loss_fn, batches, adamw_lr, adamw_wd, steps)
    if not rms > 0.0:
        raise ValueError("calibrate: AdamW's update is zero (are the gradients all zero?)")
    lr = float(adamw_lr) * rms
    return {"lr": lr, "weight_decay": float(adamw_lr) * float(adamw_wd) / lr}
