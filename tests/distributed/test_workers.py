"""``lionopt.tasks.workers``: simulated data-parallel runs on a comparison task.

One virtual worker voting alone is global Lion on the same batches, so its whole run (curves
and final metric) must equal ``train_run``'s Lion run exactly; with several workers the run
must differ from it, and bad arguments must be refused.
"""

from __future__ import annotations

import pytest

from lionopt.tasks import get_task
from lionopt.tasks.protocol import make_plan
from lionopt.tasks.workers import METHODS, train_workers


@pytest.fixture(scope="module")
def digits():
    task = get_task("digits")
    data = task.load()
    return task, data, make_plan(task, data, seed=0, steps=12, batch_size=32)


def test_one_worker_voting_is_global_lion(digits):
    task, data, plan = digits
    lion = train_workers(task, data, plan, "lion", 1, evals=3)
    for method in ("mavo", "avg"):
        run = train_workers(task, data, plan, method, 1, evals=3)
        assert run.history == lion.history, method
    mavo4 = train_workers(task, data, plan, "mavo", 4, evals=3)
    assert mavo4.history["val_loss"] != lion.history["val_loss"]
    # a worker holds one fp32 momentum, as global Lion does: the report's state bytes agree
    assert mavo4.state_bytes == lion.state_bytes > 0
    assert set(METHODS) == {"lion", "mavo", "avg", "adamw"}


def test_bad_arguments(digits):
    task, data, plan = digits
    with pytest.raises(ValueError, match="unknown method"):
        train_workers(task, data, plan, "sgd", 2)
    with pytest.raises(ValueError, match="does not split"):
        train_workers(task, data, plan, "mavo", 5)
