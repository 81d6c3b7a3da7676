"""Process groups of one model replica: a TP group per pipeline stage and PP edges.

Ranks come from the mesh `arange(pp * tp).reshape(pp, tp)`: global rank r = stage * tp +
tp_rank. The rows of the mesh are the TP groups; the columns are the PP edges, so TP rank i
of stage s sends its hidden states to TP rank i of stage s + 1 (after the row-parallel
all-reduce every rank of a stage holds the same activations, so the tp edges run side by
side and no rank has to fan out).

NCCL on GPUs, gloo on CPU. A TP group of CPU processes on one host all-reduces through
shared memory instead (actors/shm_allreduce.py: ~4 us instead of gloo's ~150-400 us for a
decode token), falling back to gloo for a tensor larger than the segment's slots. A replica
of one rank builds no process group at all: every collective of a size-1 group is a no-op,
which is what lets tp=1 run in-process without Ray.
"""

import time
from collections import deque
from dataclasses import dataclass, field
from datetime import timedelta
from enum import Enum

import torch
import torch.distributed as dist

from actors.shm_allreduce import ShmAllReduce, open_shm_all_reduce

# Sends a stage may have under way: more steps than stages are never in flight, so this
# bound is reached only when the next stage stopped receiving (then the wait has a deadline).
MAX_SENDS_IN_FLIGHT = 8


def rank_mesh(tp: int, pp: int) -> list[list[int]]:
    """`mesh[stage][tp_rank]` = global rank."""
    return torch.arange(pp * tp).reshape(pp, tp).tolist()


class CpuAllReduce(Enum):
    """How a TP group of CPU processes all-reduces; NCCL groups are not affected."""

    GLOO = "gloo"  # always gloo over TCP (the benchmarks' baseline)
    SHM = "shm"  # shared memory when the group's ranks share a host and the tensor fits, else gloo


@dataclass
class CommStats:
    """What this rank spent in collectives, read by the benchmarks and the metrics."""

    all_reduces: int = 0
    all_reduce_seconds: float = 0.0
    gathers: int = 0
    p2p_seconds: float = 0.0


