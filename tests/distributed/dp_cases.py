"""Data-parallel cases run inside a spawned gloo group: DDP, ZeRO-1, DeepSpeed ZeRO 1 and 2.

Each rank trains on its own batch. The reference is one process stepping the unsharded model
on the mean of the ranks' gradients (computed here from the same batches); at world 2 the
mean is exact, so the parameters must match bitwise in float64 (DeepSpeed: fp32).
"""

from __future__ import annotations

import copy
import os
import sys
import traceback

import torch
import torch.distributed as dist
from torch import nn

import lionopt
from lionopt import Lion

STEPS = 6
SAVE_AT = 3
LR = 1e-2
WD = 0.1


def _model(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 20, dtype=dtype), nn.Tanh(), nn.Linear(20, 5, dtype=dtype))


def _batch(step, rank, dtype):
    gen = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(4, 6, generator=gen, dtype=dtype)


def _loss(model, x):
    return model(x).square().mean()


def _reference(world, dtype, steps, **kwargs):
    """One process: the mean of the ranks' gradients each step."""
    model = _model(dtype)
    opt = Lion(model.parameters(), lr=LR, weight_decay=WD, **kwargs)
    for step in range(steps):
        grads = []
        for r in range(world):
            model.zero_grad()
            _loss(model, _batch(step, r, dtype)).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for i, p in enumerate(model.parameters()):
            p.grad = sum(g[i] for g in grads) / world
        opt.step()
    return model


def _same_on_every_rank(params):
    for i, p in enumerate(params):
        gathered = [torch.empty_like(p) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, p.detach().contiguous())
        for r, other in enumerate(gathered):
            assert torch.equal(other, p), f"parameter {i} differs between rank 0 and rank {r}"


def _equal(model, ref, what):
    for i, (p, pr) in enumerate(zip(model.parameters(), ref.parameters(), strict=True)):
        assert torch.equal(p.detach(), pr.detach()), f"{what}: parameter {i} differs"


def case_ddp(rank, world, tmp):
    from torch.nn.parallel import DistributedDataParallel as DDP

    for kwargs in ({}, dict(cautious=True), dict(momentum_dtype="int8")):
        model = DDP(_model(torch.float64))
        opt = Lion(model.parameters(), lr=LR, weight_decay=WD, **kwargs)
        for step in range(STEPS):
            opt.zero_grad()
            _loss(model, _batch(step, rank, torch.float64)).backward()
            opt.step()
        _same_on_every_rank(list(model.parameters()))
        _equal(model.module, _reference(world, torch.float64, STEPS, **kwargs), f"DDP {kwargs}")


def _zero(model, **kwargs):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(
        model.parameters(), optimizer_class=lionopt.Lion, lr=LR, weight_decay=WD, **kwargs
    )


def _train(model, opt, rank, first, last, dtype=torch.float64):
    for step in range(first, last):
        opt.zero_grad()
        _loss(model, _batch(step, rank, dtype)).backward()
        opt.step()


def case_zero1(rank, world, tmp):
    """ZeroRedundancyOptimizer(optimizer_class=Lion) == DDP + Lion; consolidate, save, resume."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    for kwargs in ({}, dict(cautious=True), dict(momentum_dtype="int8")):
        model = DDP(_model(torch.float64))
        opt = _zero(model, **kwargs)
        _train(model, opt, rank, 0, SAVE_AT)
        opt.consolidate_state_dict(to=0)
        path = os.path.join(tmp, "zero1.pt")
        if rank == 0:
            torch.save({"model": model.module.state_dict(), "optim": opt.state_dict()}, path)
        dist.barrier()
        _train(model, opt, rank, SAVE_AT, STEPS)
        _same_on_every_rank(list(model.parameters()))
        _equal(model.module, _reference(world, torch.float64, STEPS, **kwargs), f"ZeRO {kwargs}")

        saved = torch.load(path, weights_only=True)
        model2 = DDP(_model(torch.float64))
        model2.module.load_state_dict(saved["model"])
        opt2 = _zero(model2, **kwargs)
        opt2.load_state_dict(saved["optim"])
        _train(model2, opt2, rank, SAVE_AT, STEPS)
        _equal(model2.module, model.module, f"ZeRO resumed {kwargs}")
        dist.barrier()


def _no_shm_build():
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about a minute, and
    a lock that a killed run leaves behind); gloo's all-reduce is all these tests need."""
    import importlib

    importlib.import_module("deepspeed.comm.torch")  # the module, not deepspeed.comm's `torch`
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _deepspeed_engine(stage, **kwargs):
    import deepspeed

    _no_shm_build()

    model = _model(torch.float32)
    opt = Lion(model.parameters(), lr=LR, weight_decay=WD, **kwargs)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,  # DeepSpeed's default clips to 1.0: not Lion's rule
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def _ds_train(engine, rank, first, last):
    for step in range(first, last):
        loss = _loss(engine, _batch(step, rank, torch.float32))
        engine.backward(loss)
        engine.step()


