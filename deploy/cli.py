"""The `tensorfleet` command. Each subcommand is one `add_<name>(subparsers)` that registers
its arguments and one `run_<name>(args) -> exit code`; `main` only dispatches.

    tensorfleet plan CONFIG [--nodes N] [--gpus-per-node G] [--gpu-memory 80GiB]
    tensorfleet verify CONFIG [--simulate NxG | --address ADDR]
    tensorfleet serve [CONFIG] [--simulate NxG | --address ADDR]
    tensorfleet bench (--url URL | --offline CONFIG) [workload, rate, concurrency] [--out FILE]
    tensorfleet dashboards push --grafana-url URL [--token T | --user U --password P] [--prometheus-url URL]

Exit codes: 0 success, 2 a config or layout the user must change (message on stderr).
"""

import argparse
import contextlib
import math
import re
import sys
import time
from collections.abc import Callable, Sequence

from actors.loader import CheckpointError
from actors.models.llama import UnsupportedModelError
from actors.sharding import ShardingError
from cluster.config import ConfigError, ModelShape, load_config, resolve_dtype
from cluster.plan import ClusterSpec, PlanError, format_plan, make_plan
from deploy.bench import add_bench
from deploy.grafana_push import add_dashboards

EXIT_USER_ERROR = 2
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


# --- tensorfleet plan -------------------------------------------------------------------


def add_plan(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="show the layout and memory per GPU of a config, or why it does not fit",
        description=(
            "Lay the model out over the cluster: layers per pipeline stage, heads per TP rank, "
            "weights / activations / KV cache per GPU. Needs only the model's config.json. "
            "Plans for GPUs: dtype auto means the checkpoint's dtype unless "
            "parallel.device is cpu."
        ),
    )
    p.add_argument("config", help="the tensorfleet YAML config")
    p.add_argument(
        "--gpus-per-node", type=_positive_int, default=DEFAULT_GPUS_PER_NODE,
        help=f"GPUs per node (default {DEFAULT_GPUS_PER_NODE}, an HGX / DGX node)",
    )
    p.add_argument(
        "--nodes", type=_positive_int, default=None,
        help="nodes in the cluster (default: as many as the layout needs)",
    )
    p.add_argument(
        "--gpu-memory", type=parse_size, default=parse_size(DEFAULT_GPU_MEMORY),
        help=f"memory per GPU, e.g. 80GiB, 24GB, 40G (G = GiB; default {DEFAULT_GPU_MEMORY})",
    )
    p.set_defaults(run=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    shape = ModelShape.from_dir(config.model)
    tp = config.parallel.tensor_parallel_size
    pp = config.parallel.pipeline_parallel_size
    gpus_per_node = args.gpus_per_node
    # Default: just enough nodes, each stage's TP group packed inside one node.
    nodes = args.nodes or math.ceil(pp / max(1, gpus_per_node // tp))
    device = "cpu" if config.parallel.device == "cpu" else "cuda"
    dtype = resolve_dtype(config.dtype, shape, device)
    plan = make_plan(shape, config.parallel, config.engine, dtype,
                     ClusterSpec(nodes, gpus_per_node, args.gpu_memory))
    print(format_plan(plan))
    return 0


# --- tensorfleet verify -----------------------------------------------------------------


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--simulate", metavar="NxG",
                       help="start a local Ray cluster of N nodes x G logical GPUs on 127.0.0.1, e.g. 2x2")
    where.add_argument("--address", help="join a running Ray cluster (e.g. auto, or the head's GCS address)")


@contextlib.contextmanager
def ray_session(args: argparse.Namespace):
    """Start a simulated cluster, join one, or (neither) run without Ray where possible."""
    if args.simulate:
        from cluster.local_cluster import parse_simulate, start_local_cluster

        try:
            nodes, gpus = parse_simulate(args.simulate)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        start = time.perf_counter()
        cluster = start_local_cluster(nodes, gpus)
        print(f"started a simulated {nodes}x{gpus} Ray cluster on 127.0.0.1 in {time.perf_counter() - start:.1f}s",
              flush=True)
        try:
            yield
        finally:
            cluster.shutdown()
    elif args.address:
        from cluster.local_cluster import connect

        connect(args.address)
        yield
    else:
        yield


def add_verify(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="run the configured TP x PP layout and compare its logits with Hugging Face",
        description="Runs the layout of CONFIG on Ray (or in this process for tp=pp=1) and compares the "
                    "logits at every position of a few prompts with the Hugging Face transformers model "
                    "in float32. Exit 0 within tolerance (1e-4 float32, 2e-2 bf16/fp16), else 1.",
    )
    p.add_argument("config", help="the tensorfleet YAML config")
    add_cluster_args(p)
    p.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from cluster.verify import format_result, verify

    config = load_config(args.config)
    with ray_session(args):
        result = verify(config, log=lambda m: print(m, flush=True))
    print(format_result(result))
    return 0 if result.ok else 1


# --- tensorfleet serve ------------------------------------------------------------------


def add_serve(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API with Ray Serve",
        description="Deploy CONFIG (default: the built-in tiny model at tp=2 x pp=2 on a simulated "
                    "2x2 cluster) with Ray Serve on serve.host:serve.port. Without --simulate or "
                    "--address, a one-node Ray cluster is started on 127.0.0.1 for the layout.",
    )
    p.add_argument("config", nargs="?", help="the tensorfleet YAML config (default: the built-in model)")
    add_cluster_args(p)
    p.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from deploy.serve import run_serve as serve_config  # imports Ray Serve: only when serving

    return serve_config(args)


# --- dispatch ---------------------------------------------------------------------------

_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_plan, add_verify, add_serve, add_bench, add_dashboards,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tensorfleet",
        description="Serve one LLM across many GPUs: tensor parallel in a node, "
                    "pipeline parallel across nodes.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _COMMANDS:
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, PlanError, ShardingError, CheckpointError, UnsupportedModelError) as e:
        print(f"tensorfleet {args.command}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
