"""The Ray actor shell around a `Worker`: it binds the collectives to the network interface
of its Ray node, exports its rank's metrics, and answers liveness probes.

The driver creates one per GPU (see `cluster.placement`); everything model-related is the
plain `Worker`'s, which tests drive without Ray.
"""

import os
import time

import ray

from actors.net_interface import bind_collectives_to_node_interface
from actors.rank_metrics import RankMetrics
from actors.step_io import StepInput, StepOutput
from actors.worker import Worker, WorkerSpec

METRICS_EXPORT_INTERVAL_S = 1.0


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

    def step(self, step: StepInput) -> StepOutput | None:
        out = super().step(step)
        if (now := time.monotonic()) - self._last_export >= METRICS_EXPORT_INTERVAL_S:
            self._last_export = now
            self.metrics.record(self.rank_stats())
        return out

    def ping(self) -> int:
        """Liveness probe; answers with this worker's process id."""
        return os.getpid()
