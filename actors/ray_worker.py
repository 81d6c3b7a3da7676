"""The Ray actor shell around a `Worker`: it binds the collectives to the network interface
of its Ray node, exports its rank's metrics, and answers liveness probes.

The driver creates one per GPU (see `cluster.placement`); everything model-related is the
plain `Worker`'s, which tests drive without Ray.

A busy worker is not a dead one: `ping` runs in its own concurrency group (its own thread),
so it answers while a long step runs; the steps keep the default group's single thread, in
the order they were sent. Only the step deadline judges a slow step.

A stage's step takes the previous stage's handoff as a reference inside a list, fetched by
the step itself: Ray passes a nested reference as is, where it would hold a call back until
a top-level reference argument is ready, and the calls sent after it (the pings) with it:
a long step on stage 0 would then look like a dead stage 1.
"""

import os
import time

import ray

from actors.net_interface import bind_collectives_to_node_interface
from actors.rank_metrics import RankMetrics
from actors.step_io import StageHandoff, StepInput, StepOutput
from actors.worker import Worker, WorkerSpec

METRICS_EXPORT_INTERVAL_S = 1.0
LIVENESS_GROUP = "liveness"


class RayWorker(Worker):
    """A Worker whose collectives use its Ray node's interface and whose per-rank totals
    are exported as metrics (at most once a second)."""

    def __init__(self, spec: WorkerSpec, stage: int, tp_rank: int):
        bind_collectives_to_node_interface(ray.util.get_node_ip_address())
        super().__init__(spec, stage, tp_rank)
        self.metrics = RankMetrics(spec.model_name, stage, tp_rank)
        self._last_export = 0.0

    def allocate_kv(self, num_blocks: int) -> int:
        allocated = super().allocate_kv(num_blocks)
        self.metrics.record(self.rank_stats())
        return allocated

    def step(self, step: StepInput, prev: list[ray.ObjectRef] | StageHandoff | None = None,
             ) -> StageHandoff | StepOutput | None:
        """`prev`: [the previous stage's handoff, as a reference] (see the module docstring)."""
        if isinstance(prev, list):
            prev = ray.get(prev[0])  # an upstream failure raises here and fails this call too
        out = super().step(step, prev)
        if (now := time.monotonic()) - self._last_export >= METRICS_EXPORT_INTERVAL_S:
            self._last_export = now
            self.metrics.record(self.rank_stats())
        return out

    @ray.method(concurrency_group=LIVENESS_GROUP)
    def ping(self) -> int:
        """Liveness probe; answers with this worker's process id, even mid-step."""
        return os.getpid()


def actor_class(worker_cls: type[RayWorker] = RayWorker) -> ray.actor.ActorClass:
    """`worker_cls` as a Ray actor whose liveness probes have a thread of their own."""
    return ray.remote(concurrency_groups={LIVENESS_GROUP: 1})(worker_cls)
