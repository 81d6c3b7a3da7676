"""A simulated multi-node Ray cluster on one machine, and joining a real cluster.

Tests, CPU development and `--simulate 2x2` need the multi-node code paths (placement
groups per pipeline stage, TP groups that must not straddle nodes) without owning
several GPU machines. `ray.cluster_utils.Cluster` starts several raylets against one
GCS; each declares `num_gpus` *logical* GPUs, which Ray schedules exactly like real
ones. Everything binds 127.0.0.1 and lives in a private temp dir, so several clusters
(other engineers, other test sessions) can share one machine without seeing each other.

Token auth. Ray turns token auth on for a new cluster started by a bare `ray.init()`,
but `Cluster` starts nodes directly and would leave it off. We keep it on: each
`LocalCluster` gets a fresh random token in its temp dir (mode 0600) and exports
`RAY_AUTH_MODE=token` and `RAY_AUTH_TOKEN_PATH` while it lives, so its GCS, raylets,
workers, this driver and any subprocess we spawn (a CLI under test) share that token,
and nothing touches the user's `~/.ray/auth_token`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import ray
from ray._private import ray_constants
from ray._raylet import AuthenticationTokenLoader, Config
from ray.cluster_utils import Cluster

_LOOPBACK = "127.0.0.1"
# Unix socket paths (raylet, plasma) live under the temp dir and must stay under
# ~107 bytes, so the private dir sits directly in /tmp rather than under $TMPDIR.
_TEMP_PARENT = "/tmp"
_AUTH_ENV = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
# Ray rewrites "127.0.0.1" in addresses to the machine's outward IP (so that remote
# nodes could reach it) unless this flag is 0; our processes listen on loopback only.
_SINGLE_HOST_FLAG = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@dataclass
class LocalCluster:
    """A running simulated cluster; `address` is what `--address` / `ray.init` take."""

    nodes: int
    gpus_per_node: int
    cpus_per_node: int
    temp_dir: str
    _cluster: Cluster = field(repr=False)
    _saved_env: dict[str, str | None] = field(repr=False)
    _alive: bool = field(default=True, repr=False)

    @property
    def address(self) -> str:
        """The GCS address, `127.0.0.1:PORT`."""
        return self._cluster.address

    def shutdown(self) -> None:
        """Disconnect the driver, stop this cluster's processes, restore the environment.

        Only this cluster's own processes are killed (never `ray stop`), so other
        clusters on the machine survive. Safe to call twice.
        """
        if not self._alive:
            return
        self._alive = False
        try:
            # Cluster refuses to remove the node the driver is attached to.
            ray.shutdown()
            self._cluster.shutdown()
        finally:
            # Cluster.shutdown deletes its address file under $RAY_TMPDIR: restore after.
            _swap_env(self._saved_env)
            shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def parse_simulate(spec: str) -> tuple[int, int]:
    """`"2x2"` -> `(nodes, gpus_per_node)` = `(2, 2)`, for `--simulate`."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", spec)
    if match is None or int(match[1]) < 1:
        raise ValueError(
            f"--simulate expects NODESxGPUS_PER_NODE with NODES >= 1, e.g. '2x2' for "
            f"2 nodes with 2 logical GPUs each; got {spec!r}"
        )
    return int(match[1]), int(match[2])


