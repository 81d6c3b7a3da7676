"""Runs one step on all of a replica's workers. The engine sees only this interface.

`InProcessExecutor` drives a single worker in the engine's own process: tp=1, pp=1, no
Ray at all (what a one-GPU user wants, and what runs on a machine without Ray).
`cluster.ray_executor.RayExecutor` drives TP x PP worker actors.
"""

import os
from typing import Protocol

from actors.step_io import StepInput, StepOutput
from actors.worker import RankStats, Worker, WorkerSpec

# On CPU the KV cache shares RAM with everything else: take at most this share of what is free.
CPU_KV_MEMORY_FRACTION = 0.25


class Executor(Protocol):
    num_kv_blocks: int

    def execute(self, step: StepInput) -> StepOutput:
        """Run one step on every worker; raise if any worker fails or misses the deadline."""
        ...

    def prompt_logits(self, prompts: list[list[int]]) -> list:
        """Logits at every position of each prompt (for `tensorfleet verify`)."""
        ...

    def check_health(self) -> None: ...

    def rank_stats(self) -> list[RankStats]:
        """Every rank's running totals (forward and all-reduce time, memory), mesh order."""
        ...

    def worker_pids(self) -> list[int]:
        """The process id of each worker, mesh order."""
        ...

    def shutdown(self) -> None: ...


def kv_blocks_that_fit(free_bytes: int, block_bytes: int, *, device: str, memory_utilization: float,
                       workers_sharing_memory: int, max_blocks: int) -> int:
    """KV blocks from free memory (measured after the weights are loaded), capped by what
    max_num_seqs sequences of max_model_len can use (`max_blocks`)."""
    fraction = memory_utilization if device == "cuda" else CPU_KV_MEMORY_FRACTION
    return max(0, min(max_blocks, int(free_bytes * fraction / workers_sharing_memory) // block_bytes))


class InProcessExecutor:
    def __init__(self, spec: WorkerSpec, num_kv_blocks: int | None, *, memory_utilization: float, max_blocks: int):
        if spec.tp * spec.pp != 1:
            raise ValueError("the in-process executor runs tensor_parallel_size=1, pipeline_parallel_size=1 only")
        self.worker = Worker(spec, 0, 0)
        self.load_report = self.worker.load()
        self.num_kv_blocks = num_kv_blocks or kv_blocks_that_fit(
            self.worker.free_memory_bytes(), self.worker.kv_block_bytes(), device=spec.device,
            memory_utilization=memory_utilization, workers_sharing_memory=1, max_blocks=max_blocks,
        )
        self.worker.allocate_kv(self.num_kv_blocks)

    def execute(self, step: StepInput) -> StepOutput:
        return self.worker.step(step)

    def prompt_logits(self, prompts: list[list[int]]):
        return self.worker.prompt_logits(prompts)

    def check_health(self) -> None:
        pass  # in-process: if the engine runs, so does its worker

    def rank_stats(self) -> list[RankStats]:
        return [self.worker.rank_stats()]

    def worker_pids(self) -> list[int]:
        return [os.getpid()]

    def shutdown(self) -> None:
        self.worker = None