@dataclass
class TPGroup:
    """The tensor-parallel group of one pipeline stage, seen from one of its ranks."""

    size: int
    rank: int
    group: dist.ProcessGroup | None = None  # None when size == 1
    global_ranks: list[int] = field(default_factory=list)
    stats: CommStats = field(default_factory=CommStats)
    # A collective on CUDA is asynchronous: its time is only true after a sync, which
    # stalls the stream, so only a profiling run turns it on. gloo (CPU) is synchronous.
    sync_to_time_collectives: bool = False
    shm: ShmAllReduce | None = None  # set when the ranks are CPU processes of one host

    @classmethod
    def single(cls) -> "TPGroup":
        return cls(size=1, rank=0, global_ranks=[0])

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        start = time.perf_counter()
        if self.shm is not None and self.shm.fits(x):
            self.shm.all_reduce_(x)
        else:
            dist.all_reduce(x, group=self.group)
        if self.sync_to_time_collectives and x.is_cuda:
            torch.cuda.synchronize(x.device)
        self.stats.all_reduces += 1
        self.stats.all_reduce_seconds += time.perf_counter() - start
        return x

    def gather_to_first(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        """Concatenate every rank's `x` along `dim` on TP rank 0; other ranks get None."""
        if self.size == 1:
            return x
        self.stats.gathers += 1
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=self.global_ranks[0], group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None


def reduce_from_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor:
    """Leave the sharded region by summing partial results: Y = sum_i Y_i (all-reduce)."""
    return tp.all_reduce(x)


def gather_from_tp_region(x: torch.Tensor, tp: TPGroup) -> torch.Tensor | None:
    """Leave the sharded region by concatenating column shards on TP rank 0."""
    return tp.gather_to_first(x, dim=-1)


@dataclass
class PipelineEdges:
    """Point-to-point links of one rank to the same TP rank of the adjacent stages.

    A send only starts the transfer and returns: the next stage's call for the step begins
    once this stage's has returned (the driver chains them), so a send that waited for its
    receiver would wait forever. The tensor is held until its send completes."""

    prev_rank: int | None  # global rank feeding this stage, None on the first stage
    next_rank: int | None  # global rank this stage feeds, None on the last stage
    stats: CommStats
    sending: deque[tuple[dist.Work, torch.Tensor]] = field(default_factory=deque)

    def send_next(self, x: torch.Tensor) -> None:
        assert self.next_rank is not None, "the last stage has no next stage"
        start = time.perf_counter()
        while self.sending and (self.sending[0][0].is_completed() or len(self.sending) >= MAX_SENDS_IN_FLIGHT):
            self.sending.popleft()[0].wait()  # raises if that transfer failed
        x = x.contiguous()
        self.sending.append((dist.isend(x, dst=self.next_rank), x))
        self.stats.p2p_seconds += time.perf_counter() - start

    def finish_sends(self) -> None:
        """Wait until every send under way has been received (before a caller may tear the
        process group down: a send cut short fails the receiver)."""
        start = time.perf_counter()
        while self.sending:
            self.sending.popleft()[0].wait()
        self.stats.p2p_seconds += time.perf_counter() - start

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        assert self.prev_rank is not None, "the first stage has no previous stage"
        start = time.perf_counter()
        x = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(x, src=self.prev_rank)
        self.stats.p2p_seconds += time.perf_counter() - start
        return x


@dataclass(frozen=True)
class ParallelContext:
    """Where one worker sits in the replica: its stage, its TP rank, and its groups."""

    tp_size: int
    pp_size: int
    stage: int
    tp: TPGroup
    pp: PipelineEdges

    @property
    def tp_rank(self) -> int:
        return self.tp.rank

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.pp_size - 1

    @property
    def is_sampling_rank(self) -> bool:
        """TP rank 0 of the last stage: the LM head gathers the full-vocabulary logits here."""
        return self.is_last_stage and self.tp_rank == 0

    @classmethod
    def single(cls) -> "ParallelContext":
        tp = TPGroup.single()
        return cls(1, 1, 0, tp, PipelineEdges(None, None, tp.stats))


def init_parallel(
    *,
    stage: int,
    tp_rank: int,
    tp_size: int,
    pp_size: int,
    init_method: str,
    backend: str,
    timeout_s: float = 60.0,
    cpu_all_reduce: CpuAllReduce = CpuAllReduce.SHM,
) -> ParallelContext:
    """Join the replica's process group and build the TP groups and PP edges.

    Every rank calls this with its own (stage, tp_rank); `init_method` is the rendezvous
    (`tcp://rank0-ip:port`) handed out by the driver. `timeout_s` bounds every collective,
    so a dead peer becomes an error instead of a hang; the shared-memory all-reduce waits
    under the same deadline. With gloo and `cpu_all_reduce=SHM`, each TP group checks at
    init that its ranks share a host (boot id and /dev/shm mount) and maps one segment.
    """
    if tp_size * pp_size == 1:
        return ParallelContext.single()
    mesh = rank_mesh(tp_size, pp_size)
    dist.init_process_group(
        backend,
        init_method=init_method,
        rank=mesh[stage][tp_rank],
        world_size=tp_size * pp_size,
        timeout=timedelta(seconds=timeout_s),
    )
    # new_group is collective over the whole world: every rank creates every row's group.
    groups = [dist.new_group(row, timeout=timedelta(seconds=timeout_s)) for row in mesh]
    stats = CommStats()
    group = groups[stage] if tp_size > 1 else None
    shm = None
    if group is not None and backend == "gloo" and cpu_all_reduce is CpuAllReduce.SHM:
        shm = open_shm_all_reduce(group, tp_rank, tp_size, timeout_s=timeout_s)
    tp = TPGroup(tp_size, tp_rank, group, mesh[stage], stats, shm=shm)
    prev_rank = mesh[stage - 1][tp_rank] if stage > 0 else None
    next_rank = mesh[stage + 1][tp_rank] if stage < pp_size - 1 else None
    return ParallelContext(tp_size, pp_size, stage, tp, PipelineEdges(prev_rank, next_rank, stats))


def destroy_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
