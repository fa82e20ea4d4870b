"""Distributed training with Lion: Distributed Lion (sign votes instead of gradients)."""

from lionopt.distributed.dlion import DistributedLion, checkpoint_world_size, local_gradients

__all__ = ["DistributedLion", "checkpoint_world_size", "local_gradients"]
