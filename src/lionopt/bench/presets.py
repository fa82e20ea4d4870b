"""Parameter lists to benchmark: the shapes of a model's tensors, without the model."""

from __future__ import annotations

import math

Shape = tuple[int, ...]


def gpt_shapes(d_model: int, n_layers: int, vocab: int, context: int) -> list[Shape]:
    """The tensors of a GPT-2-style decoder (tied embedding): 12 per block plus 4."""
    shapes: list[Shape] = [(vocab, d_model), (context, d_model)]
    d = d_model
    block = [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,)]  # ln_1, attention qkv, proj
    block += [(d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # ln_2, mlp fc, proj
    for _ in range(n_layers):
        shapes += block
    return [*shapes, (d,), (d,)]  # ln_f


def many_small_shapes(count: int = 2000) -> list[Shape]:
    """Many small tensors (biases, norms, small heads): sizes 512 to 8192, 6.35M in all."""
    sizes = (512, 1024, 2048, 4096, 8192)
    return [(sizes[i % len(sizes)],) for i in range(count)]


PRESETS: dict[str, tuple[str, list[Shape]]] = {
    "gpt": (
        "GPT-like, d=512, 8 layers, vocab 8192: 100 tensors, 29.9M params",
        gpt_shapes(512, 8, 8192, 1024),
    ),
    "gpt2-small": (
        "GPT-2 small, d=768, 12 layers, vocab 50257: 148 tensors, 124.4M params",
        gpt_shapes(768, 12, 50257, 1024),
    ),
    "one-large": ("one tensor of 2**25 = 33.6M params", [(2**25,)]),
    "many-small": ("2000 tensors of 512-8192 params, 6.35M params", many_small_shapes()),
    "tiny": ("10 small tensors, 20.8k params (smoke tests)", [(64, 64), (64,)] * 5),
}

DEFAULT_PRESETS = ("gpt", "many-small")


def numel(shape: Shape) -> int:
    return math.prod(shape)


def parse_shapes(text: str) -> list[Shape]:
    """``"1024x1024,4096,3x4x5"`` -> [(1024, 1024), (4096,), (3, 4, 5)]."""
    shapes = []
    for item in text.split(","):
        item = item.strip().lower()
        if not item:
            continue
        dims = tuple(int(d) for d in item.split("x"))
        if not dims or any(d < 0 for d in dims):
            raise ValueError(f"bad shape {item!r} in --shapes")
        shapes.append(dims)
    if not shapes:
        raise ValueError("--shapes names no shape")
    return shapes
