"""How Distributed Lion's ranks exchange their signs: three exact transports.

Every transport takes one bucket's local signs and returns the vote in a packed form that the
update pass decodes (``voting.ResultFormat``). All are exact: they deliver the same S = Σ_i s_i
(or, for the majority vote, sign(S)) on every rank.

* ``Int8Transport``: one SUM all-reduce of int8 signs (exact up to 127 ranks).
* ``AllGatherTransport``: every rank's packed signs (1 bit, or 2 where a zero must be carried)
  are all-gathered and counted locally, as the paper's code does; cost grows with N.
* ``PackedTransport``: two phases. An ``all_to_all`` sends slice j of every rank's packed signs
  to rank j, which counts the votes of its slice; the packed results are all-gathered.
  About (w1 + w2)·(N−1)/N bits an element whatever N is.

``Traffic`` records each collective's input size, and ``ring_bytes`` turns it into the bytes a
rank sends under the ring algorithms, which is how the benchmark counts wire bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from lionopt.distributed.voting import (
    RAW8,
    SIGN1,
    SIGN2,
    ResultFormat,
    count_votes,
    encode_result,
    pack,
    result_format,
    unpack,
)

__all__ = [
    "TRANSPORTS",
    "AllGatherTransport",
    "Int8Transport",
    "PackedTransport",
    "Traffic",
    "choose_transport",
    "ring_bytes",
]

TRANSPORTS = ("auto", "int8", "packed", "all_gather")
#: Largest world size whose vote sums fit an int8.
INT8_MAX_RANKS = 127


def ring_bytes(op: str, input_bytes: int, ranks: int) -> float:
    """Bytes one rank sends for a collective on ``input_bytes`` under the ring algorithm."""
    if ranks <= 1:
        return 0.0
    factor = {
        "all_reduce": 2 * (ranks - 1) / ranks,
        "all_gather": ranks - 1,
        "all_to_all": (ranks - 1) / ranks,
    }[op]
    return factor * input_bytes


@dataclass
class Traffic:
    """The collectives of the last step: (op, input bytes of this rank) each."""

    calls: list[tuple[str, int]] = field(default_factory=list)

    def add(self, op: str, tensor: Tensor) -> None:
        self.calls.append((op, tensor.numel() * tensor.element_size()))

    def wire_bytes(self, ranks: int) -> float:
        return sum(ring_bytes(op, size, ranks) for op, size in self.calls)


def choose_transport(ranks: int, backend: str, vote: str) -> str:
    """``transport="auto"``: all_gather for two ranks (one collective, 1–2 bits an element);
    packed beyond (two collectives, but a cost that does not grow with N); int8 on a backend
    that has no all_to_all."""
    if ranks <= 2:
        return "all_gather"
    if backend not in ("gloo", "nccl", "xccl", "mpi", "ucc", "cpu:gloo,cuda:nccl"):
        return "int8" if ranks <= INT8_MAX_RANKS else "all_gather"
    return "packed"


class _Transport:
    #: What the sign pass must emit: 2 (2-bit sign codes) or 8 (int8 signs).
    sign_width = 2

    def __init__(self, group, ranks: int, vote: str, timeout: timedelta | None, traffic: Traffic):
        self.group, self.ranks, self.vote = group, ranks, vote
        self.timeout, self.traffic = timeout, traffic
        #: False: torch ops only (``DistributedLion(fused=False)``); else C++ helpers on CPU.
        self.use_kernels = True

    def _wait(self, work) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(self.timeout)
        except Exception as exc:
            raise RuntimeError(
                f"DistributedLion: a collective failed or timed out (timeout {self.timeout}); "
                f"a rank may have died or skipped step(): {exc}"
            ) from exc

    def _signs(self, local: Tensor, zeros: bool) -> tuple[Tensor, ResultFormat]:
        """This rank's 2-bit codes, repacked to 1 bit where no rank has a zero in the bucket."""
        if zeros:
            return local, SIGN2
        kernel = self._kernel(local)
        if kernel is not None:
            return kernel.repack_2to1(local), SIGN1
        return pack((unpack(local, 2) == 2).to(torch.uint8), 1), SIGN1

    def _count(self, rows: Tensor, fmt: ResultFormat, sign_only: bool) -> Tensor:
        """int8 S (or sign(S)) of packed sign rows; exact: |S| <= 127 unless ``sign_only``."""
        kernel = self._kernel(rows)
        if kernel is not None:
            return kernel.count_votes(rows, fmt.width, sign_only)
        counts = count_votes(rows, fmt)
        return (torch.sign(counts) if sign_only else counts).to(torch.int8)

    def _kernel(self, tensor: Tensor):
        return _cpu_kernel(tensor) if self.use_kernels else None

    def exchange(self, local: Tensor, zeros: bool) -> tuple[Tensor, ResultFormat]:
        """One bucket's vote: the packed result and its format."""
        return self.exchange_many([(local, zeros)])[0]

    def exchange_many(
        self, buckets: list[tuple[Tensor, bool]]
    ) -> list[tuple[Tensor, ResultFormat]]:
        """Every bucket's vote, with the buckets' collectives in flight together: each bucket's
        stages run round-robin (launch a collective, then the next bucket's), so counting one
        bucket overlaps the others' communication. Every rank issues them in the same order."""
        stages = [self._stages(local, zeros) for local, zeros in buckets]
        results: list = [None] * len(stages)
        pending = list(range(len(stages)))
        while pending:
            running = []
            for i in pending:
                try:
                    next(stages[i])
                    running.append(i)
                except StopIteration as done:
                    results[i] = done.value
            pending = running
        return results

    def _stages(self, local: Tensor, zeros: bool):
        """A generator: yields after launching each collective, returns (packed, format)."""
        raise NotImplementedError


