"""Implementations of one Lion step over a ``TensorGroup`` (``kernels.group``).

- ``reference``: the per-tensor loop, the definition every other path is tested against
  (also over 8-bit momentum: dequantise, the reference step in fp32, requantise);
- ``foreach``: the same math with ``torch._foreach_*`` ops, a few launches per group;
- ``registry``: the fused backends, ``Backend`` records that ``cpu/`` (C++ kernels) and
  ``triton/`` (CUDA) register when imported, which this package does;
- ``hyper``: ``LionHyper``, the step's hyperparameters; ``rounding``: stochastic rounding.

Kernels never import the optimizers (``lionopt.optim``) or the functional API.
"""

from lionopt.kernels import cpu, registry, triton

__all__ = ["cpu", "registry", "triton"]
