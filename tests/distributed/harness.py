"""Run a function on N gloo processes on this machine, with timeouts, and collect the results.

``run_world(fn, world, *args)`` spawns ``world`` processes (``torch.multiprocessing`` spawn
context) on a free localhost port. Each initialises a gloo process group with a timeout, calls
``fn(rank, world, *args)`` and sends back its return value, or its traceback if it raised. The
parent joins with a deadline: a hang (a missing collective on one rank) fails the test with
the ranks that did not finish, instead of stalling CI; a rank that raised is reported with its
own traceback.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

SRC = str(Path(__file__).resolve().parents[2] / "src")
TESTS = str(Path(__file__).resolve().parent)


class WorkerError(AssertionError):
    """A rank raised, or the group did not finish in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, queue, pg_timeout):
    try:
        for path in (SRC, TESTS):
            if path not in sys.path:
                sys.path.insert(0, path)
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world),
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE=str(world),
        )
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=pg_timeout),
        )
        try:
            result = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))


def run_world(fn, world: int, *args, timeout: float = 240.0, pg_timeout: float = 120.0) -> list:
    """``[fn(0, world, *args), ..., fn(world-1, ...)]``, each run in its own process."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, fn, args, queue, pg_timeout))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world:
            if time.monotonic() > deadline:
                missing = sorted(set(range(world)) - set(results) - set(errors))
                raise WorkerError(
                    f"ranks {missing} did not finish within {timeout:.0f} s"
                    + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items())
                )
            if queue.empty():
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                dead = [r for r in dead if r not in results and r not in errors]
                if dead and queue.empty():
                    time.sleep(0.5)
                    if queue.empty():
                        raise WorkerError(
                            f"ranks {dead} died (exit codes "
                            f"{[procs[r].exitcode for r in dead]}; negative = signal)"
                        )
                time.sleep(0.05)
                continue
            rank, ok, value = queue.get()
            (results if ok else errors)[rank] = value
        if errors:
            raise WorkerError(
                "".join(f"\n--- rank {r} raised ---\n{tb}" for r, tb in sorted(errors.items()))
            )
        return [results[r] for r in range(world)]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
