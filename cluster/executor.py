"""Runs one step on all of a replica's workers. The engine sees only this interface.

`InProcessExecutor` drives a single worker in the engine's own process: tp=1, pp=1, no
Ray at all (what a one-GPU user wants, and what runs on a machine without Ray).
`cluster.ray_executor.RayExecutor` drives TP x PP worker actors.
"""

import os
from typing import Protocol

from actors.step_io import RankStats, StepInput, StepOutput
from actors.worker import Worker, WorkerSpec


class Executor(Protocol):
    spec: WorkerSpec  # what every worker was built from
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


class InProcessExecutor:
    def __init__(self, spec: WorkerSpec, num_kv_blocks: int):
        if spec.tp * spec.pp != 1:
            raise ValueError("the in-process executor runs tensor_parallel_size=1, pipeline_parallel_size=1 only")
        self.spec = spec
        self.worker = Worker(spec, 0, 0)
        self.worker.load()
        self.num_kv_blocks = num_kv_blocks
        self.worker.allocate_kv(num_kv_blocks)

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