class Int8Transport(_Transport):
    sign_width = 8

    def _stages(self, local: Tensor, zeros: bool):
        signs = local.view(torch.int8)
        self.traffic.add("all_reduce", signs)
        work = dist.all_reduce(signs, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        yield
        self._wait(work)
        return signs.view(torch.uint8), RAW8


class AllGatherTransport(_Transport):
    def _stages(self, local: Tensor, zeros: bool):
        payload, fmt = self._signs(local, zeros)
        gathered = payload.new_empty(self.ranks * payload.numel())
        self.traffic.add("all_gather", payload)
        work = dist.all_gather_single(gathered, payload, group=self.group, async_op=True)
        yield
        self._wait(work)
        # Beyond 127 ranks only the majority vote gets here: sign(S) is all it needs.
        counts = self._count(gathered.view(self.ranks, -1), fmt, self.ranks > INT8_MAX_RANKS)
        return counts.view(torch.uint8), RAW8


class PackedTransport(_Transport):
    def _stages(self, local: Tensor, zeros: bool):
        payload, fmt = self._signs(local, zeros)
        received = torch.empty_like(payload)
        self.traffic.add("all_to_all", payload)
        work = dist.all_to_all_single(received, payload, group=self.group, async_op=True)
        yield
        self._wait(work)
        counts = self._count(received.view(self.ranks, -1), fmt, self.vote == "majority")
        out_fmt = result_format(self.vote, self.ranks, zeros)
        kernel = self._kernel(counts)
        if out_fmt.width == 8:
            mine = counts.view(torch.uint8)
        elif kernel is not None:
            mine = kernel.encode_result(counts, self.vote, out_fmt)
        else:
            mine = encode_result(counts.to(torch.int32), self.vote, out_fmt)
        gathered = mine.new_empty(self.ranks * mine.numel())
        self.traffic.add("all_gather", mine)
        work = dist.all_gather_single(gathered, mine, group=self.group, async_op=True)
        yield
        self._wait(work)
        return gathered, out_fmt


def _cpu_kernel(tensor: Tensor):
    """The C++ sign-pack helpers for a CPU tensor, where they build; else None (torch ops)."""
    if not tensor.is_cpu:
        return None
    from lionopt.kernels.cpu import signpack as signpack_cpu

    return signpack_cpu if signpack_cpu.available() else None


def make_transport(name: str, group, ranks: int, vote: str, timeout, traffic: Traffic):
    cls = {"int8": Int8Transport, "all_gather": AllGatherTransport, "packed": PackedTransport}
    return cls[name](group, ranks, vote, timeout, traffic)
