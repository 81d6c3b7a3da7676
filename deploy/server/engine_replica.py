"""One model replica as a Ray Serve deployment: it owns one engine and its TP x PP workers.

The replica builds the engine (placement groups, worker actors, weights) in its constructor
and removes them with itself. It speaks no HTTP: the ingress (`deploy/server/app.py`) calls
`generate` through a deployment handle, whose request router (`deploy/server/router.py`)
picks the replica, so one endpoint serves serve.num_replicas replicas (or as many as
serve.autoscaling asks for), each with its own placement groups.

Re-layout while serving: the deployment's `user_config` is the layout, `{"parallel": {...},
"engine": {...}}` over the deployed config (`cluster/relayout.py`); a new one makes Serve
call `reconfigure` on every running replica: requests pause, the workers are rebuilt in the
new layout, requests resume.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from ray import serve

from actors.sampling_params import SamplingParams
from actors.step_io import RankStats
from cluster.config import TensorfleetConfig
from cluster.engine_client import EngineDeadError, EngineStats, RequestOutput
from cluster.relayout import (
    Layout,
    LayoutRefused,
    LayoutStatus,
    layout_of,
    plan_layout,
    relayout,
    with_layout,
)
from cluster.replica import build_engine

logger = logging.getLogger("ray.serve")


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the replica only schedules; its workers hold the devices
    max_ongoing_requests=1024,  # continuous batching wants every request in the engine
    health_check_period_s=5,
    health_check_timeout_s=15,
)
class EngineReplica:
    def __init__(self, config: dict[str, Any]):
        self.deployed = self.config = TensorfleetConfig.model_validate(config)
        replica = serve.get_replica_context().replica_id.unique_id  # its metrics' `replica` label
        self.engine = build_engine(self.config, log=logger.info, replica=replica)
        self.layout = LayoutStatus(layout_of(self.config))
        self._relayout_lock = asyncio.Lock()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request (a streaming handle call); cancelling the
        call aborts the request and frees its KV blocks."""
        async for out in self.engine.generate(request_id, prompt_token_ids, params):
            yield out

    async def check_health(self) -> None:
        """Serve's replica health check. A dead or stuck worker is the engine's to heal
        (it rebuilds its workers and resumes the requests in flight); only when that keeps
        failing is the replica unhealthy, and Serve replaces it."""
        stats = await self.engine.stats()
        if stats.gave_up and not stats.draining:
            raise RuntimeError("the engine could not rebuild its workers")
        if stats.healthy:
            try:
                await self.engine.check_health()
            except EngineDeadError:
                pass  # the engine is now rebuilding

    async def healthy(self) -> None:
        """For the ingress's /health: raise `EngineDeadError` while the engine is down."""
        await self.engine.check_health()

    async def reconfigure(self, user_config: Layout) -> None:
        """Serve's user_config: the layout to run. A layout the replica cannot take is
        logged and reported by `layout_status`, never raised: Serve would stop this replica
        (and every request on it) over a failed reconfigure."""
        async with self._relayout_lock:
            try:
                cfg = with_layout(self.deployed, user_config)
                if cfg != self.config:
                    paused = await relayout(self.engine, cfg, logger.info)
                    logger.info("re-laid out; requests were paused for %.1f s", paused)
                    self.config = cfg
                self.layout = LayoutStatus(layout_of(self.config))
            except LayoutRefused as e:
                self._refuse(user_config, str(e))
            except Exception as e:  # noqa: BLE001 - see the docstring; the engine rebuilt the old layout
                self._refuse(user_config, f"the new workers did not start ({e}); the previous layout was rebuilt")

    def _refuse(self, layout: Layout, reason: str) -> None:
        logger.error("layout change refused, still serving the previous layout: %s", reason)
        self.layout = LayoutStatus(layout_of(self.config), dict(layout), reason)

    async def check_layout(self, layout: Layout) -> str | None:
        """Why `layout` would be refused now, or None; changes nothing."""
        try:
            plan_layout(self.engine, with_layout(self.deployed, layout))
        except LayoutRefused as e:
            return str(e)
        return None

    async def layout_status(self) -> LayoutStatus:
        return self.layout

    async def stats(self) -> EngineStats:
        """Scheduler and KV-cache occupancy, worker rebuilds and worker process ids."""
        return await self.engine.stats()

    async def rank_stats(self) -> list[RankStats]:
        return await self.engine.rank_stats()

    async def prometheus_metrics(self) -> bytes:
        return await self.engine.prometheus_metrics()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
