"""Compile a C++ source into a shared library on first use, cached, and load it with ctypes.

Same recipe as ``kernels.cpu.plain``: ``$CXX`` (default ``c++``) with ``-O3 -ffp-contract=off
-fno-trapping-math`` (plus ``-mavx2 -mfma`` where the CPU has them) and ``-fopenmp`` when it links, into
``$LIONOPT_CACHE_DIR`` or ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``),
under a folder named by a hash of the source, flags and compiler. The build writes a temporary
file and renames it, so concurrent processes never load a half-written library. A library can
also build in the background (``LazyLibrary(background=True)``): the compiler starts at once
and a daemon thread waits for it; the shell that runs the compiler also does the rename, so the
build lands in the cache even when the process that started it has exited. One process per
machine compiles a given library (``lionopt.kernels.cpu._buildlock``); the others wait for its
result, a background build in its thread.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lionopt.kernels.cpu import _buildlock

__all__ = ["Build", "BuildOptions", "LazyLibrary"]


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
        fallback: str = "using the torch implementation instead",
        build: Callable[[], BuildOptions] | None = None,
        background: bool = False,
    ) -> None:
        self._config = dict(
            source=source,
            name=name,
            check=check,
            declare=declare,
            description=description,
            fallback=fallback,
            build=build,
            background=background,
        )
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._failure: str | None = None
        self.lib: ctypes.CDLL | None = None
        self.state: bool | None = None  # None: not tried yet (or still building)
        self.info: dict = {}

    def fresh(self) -> LazyLibrary:
        """An untried copy (tests use it to build again)."""
        config = dict(self._config)
        return LazyLibrary(config.pop("source"), config.pop("name"), **config)

    def available(self) -> bool:
        """Whether the library is loaded; the first call builds it, or loads the cached build.

        A ``background`` library builds in a thread: until it is ready this returns False at
        once, and the caller uses its fallback.
        """
        if self.state is None:
            if self._config["background"]:
                self._start_background()
            else:
                with self._lock:
                    if self.state is None:
                        self.state = self._load()
        if self._failure is not None:
            self._warn(self._failure)
        return bool(self.state)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a background build is done (or ``timeout`` s); then ``available()``."""
        self.available()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return self.available()

    def _start_background(self) -> None:
        """Start the compiler now (a few ms), and wait for it in a daemon thread."""
        with self._lock:
            if self._thread is not None or self.state is not None:
                return
            started = time.perf_counter()
            try:
                build = self._build()
            except Exception as exc:  # e.g. no headers: known before anything runs
                self._failure, self.state = str(exc), False
                return
            self._thread = threading.Thread(
                target=self._finish_in_background,
                args=(build, started),
                name=f"lionopt-build-{self._config['name']}",
                daemon=True,
            )
            self._thread.start()

    def _finish_in_background(self, build: Build, started: float) -> None:
        loaded = self._finish(build, started, warn=False)
        with self._lock:
            self.state = loaded

    def _build(self) -> Build:
        config = self._config
        options = config["build"]() if config["build"] is not None else BuildOptions()
        return Build(config["source"], config["name"], options)

    def _load(self) -> bool:
        started = time.perf_counter()
        try:
            build = self._build()
        except Exception as exc:
            self._warn(str(exc))
            return False
        return self._finish(build, started, warn=True)

    def _finish(self, build: Build, started: float, warn: bool) -> bool:
        try:
            lib, info = build.finish()
            self._config["check"](lib, info)
            self._config["declare"](lib)
        except Exception as exc:
            if warn:
                self._warn(str(exc))
            else:  # a background thread: warn from the caller's thread, at its next call
                self._failure = str(exc)
            return False
        self.info.update(info, seconds=time.perf_counter() - started)
        self.lib = lib
        return True

    def _warn(self, reason: str) -> None:
        self._failure = None
        warnings.warn(
            f"lionopt: the {self._config['description']} could not be built or loaded "
            f"({reason}); {self._config['fallback']}.",
            RuntimeWarning,
            stacklevel=5,
        )


@dataclass(frozen=True)
class BuildOptions:
    """What a library needs beyond ``_compile_flags()``: headers, libraries, a loader."""

    compile_flags: tuple[str, ...] = ()
    link_flags: tuple[str, ...] = ()
    #: Also hashed into the cache folder's name: what the build depends on besides the source.
    salt: str = ""
    #: ctypes.PyDLL for a library that calls the Python C API (the GIL stays held).
    dll_type: type = ctypes.CDLL
    #: Other sources the build includes, hashed with it.
    includes: tuple[Path, ...] = ()


