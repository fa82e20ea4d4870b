"""Distributed Lion: data-parallel Lion where ranks send signs and agree by a vote.

Each rank computes a gradient on its own batch and keeps its own momentum ``m_i``
(``state["exp_avg"]``). A step, for every parameter:

    c_i = β1·m_i + (1−β1)·g_i,   s_i = sign(c_i)           (sign(0) = sign(NaN) = 0: no vote)
    majority: θ ← θ·(1−η·λ) − η·sign(Σ_i s_i)              (an exact tie moves nothing)
    average:  θ ← θ·(1−η·λ) − η·(Σ_i s_i)/N
    m_i ← β2·m_i + (1−β2)·g_i

(Liu et al., "Communication Efficient Distributed Training with Distributed Lion", 2024). Every
rank applies the same vote, so parameters stay bitwise identical; with one rank this is exactly
``lionopt.Lion``. The parameters are cut into buckets (flat buffers, one collective or two per
bucket), and the signs travel by one of the exact transports of ``transports``.

Rules worth knowing:

* **A parameter whose ``.grad`` is None on some ranks** has a zero gradient there: its vote is
  sign(β1·m_i) and its momentum decays. A parameter with no gradient on *any* rank is skipped,
  as torch.optim does (no decay, momenta unchanged). Knowing which case applies costs one small
  all-reduce of one byte a parameter tensor per step, which also carries whether any rank has
  an exact zero sign in a bucket (then signs need 2 bits on the wire instead of 1).
* **The first step checks** a fingerprint of the parameters' shapes and dtypes, the vote and
  the transport on every rank, and raises ``ValueError`` on all of them before anything changes.
* **Collectives wait at most ``timeout``** seconds: a dead rank gives an error, not a hang.
* **Checkpoints**: ``state_dict()`` is this rank's (its own momenta) and records the world
  size; ``load_state_dict`` restores it at the same world size. ``load_state_dicts`` takes all
  ranks' dicts and gives every rank their average (any world size). For
  ``torch.distributed.checkpoint``, ``dcp_state_dict()`` presents the momenta as one DTensor of
  shape ``(N, *param.shape)`` sharded over ranks, so every rank's momentum is saved; at another
  world size ``load_dcp_state_dict`` gives every rank the average of the saved momenta.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim import Optimizer

from lionopt.distributed import voting
from lionopt.distributed.transports import (
    INT8_MAX_RANKS,
    TRANSPORTS,
    Traffic,
    choose_transport,
    make_transport,
)
from lionopt.distributed.voting import SIGN2

__all__ = ["VOTES", "DistributedLion", "checkpoint_world_size", "local_gradients"]

VOTES = ("majority", "average")
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


@dataclass
class _Bucket:
    """Consecutive parameters of one device and dtype, laid out in one flat vote buffer."""

    indices: list[int]  # positions in the optimizer's flat parameter list
    offsets: list[int]  # each tensor's first element in the buffer (a multiple of 8)
    numel: int  # buffer length: a multiple of 8·N, so slices pack into whole bytes


class DistributedLion(Optimizer):
    """Distributed Lion (MaVo / Avg) for data parallelism without a gradient all-reduce.

    Args:
        params: parameters or parameter groups (the same on every rank, in the same order).
        lr, betas, weight_decay: as ``lionopt.Lion`` (decoupled decay, scaled by the lr).
        vote: ``"majority"`` (MaVo, 1 bit a vote) or ``"average"`` (Avg).
        transport: ``"int8"``, ``"packed"``, ``"all_gather"``, or ``"auto"`` (all_gather for
            two ranks, packed beyond; see ``transports.choose_transport``).
        process_group: the data-parallel group (default: the world). Without an initialised
            process group the optimizer runs alone (N = 1), exactly as ``lionopt.Lion``.
        bucket_numel: elements a bucket holds at most (a larger tensor gets its own bucket).
        timeout: seconds (or a timedelta) each collective may wait; None: the group's own.
        fused: None (fused kernels where they run: C++ on CPU, Triton on CUDA), False (torch
            ops only) or True (fused, warning once where a bucket cannot be fused).
    """

    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        vote: str = "majority",
        transport: str = "auto",
        process_group=None,
        bucket_numel: int = 1 << 22,
        timeout: float | timedelta | None = 300.0,
        fused: bool | None = None,
    ) -> None:
        if vote not in VOTES:
            raise ValueError(f"Invalid vote: {vote!r} (expected one of {', '.join(VOTES)})")
        if transport not in TRANSPORTS:
            raise ValueError(
                f"Invalid transport: {transport!r} (expected one of {', '.join(TRANSPORTS)})"
            )
        if not isinstance(bucket_numel, int) or bucket_numel < 1:
            raise ValueError(f"Invalid bucket_numel: {bucket_numel!r}")
        if fused not in (None, True, False):
            raise ValueError(f"Invalid fused: {fused!r} (expected None, True or False)")
        defaults = dict(lr=lr, betas=betas, weight_decay=weight_decay)
        super().__init__(params, defaults)

        if dist.is_available() and dist.is_initialized():
            self.rank = dist.get_rank(process_group)
            self.ranks = dist.get_world_size(process_group) if self.rank >= 0 else 0
            if self.rank < 0:
                raise ValueError("this rank is not a member of the given process_group")
            backend = str(dist.get_backend(process_group))
        else:
            if process_group is not None:
                raise ValueError("process_group given but torch.distributed is not initialised")
            self.ranks, self.rank, backend = 1, 0, "none"
        # (a transport name, not a momentum storage format)
        if transport in ("int8",) and self.ranks > INT8_MAX_RANKS:
            raise ValueError(
                f"transport='int8' is exact up to {INT8_MAX_RANKS} ranks, got {self.ranks}; "
                "use 'packed'"
            )
        if vote == "average" and self.ranks > INT8_MAX_RANKS:
            raise ValueError(f"vote='average' supports at most {INT8_MAX_RANKS} ranks")
        self.vote = vote
        self.transport_name = (
            choose_transport(self.ranks, backend, vote) if transport == "auto" else transport
        )
        self.process_group = process_group
        self.bucket_numel = bucket_numel
        if isinstance(timeout, (int, float)):
            timeout = timedelta(seconds=float(timeout))
        self.timeout = timeout
        self.fused = fused
        #: The collectives of the last step (``Traffic.wire_bytes(N)`` gives bytes on the wire).
        self.traffic = Traffic()
        self._transport = make_transport(
            self.transport_name, process_group, self.ranks, vote, timeout, self.traffic
        )
        self._transport.use_kernels = fused is not False
        self._checked: tuple | None = None
        self._buckets: list[_Bucket] | None = None
        self._layout_key: tuple | None = None

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch.optim's, validating the group first (every rank must add the same)."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            _validate_group(group)
            for p in group["params"]:
                if p.dtype not in _FLOAT_DTYPES and not p.is_complex():
                    raise ValueError(f"DistributedLion does not take {p.dtype} parameters")
        except ValueError:
            self.param_groups.pop()
            raise

    # ----------------------------------------------------------------------------- the step

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.traffic.calls.clear()
        params, hypers = self._flat_params()
        grads = [p.grad for p in params]
        for g in grads:
            if g is not None and g.is_sparse:
                raise ValueError("DistributedLion does not support sparse gradients")
        buckets = self._layout(params)
        if self.ranks > 1 and self._checked != self._layout_key:
            self._check_fingerprint(params)
            self._checked = self._layout_key
        for p in params:
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        exp_avgs = [self.state[p]["exp_avg"] for p in params]

        width = self._transport.sign_width if self.ranks > 1 else 2
        count_zeros = self.ranks > 1 and width == 2
        locals_, zeros = [], []
        for bucket in buckets:
            idx = bucket.indices
            beta1, beta2 = hypers[idx[0]][1]
            kernel = self._kernel(params, grads, exp_avgs, idx)
            local, zero_count = kernel.sign_pass(
                [params[i] for i in idx],
                [grads[i] for i in idx],
                [exp_avgs[i] for i in idx],
                bucket.offsets,
                bucket.numel,
                beta1,
                beta2,
                width,
                count_zeros,
            )
            locals_.append(local)
            zeros.append(zero_count > 0)

        has_grad = [g is not None for g in grads]
        if self.ranks > 1:
            flags = torch.tensor(has_grad + zeros, dtype=torch.uint8)
            flags = flags.to(params[0].device) if params else flags
            self.traffic.add("all_reduce", flags)
            work = dist.all_reduce(
                flags, op=dist.ReduceOp.MAX, group=self.process_group, async_op=True
            )
            self._transport._wait(work)
            flags = flags.tolist()
            active = [bool(f) for f in flags[: len(params)]]
            zeros = [bool(f) for f in flags[len(params) :]]
        else:
            active = has_grad

        for i in range(len(params)):  # a zero gradient here, a gradient elsewhere
            if active[i] and grads[i] is None:
                beta2 = hypers[i][1][1]
                exp_avgs[i].mul_(beta2).add_(0.0)

        if self.ranks > 1:
            votes = self._transport.exchange_many(list(zip(locals_, zeros)))
        else:
            votes = [(local, SIGN2) for local in locals_]
        for bucket, (packed, fmt) in zip(buckets, votes):
            keep = [k for k, i in enumerate(bucket.indices) if active[i]]
            if not keep:
                continue
            idx = [bucket.indices[k] for k in keep]
            kernel = self._kernel(params, grads, exp_avgs, bucket.indices)
            kernel.apply_pass(
                [params[i] for i in idx],
                [bucket.offsets[k] for k in keep],
                [hypers[i][0] for i in idx],
                [hypers[i][2] for i in idx],
                packed,
                fmt,
                self.vote,
                self.ranks,
            )
        return loss

    def _flat_params(self) -> tuple[list[Tensor], list[tuple]]:
        params, hypers = [], []
        for group in self.param_groups:
            lr = _as_float(group["lr"])
            beta1, beta2 = (_as_float(b) for b in group["betas"])
            wd = _as_float(group["weight_decay"])
            for p in group["params"]:
                params.append(p)
                hypers.append((lr, (beta1, beta2), wd))
        return params, hypers

    def _layout(self, params: list[Tensor]) -> list[_Bucket]:
        """Buckets of consecutive parameters sharing device, dtype and betas (cached)."""
        betas = [tuple(g["betas"]) for g in self.param_groups for _ in g["params"]]
        key = tuple((id(p), tuple(p.shape), p.dtype, p.device, b) for p, b in zip(params, betas))
        if key == self._layout_key and self._buckets is not None:
            return self._buckets
        buckets: list[_Bucket] = []
        current: list[int] = []
        size = 0

        def close() -> None:
            if current:
                offsets, total = [], 0
                for i in current:
                    offsets.append(total)
                    total += _aligned(_real_numel(params[i]), voting.ALIGN)
                slice_numel = _aligned(math.ceil(total / self.ranks), voting.ALIGN)
                buckets.append(_Bucket(list(current), offsets, slice_numel * self.ranks))

        for i, p in enumerate(params):
            n = _aligned(_real_numel(p), voting.ALIGN)
            if current:
                first = params[current[0]]
                same = (
                    first.dtype == p.dtype
                    and first.device == p.device
                    and betas[current[0]] == betas[i]
                )
                if not same or size + n > self.bucket_numel:
                    close()
                    current, size = [], 0
            current.append(i)
            size += n
        close()
        self._buckets, self._layout_key = buckets, key
        return buckets

    def _kernel(self, params, grads, exp_avgs, idx):
        """The module whose sign_pass/apply_pass runs this bucket: fused kernels or torch."""
        if self.fused is False:
            return voting
        from lionopt.distributed import _kernels

        kernel = _kernels.select(
            [params[i] for i in idx], [grads[i] for i in idx], [exp_avgs[i] for i in idx]
        )
        if kernel is None:
            if self.fused:
                _kernels.warn_once("a bucket has tensors no fused kernel takes")
            return voting
        return kernel

    def _check_fingerprint(self, params: list[Tensor]) -> None:
        """Every rank must hold the same parameters (shapes, dtypes, order), group values and options."""
        text = repr(
            (
                [(tuple(p.shape), str(p.dtype)) for p in params],
                [len(g["params"]) for g in self.param_groups],
                # betas decide the buckets; lr and decay must agree or the ranks drift apart
                [
                    (_as_float(g["lr"]), tuple(map(float, g["betas"])), float(g["weight_decay"]))
                    for g in self.param_groups
                ],
                self.vote,
                self.transport_name,
                self.bucket_numel,
            )
        )
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        mine = torch.tensor([int.from_bytes(digest, "little", signed=True)], dtype=torch.int64)
        device = params[0].device if params and params[0].device.type != "cpu" else "cpu"
        if str(dist.get_backend(self.process_group)) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        mine = mine.to(device)
        every = mine.new_empty(self.ranks)
        self.traffic.add("all_gather", mine)
        work = dist.all_gather_single(every, mine, group=self.process_group, async_op=True)
        self._transport._wait(work)
        every = every.tolist()
        if len(set(every)) > 1:
            differ = [r for r, f in enumerate(every) if f != every[0]]
            raise ValueError(
                "DistributedLion: parameters (shapes, dtypes, order or groups) or options "
                f"differ across ranks: ranks {differ} do not match rank 0. Every rank must "
                "build the optimizer over the same model; nothing was changed."
            )

    # ------------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """This rank's state (its own momenta), plus the world size and rank it was saved at."""
        sd = super().state_dict()
        sd["distributed"] = {"world_size": self.ranks, "rank": self.rank, "vote": self.vote}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore this rank's own state, saved at the same world size."""
        state_dict = dict(state_dict)
        info = state_dict.pop("distributed", None)
        if info is not None and info["world_size"] != self.ranks:
            raise ValueError(
                f"this state_dict was saved at world size {info['world_size']}, the optimizer "
                f"runs at {self.ranks}: pass every rank's state_dict to load_state_dicts(), "
                "which gives each rank their average"
            )
        super().load_state_dict(state_dict)

    def load_state_dicts(self, state_dicts: list[dict[str, Any]]) -> None:
        """Resume from every rank's ``state_dict()`` (of any world size): each rank gets the
        average of the saved momenta (fp64 sum in rank order, rounded once), so all ranks
        start equal."""
        if not state_dicts:
            raise ValueError("load_state_dicts needs at least one state_dict")
        merged = {k: v for k, v in state_dicts[0].items() if k != "distributed"}
        merged["state"] = {}
        for index, entry in state_dicts[0]["state"].items():
            momenta = [sd["state"][index]["exp_avg"] for sd in state_dicts]
            merged["state"][index] = {**entry, "exp_avg": _average(momenta)}
        super().load_state_dict(merged)

    def dcp_state_dict(self, saved_world_size: int | None = None) -> dict[str, Any]:
        """A state dict for ``torch.distributed.checkpoint`` save and load.

        Each momentum is a DTensor of shape ``(N, *param.shape)`` sharded on dim 0 over the
        ranks, so DCP saves every rank's own momentum (plain per-rank tensors under one key
        would be deduplicated to one rank's copy). To load a checkpoint saved at another world
        size, pass ``saved_world_size`` (``checkpoint_world_size()`` reads it): the template
        then holds the full ``(N_saved, ...)`` tensor on every rank, and
        ``load_dcp_state_dict`` averages it.
        """
        from torch.distributed.tensor import DTensor, Shard

        params, _ = self._flat_params()
        for p in params:
            if "exp_avg" not in self.state[p]:
                self.state[p]["exp_avg"] = torch.zeros_like(p)
        sd = super().state_dict()
        mesh = self._mesh()
        for entry in sd["state"].values():
            local = entry["exp_avg"]
            if saved_world_size is None or saved_world_size == self.ranks:
                entry["exp_avg"] = DTensor.from_local(
                    local.unsqueeze(0).clone(), mesh, [Shard(0)], run_check=False
                )
            else:
                entry["exp_avg"] = local.new_zeros((saved_world_size, *local.shape))
        sd["distributed"] = {"vote": self.vote}
        return sd

    def load_dcp_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ``dcp_state_dict()`` filled by ``torch.distributed.checkpoint.load``."""
        from torch.distributed.tensor import DTensor

        merged = {k: v for k, v in state_dict.items() if k != "distributed"}
        merged["state"] = {}
        for index, entry in state_dict["state"].items():
            momentum = entry["exp_avg"]
            if isinstance(momentum, DTensor):
                momentum = momentum.to_local()[0]
            else:  # another world size: the average of every saved rank's momentum
                momentum = _average(list(momentum.unbind(0)))
            merged["state"][index] = {**entry, "exp_avg": momentum}
        super().load_state_dict(merged)

    def _mesh(self):
        from torch.distributed.device_mesh import DeviceMesh

        group = self.process_group or dist.group.WORLD
        backend = str(dist.get_backend(group))
        return DeviceMesh.from_group(group, "cuda" if backend == "nccl" else "cpu")


def checkpoint_world_size(checkpoint_id, key: str = "optim") -> int:
    """The world size a ``dcp_state_dict()`` stored under ``key`` was saved at."""
    from torch.distributed.checkpoint import FileSystemReader

    metadata = FileSystemReader(checkpoint_id).read_metadata()
    prefix = f"{key}.state."
    for name, item in metadata.state_dict_metadata.items():
        if name.startswith(prefix) and name.endswith(".exp_avg"):
            return int(item.size[0])
    raise ValueError(f"no DistributedLion momenta under {key!r} in {checkpoint_id}")


def local_gradients(ddp_model):
    """Make a DistributedDataParallel model keep each rank's own gradient (no all-reduce), as
    DistributedLion needs: ``local_gradients(DDP(model))``. Returns the model."""
    ddp_model.register_comm_hook(None, _keep_local_gradients)
    return ddp_model


def _keep_local_gradients(state, bucket):
    future = torch.futures.Future()
    future.set_result(bucket.buffer())
    return future


def _average(momenta: list[Tensor]) -> Tensor:
    total = torch.zeros_like(momenta[0], dtype=torch.float64)
    for m in momenta:
        total += m.to(torch.float64)
    return (total / len(momenta)).to(momenta[0].dtype)


def _aligned(n: int, to: int) -> int:
    return -(-n // to) * to


def _real_numel(p: Tensor) -> int:
    return p.numel() * (2 if p.is_complex() else 1)


def _as_float(value) -> float:
    return float(value.item()) if isinstance(value, Tensor) else float(value)


def _validate_group(group: dict[str, Any]) -> None:
    lr = _as_float(group["lr"])
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"Invalid learning rate: {group['lr']}")
    betas = group["betas"]
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected two values)")
    for i, beta in enumerate(betas):
        b = _as_float(beta)
        if not (0.0 <= b < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    wd = _as_float(group["weight_decay"])
    if not (math.isfinite(wd) and wd >= 0):
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")
