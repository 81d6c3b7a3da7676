"""The Ray Serve application: an HTTP ingress in front of the model replicas.

Two deployments. `EngineReplica` (`deploy/server/engine_replica.py`) owns one engine and its
TP x PP workers; there are serve.num_replicas of them, or as many as serve.autoscaling asks
for (Serve's autoscaler, on requests in flight per replica). `OpenAIIngress` serves the HTTP
routes (`deploy.server.api.build_api`, built after construction: Serve's late-bound ingress,
so nothing heavy is pickled) over a `RemoteEngine`: it tokenizes, then streams each request
from the replica the request router picks (serve.routing: `prefix`, this project's
prefix-aware router, or `power_of_two`, Serve's default). `build_app` is what `serve run` /
`serve deploy` import:

    serve run deploy.server.app:build_app config=my.yaml   # without config=: the default model

Re-layout while serving: both deployments take the layout as `user_config`, `{"parallel":
{...}, "engine": {...}}` over the deployed config (`cluster/relayout.py`). Changing it in a
Serve config file and running `serve deploy` again (or `deploy(config, layout)` here, which
`tensorfleet serve` uses when its YAML is edited) makes Serve call `reconfigure` on every
running replica: requests pause, the workers are rebuilt in the new layout, requests resume.
"""

import logging
import time
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig
from ray.serve.context import _get_global_client
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

from actors.checkpoint import open_checkpoint
from cluster.config import ConfigError, TensorfleetConfig, format_validation_error
from cluster.engine_client import EngineStats
from cluster.relayout import Layout, LayoutRefused, LayoutStatus, layout_of, with_layout
from cluster.replica import load_tokenizer
from deploy.default_model import config_or_default
from deploy.server.api import build_api
from deploy.server.engine_replica import EngineReplica
from deploy.server.remote_engine import RemoteEngine
from deploy.server.router import PrefixAwareRouter

logger = logging.getLogger("ray.serve")
APP_NAME = "tensorfleet"
INGRESS, ENGINE = "OpenAIIngress", "EngineReplica"


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=4096)
@serve.ingress()
class OpenAIIngress:
    def __init__(self, config: dict[str, Any], engine: DeploymentHandle):
        self.config = TensorfleetConfig.model_validate(config)
        checkpoint = open_checkpoint(self.config.model)
        self.engine = RemoteEngine(engine, model_name=self.config.served_model_name,
                                   max_model_len=self.config.engine.max_model_len,
                                   vocab_size=checkpoint.shape.vocab_size,
                                   tokenizer=load_tokenizer(checkpoint, logger.info))

    def __serve_build_asgi_app__(self):
        serve_cfg = self.config.serve
        return build_api(
            self.engine,
            served_model_name=self.config.served_model_name,
            api_key=serve_cfg.effective_api_key(),
            max_body_bytes=serve_cfg.max_body_bytes,
        )

    async def reconfigure(self, user_config: Layout) -> None:
        """The layout the replicas run: only its max_model_len matters here (the prompt
        length check); a layout the replicas refuse keeps the previous one."""
        try:
            self.engine.max_model_len = with_layout(self.config, user_config).engine.max_model_len
        except LayoutRefused:
            pass  # the replicas refuse it too, and say why

    async def check_layout(self, layout: Layout) -> str | None:
        """Why a replica would refuse `layout` now, or None; changes nothing."""
        return await self.engine.handle.check_layout.remote(layout)

    async def layout_status(self) -> LayoutStatus:
        """What a replica runs (each call may ask another)."""
        return await self.engine.handle.layout_status.remote()

    async def drain(self) -> None:
        """Graceful shutdown, step one: refuse new requests (503, and /health 503 so load
        balancers look elsewhere) while running ones finish."""
        self.engine.drain()

    async def in_flight(self) -> int:
        """Requests this ingress has open on the replicas."""
        return self.engine.in_flight

    async def failovers(self) -> int:
        """Requests this ingress moved to a sibling replica after theirs died or gave up."""
        return self.engine.failovers

    async def stats(self) -> EngineStats:
        """One replica's scheduler and KV-cache occupancy, worker rebuilds and worker
        process ids, for operators (through a Serve handle) and tests."""
        return await self.engine.stats()


def _replica_options(config: TensorfleetConfig) -> dict[str, Any]:
    """Serve's replica count (fixed or autoscaled) and request router for the engine."""
    s = config.serve
    if s.autoscaling is not None:
        count: dict[str, Any] = {"autoscaling_config": s.autoscaling.model_dump()}  # Serve's own field names
    else:
        count = {"num_replicas": s.max_replicas}
    if s.routing == "prefix":
        router = RequestRouterConfig(request_router_class=PrefixAwareRouter, request_router_kwargs={
            "block_size": config.engine.block_size, "max_load_imbalance": s.max_load_imbalance})
    else:
        router = RequestRouterConfig()
    return {**count, "request_router_config": router}


def deployment_for(config: TensorfleetConfig) -> Application:
    layout, args = layout_of(config), config.model_dump()
    engine = EngineReplica.options(
        name=ENGINE,
        user_config=layout,
        # draining: Serve routes nothing new to a stopping replica and waits this long for
        # its running requests before it is torn down (and its workers with it)
        graceful_shutdown_timeout_s=config.serve.graceful_shutdown_s,
        graceful_shutdown_wait_loop_s=0.5,
        **_replica_options(config),
    ).bind(args)
    return OpenAIIngress.options(name=INGRESS, user_config=layout).bind(args, engine)


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
           "deployments": [{"name": name, "user_config": layout or layout_of(config)} for name in (INGRESS, ENGINE)]}
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
