"""Per-tensor rules need whole parameters: a guard against flat partitions (DeepSpeed ZeRO).

DeepSpeed ZeRO stages 1 and 2 replace each optimizer group's parameters, after the optimizer
was built, by one flat fp32 partition of the group's concatenated parameters
(``param_group["params"] = [flat]``). Lion's elementwise update is exact on that. A rule that
takes a statistic per tensor is not: cautious Lion's mask mean and Tiger's RMS and non-finite
guard would be taken over a slice of a concatenation of tensors. So the optimizer notes each
group's parameter shapes when the group is added, and such a rule refuses (ValueError, before
anything changes) to step a group whose parameters were replaced by tensors of other shapes.
Replacements that keep the shapes (Accelerate's FSDP2 preparation swaps parameters matched by
``data_ptr``; FSDP2 keeps global shapes) pass.
"""

from __future__ import annotations

from typing import Any

__all__ = ["check_whole", "remember_shapes"]


def _shapes(params: list) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in params]


def remember_shapes(optimizer: Any) -> None:
    """Note the shapes of the newest group's parameters (call after ``add_param_group``)."""
    records = optimizer.__dict__.setdefault("_whole_shapes", [])
    group = optimizer.param_groups[-1]
    records.append((group["params"], _shapes(group["params"])))


def check_whole(optimizer: Any, index: int, rule: str) -> None:
    """ValueError when group ``index``'s parameters are no longer the tensors it was given."""
    records = optimizer.__dict__.get("_whole_shapes")
    if records is None or index >= len(records):
        return  # an optimizer restored by pickle: nothing was noted
    params = optimizer.param_groups[index]["params"]
    noted, shapes = records[index]
    if params is noted:
        return
    now = _shapes(params)
    if now != shapes:
        raise ValueError(
            f"{rule} needs whole parameters, but group {index}'s parameters were replaced by "
            f"tensors of other shapes ({len(shapes)} tensors {shapes[:3]}... became {len(now)} "
            f"tensors {now[:3]}...), as DeepSpeed ZeRO's flat partitions do. Its per-tensor "
            "statistics would be wrong there: use plain Lion (elementwise, exact on partitions), "
            "or FSDP2 / DDP / torch's ZeroRedundancyOptimizer, which keep parameters whole."
        )
    records[index] = (params, now)
