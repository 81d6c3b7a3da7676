"""The Ray Serve application: one replica owns one engine and its TP x PP workers.

The replica builds the engine (placement groups, worker actors, weights) in its
constructor and removes them with itself; the HTTP routes come from `deploy.server.api.build_api`,
built on the replica after construction (Serve's late-bound ingress), so nothing heavy is
pickled. `build_app` is what `serve run` / `serve deploy` import:

    serve run deploy.server.app:build_app config=my.yaml   # without config=: the default model
"""

import logging
from typing import Any

from ray import serve
from ray.serve import Application

from cluster.config import TensorfleetConfig
from cluster.engine_client import EngineDeadError, EngineStats
from cluster.replica import build_engine
from deploy.default_model import config_or_default
from deploy.server.api import build_api

logger = logging.getLogger("ray.serve")


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the replica only schedules; its workers hold the devices
    max_ongoing_requests=1024,  # continuous batching wants every request in the engine
    health_check_period_s=5,
    health_check_timeout_s=15,
)
@serve.ingress()
class TensorfleetServer:
    def __init__(self, config: dict[str, Any]):
        self.config = TensorfleetConfig.model_validate(config)
        self.engine = build_engine(self.config, log=logger.info)

    def __serve_build_asgi_app__(self):
        serve_cfg = self.config.serve
        return build_api(
            self.engine,
            served_model_name=self.config.served_model_name,
            api_key=serve_cfg.effective_api_key(),
            max_body_bytes=serve_cfg.max_body_bytes,
        )

    async def check_health(self) -> None:
        """Serve's replica health check. A dead or stuck worker is the engine's to heal
        (it fails in-flight requests and rebuilds its workers, while `/health` answers
        503); only when that keeps failing is the replica unhealthy, and Serve replaces it."""
        stats = await self.engine.stats()
        if stats.gave_up and not stats.draining:
            raise RuntimeError("the engine could not rebuild its workers")
        if stats.healthy:
            try:
                await self.engine.check_health()
            except EngineDeadError:
                pass  # the engine is now rebuilding; /health says so

    async def drain(self) -> None:
        """Graceful shutdown, step one: refuse new requests (503, and /health 503 so load
        balancers look elsewhere) while running ones finish."""
        self.engine.drain()

    async def stats(self) -> EngineStats:
        """Scheduler and KV-cache occupancy, worker rebuilds and worker process ids, for
        operators (through a Serve handle) and tests."""
        return await self.engine.stats()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def deployment_for(config: TensorfleetConfig) -> Application:
    return TensorfleetServer.options(
        name="tensorfleet",
        # draining: Serve routes nothing new to a stopping replica and waits this long for
        # its running requests before it is torn down (and its workers with it)
        graceful_shutdown_timeout_s=config.serve.graceful_shutdown_s,
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(config.model_dump())


def build_app(args: dict[str, str]) -> Application:
    """Entry point for `serve run deploy.server.app:build_app [config=PATH]` and Serve config
    files; without config, the default model."""
    return deployment_for(config_or_default(args.get("config")))
