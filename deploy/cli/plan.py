"""`tensorfleet plan CONFIG`: the layout and memory per GPU of a config, or why it does not
fit, on hardware you name; needs only the model's config: a Hugging Face config.json, or
a GGUF file's header (which also lists its tensors, so a GGUF is checked complete here)."""

import argparse
import re

from actors.checkpoint import open_checkpoint
from cluster.config import resolve_dtype
from cluster.plan import ClusterSpec, make_plan, nodes_for
from cluster.plan_report import format_plan
from cluster.replica import device_memory_bytes
from deploy.default_model import config_or_default

DEFAULT_GPU_MEMORY = "80GiB"  # an 80 GB A100 / H100
DEFAULT_GPUS_PER_NODE = 8  # an HGX / DGX node

# Binary units for bare and "i" suffixes (like dd and `free -g`), SI only for "B" ones.
_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "ki": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mi": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gi": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "ti": 2**40, "tib": 2**40, "tb": 10**12,
}


def parse_size(text: str) -> int:
    """'80GiB' / '80G' / '80Gi' -> 80 * 2**30, '24GB' -> 24 * 10**9, '1024' -> 1024 bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}: use a number with an optional unit, e.g. 80GiB, 24GB, 40G"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: must be positive")
    return int(value)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_plan(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show the layout and memory per GPU of a config, or why it does not fit",
        description=(
            "Lay the model out over the cluster: layers per pipeline stage, heads per TP rank, "
            "weights / activations / KV cache per GPU, and whether serve.num_replicas (or "
            "serve.autoscaling.max_replicas) replicas fit. Needs only the model's config. "
            "Plans for GPUs (dtype auto: bfloat16) unless parallel.device is cpu, where each "
            "worker plans with its share of this machine's RAM (dtype auto: bfloat16 on a CPU "
            "with native bf16, else float32), as tensorfleet serve does."
        ),
    )
    p.add_argument("config", nargs="?", help="the tensorfleet YAML config (default: the built-in model)")
    p.add_argument(
        "--gpus-per-node", type=_positive_int, default=DEFAULT_GPUS_PER_NODE,
        help=f"GPUs per node (default {DEFAULT_GPUS_PER_NODE}, an HGX / DGX node)",
    )
    p.add_argument(
        "--nodes", type=_positive_int, default=None,
        help="nodes in the cluster (default: as many as the layout needs)",
    )
    p.add_argument(
        "--gpu-memory", type=parse_size, default=None,
        help=f"memory per GPU, e.g. 80GiB, 24GB, 40G (G = GiB; default {DEFAULT_GPU_MEMORY}, "
             "or a worker's share of this machine's RAM when parallel.device is cpu)",
    )
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    config = config_or_default(args.config)
    shape = open_checkpoint(config.model).shape
    tp = config.parallel.tensor_parallel_size
    pp = config.parallel.pipeline_parallel_size
    gpus_per_node = args.gpus_per_node
    # Default: just enough nodes for every replica, each stage's TP group packed inside one node.
    nodes = args.nodes or nodes_for(config.serve.max_replicas * pp, tp, gpus_per_node)
    device = "cpu" if config.parallel.device == "cpu" else "cuda"
    dtype = resolve_dtype(config.dtype, device)
    memory = args.gpu_memory or (device_memory_bytes("cpu", tp * pp) if device == "cpu"
                                 else parse_size(DEFAULT_GPU_MEMORY))
    plan = make_plan(shape, config.parallel, config.engine, dtype, ClusterSpec(nodes, gpus_per_node, memory),
                     config.serve)
    print(format_plan(plan))
    return 0


