"""Implementations of one Lion step over lists of tensors.

- ``reference``: the per-tensor loop, the definition every other path is tested against;
- ``foreach``: the same math with ``torch._foreach_*`` ops, a few launches per group;
- ``fused_cpu``: a compiled one-pass kernel for CPU tensors;
- ``triton_lion``: a one-launch multi-tensor Triton kernel for CUDA tensors.

All of them share one signature (see ``lionopt.functional.lion``) and update in place.
"""
