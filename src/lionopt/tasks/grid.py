"""Log-spaced learning-rate grids on the 1-3-10 sequence, and their extension at an edge."""

from __future__ import annotations

import math


def nice(value: float) -> float:
    """The 1-3-10 sequence value (1, 3, 10, 30, ...) nearest to ``value`` in log scale."""
    k = round(2 * math.log10(value))
    return float(f"{(3 if k % 2 else 1) * 10 ** (k // 2):.12g}")


def neighbour(value: float, direction: int) -> float:
    """The next 1-3-10 value above (``direction=1``) or below (``-1``) ``value``."""
    k = round(2 * math.log10(nice(value))) + direction
    return float(f"{(3 if k % 2 else 1) * 10 ** (k // 2):.12g}")


def default_grid(center: float, points: int = 4) -> list[float]:
    """``points`` 1-3-10 values around ``center``: one below it, the rest at and above it."""
    grid = [neighbour(center, -1)]
    while len(grid) < points:
        grid.append(neighbour(grid[-1], 1))
    return grid


def scaled_grid(values, scale: float) -> list[float]:
    """Each value times ``scale`` (e.g. Lion's grid from AdamW's tuned lr)."""
    return [v * scale for v in values]
