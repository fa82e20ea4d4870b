"""Fashion-MNIST (Zalando, 28x28 clothing images, 10 classes), small CNN. Optional data.

Data: the four official IDX files (``train-images-idx3-ubyte.gz`` etc.), looked up in order in
``--data-dir``, in ``$LIONOPT_DATA_DIR``, and in ``/usr/share/datasets/fashion-mnist`` where
Debian's ``dataset-fashion-mnist`` package installs them (``apt-get install
dataset-fashion-mnist``); each directory is also searched for a ``fashion-mnist``
subdirectory. Nothing is downloaded: without the files the task is skipped with a message.
Licence: MIT (c) 2017 Zalando SE; Xiao, Rasul, Vollgraf, arXiv:1708.07747.

Split: all 60,000 training images; validation on the first 2,000 images of the official test
set (kept small so evaluation stays cheap on a CPU). AdamW: lr 1e-3, weight decay 0.01.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from lionopt.tasks.base import ImageClassificationTask, TaskData, TaskUnavailable, image_data

ENV_VAR = "LIONOPT_DATA_DIR"
DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
VAL_SIZE = 2000


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims).copy()


def candidate_dirs(data_dir: str | None) -> list[Path]:
    roots = [d for d in (data_dir, os.environ.get(ENV_VAR)) if d] + [DEBIAN_DIR]
    dirs: list[Path] = []
    for root in roots:
        dirs += [Path(root), Path(root) / "fashion-mnist"]
    return dirs


def find_files(data_dir: str | None) -> dict[str, Path]:
    for directory in candidate_dirs(data_dir):
        found = {}
        for key, stem in FILES.items():
            for name in (stem + ".gz", stem):
                if (directory / name).is_file():
                    found[key] = directory / name
                    break
        if len(found) == len(FILES):
            return found
    searched = ", ".join(str(d) for d in candidate_dirs(data_dir))
    raise TaskUnavailable(
        "Fashion-MNIST files not found (searched: "
        f"{searched}). Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) "
        f"or point --data-dir / ${ENV_VAR} at a folder holding {FILES['train_images']}.gz and "
        "the three other official files."
    )


class FashionTask(ImageClassificationTask):
    name = "fashion"
    title = "Fashion-MNIST 28x28, small CNN"
    pixel_max = 255.0
    channels = (8, 16)
    adamw_lr = 1e-3
    adamw_weight_decay = 0.01
    steps = 300
    quick_steps = 100
    batch_size = 128
    source = "Fashion-MNIST (Zalando Research), local IDX files, e.g. Debian dataset-fashion-mnist"
    licence = "MIT"

    def load(self, data_dir: str | None = None) -> TaskData:
        files = find_files(data_dir)
        arrays = {key: read_idx(path) for key, path in files.items()}
        return image_data(
            arrays["train_images"],
            arrays["train_labels"],
            arrays["val_images"][:VAL_SIZE],
            arrays["val_labels"][:VAL_SIZE],
            self.pixel_max,
            directory=str(files["train_images"].parent),
        )
