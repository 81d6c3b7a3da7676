"""`tensorfleet verify CONFIG`: run the configured layout and compare its logits with
Hugging Face transformers on the same weights."""

import argparse

from actors.checkpoint import open_checkpoint
from deploy.cli.cluster_args import add_cluster_args, ray_session_of
from deploy.default_model import config_or_default


def add_verify(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="run the configured TP x PP layout and compare its logits with Hugging Face",
        description="Runs the layout of CONFIG on Ray (or in this process for tp=pp=1) and compares the "
                    "logits at every position of a few prompts with the Hugging Face transformers model "
                    "in float32. Exit 0 within tolerance (1e-4 float32, 2e-2 bf16/fp16), else 1.",
    )
    p.add_argument("config", nargs="?", help="the tensorfleet YAML config (default: the built-in model)")
    add_cluster_args(p)
    p.set_defaults(run=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from cluster.verify import format_result, verify  # loads transformers' models: only when verifying

    config = config_or_default(args.config)
    open_checkpoint(config.model).check_complete()  # a bad checkpoint: exit 2 before Ray starts
    with ray_session_of(args):
        result = verify(config, log=lambda m: print(m, flush=True))
    print(format_result(result))
    return 0 if result.ok else 1
