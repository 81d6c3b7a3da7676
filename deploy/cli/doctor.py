"""`tensorfleet doctor CONFIG`: check a Ray cluster for what would make CONFIG's replica hang
or fail (versions, CUDA, free memory, the model's files, interfaces, reachability, token
auth, placement, timed collectives) and print one row per check; exit 0 when none fails,
else 1. `tensorfleet serve` runs the same checks first (`check_before_serving`)."""

import argparse
import sys

from cluster.config import TensorfleetConfig, load_config
from cluster.doctor import DoctorError, diagnose, format_report
from cluster.doctor_checks import OK
from deploy.cli.cluster_args import add_cluster_args, ray_session_of


def add_doctor(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "doctor",
        help="check a Ray cluster for what would make a config's replica hang or fail, in seconds",
        description="Per node: Python / torch / Ray / transformers / tensorfleet versions, CUDA and the "
                    "driver, free GPU memory against the plan, the model's files. Network: the interface "
                    "gloo or NCCL binds on each node, TCP between the nodes on those addresses, Ray token "
                    "auth. Placement of every stage's TP group, then a timed all-reduce per TP group and "
                    "send/recv per pipeline edge against what the interconnect should give. Every probe "
                    "has a short deadline. Prints a table (check, node, result, detail, fix); exit 0 when "
                    "no check fails, else 1. Without --simulate or --address it joins the running "
                    "cluster Ray finds ($RAY_ADDRESS, or the one `ray start` left on this machine).",
    )
    p.add_argument("config", help="the tensorfleet YAML config")
    add_cluster_args(p)
    p.set_defaults(run=run_doctor)


def run_doctor(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if not (args.simulate or args.address):
        args.address = "auto"
    try:
        with ray_session_of(args):
            report = diagnose(config)
    except ConnectionError as e:
        print(f"tensorfleet doctor: no Ray cluster to check ({e}); start one (`ray start --head`, "
              "`ray up`) and pass its --address, or try a layout with --simulate NxG", file=sys.stderr)
        return 2
    print(format_report(report), flush=True)
    return 0 if report.ok else 1


def check_before_serving(config: TensorfleetConfig) -> None:
    """The doctor, on the connected cluster: raise `DoctorError` (its table) when a check
    fails, else print one line (the table too when something only warns)."""
    report = diagnose(config)
    if not report.ok:
        raise DoctorError(f"{len(report.failures)} check(s) failed; fix them, or pass --skip-doctor to "
                          f"deploy anyway:\n{format_report(report)}")
    if any(r.result != OK for r in report.rows):
        print(format_report(report), flush=True)
    else:
        print(f"doctor: all {len(report.rows)} checks ok in {report.seconds:.1f} s "
              "(`tensorfleet doctor CONFIG` prints them)", flush=True)