def case_deepspeed(rank, world, tmp):
    """DeepSpeed ZeRO 1 and 2 with lionopt.Lion: == one process on the mean gradient; save,
    resume == uninterrupted; cautious and Tiger raise (flat partitions are not whole tensors)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    figures = {}
    for stage in (1, 2):
        for kwargs in ({}, dict(momentum_dtype=torch.bfloat16)):
            engine = _deepspeed_engine(stage, **kwargs)
            _ds_train(engine, rank, 0, SAVE_AT)
            tag = f"stage{stage}_{kwargs.get('momentum_dtype', 'fp32')}".replace("torch.", "")
            engine.save_checkpoint(os.path.join(tmp, "ds"), tag=tag)
            _ds_train(engine, rank, SAVE_AT, STEPS)
            ref = _reference(world, torch.float32, STEPS, **kwargs)
            diff = max(
                float((p.detach() - pr.detach()).abs().max())
                for p, pr in zip(engine.module.parameters(), ref.parameters(), strict=True)
            )
            figures[f"{tag}_max_abs_vs_reference"] = diff
            _equal(engine.module, ref, f"DeepSpeed stage {stage} {kwargs}")
            resumed = _deepspeed_engine(stage, **kwargs)
            resumed.load_checkpoint(os.path.join(tmp, "ds"), tag=tag)
            _ds_train(resumed, rank, SAVE_AT, STEPS)
            _equal(resumed.module, engine.module, f"DeepSpeed stage {stage} resumed")
        for kwargs in (dict(cautious=True),):
            engine = _deepspeed_engine(stage, **kwargs)
            before = [p.detach().clone() for p in engine.module.parameters()]
            try:
                _ds_train(engine, rank, 0, 1)
            except ValueError as error:
                assert "whole" in str(error), error
            else:
                raise AssertionError(f"DeepSpeed stage {stage} accepted {kwargs}")
            for b, p in zip(before, engine.module.parameters(), strict=True):
                assert torch.equal(b, p.detach()), "the refused step changed a parameter"
    return figures


def case_deepspeed_tiger(rank, world, tmp):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    _no_shm_build()
    for stage in (1, 2):
        model = _model(torch.float32)
        opt = lionopt.Tiger(model.parameters(), lr=1e-3)
        config = {
            "train_micro_batch_size_per_gpu": 4,
            "gradient_clipping": 0.0,
            "zero_optimization": {"stage": stage},
            "zero_allow_untested_optimizer": True,
        }
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        try:
            _ds_train(engine, rank, 0, 1)
        except ValueError as error:
            assert "whole" in str(error), error
        else:
            raise AssertionError(f"DeepSpeed stage {stage} accepted Tiger")
    return {}


CASES = {
    "ddp": case_ddp,
    "zero1": case_zero1,
    "deepspeed": case_deepspeed,
    "deepspeed_tiger": case_deepspeed_tiger,
}


def run_cases(rank, world, names, tmp):
    results = {}
    for name in names:
        try:
            figures = CASES[name](rank, world, tmp) or {}
            ok, message = True, ""
        except Exception:
            ok, message, figures = False, traceback.format_exc(), {}
        flag = torch.tensor([0 if ok else 1])
        dist.all_reduce(flag)
        if ok and int(flag):
            ok, message = False, "failed on another rank"
        results[name] = (ok, message, figures)
    return results


__all__ = ["CASES", "copy", "run_cases"]
