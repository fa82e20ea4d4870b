"""FSDP2 (``fully_shard``) and DCP: every Lion path on DTensors against the unsharded run.

The cases live in ``fsdp_cases.py``; each world size runs all of its cases in one spawned gloo
group (spawning costs seconds), in this order so that checkpoints reshard:

- world 1: FSDP2 on a 1-rank mesh, saves the DCP checkpoints;
- world 2: every path, the mixed group, bad input, real training, HSDP-free DCP cases
  (resume at 2 == uninterrupted; load of the world-1 checkpoint, 1→2);
- world 4: uneven shards with an empty one (5 rows over 4 ranks), HSDP on a 2x2 mesh, and
  the world-2 checkpoints loaded at 4 (2→4);
- world 1 again: the world-2 checkpoints loaded at 1 (2→1);
- this process, no process group: the world-2 checkpoints loaded into a plain model.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from harness import run_world

fsdp_cases = pytest.importorskip("fsdp_cases")
dcp = pytest.importorskip("torch.distributed.checkpoint")

if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch.distributed is not available", allow_module_level=True)

C = fsdp_cases
WORLD2 = [n for n in C.CASES if not n.startswith("hsdp_")]
WORLD4 = [
    "default",
    "fused",
    "int8",
    "stochastic_rounding",
    "cautious",
    "cautious_int8",
    "tiger_nan",
    "tiger_groups",
    "mixed_group",
    "diagnostics",
    "tiger_int8",
    *(f"hsdp_{n}" for n in C.HSDP_PATHS),
    *(f"dcp_{n}" for n in C.DCP_PATHS),
]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    ckpt = str(tmp_path_factory.mktemp("dcp"))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = {}
    dcp_names = [f"dcp_{n}" for n in C.DCP_PATHS]
    results[1] = run_world(C.run_cases, 1, dcp_names, ckpt, 0)[0]
    results[2] = run_world(C.run_cases, 2, WORLD2, ckpt, 1)[0]
    results[4] = run_world(C.run_cases, 4, WORLD4, ckpt, 2)[0]
    results["1b"] = run_world(C.run_cases, 1, dcp_names, ckpt, 2)[0]
    return ckpt, results


def _check(results, name):
    ok, message, _ = results[name]
    assert ok, message


@pytest.mark.parametrize("name", WORLD2)
def test_world2(worlds, name):
    _check(worlds[1][2], name)


@pytest.mark.parametrize("name", WORLD4)
def test_world4(worlds, name):
    _check(worlds[1][4], name)


@pytest.mark.parametrize("name", [f"dcp_{n}" for n in C.DCP_PATHS])
def test_world1_saves(worlds, name):
    _check(worlds[1][1], name)


@pytest.mark.parametrize("name", [f"dcp_{n}" for n in C.DCP_PATHS])
def test_world1_loads_world2(worlds, name):
    """2→1 with FSDP2 on a 1-rank mesh."""
    _check(worlds[1]["1b"], name)


def test_int8_distance_is_reported(worlds):
    """8-bit at world 2: the whole-block parameter is exact, the rest within a few lr steps."""
    figures = worlds[1][2]["int8"][2]
    assert figures["max_abs"] <= 4 * C.STEPS * C.LR, figures


@pytest.mark.parametrize("path", [p for p in C.DCP_PATHS if p != "int8"])
def test_load_world2_checkpoint_into_plain_model(worlds, path):
    """A DCP checkpoint of FSDP2 at world 2 loads into an unsharded model, no process group,
    and resumes to the uninterrupted unsharded run. (Not 8-bit: a plain optimizer's 8-bit
    state is flat codes, which DCP cannot fill from the sharded fp32 presentation.)"""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ckpt, _ = worlds
    cls, kwargs, dtype, model_cls, exact = C.PATHS[path]
    nan = kwargs.get("nan", False)
    torch.manual_seed(0)
    ref = model_cls(dtype)
    model = copy.deepcopy(ref)
    opt_ref = C._optimizer(cls, kwargs, ref)
    C._steps(opt_ref, 0, C.STEPS, nan)
    opt = C._optimizer(cls, kwargs, model)
    model_sd, optim_sd = get_state_dict(model, opt)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=os.path.join(ckpt, "w2", path), no_dist=True)
    set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    C._steps(opt, C.SAVE_AT, C.STEPS, nan)
    for i, (pr, p) in enumerate(zip(ref.parameters(), model.parameters(), strict=True)):
        if exact is True:
            assert torch.equal(p, pr), f"{path}: parameter {i}"
        elif exact == "close":
            torch.testing.assert_close(p, pr, rtol=0, atol=1e-12)
        else:  # 8-bit: the global blocks differ from the world-2 shards' blocks
            assert (p - pr).abs().max() <= 4 * C.STEPS * C.LR
