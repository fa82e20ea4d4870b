"""What ``lionopt bench`` times: our Lion paths, the official eager loop, torch AdamW, peers.

Each entry builds an optimizer over a shared list of parameters (with their ``.grad`` set) and
returns a zero-argument ``step``. Peer libraries are imported only when their entry is built;
a missing one is reported as skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from lionopt import Lion

LION_LR, LION_BETAS, LION_WD = 1e-4, (0.9, 0.99), 0.1
ADAMW_LR, ADAMW_WD = 1e-3, 0.01

Step = Callable[[], None]


@dataclass(frozen=True)
class Impl:
    """One implementation to time. ``kind`` is "lion" or "adamw" (which ideal bytes apply)."""

    name: str
    kind: str
    build: Callable[[list[Tensor]], Step]
    group: str  # "lionopt", "baseline", "torch" or "peer"
    requires: str | None = None  # module that must import, for peers


class SeedLion(Optimizer):
    """The official eager PyTorch Lion (google/automl lion_pytorch.py), as published."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data.mul_(1 - group["lr"] * group["weight_decay"])
                grad = p.grad
                state = self.state[p]
                if len(state) == 0:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                beta1, beta2 = group["betas"]
                update = exp_avg * beta1 + grad * (1 - beta1)
                p.add_(torch.sign(update), alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(grad, alpha=1 - beta2)


def _lion(**flags) -> Callable[[list[Tensor]], Step]:
    def build(params: list[Tensor]) -> Step:
        return Lion(params, lr=LION_LR, betas=LION_BETAS, weight_decay=LION_WD, **flags).step

    return build


def _adamw(**flags) -> Callable[[list[Tensor]], Step]:
    def build(params: list[Tensor]) -> Step:
        return torch.optim.AdamW(params, lr=ADAMW_LR, weight_decay=ADAMW_WD, **flags).step

    return build


def _seed(params: list[Tensor]) -> Step:
    return SeedLion(params, lr=LION_LR, betas=LION_BETAS, weight_decay=LION_WD).step


def _peer(module: str, attribute: str, **kwargs) -> Callable[[list[Tensor]], Step]:
    def build(params: list[Tensor]) -> Step:
        cls = getattr(_import_peer(module), attribute)
        return cls(params, lr=LION_LR, betas=LION_BETAS, weight_decay=LION_WD, **kwargs).step

    return build


def _import_peer(module: str) -> types.ModuleType:
    try:
        return importlib.import_module(module)
    except Exception:
        if module != "timm.optim":
            raise
        return _timm_optim_without_package_init()


def _timm_optim_without_package_init() -> types.ModuleType:
    """``timm.optim.lion`` alone: timm's package init needs a torchvision that matches torch.

    The optimizer module itself needs only torch; it is loaded under stand-in parent packages.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("timm is not installed")
    root = next(iter(spec.submodule_search_locations))
    saved = {name: sys.modules.get(name) for name in ("timm", "timm.optim")}
    try:
        for name, path in (("timm", root), ("timm.optim", f"{root}/optim")):
            package = types.ModuleType(name)
            package.__path__ = [path]
            sys.modules[name] = package
        return importlib.import_module("timm.optim.lion")
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.modules.pop("timm.optim.lion", None)
        for name in [n for n in sys.modules if n.startswith("timm.optim._")]:
            sys.modules.pop(name, None)


IMPLS: list[Impl] = [
    Impl("lionopt fused (default)", "lion", _lion(), "lionopt"),
    Impl("lionopt foreach", "lion", _lion(foreach=True), "lionopt"),
    Impl("lionopt loop", "lion", _lion(foreach=False, fused=False), "lionopt"),
    Impl("lionopt bf16 momentum", "lion-bf16", _lion(momentum_dtype="bf16"), "lionopt"),
    Impl("lionopt 8-bit momentum", "lion-8bit", _lion(momentum_dtype="int8"), "lionopt"),
    Impl("seed-style loop", "lion", _seed, "baseline"),
    Impl("torch AdamW loop", "adamw", _adamw(foreach=False), "torch"),
    Impl("torch AdamW foreach", "adamw", _adamw(foreach=True), "torch"),
    Impl("torch AdamW fused", "adamw", _adamw(fused=True), "torch"),
    Impl("lion-pytorch", "lion", _peer("lion_pytorch", "Lion"), "peer", "lion_pytorch"),
    Impl("timm Lion", "lion", _peer("timm.optim", "Lion"), "peer", "timm"),
    Impl(
        "pytorch-optimizer Lion",
        "lion",
        _peer("pytorch_optimizer", "Lion"),
        "peer",
        "pytorch_optimizer",
    ),
    Impl("optimi Lion", "lion", _peer("optimi", "Lion"), "peer", "optimi"),
]


def peer_installed(impl: Impl) -> bool:
    return impl.requires is None or importlib.util.find_spec(impl.requires) is not None


#: State bytes per element of each kind; None: the parameter's own element size.
_STATE_BYTES = {"lion": None, "adamw": None, "lion-bf16": 2.0, "lion-8bit": 1.0 + 4.0 / 256}


def ideal_bytes(kind: str, params: list[Tensor]) -> int:
    """Bytes an ideal fused kernel moves per step: Lion reads θ, g, m and writes θ, m; AdamW
    also reads and writes v. State is in the parameter dtype, or bf16 / 8-bit for those kinds."""
    state_tensors = 2 if kind == "adamw" else 1
    total = 0.0
    for p in params:
        size = p.numel() * p.element_size()
        state_size = p.numel() * (_STATE_BYTES[kind] or p.element_size())
        total += 2 * size + size + 2 * state_tensors * state_size
    return int(total)
