"""Import training frameworks for the integration tests, or skip with the exact reason.

``require("transformers")`` returns the module, or skips the test with the import error. timm
and Lightning import torchvision when it is installed; a torchvision wheel built for another
torch (here: torchvision 0.28.0+cu130 beside torch 2.13.0+cpu) fails at import with
``RuntimeError: operator torchvision::nms does not exist``, because its ``_C.so`` does not load
and ``torchvision._meta_registrations`` then registers fake kernels for undefined ops. In that
case ``require`` declares the two op schemas (``torchvision::nms``, ``torchvision::qnms``) with
no kernels, with one warning, so that the pure-Python parts of torchvision that timm uses
import; the ops themselves still fail if called (these tests never call them).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch

_SHIM = None
_TORCHVISION_OPS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)


def require(name: str, *attributes: str):
    """The imported framework module, or ``pytest.skip`` with the reason it cannot import.

    ``attributes`` are looked up too (``require("transformers", "Trainer")``): some packages
    import their parts lazily, so a broken dependency shows only then.
    """
    _torchvision_importable()
    try:
        module = importlib.import_module(name)
        for attribute in attributes:
            getattr(module, attribute)
    except Exception as exc:  # ImportError, or a broken binary extension's RuntimeError
        pytest.skip(f"{name} cannot be imported here: {type(exc).__name__}: {exc}")
    return module


def _torchvision_importable() -> None:
    """Declare torchvision's op schemas when its compiled extension cannot load (see above)."""
    global _SHIM
    if _SHIM is not None or importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.load_library(_torchvision_extension())
        _SHIM = False
        return
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
    _SHIM = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _TORCHVISION_OPS:
        with contextlib.suppress(RuntimeError):  # already defined
            _SHIM.define(schema)
    warnings.warn(
        "tests: torchvision's compiled ops do not load beside this torch "
        f"({reason}; importing it raises 'operator torchvision::nms does not exist'); "
        "declared the op schemas without kernels so that timm and Lightning import",
        RuntimeWarning,
        stacklevel=3,
    )


def _torchvision_extension() -> str:
    spec = importlib.util.find_spec("torchvision")
    folder = Path(spec.origin).parent
    candidates = sorted(folder.glob("_C*.so")) + sorted(folder.glob("_C*.pyd"))
    if not candidates:
        raise OSError(f"no compiled extension in {folder}")
    return str(candidates[0])
