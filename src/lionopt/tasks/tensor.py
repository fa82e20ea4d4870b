"""``TensorTask``: a comparison task from in-memory tensors, a model factory and two functions.

For a user's own model and data that fit in memory::

    task = TensorTask(name="mine", model=lambda: MyNet(), train=(x, y), val=(xv, yv),
                      loss=torch.nn.functional.cross_entropy,
                      metric=lambda out, y: (out.argmax(1) == y).float().mean().item(),
                      higher_is_better=True, steps=1000, batch_size=128,
                      adamw_lr=1e-3, adamw_weight_decay=0.01)

then ``lionopt compare --task myfile.py:task`` (or a function returning it). Batches are drawn
epoch by epoch from fresh permutations of the training rows; the tune split holds out 20% of
the training rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from lionopt.tasks.base import Task, TaskData, epoch_permutations


def _pair(name: str, value) -> tuple[torch.Tensor, torch.Tensor]:
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ValueError(f"TensorTask: {name} must be a pair (inputs, targets)")
    x, y = (torch.as_tensor(v) for v in value)
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"TensorTask: {name} inputs and targets need the same number of rows, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if x.shape[0] == 0:
        raise ValueError(f"TensorTask: {name} is empty")
    return x, y


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"TensorTask: {name} must be a positive integer, got {value!r}")
    return value


def _positive_float(name: str, value, allow_zero: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"TensorTask: invalid {name}: {value}")
    return value


class TensorTask(Task):
    """A task from tensors: ``model`` is a zero-argument callable returning an ``nn.Module``.

    ``loss(outputs, targets)`` returns the scalar training loss; ``metric(outputs, targets)``
    returns the validation metric as a float (``higher_is_better`` says its direction). The
    model is called on a batch of inputs; evaluation runs over ``val`` in chunks of
    ``eval_batch_size`` rows and concatenates the outputs along dim 0.
    """

    def __init__(
        self,
        *,
        name: str,
        model: Callable[[], nn.Module],
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor],
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        metric: Callable[[torch.Tensor, torch.Tensor], float],
        higher_is_better: bool = True,
        steps: int = 1000,
        batch_size: int = 64,
        adamw_lr: float = 1e-3,
        adamw_weight_decay: float = 0.01,
        title: str | None = None,
        metric_name: str | None = None,
        eval_batch_size: int = 4096,
    ):
        if not isinstance(name, str) or not name.strip():
            raise ValueError("TensorTask: name must be a non-empty string")
        for key, fn in (("model", model), ("loss", loss), ("metric", metric)):
            if not callable(fn):
                raise ValueError(f"TensorTask: {key} must be callable, got {type(fn).__name__}")
        self.name = name
        self.title = title or name
        self._model, self._loss, self._metric = model, loss, metric
        self._train, self._val = _pair("train", train), _pair("val", val)
        fn_name = getattr(metric, "__name__", "")
        self.metric = metric_name or (fn_name if fn_name.isidentifier() else "metric")
        self.higher_is_better = bool(higher_is_better)
        self.steps = _positive_int("steps", steps)
        self.quick_steps = max(1, min(self.steps, 100))
        self.batch_size = _positive_int("batch_size", batch_size)
        self.adamw_lr = _positive_float("adamw_lr", adamw_lr)
        self.adamw_weight_decay = _positive_float(
            "adamw_weight_decay", adamw_weight_decay, allow_zero=True
        )
        self.eval_batch_size = _positive_int("eval_batch_size", eval_batch_size)
        self.source = "user tensors"
        self.licence = "-"

    def load(self, data_dir: str | None = None) -> TaskData:
        (tx, ty), (vx, vy) = self._train, self._val
        info = {"train_size": int(tx.shape[0]), "val_size": int(vx.shape[0])}
        return TaskData(tx, ty, vx, vy, info)

    def build_model(self, data: TaskData) -> nn.Module:
        model = self._model()
        if not isinstance(model, nn.Module):
            raise ValueError(
                f"TensorTask {self.name!r}: model() must return an nn.Module, "
                f"got {type(model).__name__}"
            )
        return model

    def batch_indices(self, data, steps, batch_size, generator):
        return epoch_permutations(data.train_x.shape[0], steps, batch_size, generator)

    def get_batch(self, data, indices):
        return data.train_x[indices], data.train_y[indices]

    def loss(self, model, batch):
        x, y = batch
        return self._loss(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, data):
        n = data.val_x.shape[0]
        outputs = torch.cat(
            [
                model(data.val_x[i : i + self.eval_batch_size])
                for i in range(0, n, self.eval_batch_size)
            ]
        )
        return float(self._loss(outputs, data.val_y)), float(self._metric(outputs, data.val_y))
