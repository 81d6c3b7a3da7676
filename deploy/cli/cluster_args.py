"""Where a command runs its workers: `--simulate NxG` or `--address ADDR` (or neither)."""

import argparse
from contextlib import AbstractContextManager

from cluster.local_cluster import parse_simulate, ray_session


def _simulate(text: str) -> str:
    try:
        parse_simulate(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--simulate", metavar="NxG", type=_simulate,
                       help="start a local Ray cluster of N nodes x G logical GPUs on 127.0.0.1, e.g. 2x2")
    where.add_argument("--address", help="join a running Ray cluster (e.g. auto, or the head's GCS address)")


def ray_session_of(args: argparse.Namespace) -> AbstractContextManager[None]:
    return ray_session(args.simulate, args.address, log=lambda m: print(m, flush=True))
