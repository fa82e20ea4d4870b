"""Timing, memory and roofline measurement for ``lionopt bench``.

Method, per preset:

- One list of parameters (randn·0.02, with fixed randn·1e-3 gradients) is shared by every
  implementation; each builds its own optimizer (so its own state) over it.
- Steps are interleaved: after ``warmup`` steps each, every timed round runs one step of each
  implementation in a rotating order, so a change in machine load hits all of them alike.
  The figure is the median over ``steps`` rounds (CUDA: synchronised before and after).
- Effective GB/s = the bytes an ideal fused kernel moves (Lion: read θ, g, m, write θ, m =
  20 B/param in fp32; AdamW: 28 B) / the median time.
- Roofline: on CPU, ``lionopt.kernels.cpu.plain.streamer``, a C++ kernel that reads three
  arrays and writes two over the same tensors with the same threads and split as the fused
  Lion step but does no math, with its pointer table built once before timing (so the
  roofline holds no Python work per tensor, and Lion's own bookkeeping counts against it);
  its GB/s is the memory roofline and "x roofline" is
  time / (ideal bytes / roofline GB/s). On CUDA, or without a C++ compiler, the roofline is
  ``torch.add(a, b, out=c)`` over flat buffers of the same total size (read 2, write 1).
- Extra peak memory of one step: on CUDA ``max_memory_allocated`` minus the memory allocated
  before the step; on Linux CPUs the process's peak RSS during the step minus its RSS before
  (glibc's free memory is returned with ``malloc_trim`` and the peak reset through
  ``/proc/self/clear_refs`` first). Elsewhere it is not measured.
"""

from __future__ import annotations

import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lionopt.bench.impls import Impl, Step, ideal_bytes, peer_installed
from lionopt.bench.presets import Shape
from lionopt.memory import bytes_per_param


@dataclass
class Result:
    name: str
    kind: str
    group: str
    status: str = "ok"  # "ok", "skipped" or "error"
    note: str = ""
    ms: float | None = None
    ms_min: float | None = None
    gbps: float | None = None
    x_adamw_loop: float | None = None
    x_adamw_foreach: float | None = None
    x_adamw_fused: float | None = None
    x_roofline: float | None = None
    extra_peak_mb: float | None = None
    state_bytes_per_param: float | None = None
    times_ms: list[float] = field(default_factory=list, repr=False)


@dataclass
class PresetReport:
    preset: str
    description: str
    tensors: int
    params: int
    dtype: str
    device: str
    roofline_gbps: float | None
    roofline_ms: float | None
    roofline_method: str
    results: list[Result]


def make_params(shapes: Sequence[Shape], dtype: torch.dtype, device: str) -> list[Tensor]:
    generator = torch.Generator().manual_seed(0)
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=generator) * 0.02).to(device, dtype))
        p.grad = (torch.randn(shape, generator=generator) * 1e-3).to(device, dtype)
        params.append(p)
    return params


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_preset(
    preset: str,
    description: str,
    shapes: Sequence[Shape],
    impls: Sequence[Impl],
    *,
    dtype: torch.dtype,
    device: str,
    steps: int,
    warmup: int,
    memory: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> PresetReport:
    params = make_params(shapes, dtype, device)
    results: list[Result] = []
    steppers: list[tuple[Result, Step]] = []
    for impl in impls:
        result = Result(impl.name, impl.kind, impl.group)
        results.append(result)
        if not peer_installed(impl):
            result.status, result.note = "skipped", f"{impl.requires} not installed"
            continue
        try:
            step = impl.build(params)
            for _ in range(max(warmup, 1)):
                step()
            _sync(device)
        except Exception as exc:
            result.status, result.note = "error", f"{type(exc).__name__}: {exc}"[:120]
            continue
        steppers.append((result, step))
    log(f"  {preset}: timing {len(steppers)} implementations, {steps} interleaved steps")

    roofline_step, roofline_method, roofline_bytes = _roofline(params, device)
    timed = [*steppers, (None, roofline_step)]
    roofline_times = []
    for round_index in range(steps):
        shift = round_index % len(timed)
        for result, step in timed[shift:] + timed[:shift]:
            _sync(device)
            start = time.perf_counter()
            step()
            _sync(device)
            elapsed = (time.perf_counter() - start) * 1e3
            (roofline_times if result is None else result.times_ms).append(elapsed)

    roofline_ms = statistics.median(roofline_times)
    roofline_gbps = roofline_bytes / roofline_ms / 1e6
    for result, step in steppers:
        result.ms = statistics.median(result.times_ms)
        result.ms_min = min(result.times_ms)
        moved = ideal_bytes(result.kind, params)
        result.gbps = moved / result.ms / 1e6
        result.x_roofline = result.ms / (moved / roofline_gbps / 1e6)
        optimizer = getattr(step, "__self__", None)  # a bound Optimizer.step
        if isinstance(optimizer, torch.optim.Optimizer):
            result.state_bytes_per_param = bytes_per_param(optimizer)
        if memory:
            result.extra_peak_mb = extra_peak_bytes(step, device)
            if result.extra_peak_mb is not None:
                result.extra_peak_mb /= 2**20
    by_name = {r.name: r for r in results}
    for column, name in (
        ("x_adamw_loop", "torch AdamW loop"),
        ("x_adamw_foreach", "torch AdamW foreach"),
        ("x_adamw_fused", "torch AdamW fused"),
    ):
        base = by_name.get(name)
        if base is None or base.ms is None:
            continue
        for result in results:
            if result.ms is not None:
                setattr(result, column, result.ms / base.ms)

    return PresetReport(
        preset=preset,
        description=description,
        tensors=len(params),
        params=sum(p.numel() for p in params),
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        roofline_gbps=roofline_gbps,
        roofline_ms=roofline_ms * ideal_bytes("lion", params) / roofline_bytes,
        roofline_method=roofline_method,
        results=results,
    )


def _roofline(params: list[Tensor], device: str) -> tuple[Step, str, int]:
    """A step that streams memory like an ideal Lion step, its description, and its bytes."""
    if device == "cpu":
        from lionopt.kernels.cpu import plain as fused_cpu

        if fused_cpu.available():
            thetas = [p.detach().clone() for p in params]
            grads = [p.grad for p in params]
            moms = [torch.zeros_like(p) for p in params]
            if fused_cpu.supports(thetas, grads, moms, _stream_hyper()):
                stream = fused_cpu.streamer(thetas, grads, moms)
                method = (
                    "C++ stream kernel: read 3 arrays, write 2, same tensors and threads, "
                    "pointer table built once"
                )
                return stream, method, ideal_bytes("lion", params)
    total = sum(p.numel() for p in params)
    dtype = params[0].dtype
    a, b, c = (torch.ones(total, dtype=dtype, device=device) for _ in range(3))

    def add() -> None:
        torch.add(a, b, out=c)

    method = "torch.add(a, b, out=c) over flat buffers: read 2 arrays, write 1"
    return add, method, 3 * total * a.element_size()


def _stream_hyper():
    from lionopt.kernels.hyper import LionHyper

    return LionHyper(lr=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0)


def extra_peak_bytes(step: Step, device: str) -> float | None:
    """Memory one step allocates above what was allocated before it (see module doc)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - before)
    if not sys.platform.startswith("linux"):
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM, the peak RSS
        before = _status_bytes("VmRSS")
        step()
        return float(max(0, _status_bytes("VmHWM") - before))
    except OSError:
        return None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")
