"""What one node looks like to a replica's workers, gathered on that node.

`node_facts(model_path, backend)` runs as a Ray task pinned to a node (and in the driver
for reference): versions, CUDA and the NVIDIA driver, GPUs and their free memory, the
model's files as that node sees the path, the interface and address the collectives will
bind to (by the workers' own rule, `actors.net_interface.socket_ifnames`), and which Ray
token this node's processes hold (its fingerprint, never the token). It only looks:
nothing here allocates a GPU or holds a resource, and every subprocess has a deadline.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import ray

from actors.net_interface import socket_ifnames

NVIDIA_SMI_TIMEOUT_S = 5.0
PACKAGES = ("torch", "ray", "transformers")
# tensorfleet's own code: the packages a worker imports, hashed so drift shows.
SOURCE_PACKAGES = ("actors", "cluster", "deploy")
# Settings that push NCCL onto a slower transport, named when a link measures slow.
SLOWER_TRANSPORT_ENV = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_IB_DISABLE", "NCCL_NET")


@dataclass(frozen=True)
class Gpu:
    index: int  # nvidia-smi's index, the one `nvidia-smi topo -m` and Ray's GPU ids use
    name: str
    total_bytes: int
    free_bytes: int


@dataclass(frozen=True)
class ModelFiles:
    path: str  # the checkpoint: a Hugging Face folder or a .gguf file
    sizes: dict[str, int]  # file name -> bytes, for every file a rank reads
    error: str | None  # why a rank could not read them here


@dataclass(frozen=True)
class SocketInterface:
    """Where a collective library binds on this node."""

    variable: str  # GLOO_SOCKET_IFNAME or NCCL_SOCKET_IFNAME
    setting: str | None  # what the variable holds in a worker (the user's, or the node IP's interface)
    from_user: bool  # the user set it, rather than the workers' rule
    interface: str | None  # the interface it resolves to here
    address: str | None  # that interface's IPv4 address
    speed_mbps: int | None  # its line rate, when the kernel knows it


@dataclass(frozen=True)
class NodeFacts:
    node_ip: str  # the address Ray knows the node by
    hostname: str
    hostname_address: str | None  # what the hostname resolves to (the libraries' fallback)
    versions: dict[str, str]  # python, torch, ray, transformers, tensorfleet
    torch_cuda: str | None  # the CUDA torch was built with; None on a CPU build
    driver: str | None  # NVIDIA driver version; None without nvidia-smi
    driver_cuda: str | None  # the newest CUDA that driver supports
    gpus: tuple[Gpu, ...]
    topology: str | None  # `nvidia-smi topo -m`
    ram_available_bytes: int
    interfaces: dict[str, str]  # name -> IPv4 address
    socket: SocketInterface  # for the backend the replica will use
    auth_mode: str  # "token" or "disabled"
    token_fingerprint: str | None  # sha256 of the token, first 12 hex digits
    model: ModelFiles
    slower_transport_env: dict[str, str]  # those of SLOWER_TRANSPORT_ENV set in a worker here


def node_facts(model_path: str, backend: str) -> NodeFacts:
    """Everything above, on the node this runs on; `backend` is "nccl" or "gloo"."""
    interfaces = ipv4_interfaces()
    node_ip = ray.util.get_node_ip_address()
    gpus, driver, driver_cuda = _nvidia_gpus()
    torch_cuda = _torch_cuda()
    mode, fingerprint = _auth()
    hostname = socket.gethostname()
    return NodeFacts(
        node_ip=node_ip,
        hostname=hostname,
        hostname_address=_resolve(hostname),
        versions=versions(),
        torch_cuda=torch_cuda,
        driver=driver,
        driver_cuda=driver_cuda,
        gpus=gpus,
        topology=_run(["nvidia-smi", "topo", "-m"]) if gpus else None,
        ram_available_bytes=psutil.virtual_memory().available,
        interfaces=interfaces,
        socket=socket_interface(backend, interfaces, node_ip),
        auth_mode=mode,
        token_fingerprint=fingerprint,
        model=model_files(model_path),
        slower_transport_env={k: os.environ[k] for k in SLOWER_TRANSPORT_ENV if k in os.environ},
    )


def versions() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["tensorfleet"] = tensorfleet_version()
    return found


def tensorfleet_version() -> str:
    """The installed version plus a digest of the code this process imports, e.g.
    "0.1.0 (source 3f2a9c1e7b04)": a node whose copy of the checkout drifted differs
    even when nobody bumped the version."""
    try:
        release = importlib.metadata.version("tensorfleet")
    except importlib.metadata.PackageNotFoundError:
        release = "uninstalled"
    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for package in SOURCE_PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return f"{release} (source {digest.hexdigest()[:12]})"


def model_files(model_path: str) -> ModelFiles:
    """Every file a rank opens (`Checkpoint.rank_files`), as this node sees `model_path`:
    the checkpoint must open here as it does when a rank loads (configs and headers: a
    truncated GGUF fails), and each file must yield its first bytes (a mount that lists
    files but cannot read them fails too)."""
    if not os.path.exists(model_path):
        return ModelFiles(model_path, {}, f"{model_path} does not exist on this node")
    try:
        # Imported here: it needs torch, and the other facts should come back even from
        # a node whose torch does not import.
        from actors.checkpoint import open_checkpoint
        from actors.loader import CheckpointError
        from actors.model_shape import ModelShapeError
    except ImportError as e:
        return ModelFiles(model_path, {}, f"cannot open the checkpoint here: {e}")
    try:
        files = open_checkpoint(model_path).rank_files()
    except (CheckpointError, ModelShapeError) as e:
        return ModelFiles(model_path, {}, str(e))
    sizes = {}
    for file in files:
        try:
            with open(file, "rb") as f:
                f.read(8)
            sizes[file.name] = file.stat().st_size
        except OSError as e:
            return ModelFiles(model_path, sizes, f"{file}: {e.strerror or e}")
    return ModelFiles(model_path, sizes, None)


def ipv4_interfaces() -> dict[str, str]:
    return {name: a.address for name, addrs in psutil.net_if_addrs().items()
            for a in addrs if a.family == socket.AF_INET}


def resolve_ifname(setting: str, names: list[str]) -> str | None:
    """The interface a GLOO/NCCL_SOCKET_IFNAME setting picks among `names` (in the
    system's order): "eth0" or a comma list of prefixes ("eth,ens"), "=eth0" exact
    names, "^docker,lo" every interface but those prefixes (NCCL's syntax; gloo takes
    plain names, which the prefix rule matches too)."""
    if setting.startswith("^"):
        excluded = [p for p in setting[1:].split(",") if p]
        return next((n for n in names if not any(n.startswith(p) for p in excluded)), None)
    if setting.startswith("="):
        wanted = [p for p in setting[1:].split(",") if p]
        return next((w for w in wanted if w in names), None)
    prefixes = [p for p in setting.split(",") if p]
    for prefix in prefixes:
        if prefix in names:
            return prefix
        if match := next((n for n in names if n.startswith(prefix)), None):
            return match
    return None


def socket_interface(backend: str, interfaces: dict[str, str], node_ip: str) -> SocketInterface:
    variable = "NCCL_SOCKET_IFNAME" if backend == "nccl" else "GLOO_SOCKET_IFNAME"
    setting = socket_ifnames(node_ip)[variable]
    iface = resolve_ifname(setting, list(interfaces)) if setting else None
    return SocketInterface(variable, setting, variable in os.environ, iface,
                           interfaces.get(iface) if iface else None, _speed_mbps(iface))


def _speed_mbps(iface: str | None) -> int | None:
    try:
        speed = int(Path(f"/sys/class/net/{iface}/speed").read_text())
    except (OSError, ValueError, TypeError):
        return None
    return speed if speed > 0 else None


def _resolve(hostname: str) -> str | None:
    try:
        return socket.gethostbyname(hostname)
    except OSError:
        return None


def _run(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _nvidia_gpus() -> tuple[tuple[Gpu, ...], str | None, str | None]:
    """(GPUs, driver version, newest CUDA the driver supports) from nvidia-smi."""
    listing = _run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free,driver_version",
                    "--format=csv,noheader,nounits"])
    if not listing:
        return (), None, None
    gpus, driver = parse_gpu_listing(listing)
    return gpus, driver, parse_driver_cuda(_run(["nvidia-smi"]) or "")


def parse_gpu_listing(text: str) -> tuple[tuple[Gpu, ...], str | None]:
    """`nvidia-smi --query-gpu=index,name,memory.total,memory.free,driver_version
    --format=csv,noheader,nounits` (MiB) -> (GPUs, driver version)."""
    gpus, driver = [], None
    for line in text.strip().splitlines():
        index, name, total, free, driver = (c.strip() for c in line.split(","))
        gpus.append(Gpu(int(index), name, int(float(total)) << 20, int(float(free)) << 20))
    return tuple(gpus), driver


def parse_driver_cuda(text: str) -> str | None:
    """'CUDA Version: 12.8' in nvidia-smi's banner -> '12.8'."""
    match = re.search(r"CUDA Version:\s*([\d.]+)", text)
    return match[1] if match else None


def _torch_cuda() -> str | None:
    """`torch.version.cuda`, read by running torch/version.py alone (a file of constants):
    the facts import no torch, so they come back fast and even from a node whose torch
    does not import."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "version.py"
    version_spec = importlib.util.spec_from_file_location("_tensorfleet_torch_version", path)
    module = importlib.util.module_from_spec(version_spec)
    try:
        version_spec.loader.exec_module(module)
    except OSError:
        return None
    return getattr(module, "cuda", None)


def _auth() -> tuple[str, str | None]:
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, get_authentication_mode

    mode = "token" if get_authentication_mode() == AuthenticationMode.TOKEN else "disabled"
    loader = AuthenticationTokenLoader.instance()
    if not loader.has_token(ignore_auth_mode=True):
        return mode, None
    token = loader.get_raw_token(ignore_auth_mode=True)
    return mode, hashlib.sha256(token.encode()).hexdigest()[:12]
