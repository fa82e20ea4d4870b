"""Distributed Lion: bitwise against an independent simulation of N workers, on real gloo groups.

One spawn of 4 processes builds gloo groups of 2, 3 and 4 ranks and runs every case there (both
votes, every transport, torch and fused passes, fp64 and fp32, 25 steps with weight decay, some
gradients missing on some ranks), then the checkpoint round trips (per-rank state_dict, DCP at
the same world size, DCP resumed at another one), the DDP helper, the fingerprint check and a
dead rank's timeout. The in-process tests cover one rank (exactly lionopt.Lion), the codecs and
the bad input.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from dlion_reference import simulate

from lionopt import Lion
from lionopt.distributed import DistributedLion, checkpoint_world_size, local_gradients, voting

SHAPES = [(5,), (300,), (17, 13), (1,), (24, 40)]
LRS = [0.01, 0.01, 0.03, 0.01, 0.01]  # two groups: params 0, 1, 3, 4 and param 2
WDS = [0.5, 0.5, 0.2, 0.5, 0.5]
BETAS = (0.9, 0.99)
STEPS = 20
TRANSPORTS = ("int8", "packed", "all_gather")


def initial_params(dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in SHAPES]


def make_grads(dtype):
    def grads(step: int, worker: int) -> list[torch.Tensor | None]:
        gen = torch.Generator().manual_seed(1000 * step + worker)
        out: list[torch.Tensor | None] = []
        for j, s in enumerate(SHAPES):
            scale = float((step + worker + j) % 3)  # exact zeros: votes of 0 at the start
            out.append((torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype))
        if step % 4 == 1 and worker == 0:
            out[1] = None  # no gradient here, gradients elsewhere: a zero gradient
        if step == 3:
            out[3] = None  # no gradient anywhere: skipped
        return out

    return grads


def build(params, group, **options) -> DistributedLion:
    groups = [
        {"params": [params[i] for i in (0, 1, 3, 4)]},
        {"params": [params[2]], "lr": LRS[2], "weight_decay": WDS[2]},
    ]
    return DistributedLion(
        groups, lr=LRS[0], betas=BETAS, weight_decay=WDS[0], process_group=group, **options
    )


def run_steps(opt, params, grads, rank, start, steps) -> None:
    for step in range(start, start + steps):
        for p, g in zip(params, grads(step, rank)):
            p.grad = None if g is None else g.clone()
        opt.step()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a, b)


# ------------------------------------------------------------------------------ the workers


def _cases(rank: int, ranks: int, group, failures: list[str]) -> None:
    for dtype in (torch.float64, torch.float32):
        grads = make_grads(dtype)
        for vote in ("majority", "average"):
            want, momenta = simulate(
                initial_params(dtype), grads, ranks, STEPS, LRS, BETAS, WDS, vote
            )
            cases = [(t, f) for t in TRANSPORTS for f in (False, None)] + [("auto", None)]
            if dtype == torch.float32:  # the fp32 fused kernels; fp64 covered the torch passes
                cases = [(t, None) for t in TRANSPORTS]
            for transport, fused in cases:
                params = initial_params(dtype)
                opt = build(
                    params,
                    group,
                    vote=vote,
                    transport=transport,
                    fused=fused,
                    bucket_numel=512,
                    timeout=60,
                )
                run_steps(opt, params, grads, rank, 0, STEPS)
                name = f"N={ranks} {dtype} {vote} {transport} fused={fused}"
                for j, p in enumerate(params):
                    if not same(p, want[j]):
                        failures.append(f"{name}: param {j} differs from the simulation")
                    if not same(opt.state[p]["exp_avg"], momenta[rank][j]):
                        failures.append(f"{name}: momentum {j} differs")


def _checkpoints(rank, g2, g3, path, failures) -> None:
    dtype = torch.float64
    grads = make_grads(dtype)
    import torch.distributed.checkpoint as dcp

    if rank < 2:  # per-rank state_dict: save after 10 steps, resume, 10 more == 20 straight
        _, momenta10 = simulate(initial_params(dtype), grads, 2, 10, LRS, BETAS, WDS, "majority")
        want, _ = simulate(initial_params(dtype), grads, 2, 20, LRS, BETAS, WDS, "majority")
        params = initial_params(dtype)
        opt = build(params, g2, transport="packed")
        run_steps(opt, params, grads, rank, 0, 10)
        file = os.path.join(path, f"rank{rank}.pt")
        torch.save({"params": params, "optim": opt.state_dict()}, file)
        dcp.save(
            {"optim": opt.dcp_state_dict()},
            checkpoint_id=os.path.join(path, "dcp"),
            process_group=g2,
        )
        saved = torch.load(file, weights_only=False)
        params2 = [p.clone() for p in saved["params"]]
        opt2 = build(params2, g2, transport="packed")
        opt2.load_state_dict(saved["optim"])
        run_steps(opt2, params2, grads, rank, 10, 10)
        if not all(same(p, w) for p, w in zip(params2, want)):
            failures.append("state_dict round trip: parameters differ from 20 straight steps")
        # DCP at the same world size: each rank gets its own momentum back.
        params3 = [p.clone() for p in saved["params"]]
        opt3 = build(params3, g2, transport="packed")
        state = {"optim": opt3.dcp_state_dict()}
        dcp.load(state, checkpoint_id=os.path.join(path, "dcp"), process_group=g2)
        opt3.load_dcp_state_dict(state["optim"])
        if not all(same(opt3.state[p]["exp_avg"], m) for p, m in zip(params3, momenta10[rank])):
            failures.append("DCP at the same world size: momenta differ from this rank's")
        run_steps(opt3, params3, grads, rank, 10, 10)
        if not all(same(p, w) for p, w in zip(params3, want)):
            failures.append("DCP round trip: parameters differ from 20 straight steps")
    dist.barrier()
    if g3 is not None:  # resume the 2-rank checkpoint on 3 ranks: every rank gets the average
        _, momenta10 = simulate(initial_params(dtype), grads, 2, 10, LRS, BETAS, WDS, "majority")
        params = initial_params(dtype)
        opt = build(params, g3, transport="packed")
        saved_n = checkpoint_world_size(os.path.join(path, "dcp"), "optim")
        state = {"optim": opt.dcp_state_dict(saved_world_size=saved_n)}
        dcp.load(state, checkpoint_id=os.path.join(path, "dcp"), process_group=g3)
        opt.load_dcp_state_dict(state["optim"])
        if saved_n != 2:
            failures.append(f"checkpoint_world_size read {saved_n}, not 2")
        for p, m0, m1 in zip(params, momenta10[0], momenta10[1]):
            if not same(opt.state[p]["exp_avg"], (m0 + m1) / 2):
                failures.append("DCP at 3 ranks from 2: momentum is not the average")
        # and the per-rank dicts, all of them: the same average
        dicts = [torch.load(os.path.join(path, f"rank{r}.pt"), weights_only=False) for r in (0, 1)]
        try:  # one rank's dict at another world size: refused, with the way out in the message
            build(initial_params(dtype), g3).load_state_dict(dicts[0]["optim"])
            failures.append("load_state_dict at another world size did not raise")
        except ValueError as exc:
            if "load_state_dicts" not in str(exc):
                failures.append(f"unclear error: {exc}")
        opt4 = build(initial_params(dtype), g3, transport="packed")
        opt4.load_state_dicts([d["optim"] for d in dicts])
        for p, q in zip(opt4.param_groups[0]["params"], opt.param_groups[0]["params"]):
            if not same(opt4.state[p]["exp_avg"], opt.state[q]["exp_avg"]):
                failures.append("load_state_dicts and DCP averages differ")


def _ddp_and_errors(rank, g2, failures) -> None:
    if rank >= 2:  # not a member of g2: a clear error, not a hang
        try:
            DistributedLion([torch.zeros(2)], process_group=g2)
            failures.append("a non-member rank built an optimizer on the group")
        except ValueError as exc:
            if "not a member" not in str(exc):
                failures.append(f"non-member: unclear error {exc}")
        return
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3).double()
    plain = torch.nn.Linear(6, 3).double()
    plain.load_state_dict(model.state_dict())
    ddp = local_gradients(DDP(model, process_group=g2))
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))
    ddp(x).square().sum().backward()
    plain(x).square().sum().backward()
    for a, b in zip(model.parameters(), plain.parameters()):
        if not same(a.grad, b.grad):
            failures.append("local_gradients: DDP changed the local gradient")
    # Shapes that differ across ranks: a ValueError on every rank, before anything changes.
    params = [torch.ones(3 + rank, dtype=torch.float64)]
    params[0].grad = torch.ones_like(params[0])
    opt = DistributedLion(params, lr=0.1, process_group=g2, timeout=30)
    try:
        opt.step()
        failures.append("differing shapes: no error")
    except ValueError as exc:
        if "differ across ranks" not in str(exc):
            failures.append(f"differing shapes: unclear error {exc}")
    if not torch.equal(params[0], torch.ones(3 + rank, dtype=torch.float64)) or opt.state:
        failures.append("differing shapes: something changed before the error")


def _dead_rank(rank, g_dead, failures) -> None:
    if rank == 1:
        time.sleep(6)  # alive but silent, so that rank 0's timeout (not a closed socket) fires
    if rank == 0:  # rank 1 never steps: rank 0 must get an error within the timeout
        p = torch.ones(8, dtype=torch.float64)
        p.grad = torch.ones_like(p)
        opt = DistributedLion([p], lr=0.1, process_group=g_dead, timeout=2)
        started = time.monotonic()
        try:
            opt.step()
            failures.append("dead rank: step returned")
        except RuntimeError as exc:
            if "timed out" not in str(exc):
                failures.append(f"dead rank: unclear error {exc}")
            waited = time.monotonic() - started
            if not 1.5 < waited < 5:
                failures.append(f"dead rank: the error came after {waited:.1f} s, not ~2 s")


def _worker(rank: int, world: int, port: int, path: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=90),
    )
    failures: list[str] = []
    groups = {n: dist.new_group(list(range(n))) for n in (2, 3)}
    groups[4] = dist.group.WORLD
    g_dead = dist.new_group([0, 1])
    try:
        t0 = time.monotonic()
        for n in (2, 3, 4):
            if rank < n:
                _cases(rank, n, groups[n], failures)
        dist.barrier()
        t1 = time.monotonic()
        _checkpoints(
            rank, groups[2] if rank < 2 else None, groups[3] if rank < 3 else None, path, failures
        )
        dist.barrier()
        _ddp_and_errors(rank, groups[2], failures)
        dist.barrier()
        t2 = time.monotonic()
        _dead_rank(rank, g_dead, failures)
        if os.environ.get("DLION_TEST_TIMES"):
            print(
                f"rank {rank}: cases {t1 - t0:.1f} s, rest {t2 - t1:.1f} s, "
                f"dead rank {time.monotonic() - t2:.1f} s",
                flush=True,
            )
    except Exception:
        failures.append(traceback.format_exc())
    with open(os.path.join(path, f"failures{rank}.txt"), "w") as f:
        f.write("\n".join(failures))
    os._exit(0)  # the dead-rank group is left broken: no teardown that could wait on it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_distributed_against_simulation_on_gloo():
    world = 4
    with tempfile.TemporaryDirectory() as path:
        context = mp.start_processes(
            _worker,
            args=(world, _free_port(), path),
            nprocs=world,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + 200
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail("the distributed workers did not finish in 200 s")
        failures = []
        for rank in range(world):
            with open(os.path.join(path, f"failures{rank}.txt")) as f:
                text = f.read().strip()
            if text:
                failures.append(f"rank {rank}:\n{text}")
        assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("vote", ["majority", "average"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_one_rank_is_lion(vote, fused, dtype):
    grads = make_grads(dtype)
    a, b = initial_params(dtype), initial_params(dtype)
    lion = Lion(
        [
            {"params": [a[i] for i in (0, 1, 3, 4)]},
            {"params": [a[2]], "lr": LRS[2], "weight_decay": WDS[2]},
        ],
        lr=LRS[0],
        betas=BETAS,
        weight_decay=WDS[0],
    )
    dlion = build(b, None, vote=vote, fused=fused, bucket_numel=512)
    run_steps(lion, a, grads, 0, 0, STEPS)
    run_steps(dlion, b, grads, 0, 0, STEPS)
    for p, q in zip(a, b):
        assert same(p, q)
        assert same(lion.state[p]["exp_avg"], dlion.state[q]["exp_avg"])


def test_one_rank_matches_the_simulation():
    grads = make_grads(torch.float64)
    want, _ = simulate(initial_params(torch.float64), grads, 1, STEPS, LRS, BETAS, WDS, "majority")
    params = initial_params(torch.float64)
    run_steps(build(params, None), params, grads, 0, 0, STEPS)
    assert all(same(p, w) for p, w in zip(params, want))


@pytest.mark.parametrize("vote", ["majority", "average"])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4, 5, 8, 9, 16, 127])
@pytest.mark.parametrize("zeros", [True, False])
def test_result_formats_are_exact(vote, ranks, zeros):
    gen = torch.Generator().manual_seed(ranks)
    signs = torch.randint(0, 3 if zeros else 2, (ranks, 64), generator=gen)
    signs = signs - 1 if zeros else signs * 2 - 1
    counts = signs.sum(0).to(torch.int32)
    fmt = voting.result_format(vote, ranks, zeros)
    decoded = voting.decode(voting.encode_result(counts, vote, fmt), fmt)
    want = torch.sign(counts) if vote == "majority" else counts
    assert torch.equal(decoded, want)
    assert fmt.width <= (2 if vote == "majority" else 8)


@pytest.mark.parametrize("width", [1, 2])
def test_count_votes(width):
    gen = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (3, 40), generator=gen) * 2 - 1
    if width == 2:
        signs[0, :5] = 0
    packed = torch.stack([voting.pack(voting.sign_codes(s, width), width) for s in signs])
    fmt = voting.SIGN2 if width == 2 else voting.SIGN1
    assert torch.equal(voting.count_votes(packed, fmt), signs.sum(0).to(torch.int32))


def test_fused_passes_equal_the_torch_passes():
    from lionopt.kernels.cpu import signpack as signpack_cpu

    if not signpack_cpu.available():
        pytest.skip("no C++ compiler")
    gen = torch.Generator().manual_seed(0)
    shapes = [(3,), (1500,), (40, 33), (0,), (20000,)]
    for dtype in (torch.float32, torch.float64):
        params = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        grads = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        grads[2] = None
        grads[1][:5] = 0
        grads[1][5:7] = torch.tensor([float("nan"), float("inf")])  # NaN: no vote, NaN momentum
        moms = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
        moms[1][:3] = 0
        offsets, total = [], 0
        for p in params:
            offsets.append(total)
            total += -(-p.numel() // 8) * 8
        numel = -(-total // 24) * 24
        for width in (2, 8):
            m1, m2 = [m.clone() for m in moms], [m.clone() for m in moms]
            a, za = voting.sign_pass(params, grads, m1, offsets, numel, 0.9, 0.99, width, True)
            b, zb = signpack_cpu.sign_pass(
                params, grads, m2, offsets, numel, 0.9, 0.99, width, True
            )
            assert torch.equal(a, b) and za == zb == 4
            assert all(torch.equal(x.nan_to_num(7.0), y.nan_to_num(7.0)) for x, y in zip(m1, m2))
            assert m1[1][5].isnan() and m2[1][5].isnan()
        formats = [voting.SIGN2, voting.SIGN1, voting.RAW8, voting.ResultFormat(4, 2, -4)]
        for fmt in formats:
            for vote in ("majority", "average"):
                if fmt.width == 8:
                    codes = torch.randint(-4, 5, (numel,), generator=gen, dtype=torch.int8)
                    codes = codes.view(torch.uint8)
                else:
                    codes = torch.randint(
                        0, 256, (numel * fmt.width // 8,), generator=gen, dtype=torch.uint8
                    )
                p1, p2 = [p.clone() for p in params], [p.clone() for p in params]
                lrs, wds = [0.1, 0.2, 0.1, 0.1, 0.3], [0.3, 0.0, 0.3, 0.3, 1.0]
                voting.apply_pass(p1, offsets, lrs, wds, codes, fmt, vote, 4)
                signpack_cpu.apply_pass(p2, offsets, lrs, wds, codes, fmt, vote, 4)
                assert all(same(x, y) for x, y in zip(p1, p2)), (fmt, vote)


def test_fused_vote_helpers_equal_the_torch_codecs():
    from lionopt.kernels.cpu import signpack as signpack_cpu

    if not signpack_cpu.available():
        pytest.skip("no C++ compiler")
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 3, (4096,), generator=gen).to(torch.uint8)
    want = voting.pack((codes == 2).to(torch.uint8), 1)
    assert torch.equal(signpack_cpu.repack_2to1(voting.pack(codes, 2)), want)
    for fmt in (voting.SIGN1, voting.SIGN2):
        codes = torch.randint(0, 1 << fmt.width, (5, 512), generator=gen).to(torch.uint8)
        rows = torch.stack([voting.pack(c.clamp(max=2), fmt.width) for c in codes])
        counts = voting.count_votes(rows, fmt)
        assert torch.equal(signpack_cpu.count_votes(rows, fmt.width, False).int(), counts)
        assert torch.equal(signpack_cpu.count_votes(rows, fmt.width, True).int(), counts.sign())
    for vote in ("majority", "average"):
        for ranks in (2, 3, 4, 8):
            for zeros in (True, False):
                fmt = voting.result_format(vote, ranks, zeros)
                if fmt.width == 8:
                    continue
                s = torch.randint(0, 3 if zeros else 2, (ranks, 256), generator=gen)
                counts = (s - 1 if zeros else 2 * s - 1).sum(0)
                got = signpack_cpu.encode_result(counts.to(torch.int8), vote, fmt)
                assert torch.equal(got, voting.encode_result(counts.int(), vote, fmt))


def test_bad_input():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="Invalid vote"):
        DistributedLion(p, vote="median")
    with pytest.raises(ValueError, match="Invalid transport"):
        DistributedLion(p, transport="udp")
    with pytest.raises(ValueError, match="Invalid learning rate"):
        DistributedLion(p, lr=-1.0)
    with pytest.raises(ValueError, match="Invalid beta"):
        DistributedLion(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Invalid weight_decay"):
        DistributedLion(p, weight_decay=-0.1)
    with pytest.raises(ValueError, match="not initialised"):
        DistributedLion(p, process_group=object())
    with pytest.raises(ValueError, match="does not take"):
        DistributedLion([torch.zeros(3, dtype=torch.int64)])
    q = torch.zeros(4, requires_grad=True)
    q.grad = torch.zeros(4).to_sparse()
    with pytest.raises(ValueError, match="sparse"):
        DistributedLion([q]).step()


def test_int8_refuses_more_than_127_ranks(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 128)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="127 ranks"):
        DistributedLion(p, transport="int8")
    with pytest.raises(ValueError, match="127 ranks"):
        DistributedLion(p, vote="average")
    assert DistributedLion(p, transport="auto").transport_name == "packed"
    assert DistributedLion(p, transport="packed").transport_name == "packed"


@pytest.mark.parametrize("vote", ["majority", "average"])
@pytest.mark.parametrize("workers", [1, 3, 4])
def test_simulate_matches_the_reference(vote, workers):
    from lionopt.distributed.simulate import SimulatedDistributedLion

    dtype = torch.float64
    grads = make_grads(dtype)
    want, momenta = simulate(initial_params(dtype), grads, workers, STEPS, LRS, BETAS, WDS, vote)
    params = [p.requires_grad_() for p in initial_params(dtype)]
    opt = SimulatedDistributedLion(
        [
            {"params": [params[i] for i in (0, 1, 3, 4)]},
            {"params": [params[2]], "lr": LRS[2], "weight_decay": WDS[2]},
        ],
        lr=LRS[0],
        betas=BETAS,
        weight_decay=WDS[0],
        workers=workers,
        vote=vote,
    )
    for step in range(STEPS):

        def closure(worker, step=step):
            for p, g in zip(params, grads(step, worker)):
                p.grad = None if g is None else g.clone()
            return 0.0

        opt.step(closure)
    for j, p in enumerate(params):
        assert same(p.detach(), want[j])
        for w in range(workers):
            assert same(opt.state[p]["exp_avg"][w], momenta[w][j])


def test_one_rank_mixed_dtypes_and_complex_is_lion():
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.bfloat16, torch.complex64, torch.float64, torch.float32]
    shapes = [(7,), (5, 3), (4,), (9,), (2, 2)]
    a = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    b = [p.clone() for p in a]
    lion = Lion(a, lr=0.05, weight_decay=0.3)
    dlion = DistributedLion(b, lr=0.05, weight_decay=0.3, bucket_numel=16)
    assert len(dlion._layout(b)) >= 4  # one bucket per run of one dtype, cut at 16 elements
    for step in range(15):
        for p, q in zip(a, b):
            g = torch.randn(p.shape, generator=gen).to(p.dtype) * (step % 2)
            p.grad, q.grad = g.clone(), g.clone()
        lion.step()
        dlion.step()
    for p, q in zip(a, b):
        assert same(p, q)


def test_auto_transport_choice():
    from lionopt.distributed.transports import choose_transport

    assert choose_transport(2, "gloo", "majority") == "all_gather"
    assert choose_transport(3, "gloo", "majority") == "packed"
    assert choose_transport(64, "nccl", "average") == "packed"
    assert choose_transport(8, "custom", "majority") == "int8"
    assert choose_transport(200, "custom", "majority") == "all_gather"
