"""Refuse a state dict written by another kind of optimizer, before anything is loaded.

torch.optim's ``load_state_dict`` takes any state dict with the same group sizes: an AdamW
checkpoint would load into Lion silently, keep ``exp_avg_sq`` and ``step`` in the state, and
replace Lion's groups by AdamW's (its betas (0.9, 0.999), its lr and ``eps``), which Lion then
trains with. ``check_not_foreign`` raises ValueError instead, naming what it found. Switching
from AdamW to Lion on purpose is ``lionopt.convert.adamw_to_lion``.

What marks a foreign state dict: a group with ``eps`` or ``amsgrad`` (Adam-like; no Lion port
stores them), per-parameter state with a second moment or another optimizer's buffer
(``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ...), or per-parameter state without
``exp_avg`` (every Lion port stores its momentum there). Extra keys of other Lion ports load
(torch-optimi's ``kahan_comp``, pytorch-optimizer's group ``step``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FOREIGN_GROUP_KEYS", "FOREIGN_STATE_KEYS", "check_not_foreign"]

FOREIGN_GROUP_KEYS = ("eps", "amsgrad", "momentum", "nesterov", "dampening", "lr_decay", "alpha")
FOREIGN_STATE_KEYS = (
    "exp_avg_sq",
    "max_exp_avg_sq",
    "exp_avg_sq_row",
    "exp_avg_sq_col",
    "momentum_buffer",
    "square_avg",
    "sum",
    "acc_delta",
)


def check_not_foreign(optimizer: Any, state_dict: dict[str, Any]) -> None:
    """ValueError when ``state_dict`` was not written by a Lion-family optimizer."""
    name = type(optimizer).__name__
    hint = "; to switch from AdamW on purpose, use lionopt.convert.adamw_to_lion(adamw, lion)"
    for index, group in enumerate(state_dict.get("param_groups", [])):
        found = [key for key in FOREIGN_GROUP_KEYS if key in group]
        if found:
            raise ValueError(
                f"This state dict was not written by a Lion-family optimizer: parameter group "
                f"{index} has {', '.join(map(repr, found))} (an Adam/SGD-style "
                f"hyperparameter {name} does not have); nothing was loaded{hint}"
            )
    for key, state in state_dict.get("state", {}).items():
        if not state:
            continue
        found = [k for k in FOREIGN_STATE_KEYS if k in state]
        if found:
            raise ValueError(
                f"This state dict was not written by a Lion-family optimizer: the state of "
                f"parameter {key} has {', '.join(map(repr, found))}, which {name} does not "
                f"keep; nothing was loaded{hint}"
            )
        if "exp_avg" not in state:
            raise ValueError(
                f"This state dict was not written by a Lion-family optimizer: the state of "
                f"parameter {key} has no 'exp_avg' (the momentum), only "
                f"{sorted(map(str, state))}; nothing was loaded"
            )
