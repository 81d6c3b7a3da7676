"""Servers the tests talk to over real HTTP on 127.0.0.1: an ASGI app under uvicorn in a
thread, the tensorfleet app on Ray Serve (one application at a time per cluster), and the
metrics agent of every Ray node."""

import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import ray
import uvicorn
from ray import serve
from ray.serve.context import _get_global_client

from cluster.config import TensorfleetConfig
from cluster.relayout import Layout, LayoutStatus
from deploy.server.app import APP_NAME, deploy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def uvicorn_server(app: Any) -> Iterator[str]:
    """Serve `app` on a port bound before the server starts (no race with other tests);
    yield its base URL, then shut it down."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not shut down"


@contextmanager
def serve_app(config: dict[str, Any]) -> Iterator[str]:
    """Deploy the tensorfleet app of `config` (a YAML-shaped dict; its `serve` host and
    port are set here) on the connected Ray cluster as `tensorfleet serve` does (so
    `deploy(config, layout)` re-lays it out); yield its base URL."""
    port = free_port()
    cfg = TensorfleetConfig.model_validate(
        {**config, "serve": {**config.get("serve", {}), "host": "127.0.0.1", "port": port}})
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    deploy(cfg)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()


def deployed_config() -> TensorfleetConfig:
    """The config `serve_app` deployed, as Serve holds it."""
    app = _get_global_client().get_serve_details()["applications"][APP_NAME]["deployed_app_config"]
    return TensorfleetConfig.model_validate(app["args"]["config"])


def relayout(layout: Layout) -> LayoutStatus:
    """Give the app `serve_app` deployed another layout through Serve's user_config, as an
    edited `serve deploy` config would; wait until its replica has taken or refused it."""
    return deploy(deployed_config(), layout)


# The name the tiny chat model is served under by `serve_tiny_2x2`.
TINY_MODEL = "tiny-py"


@contextmanager
def serve_tiny_2x2(model_dir: Any, engine: dict[str, Any], serve_options: dict[str, Any] | None = None,
                   name: str = TINY_MODEL) -> Iterator[str]:
    """The tiny chat model at tp=2 x pp=2 on the simulated 2x2 cluster, float32 on CPU,
    with these engine (and serve) settings, served as `name`; yield its base URL."""
    with serve_app({
        "model": str(model_dir), "served_model_name": name, "dtype": "float32",
        "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "device": "cpu"},
        "engine": engine, "serve": serve_options or {},
    }) as url:
        yield url


_SAMPLE = re.compile(r'^(\w+)\{(.*)\} (\S+)$')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def ray_counter(name: str, **labels: str) -> float:
    """The counter `name` (as exported: `ray_` prefix, `_total` suffix) over the series
    with these labels, as the metrics agents of the connected Ray cluster export it now.
    Each process reports every metrics_report_interval_ms (10 s by default), and an agent
    sums the processes that report the same labels: give a replica a model name of its own."""
    total = 0.0
    for node in ray.nodes():
        if node["Alive"]:
            text = httpx.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics", timeout=10).text
            for line in text.splitlines():
                if (m := _SAMPLE.match(line)) and m[1] == name and labels.items() <= dict(_LABEL.findall(m[2])).items():
                    total += float(m[3])
    return total
