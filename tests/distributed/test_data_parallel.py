"""DDP, torch's ZeroRedundancyOptimizer and DeepSpeed ZeRO 1/2 with lionopt at world 2.

All cases run in one spawned gloo group (``dp_cases.py``). DeepSpeed runs where it imports
(``DS_ACCELERATOR=cpu``); the CI venv installs it with the ``distributed`` extra.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
from harness import run_world

dp_cases = pytest.importorskip("dp_cases")

HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
NAMES = ["ddp", "zero1"] + (["deepspeed", "deepspeed_tiger"] if HAS_DEEPSPEED else [])


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return run_world(dp_cases.run_cases, 2, NAMES, str(tmp_path_factory.mktemp("dp")))[0]


@pytest.mark.parametrize("name", ["ddp", "zero1"])
def test_torch_data_parallel(results, name):
    ok, message, _ = results[name]
    assert ok, message


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed")
@pytest.mark.parametrize("name", ["deepspeed", "deepspeed_tiger"])
def test_deepspeed(results, name):
    ok, message, _ = results[name]
    assert ok, message
