"""Accelerate: ``prepare(model, optimizer)`` with lionopt.Lion, ``save_state``/``load_state``
resume == uninterrupted, and parameters swapped after the optimizer was built.

Accelerate's FSDP2 path builds new (sharded) parameters after the optimizer exists and writes
them into ``optimizer.param_groups[i]["params"]``, matched by ``data_ptr``
(``accelerate.utils.fsdp_utils.fsdp2_switch_optimizer_parameters``). ``Lion`` remembers each
group's parameters for its C++ dispatch; the remembered layout is checked parameter by
parameter (identity) every step, so a swapped list is noticed and the new tensors are stepped.
The tests call accelerate's own switch function on one CPU process.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lionopt

from frameworks import require

accelerate = require("accelerate", "Accelerator")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

KWARGS = dict(lr=1e-3, weight_decay=0.1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))


def _batches(n):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)) for _ in range(n)]


def _train(accelerator, model, opt, batches):
    for x, y in batches:
        opt.zero_grad()
        accelerator.backward(nn.functional.mse_loss(model(x), y))
        opt.step()


def test_prepare_save_load_state_resume_equals_uninterrupted(tmp_path):
    batches = _batches(6)
    acc = accelerate.Accelerator(cpu=True)
    model = _model()
    model, opt = acc.prepare(model, lionopt.Lion(model.parameters(), **KWARGS))
    _train(acc, model, opt, batches[:3])
    acc.save_state(str(tmp_path / "ckpt"))
    _train(acc, model, opt, batches[3:])

    acc2 = accelerate.Accelerator(cpu=True)
    model2 = _model()
    model2, opt2 = acc2.prepare(model2, lionopt.Lion(model2.parameters(), **KWARGS))
    acc2.load_state(str(tmp_path / "ckpt"))
    _train(acc2, model2, opt2, batches[3:])
    inner, inner2 = opt.optimizer, opt2.optimizer
    assert isinstance(inner2, lionopt.Lion)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
        assert torch.equal(inner.state[p]["exp_avg"], inner2.state[q]["exp_avg"])


def _swap_parameters(model: nn.Module, opt) -> list[torch.Tensor]:
    """What accelerate's FSDP2 prepare does: new parameters, matched by data_ptr. Returns the
    old ones."""
    from accelerate.utils.fsdp_utils import fsdp2_switch_optimizer_parameters

    old = list(model.parameters())
    mapping = {}
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            new = nn.Parameter(p.detach().clone())
            setattr(module, name, new)
            mapping[p.data_ptr()] = new
    # accelerate's function indexes mapping[p.data_ptr] (the bound method); give it that key.
    fsdp2_switch_optimizer_parameters(opt, {p.data_ptr: mapping[p.data_ptr()] for p in old})
    return old


@pytest.mark.parametrize("steps_before_swap", [0, 2])
@pytest.mark.parametrize("implementation", ["fused", "foreach", "loop"], indirect=True)
def test_parameters_replaced_after_the_optimizer_was_built(implementation, steps_before_swap):
    from support import IMPLEMENTATIONS

    batches = _batches(6)
    acc = accelerate.Accelerator(cpu=True)
    model = _model()
    opt = lionopt.Lion(model.parameters(), **KWARGS, **IMPLEMENTATIONS[implementation])
    model, opt = acc.prepare(model, opt)
    _train(acc, model, opt, batches[:steps_before_swap])  # layouts are remembered here
    old = _swap_parameters(model, opt.optimizer)
    frozen = [p.detach().clone() for p in old]
    state = opt.optimizer.state
    state_before = {id(p): state[p]["exp_avg"].clone() for p in old if p in state}
    _train(acc, model, opt, batches[steps_before_swap:])

    # The reference: the same steps on a fresh optimizer over the new parameters. Lion keys
    # its state by tensor, as torch.optim does, so state built before the swap stays with the
    # old tensors and the new ones start with zero momentum.
    ref_model = _model()
    ref_opt = lionopt.Lion(ref_model.parameters(), **KWARGS, foreach=False, fused=False)
    _train(acc, ref_model, ref_opt, batches[:steps_before_swap])
    ref_opt = lionopt.Lion(ref_model.parameters(), **KWARGS, foreach=False, fused=False)
    _train(acc, ref_model, ref_opt, batches[steps_before_swap:])

    for p, before in zip(old, frozen):
        assert torch.equal(p.detach(), before)  # the stale tensors were never written
        if id(p) in state_before:
            assert torch.equal(opt.optimizer.state[p]["exp_avg"], state_before[id(p)])
    for p, q in zip(model.parameters(), ref_model.parameters()):
        assert torch.equal(p, q)
    assert all(p in opt.optimizer.state for p in model.parameters())
    if steps_before_swap:
        # torch.optim's state_dict() cannot save state whose tensor left param_groups.
        with pytest.raises(KeyError):
            opt.optimizer.state_dict()
