"""The shared-memory all-reduce of actors/shm_allreduce.py, in 2, 3 and 4 spawned processes.

References are computed independently on every rank: each rank draws every rank's input
from the same seed, then
  - exact: the float64 sum. float32: |got - exact| <= 1e-6 * sum_i |x_i| elementwise;
    bf16/fp16: |got - exact| <= (n - 1) u sum_i |x_i| (u = 2^-8 bf16, 2^-11 fp16), the
    bound of n - 1 rounded adds, which gloo's result meets too;
  - rank order: ((x_0 + x_1) + x_2) ... with each add done in float32 and rounded to the
    dtype, written out here: the result must equal it bit for bit (the documented order);
  - gloo's all-reduce of the same inputs: equal bit for bit with 2 ranks; with more, gloo
    adds in its own order, so only within 2 (n - 1) u sum_i |x_i| of it.
Every rank must get bit-identical results, and nothing may be left in /dev/shm.
"""

import hashlib
import os
import signal
import subprocess
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors import shm_allreduce
from actors.comm import CpuAllReduce, TPGroup, init_parallel
from actors.shm_allreduce import (
    PREFIX,
    AllReduceTimeout,
    ShmAllReduce,
    open_shm_all_reduce,
)
from tests.mp_harness import free_port

SHAPES = [(1, 576), (8, 576), (64, 576), (3, 7, 5)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
MAX_BYTES = 64 * 576 * 4


def _join(scenario, n: int, *args, timeout_s: float = 180.0) -> list:
    """Run `scenario(rank, n, init_method, *args)` in n processes; each rank's return value."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(scenario, r, n, init_method, args, queue)) for r in range(n)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(timeout=max(1.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
    results = {}
    while not queue.empty():
        rank, value, error = queue.get()
        assert error is None, f"rank {rank}: {error}"
        results[rank] = value
    left = [f for f in os.listdir("/dev/shm") if f.startswith(PREFIX) and any(f"-{p.pid}-" in f for p in procs)]
    assert not left, f"segments left in /dev/shm: {left}"
    return [results.get(r) for r in range(n)]


def _rank_main(scenario, rank, n, init_method, args, queue) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    try:
        queue.put((rank, scenario(rank, n, init_method, *args), None))
    except Exception as e:  # noqa: BLE001 - surfaced in the parent with its rank
        queue.put((rank, None, f"{type(e).__name__}: {e}"))
    os._exit(0)  # no gloo teardown handshakes with peers that may be gone


def _init(rank: int, n: int, init_method: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=n, timeout=timedelta(seconds=60))


def _inputs(seed: int, n: int, shape, dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # a scale per rank, 2^-3 .. 2^3: ranks' partial sums differ in size, as real ones do
    scales = 2.0 ** torch.randint(-3, 4, (n,), generator=gen)
    return [(torch.randn(shape, generator=gen) * scale).to(dtype) for scale in scales]


def _rank_order_sum(xs: list[torch.Tensor]) -> torch.Tensor:
    out = xs[0]
    for t in xs[1:]:
        out = (out.float() + t.float()).to(t.dtype)  # exact in float32 for two bf16/fp16 values
    return out


def _sums(rank: int, n: int, init_method: str, rounds: int) -> dict:
    _init(rank, n, init_method)
    group = dist.group.WORLD
    # ranks that disagree on the host build nothing, on every rank alike
    real_key = shm_allreduce.host_key
    shm_allreduce.host_key = (lambda: "elsewhere") if rank == 1 else real_key
    assert open_shm_all_reduce(group, rank, n, max_bytes=MAX_BYTES) is None
    shm_allreduce.host_key = real_key

    shm = open_shm_all_reduce(group, rank, n, max_bytes=MAX_BYTES, timeout_s=30)
    assert shm is not None
    dist.barrier()  # rank 0 has unlinked the name once set-up returned there
    assert shm.name not in os.listdir("/dev/shm"), "the name outlived the set-up"
    digest, worst = hashlib.sha256(), {}  # worst: largest |got - exact| / sum_i |x_i| per dtype
    for r in range(rounds):
        for d, dtype in enumerate(DTYPES):
            for s, shape in enumerate(SHAPES):
                xs = _inputs(r * 100 + d * 10 + s, n, shape, dtype)
                x, y = xs[rank].clone(), xs[rank].clone()
                assert shm.all_reduce_(x) is x
                dist.all_reduce(y, group=group)
                wide = torch.stack([t.double() for t in xs])
                exact, magnitude = wide.sum(0), wide.abs().sum(0).clamp_min(1e-30)
                error = ((x.double() - exact).abs() / magnitude).max().item()
                worst[str(dtype)] = max(worst.get(str(dtype), 0.0), error)
                bound = 1e-6 if dtype == torch.float32 else (n - 1) * UNIT_ROUNDOFF[dtype]
                assert error <= bound, f"{dtype} {shape}: {error} * sum|x_i| from the exact sum"
                assert torch.equal(x, _rank_order_sum(xs)), f"{dtype} {shape}: not the rank-order sum"
                if n == 2:
                    assert torch.equal(x, y), f"{dtype} {shape}: differs from gloo"
                elif dtype != torch.float32:
                    gap = ((x.double() - y.double()).abs() / magnitude).max().item()
                    assert gap <= 2 * bound, f"{dtype} {shape}: {gap} * sum|x_i| from gloo"
                digest.update(x.view(torch.uint8).numpy().tobytes())
    digests = [None] * n
    dist.all_gather_object(digests, digest.hexdigest())
    assert len(set(digests)) == 1, "ranks got different bits"
    calls = shm.seq
    shm.close()
    return {"calls": calls, "worst": worst}


@pytest.mark.parametrize("n", [2, 3, 4])
def test_sums_match_exact_and_gloo(n):
    results = _join(_sums, n, 12)
    assert all(r["calls"] == 12 * len(DTYPES) * len(SHAPES) for r in results)
    print(f"n={n}: largest |got - exact| / sum|x_i|: {results[0]['worst']}")


def _dead_peer(rank: int, n: int, init_method: str, good_calls: int, timeout_s: float, how: str) -> dict | None:
    _init(rank, n, init_method)
    shm = open_shm_all_reduce(dist.group.WORLD, rank, n, max_bytes=MAX_BYTES, timeout_s=timeout_s)
    x = torch.ones(1, 576)
    for _ in range(good_calls):
        shm.all_reduce_(x.fill_(1.0))
        assert (x == n).all()
    if rank == n - 1 and how == "killed":
        os.kill(os.getpid(), signal.SIGKILL)  # dies holding the segment mapped
    if rank == n - 1 and how == "stalled":
        time.sleep(timeout_s + 2.0)  # alive, but never makes the call
        return None
    start = time.monotonic()
    with pytest.raises(AllReduceTimeout) as err:
        shm.all_reduce_(x)
    waited = time.monotonic() - start
    with pytest.raises(RuntimeError, match="unusable"):
        shm.all_reduce_(x)  # the group stays failed instead of mixing up call numbers
    return {"message": str(err.value), "waited": waited}


@pytest.mark.parametrize("how", ["killed", "stalled"])
def test_a_peer_that_never_arrives_is_named_within_the_deadline(how):
    n, timeout_s = 3, 1.0
    results = _join(_dead_peer, n, 5, timeout_s, how)
    assert results[-1] is None
    for r in results[:-1]:
        assert f"TP rank(s) [{n - 1}] of {n} did not arrive within 1 s" in r["message"]
        assert timeout_s <= r["waited"] < timeout_s + 2.0


def _through_comm(rank: int, n: int, init_method: str, second_init: str) -> dict:
    """tp=2 x pp=2 via init_parallel: each stage's group has its own segment; an oversized
    tensor and an integer tensor go through gloo; CpuAllReduce.GLOO builds no segment."""
    tp_size, pp_size = 2, 2
    stage, tp_rank = divmod(rank, tp_size)
    ctx = init_parallel(stage=stage, tp_rank=tp_rank, tp_size=tp_size, pp_size=pp_size,
                        init_method=init_method, backend="gloo", timeout_s=30)
    tp: TPGroup = ctx.tp
    assert tp.shm is not None
    x = torch.full((4, 576), float(rank + 1))
    tp.all_reduce(x)
    want = sum(stage * tp_size + r + 1 for r in range(tp_size))  # global ranks of this stage, + 1
    assert (x == want).all()
    strided = torch.full((576, 4), float(rank + 1)).t()  # [4, 576], not contiguous
    assert tp.all_reduce(strided) is strided and (strided == want).all()
    assert tp.shm.seq == 2
    big = torch.full((tp.shm.slot_bytes // 4 + 1,), float(rank + 1))
    ints = torch.full((3,), rank + 1, dtype=torch.int64)
    assert not tp.shm.fits(big) and not tp.shm.fits(ints)
    tp.all_reduce(big)
    tp.all_reduce(ints)
    assert (big == want).all() and (ints == want).all()
    assert tp.shm.seq == 2, "the fallback went through shared memory"
    assert tp.stats.all_reduces == 4
    tp.shm.close()
    dist.destroy_process_group()

    ctx = init_parallel(stage=stage, tp_rank=tp_rank, tp_size=tp_size, pp_size=pp_size, init_method=second_init,
                        backend="gloo", timeout_s=30, cpu_all_reduce=CpuAllReduce.GLOO)
    assert ctx.tp.shm is None
    y = torch.full((2, 3), 1.0)
    ctx.tp.all_reduce(y)
    assert (y == tp_size).all()
    return {"segment": tp.shm.name}


def test_init_parallel_uses_shared_memory_per_stage_and_falls_back_to_gloo():
    results = _join(_through_comm, 4, f"tcp://127.0.0.1:{free_port()}")
    assert results[0]["segment"] == results[1]["segment"] != results[2]["segment"] == results[3]["segment"]


def test_a_killed_creators_stale_segment_is_swept_at_the_next_create():
    """Only a name older than any set-up whose creating pid is gone is removed."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    paths = {kind: f"/dev/shm/{PREFIX}{pid}-test{kind}" for kind, pid in
             [("stale", dead.pid), ("fresh", dead.pid), ("alive", os.getpid())]}
    try:
        for kind, path in paths.items():
            open(path, "wb").close()
            if kind != "fresh":
                os.utime(path, (time.time() - 3600, time.time() - 3600))
        ShmAllReduce.create(2, 4096, timeout_s=1.0).close()
        assert not os.path.exists(paths["stale"])
        assert os.path.exists(paths["fresh"]) and os.path.exists(paths["alive"])
    finally:
        for path in paths.values():
            if os.path.exists(path):
                os.unlink(path)
