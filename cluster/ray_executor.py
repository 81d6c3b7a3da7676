"""Drive a replica's TP x PP worker actors on Ray, addressed as `workers[stage][tp_rank]`.

Setup: place one `actors.ray_worker.RayWorker` per GPU (one STRICT_PACK placement group per
stage), rendezvous at rank 0, build the process groups, load the shards and allocate the
KV cache the plan sized. Every wait has a deadline, so a dead or stuck worker becomes an
error, not a hang.

A step goes down the pipeline as the mesh says: TP rank i of stage s + 1 is called with
what TP rank i of stage s returns for the same step (a `StageHandoff`, passed by reference:
see `actors.ray_worker`), and fetches it before its forward; the hidden states themselves travel over the PP edge (torch.distributed:
NCCL, or gloo on CPU), sent before the handoff returns. TP rank 0 of the last stage,
`workers[-1][0]`, returns the sampled tokens. Up to pp steps are in flight: stage s works
on one while stage s + 1 works on the one before. The driver awaits the last stage's
results on its event loop, with the step deadline, counted from when the step before it
came back (a step behind others in the pipeline waits for them first).

Plain actor calls, the step sent with each call, awaited on the event loop. A Ray Compiled
Graph bound stage by stage has a shorter round trip, but its channel readers poll, taking
CPU the stages need (README.md, Benchmarks: tp=2 served 67 output tok/s with it, 114
without), and in Ray 2.60 a worker dying mid-step can crash its node's raylet
(ray-project/ray#63229), which recovery cannot live with.
"""

import asyncio
import time
from collections.abc import Callable

import ray

from actors.ray_worker import RayWorker, actor_class
from actors.step_io import RankStats, StepInput, StepOutput
from actors.worker import WorkerSpec
from cluster.engine_client import EngineDeadError
from cluster.placement import place_workers, rendezvous_address

# A worker answers pings beside a running step (its own thread), so this bounds only how
# long a live process takes to answer; a slow step is judged by the step deadline alone.
HEALTH_CHECK_TIMEOUT_S = 10.0


def uses_gpus(spec: WorkerSpec) -> bool:
    """Whether the workers' placement bundles ask for GPUs (real, or logical ones declared
    by a simulated cluster)."""
    return spec.device == "cuda" or ray.cluster_resources().get("GPU", 0) > 0


class RayExecutor:
    def __init__(self, spec: WorkerSpec, num_kv_blocks: int, *, step_deadline_s: float,
                 log: Callable[[str], None] = print, placement_timeout_s: float = 60.0,
                 worker_cls: type[RayWorker] = RayWorker, health_check_timeout_s: float = HEALTH_CHECK_TIMEOUT_S):
        self.spec = spec
        self.step_deadline_s = step_deadline_s
        self.health_check_timeout_s = health_check_timeout_s
        self.num_kv_blocks = num_kv_blocks
        self._newest: asyncio.Future[StepOutput] | None = None  # the step sent last
        self.group = place_workers(
            actor_class(worker_cls), spec.tp, spec.pp, use_gpu=uses_gpus(spec),
            timeout_s=placement_timeout_s, make_args=lambda stage, tp_rank: (spec, stage, tp_rank),
        )
        self.workers = self.group.workers
        try:
            start = time.perf_counter()
            init_method = rendezvous_address(self.workers[0][0])
            self._all(lambda w: w.init_groups.remote(init_method), "building process groups")
            reports = self._all(lambda w: w.load.remote(), "loading weights")
            log(f"loaded {len(reports)} shards in {time.perf_counter() - start:.1f}s (weights / read from the "
                "checkpoint / seconds per rank): "
                + ", ".join(f"{r['weight_bytes'] / 2**20:.1f} / {r['bytes_read'] / 2**20:.1f} MiB / {r['seconds']:.1f}s"
                            for r in reports))
            self._all(lambda w: w.allocate_kv.remote(num_kv_blocks), "allocating the KV cache")
        except BaseException:
            self.shutdown()
            raise

    @property
    def _flat(self) -> list:
        """Workers in mesh order, global rank r = stage * tp + tp_rank."""
        return self.group.flat

    def _all(self, call: Callable, what: str) -> list:
        refs = [call(w) for w in self._flat]
        try:
            return ray.get(refs, timeout=max(self.step_deadline_s, 120.0))
        except ray.exceptions.GetTimeoutError:
            raise EngineDeadError(f"workers did not finish {what} in time") from None

    def _last_rank0(self, results: list):
        """What TP rank 0 of the last stage, `workers[-1][0]`, returned, from mesh order."""
        return results[(self.spec.pp - 1) * self.spec.tp]

    @property
    def num_stages(self) -> int:
        return self.spec.pp

    def submit(self, step: StepInput) -> asyncio.Future[StepOutput]:
        """Send the step down the pipeline, stage by stage: TP rank i of each stage takes
        what TP rank i of the stage before returns. The future waits on the last stage's
        calls; an error upstream reaches them through their arguments."""
        handoffs = [None] * self.spec.tp
        for stage in self.workers:
            handoffs = [worker.step.remote(step, [prev] if prev is not None else None)  # nested: see RayWorker
                        for worker, prev in zip(stage, handoffs)]
        self._newest = asyncio.ensure_future(self._output(step.step_id, handoffs, self._newest))
        return self._newest

    async def _output(self, step_id: int, last_stage: list[ray.ObjectRef],
                      before: asyncio.Future[StepOutput] | None) -> StepOutput:
        """What TP rank 0 of the last stage returns, once every rank of that stage is done;
        the deadline starts when the step sent `before` it is back."""
        if before is not None and not before.done():
            await asyncio.wait([before])  # its own outcome is its awaiter's

        async def last_stage_done() -> list[StepOutput | None]:
            return await asyncio.gather(*last_stage)  # in a task, so a timeout's cancellation is retrieved

        try:
            outputs = await asyncio.wait_for(last_stage_done(), self.step_deadline_s)
        except TimeoutError:
            raise EngineDeadError(f"step {step_id} missed its {self.step_deadline_s}s deadline: a worker is stuck") from None
        except ray.exceptions.RayError as e:
            raise EngineDeadError(f"a worker failed during step {step_id}: {e}") from None
        return outputs[0]

    def check_health(self) -> None:
        try:
            ray.get([w.ping.remote() for w in self._flat], timeout=self.health_check_timeout_s)
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
            raise EngineDeadError(f"a worker does not answer: {e}") from None

    def rank_stats(self) -> list[RankStats]:
        return self._all(lambda w: w.rank_stats.remote(), "reporting rank stats")

    def worker_pids(self) -> list[int]:
        return self._all(lambda w: w.ping.remote(), "reporting process ids")

    def prompt_logits(self, prompts: list[list[int]]):
        return self._last_rank0(self._all(lambda w: w.prompt_logits.remote(prompts), "scoring prompts"))

    def shutdown(self) -> None:
        """Kill the workers and release their placement groups."""
        self.group.shutdown()
