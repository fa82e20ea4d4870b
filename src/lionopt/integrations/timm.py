"""Register lionopt's optimizers in timm's optimizer registry.

After ``lionopt.integrations.timm.register()``, ``timm.optim.create_optimizer_v2(model,
"lionopt", lr=..., weight_decay=...)`` builds a ``lionopt.Lion`` with timm's parameter groups
(no decay for biases and norm gains, layer decay, ...). Registered names:

- ``lionopt``: ``lionopt.Lion``; ``clionopt``: ``Lion(cautious=True)``;
- ``signumopt``: ``lionopt.Signum``; ``tigeropt``: ``lionopt.Tiger``.

timm's own ``lion`` entry (its ``timm.optim.Lion``) is left alone. timm splits names at ``_``
(``lookahead_lionopt``), so the names have none. timm passes ``eps`` to optimizers that declare
it; these do not, so it drops it.
"""

from __future__ import annotations

__all__ = ["NAMES", "register"]

NAMES = ("lionopt", "clionopt", "signumopt", "tigeropt")


def register(registry=None) -> tuple[str, ...]:
    """Add lionopt's optimizers to ``registry`` (default: timm's global one); returns the names.

    Calling it again re-registers the same entries (timm logs that it overwrites them).
    """
    from timm.optim._optim_factory import OptimInfo, default_registry

    from lionopt import Lion, Signum, Tiger

    registry = default_registry if registry is None else registry
    infos = (
        OptimInfo(
            "lionopt",
            Lion,
            "lionopt's Lion: fused CPU/Triton kernels",
            has_eps=False,
            has_betas=True,
        ),
        OptimInfo(
            "clionopt",
            Lion,
            "lionopt's Cautious Lion",
            has_eps=False,
            has_betas=True,
            defaults={"cautious": True},
        ),
        OptimInfo("signumopt", Signum, "lionopt's Signum", has_eps=False),
        OptimInfo("tigeropt", Tiger, "lionopt's Tiger", has_eps=False),
    )
    for info in infos:
        registry.register(info)
    return NAMES
