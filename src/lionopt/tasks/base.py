"""The interface every comparison task implements, and the shared image-classification task.

A task owns its data (always read from local files, never from the network), its model, its
batch schedule and its validation metric. The training loop in :mod:`lionopt.tasks.protocol`
only talks to this interface, so adding a task means adding one module and one registry entry.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn


class TaskUnavailable(RuntimeError):
    """The task's data is not on this machine; the message says how to get it."""


@dataclasses.dataclass
class TaskData:
    """Train and validation tensors of one task (targets are ``None`` for language modelling)."""

    train_x: torch.Tensor
    train_y: torch.Tensor | None
    val_x: torch.Tensor
    val_y: torch.Tensor | None
    info: dict = dataclasses.field(default_factory=dict)

    def to(self, device: torch.device | str) -> TaskData:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return TaskData(
            move(self.train_x), move(self.train_y), move(self.val_x), move(self.val_y), self.info
        )


class Task:
    """Base class of a comparison task. Subclasses set the class attributes and the methods."""

    name: str = ""
    title: str = ""
    #: Name of the validation metric and its direction.
    metric: str = ""
    higher_is_better: bool = True
    #: The task's standard AdamW hyperparameters; Lion gets them through ``from_adamw``.
    adamw_lr: float = 1e-3
    adamw_weight_decay: float = 0.01
    #: Default and ``--quick`` step budgets and the default batch size.
    steps: int = 100
    quick_steps: int = 20
    batch_size: int = 32
    #: Share of the training data held out as the *tune* split (lr tuning evaluates on it).
    tune_fraction: float = 0.2
    #: AdamW's lr grid for tuning (log spaced); ``None``: 4 points of the 1-3-10 sequence
    #: around ``adamw_lr`` (see :func:`lionopt.tasks.grid.default_grid`).
    adamw_lr_grid: tuple[float, ...] | None = None
    #: Where the data comes from and under which licence (shown in reports).
    source: str = ""
    licence: str = ""

    def load(self, data_dir: str | None = None) -> TaskData:
        raise NotImplementedError

    def tune_data(self, data: TaskData) -> TaskData:
        """The tune split: train on the training data minus a held-out part, validate on it.

        The default holds out the last ``tune_fraction`` of a fixed shuffle (seed 0) of the
        training rows; the validation split is never touched.
        """
        n = data.train_x.shape[0]
        n_tune = max(1, round(n * self.tune_fraction))
        if n - n_tune < 1:
            raise ValueError(f"task {self.name!r}: too little training data for a tune split")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        order = order.to(data.train_x.device)
        keep, held = order[: n - n_tune], order[n - n_tune :]

        def rows(t, idx):
            return None if t is None else t[idx]

        info = {**data.info, "split": "tune", "train_size": n - n_tune, "val_size": n_tune}
        return TaskData(
            rows(data.train_x, keep),
            rows(data.train_y, keep),
            rows(data.train_x, held),
            rows(data.train_y, held),
            info,
        )

    def build_model(self, data: TaskData) -> nn.Module:
        raise NotImplementedError

    def batch_indices(
        self, data: TaskData, steps: int, batch_size: int, generator: torch.Generator
    ) -> torch.Tensor:
        """The whole run's batch schedule as a ``(steps, batch_size)`` integer tensor."""
        raise NotImplementedError

    def get_batch(self, data: TaskData, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, model: nn.Module, data: TaskData) -> tuple[float, float]:
        """Validation ``(loss, metric)``."""
        raise NotImplementedError

    def start_run(self, data: TaskData, seed: int) -> None:
        """Called before the first step of every run (a hook for tasks with their own data)."""

    def train_step(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        data: TaskData,
        indices: torch.Tensor,
        step: int,
    ) -> torch.Tensor:
        """One training step on the batch ``indices``; returns the (detached) loss.

        The default: ``loss``, ``zero_grad``, ``backward``, ``optimizer.step()``.
        """
        loss = self.loss(model, self.get_batch(data, indices))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach()

    def describe(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "adamw_lr": self.adamw_lr,
            "adamw_weight_decay": self.adamw_weight_decay,
            "source": self.source,
            "licence": self.licence,
        }


def epoch_permutations(n: int, steps: int, batch_size: int, generator: torch.Generator):
    """Indices of ``steps`` batches drawn epoch by epoch from fresh permutations of ``range(n)``."""
    need = steps * batch_size
    epochs = math.ceil(need / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return order[:need].view(steps, batch_size)


class SmallCNN(nn.Module):
    """Two conv-ReLU-maxpool blocks and a two-layer head, for square single-channel images."""

    def __init__(self, size: int, classes: int = 10, channels=(16, 32), hidden: int = 64):
        super().__init__()
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(), nn.Linear(hidden, classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class ImageClassificationTask(Task):
    """Images stored as ``uint8`` ``(N, H, W)``; standardised on the fly; metric: accuracy."""

    metric = "accuracy"
    higher_is_better = True
    #: Pixel value that maps to 1.0 before standardisation.
    pixel_max: float = 255.0
    eval_chunk: int = 2048
    #: Channels of the two conv blocks of :class:`SmallCNN`.
    channels: tuple[int, int] = (16, 32)

    def build_model(self, data: TaskData) -> nn.Module:
        classes = int(data.info["classes"])
        return SmallCNN(size=data.train_x.shape[-1], classes=classes, channels=self.channels)

    def batch_indices(self, data, steps, batch_size, generator):
        return epoch_permutations(data.train_x.shape[0], steps, batch_size, generator)

    def _inputs(self, data: TaskData, images: torch.Tensor) -> torch.Tensor:
        x = images.float().unsqueeze(1) / self.pixel_max
        return (x - data.info["mean"]) / data.info["std"]

    def get_batch(self, data, indices):
        return self._inputs(data, data.train_x[indices]), data.train_y[indices]

    def loss(self, model, batch):
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model, data):
        total_loss, correct, n = 0.0, 0, data.val_x.shape[0]
        for start in range(0, n, self.eval_chunk):
            x = self._inputs(data, data.val_x[start : start + self.eval_chunk])
            y = data.val_y[start : start + self.eval_chunk]
            logits = model(x)
            total_loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
        return total_loss / n, correct / n


def image_data(
    train_images, train_labels, val_images, val_labels, pixel_max: float, **info
) -> TaskData:
    """Wrap ``uint8`` numpy arrays as :class:`TaskData` with the train set's pixel statistics."""
    train_x = torch.from_numpy(train_images).to(torch.uint8)
    scaled = train_x.float() / pixel_max
    info = {
        "classes": int(train_labels.max()) + 1,
        "mean": scaled.mean().item(),
        "std": scaled.std().item(),
        "train_size": int(train_x.shape[0]),
        "val_size": int(val_images.shape[0]),
        **info,
    }
    return TaskData(
        train_x,
        torch.from_numpy(train_labels).long(),
        torch.from_numpy(val_images).to(torch.uint8),
        torch.from_numpy(val_labels).long(),
        info,
    )
