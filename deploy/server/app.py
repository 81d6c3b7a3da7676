"""The Ray Serve application: one replica owns one engine and its TP x PP workers.

The replica builds the engine (placement groups, worker actors, weights) in its
constructor and removes them with itself; the HTTP routes come from `deploy.server.api.build_api`,
built on the replica after construction (Serve's late-bound ingress), so nothing heavy is
pickled. `build_app` is what `serve run` / `serve deploy` import:

    serve run deploy.server.app:build_app config=my.yaml   # without config=: the default model

Re-layout while serving: the deployment's `user_config` is the layout, `{"parallel": {...},
"engine": {...}}` over the deployed config (`cluster/relayout.py`). Changing it in a Serve
config file and running `serve deploy` again (or `deploy(config, layout)` here, which
`tensorfleet serve` uses when its YAML is edited) makes Serve call `reconfigure` on the
running replica: requests pause, the workers are rebuilt in the new layout, requests resume.
"""

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.context import _get_global_client
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from cluster.config import ConfigError, TensorfleetConfig, format_validation_error
from cluster.engine_client import EngineDeadError, EngineStats
from cluster.relayout import Layout, LayoutRefused, LayoutStatus, layout_of, plan_layout, relayout, with_layout
from cluster.replica import build_engine
from deploy.default_model import config_or_default
from deploy.server.api import build_api

logger = logging.getLogger("ray.serve")
APP_NAME = "tensorfleet"


@serve.deployment(
    ray_actor_options={"num_cpus": 0},  # the replica only schedules; its workers hold the devices
    max_ongoing_requests=1024,  # continuous batching wants every request in the engine
    health_check_period_s=5,
    health_check_timeout_s=15,
)
@serve.ingress()
class TensorfleetServer:
    def __init__(self, config: dict[str, Any]):
        self.deployed = self.config = TensorfleetConfig.model_validate(config)
        self.engine = build_engine(self.config, log=logger.info)
        self.layout = LayoutStatus(layout_of(self.config))
        self._relayout_lock = asyncio.Lock()

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
        (it rebuilds its workers and resumes the requests in flight, while `/health`
        answers 503); only when that keeps failing is the replica unhealthy, and Serve
        replaces it."""
        stats = await self.engine.stats()
        if stats.gave_up and not stats.draining:
            raise RuntimeError("the engine could not rebuild its workers")
        if stats.healthy:
            try:
                await self.engine.check_health()
            except EngineDeadError:
                pass  # the engine is now rebuilding; /health says so

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
        name=APP_NAME,
        user_config=layout_of(config),
        # draining: Serve routes nothing new to a stopping replica and waits this long for
        # its running requests before it is torn down (and its workers with it)
        graceful_shutdown_timeout_s=config.serve.graceful_shutdown_s,
        graceful_shutdown_wait_loop_s=0.5,
    ).bind(config.model_dump())


def build_app(args: dict[str, Any]) -> Application:
    """Entry point for `serve run deploy.server.app:build_app [config=PATH]` and Serve config
    files (without config, the default model); `config` may also be the config itself (a
    mapping), as `deploy` passes it."""
    if isinstance(args.get("config"), Mapping):
        try:
            return deployment_for(TensorfleetConfig.model_validate(args["config"]))
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, "application args")) from None
    return deployment_for(config_or_default(args.get("config")))


def deploy(config: TensorfleetConfig, layout: Layout | None = None, *, poll_s: float = 0.5) -> LayoutStatus | None:
    """Deploy the app on the connected Serve instance the way `serve deploy` does, and wait
    until it runs. Called again with the same config and another `layout`, it changes only
    the user_config, so Serve reconfigures the running replica in place; returns what the
    replica then runs (and a refusal, if it refused). The replica's `check_layout` tells first
    whether it would take a layout."""
    wanted = layout_of(with_layout(config, layout)) if layout is not None else None
    app = {"name": APP_NAME, "route_prefix": "/", "import_path": f"{__name__}:build_app",
           "args": {"config": config.model_dump()},
           "deployments": [{"name": APP_NAME, "user_config": layout or layout_of(config)}]}
    client = _get_global_client()
    client.deploy_apps(ServeDeploySchema.model_validate({"applications": [app]}))
    while (status := serve.status().applications.get(APP_NAME)) is None or status.status != ApplicationStatus.RUNNING:
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"deploying {APP_NAME} failed: {status.message}")
        time.sleep(poll_s)
    client.wait_for_proxies_serving()
    if layout is None:
        return None
    handle = serve.get_app_handle(APP_NAME)
    while True:  # until the replica has taken (or refused) this layout
        now: LayoutStatus = handle.layout_status.remote().result()
        if now.applied == wanted or now.refused == layout:
            return now
        time.sleep(poll_s)
