"""The `tensorfleet` command. Each subcommand is a module of this package with one
`add_<name>(subparsers)` that registers its arguments and one `run_<name>(args) -> exit
code`; `main` only dispatches.

    tensorfleet plan [CONFIG] [--nodes N] [--gpus-per-node G] [--gpu-memory 80GiB]
    tensorfleet verify [CONFIG] [--simulate NxG | --address ADDR]
    tensorfleet serve [CONFIG] [--simulate NxG | --address ADDR] [--skip-doctor]
    tensorfleet doctor CONFIG [--simulate NxG | --address ADDR]
    tensorfleet bench (--url URL | --offline CONFIG) [workload, rate, concurrency] [--out FILE]
    tensorfleet dashboards push --grafana-url URL [--token T | --user U --password P] [--prometheus-url URL]

Exit codes: 0 success, 2 a config, layout or checkpoint the user must change (message on stderr);
`doctor` exits 1 when a check fails.
"""

import argparse
import sys
from collections.abc import Callable, Sequence

from actors.loader import CheckpointError
from actors.model_shape import ModelShapeError
from actors.sharding import ShardingError
from cluster.config import ConfigError
from cluster.doctor import DoctorError
from cluster.plan import PlanError
from deploy.cli.bench import add_bench
from deploy.cli.dashboards import add_dashboards
from deploy.cli.doctor import add_doctor
from deploy.cli.plan import add_plan
from deploy.cli.serve import add_serve
from deploy.cli.verify import add_verify

EXIT_USER_ERROR = 2

_COMMANDS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    add_plan, add_verify, add_serve, add_doctor, add_bench, add_dashboards,
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
    except (ConfigError, ModelShapeError, PlanError, ShardingError, CheckpointError, DoctorError) as e:
        print(f"tensorfleet {args.command}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
