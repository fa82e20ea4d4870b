"""Switch a run from AdamW to Lion mid-training, explicitly: ``adamw_to_lion``.

``Lion.load_state_dict`` refuses an AdamW state dict (``lionopt.state.foreign``), because
loading one by accident would train on with AdamW's hyperparameters. This is the deliberate
way: AdamW's first moment ``exp_avg`` (an EMA of the gradients, as Lion's momentum is) becomes
Lion's momentum; the second moment and the step count are dropped. Each group's lr and
weight decay are translated from AdamW's (``lionopt.hparams.from_adamw``, factor 3 by default,
or ``hparams=`` with figures of your own, e.g. from ``lionopt.hparams.calibrate``); an LR
scheduler's ``initial_lr`` is translated by the same rule, so a scheduler rebuilt on the Lion
optimizer continues the schedule at Lion's scale. Lion's betas stay those it was built with.

AdamW's ``exp_avg`` follows β1 = 0.9 by default, Lion's momentum β2 = 0.99: the momentum is
carried over as it is and then decays at Lion's rate.
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from lionopt.hparams import DEFAULT_FACTOR, from_adamw

__all__ = ["adamw_to_lion"]


def adamw_to_lion(
    adamw: torch.optim.Optimizer | dict[str, Any],
    lion: torch.optim.Optimizer,
    *,
    factor: float = DEFAULT_FACTOR,
    hparams: dict[str, float] | list[dict[str, float]] | None = None,
) -> None:
    """Load AdamW's state (an optimizer or its ``state_dict()``) into ``lion``, converted.

    ``lion`` must be built over the same parameters in the same groups. ``hparams``: Lion's
    ``{"lr": ..., "weight_decay": ...}`` for every group (or one dict per group) instead of
    ``from_adamw(group lr, group weight_decay, factor)``. Raises ValueError, before anything
    changes, when the groups do not match or a state has no ``exp_avg``.
    """
    source = adamw.state_dict() if isinstance(adamw, torch.optim.Optimizer) else adamw
    source = copy.deepcopy(source)
    target = lion.state_dict()
    groups, saved_groups = target["param_groups"], source.get("param_groups", [])
    if len(groups) != len(saved_groups) or any(
        len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)
    ):
        raise ValueError(
            "adamw_to_lion: the Lion optimizer's groups do not match AdamW's "
            f"({[len(g['params']) for g in groups]} vs {[len(s['params']) for s in saved_groups]}"
            " parameters per group); build Lion over the same parameter groups"
        )
    if isinstance(hparams, list) and len(hparams) != len(groups):
        raise ValueError(f"adamw_to_lion: {len(hparams)} hparams dicts for {len(groups)} groups")
    state: dict[int, dict[str, Any]] = {}
    for group, saved in zip(groups, saved_groups):
        for index, key in zip(group["params"], saved["params"]):
            old = source.get("state", {}).get(key)
            if not old:
                continue
            if "exp_avg" not in old:
                raise ValueError(
                    f"adamw_to_lion: the state of parameter {key} has no 'exp_avg' "
                    f"({sorted(map(str, old))}); is this an AdamW state dict?"
                )
            state[index] = {"exp_avg": old["exp_avg"]}
    for i, (group, saved) in enumerate(zip(groups, saved_groups)):
        chosen = hparams[i] if isinstance(hparams, list) else hparams
        translated = (
            dict(chosen)
            if chosen is not None
            else from_adamw(float(saved["lr"]), float(saved.get("weight_decay", 0.0)), factor)
        )
        group["lr"] = translated["lr"]
        group["weight_decay"] = translated["weight_decay"]
        if "initial_lr" in saved:
            ratio = float(saved["initial_lr"]) / float(saved["lr"]) if saved["lr"] else 1.0
            group["initial_lr"] = translated["lr"] * ratio
        if group.get("decouple_lr"):
            group["max_lr"] = group.get("initial_lr", translated["lr"])
        if hasattr(lion, "validate_group"):
            lion.validate_group(group)  # a bad translated value: ValueError, nothing loaded
    target["state"] = state
    lion.load_state_dict(target)