class Build:
    """One library's build: the compiler starts at once, ``finish()`` waits and loads.

    The compiler runs in a shell that also moves the result into the cache, so a build that
    outlives its interpreter (a background build in a short process) still lands there for the
    next process. Its output goes to a file, not a pipe, for the same reason.
    """

    def __init__(self, source: Path, name: str, options: BuildOptions | None = None) -> None:
        self.options = options = options or BuildOptions()
        compiler = os.environ.get("CXX") or shutil.which("c++") or "g++"
        flags = [*_compile_flags(), *options.compile_flags]
        digest = hashlib.sha256(
            b"\0".join(
                [
                    source.read_bytes(),
                    *(path.read_bytes() for path in options.includes),
                    " ".join([*flags, *options.link_flags]).encode(),
                    options.salt.encode(),
                    compiler.encode(),
                    sys.platform.encode(),
                ]
            )
        ).hexdigest()[:16]
        self.target = _cache_root() / name / digest / f"{source.stem}.so"
        self.info = {"path": str(self.target), "compiler": compiler, "flags": flags}
        self.info["compiled"] = not self.target.exists()
        self.process: subprocess.Popen | None = None
        self._elsewhere: tuple | None = None  # another process builds it (_buildlock)
        if self.info["compiled"]:
            self._claim_and_start(source, compiler, flags)

    def _claim_and_start(self, source: Path, compiler: str, flags: list[str]) -> None:
        """Build unless another process already is (then ``finish()`` waits for it)."""
        lock = _buildlock.claim(self.target)
        if lock is None:
            self.info["compiled"] = False
            self.info["built_by_another_process"] = True
            self._elsewhere = (source, compiler, flags)
            return
        try:
            if self.target.exists():  # finished by another process meanwhile
                self.info["compiled"] = False
            else:
                self._start(source, compiler, flags, lock)
        finally:
            if isinstance(lock, _buildlock.BuildLock):
                lock.release()  # the compiler's shell holds it now

    def _start(
        self,
        source: Path,
        compiler: str,
        flags: list[str],
        lock: _buildlock.BuildLock | bool = True,
    ) -> None:
        """Compiles beside the target (or in a temporary folder if the cache is read-only)."""
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            self.target = Path(tempfile.mkdtemp(prefix="lionopt-")) / self.target.name
            self.info["path"] = str(self.target)
        tmp = self.target.with_name(
            f"{self.target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so"
        )
        link = list(self.options.link_flags)
        # Without OpenMP it still builds, single-threaded.
        commands = [
            [compiler, *flags, *openmp, str(source), "-o", str(tmp), *link]
            for openmp in (["-fopenmp"], [])
        ]
        move = f"mv -f {shlex.quote(str(tmp))} {shlex.quote(str(self.target))}"
        script = " || ".join(f"({shlex.join(command)} && {move})" for command in commands)
        shell = shutil.which("sh")
        if shell is None:
            raise RuntimeError("no POSIX shell (sh) to run the compiler")
        self._log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed by finish())
        self.compiler = compiler
        self.process = subprocess.Popen(
            [shell, "-c", script],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            pass_fds=(lock.fd,) if isinstance(lock, _buildlock.BuildLock) else (),
        )

    def finish(self, timeout: float = 300) -> tuple[ctypes.CDLL, dict]:
        """Wait for the compiler (if it runs) and load the library."""
        if self._elsewhere is not None:
            source, compiler, flags = self._elsewhere
            self._elsewhere = None
            if not _buildlock.wait_for(self.target, timeout):
                raise RuntimeError(f"another process's build took more than {timeout} s")
            if not self.target.exists():  # that build failed: try here, once
                self.info["compiled"] = True
                self._claim_and_start(source, compiler, flags)
                return self.finish(timeout)
        if self.process is not None:
            try:
                code = self.process.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                self.process.kill()
                raise RuntimeError(f"{self.compiler} took more than {timeout} s") from exc
            self._log.seek(0)
            output = self._log.read().strip()
            self._log.close()
            if code != 0 or not self.target.exists():
                raise RuntimeError(f"{self.compiler} failed: {output[-400:]}")
        return self.options.dll_type(str(self.target)), dict(self.info)


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
