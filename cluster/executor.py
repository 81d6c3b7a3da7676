"""Runs steps on a replica's workers. The engine sees only this interface.

`InProcessExecutor` drives a single worker in the engine's own process: tp=1, pp=1, no
Ray at all (what a one-GPU user wants, and what runs on a machine without Ray).
`cluster.ray_executor.RayExecutor` drives TP x PP worker actors.
"""

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from actors.step_io import RankStats, StepInput, StepOutput
from actors.worker import Worker, WorkerSpec


class Executor(Protocol):
    spec: WorkerSpec  # what every worker was built from
    num_kv_blocks: int
    num_stages: int  # pipeline stages: how many steps the workers can hold at once

    def submit(self, step: StepInput) -> asyncio.Future[StepOutput]:
        """Start one step on the workers and return at once; the future holds the step's
        output, or the error when a worker fails or the step misses its deadline. Steps
        run in the order submitted. Called on the engine's event loop."""
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
    num_stages = 1

    def __init__(self, spec: WorkerSpec, num_kv_blocks: int):
        if spec.tp * spec.pp != 1:
            raise ValueError("the in-process executor runs tensor_parallel_size=1, pipeline_parallel_size=1 only")
        self.spec = spec
        self.worker = Worker(spec, 0, 0)
        self.worker.load()
        self.num_kv_blocks = num_kv_blocks
        self.worker.allocate_kv(num_kv_blocks)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="worker")  # steps in order, off the event loop

    def submit(self, step: StepInput) -> asyncio.Future[StepOutput]:
        return asyncio.get_running_loop().run_in_executor(self._thread, self.execute, step)

    def execute(self, step: StepInput) -> StepOutput:
        """One step, here and now."""
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
        self._thread.shutdown(wait=False)
        self.worker = None
