"""Compile a C++ source into a shared library on first use, cached, and load it with ctypes.

Same recipe as ``fused_cpu``: ``$CXX`` (default ``c++``) with ``-O3 -ffp-contract=off
-fno-trapping-math`` (plus ``-mavx2 -mfma`` where the CPU has them) and ``-fopenmp`` when it links, into
``$LIONOPT_CACHE_DIR`` or ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
under a folder named by a hash of the source, flags and compiler. The build writes a temporary
file and renames it, so concurrent processes never load a half-written library.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

__all__ = ["LazyLibrary", "load_library"]


class LazyLibrary:
    """A kernel library built (or loaded from the cache) on first use, once per process.

    ``check(lib, info)`` raises when the file is not the expected build (an ABI version);
    ``declare(lib)`` sets the ctypes signatures. Any failure warns once, naming
    ``description``, and ``available()`` stays False, so the caller falls back.
    """

    def __init__(
        self,
        source: Path,
        name: str,
        *,
        check: Callable[[ctypes.CDLL, dict], None],
        declare: Callable[[ctypes.CDLL], None],
        description: str,
    ) -> None:
        self._config = (source, name, check, declare, description)
        self._lock = threading.Lock()
        self.lib: ctypes.CDLL | None = None
        self.state: bool | None = None  # None: not tried yet
        self.info: dict = {}

    def fresh(self) -> LazyLibrary:
        """An untried copy (tests use it to build again)."""
        source, name, check, declare, description = self._config
        return LazyLibrary(source, name, check=check, declare=declare, description=description)

    def available(self) -> bool:
        if self.state is None:
            with self._lock:
                if self.state is None:
                    self.state = self._load()
        return self.state

    def _load(self) -> bool:
        source, name, check, declare, description = self._config
        try:
            start = time.perf_counter()
            lib, info = load_library(source, name)
            check(lib, info)
            declare(lib)
        except Exception as exc:
            warnings.warn(
                f"lionopt: the {description} could not be built or loaded ({exc}); "
                "using the torch implementation instead.",
                RuntimeWarning,
                stacklevel=4,
            )
            return False
        self.info.update(info, seconds=time.perf_counter() - start)
        self.lib = lib
        return True


def load_library(source: Path, name: str) -> tuple[ctypes.CDLL, dict]:
    """The library built from ``source`` (building it if needed), and how it was obtained.

    Raises RuntimeError (or OSError) when it cannot be built or loaded.
    """
    compiler = os.environ.get("CXX") or shutil.which("c++") or "g++"
    flags = _compile_flags()
    digest = hashlib.sha256(
        b"\0".join(
            [
                source.read_bytes(),
                " ".join(flags).encode(),
                compiler.encode(),
                sys.platform.encode(),
            ]
        )
    ).hexdigest()[:16]
    target = _cache_root() / name / digest / f"{source.stem}.so"
    info = {"path": str(target), "compiler": compiler, "flags": flags, "compiled": False}
    if not target.exists():
        target = _build(source, compiler, flags, target)
        info.update(path=str(target), compiled=True)
    return ctypes.CDLL(str(target)), info


def _compile_flags() -> list[str]:
    # -fno-trapping-math lets loops with selects vectorise; it changes no result.
    flags = ["-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]
    flags.append("-fno-trapping-math")
    if platform.machine().lower() in ("x86_64", "amd64"):
        cpu = _cpu_flags()
        flags += [
            flag for feature, flag in (("avx2", "-mavx2"), ("fma", "-mfma")) if feature in cpu
        ]
    return flags


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cache_root() -> Path:
    root = os.environ.get("LIONOPT_CACHE_DIR") or os.environ.get("TORCH_EXTENSIONS_DIR")
    return Path(root) if root else Path.home() / ".cache" / "torch_extensions"


def _build(source: Path, compiler: str, flags: list[str], target: Path) -> Path:
    """Compiles beside ``target`` (or in a temporary folder if the cache is read-only)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        target = Path(tempfile.mkdtemp(prefix="lionopt-")) / target.name
    tmp = target.with_name(f"{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    errors = []
    for openmp in (["-fopenmp"], []):  # without OpenMP it still builds, single-threaded
        command = [compiler, *flags, *openmp, str(source), "-o", str(tmp)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.SubprocessError) as exc:
            raise RuntimeError(f"cannot run {compiler!r}: {exc}") from exc
        if result.returncode == 0:
            os.replace(tmp, target)
            return target
        errors.append(result.stderr.strip()[-400:])
    raise RuntimeError(f"{compiler} failed: {errors[-1] or errors[0]}")