def start_local_cluster(
    nodes: int, gpus_per_node: int, cpus_per_node: int | None = None
) -> LocalCluster:
    """Start `nodes` raylets on 127.0.0.1, each with `gpus_per_node` logical GPUs,
    and connect this process as the driver.

    `cpus_per_node` defaults to one CPU per GPU worker (each placement bundle asks for
    one) plus two for a Serve replica and helper tasks; these are logical CPUs, so the
    machine's real core count does not limit them.
    """
    if nodes < 1 or gpus_per_node < 0:
        raise ValueError(f"need nodes >= 1 and gpus_per_node >= 0; got {nodes}x{gpus_per_node}")
    if ray.is_initialized():
        raise RuntimeError(
            "this process is already connected to Ray; call ray.shutdown() before "
            "starting a local cluster"
        )
    cpus = gpus_per_node + 2 if cpus_per_node is None else cpus_per_node
    temp_dir = tempfile.mkdtemp(prefix="tf-", dir=_TEMP_PARENT)
    token_path = os.path.join(temp_dir, "auth_token")
    with open(os.open(token_path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    saved_env = _swap_env(
        {
            # Cluster writes its address file to $RAY_TMPDIR/ray; keep it out of /tmp/ray.
            "RAY_TMPDIR": temp_dir,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": token_path,
            "RAY_AUTH_TOKEN": None,  # would take precedence over our token file
            _SINGLE_HOST_FLAG: "0",
        }
    )
    local = LocalCluster(nodes, gpus_per_node, cpus, temp_dir, Cluster(), saved_env)
    try:
        for _ in range(nodes):
            local._cluster.add_node(
                node_ip_address=_LOOPBACK,
                num_cpus=cpus,
                num_gpus=gpus_per_node,
                temp_dir=os.path.join(temp_dir, "ray"),
                include_dashboard=False,
                # The head's agent would take fixed port 52365, which another cluster
                # on this machine may hold already.
                dashboard_agent_listen_port=0,
            )
        local._cluster.wait_for_nodes()
        ray.init(address=local.address, _node_ip_address=_LOOPBACK)
    except BaseException:
        local.shutdown()
        raise
    return local


def connect(address: str | None = None) -> None:
    """Attach this process as a driver to a running cluster (`tensorfleet --address`).

    `None` means Ray's own discovery: `$RAY_ADDRESS`, else the cluster `ray start` left
    on this machine. For an explicit address Ray uses a token only when
    `RAY_AUTH_MODE=token` is set (it never sends `~/.ray/auth_token` to an address on
    its own), so a refused token is turned into a message that says what to set.
    """
    if ray.is_initialized():
        current = ray.get_runtime_context().gcs_address
        if address in (None, "auto", current):
            return
        raise RuntimeError(f"already connected to Ray at {current}; cannot also join {address}")
    try:
        ray.init(address=address or "auto")
    except ConnectionError as e:
        # Ray reports a refused token only as text inside the chained GCS error.
        if "InvalidAuthToken" in str(e.__cause__):
            raise ConnectionError(
                f"the Ray cluster at {address or 'auto'} uses token authentication and did "
                "not accept this driver: export RAY_AUTH_MODE=token and provide that "
                "cluster's token via RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
            ) from e
        raise


@contextlib.contextmanager
def ray_session(simulate: str | None, address: str | None, log: Callable[[str], None] = print) -> Iterator[None]:
    """Start a simulated cluster (`simulate`, e.g. "2x2"), join a running one (`address`),
    or, with neither, run without Ray where the layout allows it."""
    if simulate:
        nodes, gpus = parse_simulate(simulate)
        start = time.perf_counter()
        cluster = start_local_cluster(nodes, gpus)
        log(f"started a simulated {nodes}x{gpus} Ray cluster on 127.0.0.1 in {time.perf_counter() - start:.1f}s")
        try:
            yield
        finally:
            cluster.shutdown()
    else:
        if address:
            connect(address)
        yield


def _swap_env(values: dict[str, str | None]) -> dict[str, str | None]:
    """Set (None: unset) environment variables; return the previous values, which
    passed back in restore them."""
    previous = {name: os.environ.get(name) for name in values}
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if any(name in _AUTH_ENV for name in values):
        # This process read RAY_AUTH_* when Ray was imported and caches the token it
        # found; without a reload the driver would keep talking with the old settings.
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    if _SINGLE_HOST_FLAG in values:
        # Evaluated once when Ray is imported; re-evaluate it the way Ray does.
        ray_constants.ENABLE_RAY_CLUSTER = ray_constants.env_bool(
            _SINGLE_HOST_FLAG, not ray_constants.IS_WINDOWS_OR_OSX
        )
    return previous
