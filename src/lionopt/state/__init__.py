"""Optimizer state: momentum formats (``formats``), the 8-bit codec (``int8``) and the
``load_state_dict`` hooks (``checkpoint``). Below ``kernels`` and ``optim``: imports neither."""

from lionopt.state.formats import (
    Int8Blockwise,
    MomentumFormat,
    Plain,
    normalize_momentum_dtype,
    resolve_format,
)

__all__ = ["Int8Blockwise", "MomentumFormat", "Plain", "normalize_momentum_dtype", "resolve_format"]
