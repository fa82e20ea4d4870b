"""Tests of the real-data tasks: shipped data, optional Fashion-MNIST, and no network access."""

from __future__ import annotations

import gzip
import socket
import struct

import numpy as np
import pytest
import torch

from lionopt.tasks import TASKS, TaskUnavailable, get_task
from lionopt.tasks import fashion as fashion_module
from lionopt.tasks.base import epoch_permutations


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_fashion(tmp_path):
    """A tiny Fashion-MNIST in the official IDX format, in a ``fashion-mnist`` subfolder."""
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(40) % 10)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (12, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(12) % 10)
    return tmp_path


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    monkeypatch.setattr(fashion_module, "DEBIAN_DIR", str(tmp_path / "absent"))
    monkeypatch.delenv(fashion_module.ENV_VAR, raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection or resolve a name raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("a task loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_network_guard_is_active(no_network):
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("localhost", 9))


def test_every_task_loads_without_network(no_network, no_system_fashion, fake_fashion):
    for name in TASKS:
        data = get_task(name).load(str(fake_fashion))
        assert data.train_x.shape[0] > 0 and data.val_x.shape[0] > 0


def test_digits_data():
    data = get_task("digits").load()
    assert data.train_x.shape[1:] == (8, 8)
    assert data.train_x.shape[0] + data.val_x.shape[0] == 1797
    assert int(data.train_x.max()) == 16
    assert sorted(data.train_y.unique().tolist()) == list(range(10))
    # train and validation images are disjoint rows of the fixed split
    assert data.info["train_size"] == 1438 and data.info["val_size"] == 359


def test_charlm_data_is_shakespeare():
    task = get_task("charlm")
    data = task.load()
    assert data.info["vocab"] == 76
    assert data.train_x.shape[0] == 846207
    x, y = task.get_batch(data, torch.tensor([0, 100]))
    assert x.shape == y.shape == (2, task.context)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_fashion_from_data_dir(fake_fashion, no_system_fashion):
    task = get_task("fashion")
    data = task.load(str(fake_fashion))
    assert data.train_x.shape == (40, 28, 28) and data.val_x.shape == (12, 28, 28)
    assert data.train_y.tolist()[:12] == [i % 10 for i in range(12)]


def test_fashion_from_env_var(fake_fashion, no_system_fashion, monkeypatch):
    monkeypatch.setenv(fashion_module.ENV_VAR, str(fake_fashion / "fashion-mnist"))
    assert get_task("fashion").load().train_x.shape[0] == 40


def test_fashion_missing_says_how_to_get_it(no_system_fashion, tmp_path):
    with pytest.raises(TaskUnavailable, match="apt-get install dataset-fashion-mnist"):
        get_task("fashion").load(str(tmp_path))


def test_read_idx_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.gz"
    with gzip.open(bad, "wb") as f:
        f.write(b"not an idx file")
    with pytest.raises(ValueError, match="not an IDX"):
        fashion_module.read_idx(bad)


def test_epoch_permutations_visit_each_example_once_per_epoch():
    gen = torch.Generator().manual_seed(3)
    batches = epoch_permutations(10, steps=5, batch_size=4, generator=gen)
    assert batches.shape == (5, 4)
    flat = batches.flatten().tolist()
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))


def test_unknown_task():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("imagenet")


def test_tune_split_is_held_out_of_the_training_data():
    task = get_task("digits")
    data = task.load()
    tune = task.tune_data(data)
    assert tune.train_x.shape[0] == 1150 and tune.val_x.shape[0] == 288
    # the tune split re-partitions the training rows; the validation split stays out of it
    both = torch.cat([tune.train_x, tune.val_x]).flatten(1)
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, data.train_x.flatten(1).tolist()))
    assert sorted(torch.cat([tune.train_y, tune.val_y]).tolist()) == sorted(data.train_y.tolist())
    assert torch.equal(task.tune_data(data).val_x, tune.val_x)  # fixed split

    lm = get_task("charlm")
    text = lm.load()
    tune = lm.tune_data(text)
    cut = tune.train_x.shape[0]
    assert cut == int(text.train_x.shape[0] * 0.9)
    assert torch.equal(tune.val_x, text.train_x[cut : cut + tune.val_x.shape[0]])


def test_tensor_task_validates_its_arguments():
    from lionopt.tasks import TensorTask

    x, y = torch.randn(10, 3), torch.zeros(10, dtype=torch.long)
    ok = dict(name="t", model=lambda: torch.nn.Linear(3, 2), train=(x, y), val=(x, y),
              loss=torch.nn.functional.cross_entropy, metric=lambda o, t: 0.0,
              higher_is_better=True, steps=5, batch_size=4, adamw_lr=1e-3,
              adamw_weight_decay=0.0)  # fmt: skip
    task = TensorTask(**ok)
    data = task.load()
    assert task.tune_data(data).train_x.shape[0] == 8
    assert task.evaluate(task.build_model(data), data)[1] == 0.0
    for bad, message in [
        ({"train": (x, y[:5])}, "same number of rows"),
        ({"steps": 0}, "steps must be a positive integer"),
        ({"loss": 3}, "loss must be callable"),
        ({"adamw_lr": -1}, "invalid adamw_lr"),
        ({"val": x}, "must be a pair"),
    ]:
        with pytest.raises(ValueError, match=message):
            TensorTask(**{**ok, **bad})
    with pytest.raises(ValueError, match=r"must return an nn\.Module"):
        TensorTask(**{**ok, "model": lambda: 3}).build_model(data)


def test_resolve_task_errors(tmp_path):
    from lionopt.tasks import resolve_task

    with pytest.raises(ValueError, match="unknown task"):
        resolve_task("imagenet")
    with pytest.raises(ValueError, match="no such file"):
        resolve_task(str(tmp_path / "none.py") + ":x")
    with pytest.raises(ValueError, match="importing no_such_module_xyz failed"):
        resolve_task("no_such_module_xyz:x")
    bad = tmp_path / "bad.py"
    bad.write_text("def make():\n    raise RuntimeError('nope')\n")
    with pytest.raises(ValueError, match="building the task failed: RuntimeError: nope"):
        resolve_task(f"{bad}:make")
    assert resolve_task("digits").name == "digits"
