"""Simulated tensor parallelism in one process: each TP rank runs in its own thread, and its
collectives meet the other ranks' at a barrier, summing (all-reduce) or concatenating on
rank 0 (gather) as the real ones do. For tests of layers and whole stages that need no
process group; tests/mp_harness.py runs the real thing with gloo processes."""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from actors.attention import PagedAttention, build_attention_metadata
from actors.comm import ParallelContext, PipelineEdges, TPGroup


class Meeting:
    """Where the ranks of one simulated TP group swap tensors, once per collective."""

    def __init__(self, size: int, timeout_s: float = 60.0):
        self.parts: list[torch.Tensor | None] = [None] * size
        self.barrier = threading.Barrier(size, timeout=timeout_s)  # a failed rank breaks it

    def exchange(self, rank: int, x: torch.Tensor) -> list[torch.Tensor]:
        self.parts[rank] = x.clone()
        self.barrier.wait()
        parts = list(self.parts)
        self.barrier.wait()  # nobody deposits the next collective's tensor before all have read
        return parts


@dataclass
class ThreadedTPGroup(TPGroup):
    meeting: Meeting = field(default=None, repr=False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self.stats.all_reduces += 1
        return x.copy_(torch.stack(self.meeting.exchange(self.rank, x)).sum(0))

    def gather_to_first(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor | None:
        self.stats.gathers += 1
        parts = self.meeting.exchange(self.rank, x)
        return torch.cat(parts, dim=dim) if self.rank == 0 else None


def run_ranks(tp: int, fn: Callable[[TPGroup], Any]) -> list[Any]:
    """fn(group) on every rank of a simulated TP group of size tp, each in a thread; the
    results by rank. The first rank to fail raises here."""
    meeting = Meeting(tp)
    groups = [ThreadedTPGroup(tp, rank, global_ranks=list(range(tp)), meeting=meeting) for rank in range(tp)]
    with ThreadPoolExecutor(tp) as pool:
        futures = [pool.submit(fn, g) for g in groups]
        failures = [e for f in futures if (e := f.exception()) is not None]
    if failures:  # a rank's own error rather than the broken barrier it left the others
        raise next((e for e in failures if not isinstance(e, threading.BrokenBarrierError)), failures[0])
    return [f.result() for f in futures]


def context(tp: TPGroup) -> ParallelContext:
    """A one-stage replica's context around a (simulated) TP group."""
    return ParallelContext(tp.size, 1, 0, tp, PipelineEdges(None, None, tp.stats))


def stage_prompt_logits(stage: torch.nn.Module, prompts: list[list[int]], block_size: int = 8) -> list[torch.Tensor] | None:
    """Logits at every position of each prompt, prefilled together in fresh KV blocks of a
    one-stage model (None on TP ranks other than 0)."""
    lens = [len(p) for p in prompts]
    tables, next_block = [], 0
    for n in lens:
        tables.append(list(range(next_block, next_block + -(-n // block_size))))
        next_block += len(tables[-1])
    dtype = next(stage.parameters()).dtype
    for a in stage.modules():
        if isinstance(a, PagedAttention):
            a.kv_cache = torch.zeros(2, next_block * block_size, a.num_kv_heads, a.head_dim, dtype=dtype)
    meta = build_attention_metadata(lens, lens, tables, block_size)
    ids = torch.tensor([t for p in prompts for t in p])
    pos = torch.tensor([i for n in lens for i in range(n)])
    with torch.no_grad():
        logits = stage.compute_logits(stage(ids, pos, meta))
    return list(logits.split(lens)) if logits is not None else None
