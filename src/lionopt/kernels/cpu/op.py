"""The fused CPU step as a ``torch.library`` custom op, so ``torch.compile`` keeps the kernel.

``torch.compile`` cannot trace into a ctypes call, so under compilation ``functional.lion``
used to take the foreach path (which Inductor fuses into its own loops). ``lionopt::lion_step_``
is an opaque op with a schema (it mutates ``params`` and ``exp_avgs``) and a fake
implementation (nothing to compute: the outputs are the inputs, written in place), so a
compiled graph calls the fused kernel as one node. The real implementation is
``kernels.cpu.plain.lion_step`` (which hands tensors the kernel cannot take to foreach), so it is
bitwise equal to the eager fused step.

``compiled_step(group, hyper)`` is what the CPU backend offers the functional under
``torch.compile``: it uses the op when the kernel is already loaded (a plain attribute read,
which the tracer can follow; the build is never started while tracing) and the group suits it
(no stochastic rounding), and returns False otherwise. The lr goes in as a tensor (a float
lr is the 0-dim float64 tensor ``functional.lion`` traces it as), so a changing lr is a graph
input, not a recompile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lionopt.kernels.cpu import plain
from lionopt.kernels.group import TensorGroup
from lionopt.kernels.hyper import LionHyper
from lionopt.state.formats import PLAIN_KIND

__all__ = ["compiled_step", "lion_step_"]

_MAXIMIZE, _CAUTIOUS, _CAUTIOUS_DECAY = 1, 2, 4


@torch.library.custom_op("lionopt::lion_step_", mutates_args=("params", "exp_avgs"))
def lion_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    lr: Tensor,
    beta1: float,
    beta2: float,
    weight_decay: float,
    options: int,
) -> None:
    """One fused CPU Lion step in place. ``lr``: a 0-dim tensor, or one lr per tensor (1-D);
    ``options``: maximize 1, cautious 2, cautious decay 4."""
    lrs = lr.tolist()
    hyper = LionHyper(
        lr=lrs if isinstance(lrs, list) else float(lrs),
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        maximize=bool(options & _MAXIMIZE),
        cautious=bool(options & _CAUTIOUS),
        cautious_weight_decay=bool(options & _CAUTIOUS_DECAY),
    )
    plain.lion_step(params, grads, exp_avgs, hyper)


@lion_step_.register_fake
def _(params, grads, exp_avgs, lr, beta1, beta2, weight_decay, options) -> None:
    return None


def compiled_step(group: TensorGroup, hyper: LionHyper) -> bool:
    """Step ``group`` through the custom op; False when it cannot (see the module docstring)."""
    if group.kind != PLAIN_KIND or hyper.rounding_keys is not None or not plain.loaded():
        return False
    lr = hyper.lr
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            return False
        lr = lr.reshape(())  # a shape-(1,) lr is one lr for every tensor, not a per-tensor list
    elif isinstance(lr, (int, float)):
        lr = torch.tensor(float(lr), dtype=torch.float64)
    else:
        lr = torch.tensor([float(x) for x in lr], dtype=torch.float64)
    if not plain.supports(group.params, group.grads, group.momenta, hyper):
        return False
    options = (
        (_MAXIMIZE if hyper.maximize else 0)
        | (_CAUTIOUS if hyper.cautious else 0)
        | (_CAUTIOUS_DECAY if hyper.cautious_weight_decay else 0)
    )
    torch.ops.lionopt.lion_step_(
        group.params,
        group.grads,
        group.momenta,
        lr,
        float(hyper.beta1),
        float(hyper.beta2),
        float(hyper.weight_decay),
        options,
    )
    return True
