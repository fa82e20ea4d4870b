"""One kernel build per machine (``lionopt.kernels.cpu._buildlock``), with concurrent processes.

A tiny C++ source and a compiler wrapper that logs each call and sleeps 1 s stand in for the
real kernels (which take 5-25 s to build). Several processes start at once on an empty cache:
the wrapper must run once, and every process must end up with the library loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")

_SOURCE = 'extern "C" int lionopt_lock_answer() { return 42; }\n'

# The child loads lionopt.kernels.cpu._build without running the packages' __init__ (which imports torch,
# seconds per process on a busy machine): the build helpers need no torch.
_CHILD = """
    import importlib.util, sys, types
    from pathlib import Path

    root = Path(importlib.util.find_spec("lionopt").origin).parent
    packages = (("lionopt", root), ("lionopt.kernels", root / "kernels"),
                ("lionopt.kernels.cpu", root / "kernels" / "cpu"))
    for name, folder in packages:
        module = types.ModuleType(name)
        module.__path__ = [str(folder)]
        sys.modules[name] = module
    from lionopt.kernels.cpu._build import LazyLibrary
    assert "torch" not in sys.modules

    lib = LazyLibrary(Path(sys.argv[1]), "locktest", check=lambda lib, info: None,
                      declare=lambda lib: None, description="lock test",
                      background=sys.argv[2] == "background")
    first = lib.available()
    if sys.argv[3] == "exit":
        print("OK", first)
        sys.exit(0)
    assert lib.wait(120), "never became available"
    assert lib.lib.lionopt_lock_answer() == 42
    print("OK", first, lib.info.get("compiled"), lib.info.get("built_by_another_process"))
"""


def _setup(tmp_path):
    source = tmp_path / "lock_answer.cpp"
    source.write_text(_SOURCE)
    log = tmp_path / "compiler.log"
    wrapper = tmp_path / "cxx"
    wrapper.write_text(f'#!/bin/sh\necho "$$" >> {log}\nsleep 1\nexec c++ "$@"\n')
    wrapper.chmod(0o755)
    env = {
        **os.environ,
        "CXX": str(wrapper),
        "LIONOPT_CACHE_DIR": str(tmp_path / "cache"),
        "OMP_NUM_THREADS": "1",
    }
    return source, log, env


def _spawn(source, env, mode, ending="wait"):
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD), str(source), mode, ending],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _compiles(log) -> int:
    return len(log.read_text().split()) if log.exists() else 0


@pytest.mark.parametrize("mode", ["background", "foreground"])
def test_concurrent_first_launch_compiles_once(tmp_path, mode):
    source, log, env = _setup(tmp_path)
    procs = [_spawn(source, env, mode) for _ in range(3)]
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0 and "OK" in out, err[-2000:]
    assert _compiles(log) == 1, log.read_text()
    lines = [out.split() for out, _ in outputs]
    # exactly one process compiled; the others loaded what it built
    assert sum(line[2] == "True" for line in lines) == 1, lines
    if mode == "background":
        assert all(line[1] == "False" for line in lines), lines  # Python path meanwhile


def test_a_build_left_by_an_exited_process_is_awaited_not_repeated(tmp_path):
    source, log, env = _setup(tmp_path)
    starter = _spawn(source, env, "background", ending="exit")
    out, err = starter.communicate(timeout=60)
    assert starter.returncode == 0 and "OK False" in out, err[-2000:]
    time.sleep(0.2)  # the starter is gone; its compiler (holding the lock) is not
    late = _spawn(source, env, "background")
    out, err = late.communicate(timeout=180)
    assert late.returncode == 0 and "OK" in out, err[-2000:]
    assert _compiles(log) == 1, log.read_text()
