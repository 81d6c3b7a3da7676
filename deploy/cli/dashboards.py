"""`tensorfleet dashboards push`: the command around `deploy.grafana.push.push`."""

import argparse
import os
import sys
from pathlib import Path

from deploy.grafana.dashboards import DASHBOARDS_DIR, DashboardError
from deploy.grafana.push import DATASOURCE_UID, GrafanaPushError, push


def add_dashboards(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("dashboards", help="put the Grafana dashboards and their Prometheus datasource into Grafana")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    push_p = actions.add_parser(
        "push",
        help="create or update the datasource and dashboards through the Grafana HTTP API",
        description="Create or update (idempotent, fixed uids) the tensorfleet folder, the dashboards of "
                    "dashboards/ and, with --prometheus-url, the Prometheus datasource they select by default. "
                    "Exit 0 on success, 2 when Grafana is unreachable or refuses (message on stderr).",
    )
    push_p.add_argument("--grafana-url", default=os.environ.get("GRAFANA_URL"), required="GRAFANA_URL" not in os.environ,
                        help="Grafana's base URL, e.g. http://127.0.0.1:3000 (default: $GRAFANA_URL)")
    auth = push_p.add_mutually_exclusive_group()
    auth.add_argument("--token", help="a service account token (default: $GRAFANA_TOKEN unless --user is given)")
    auth.add_argument("--user", help="basic auth user, with --password")
    push_p.add_argument("--password", default=os.environ.get("GRAFANA_PASSWORD"),
                        help="basic auth password (default: $GRAFANA_PASSWORD)")
    push_p.add_argument("--prometheus-url",
                        help=f"create or update datasource {DATASOURCE_UID!r} pointing at this Prometheus, "
                             f"e.g. http://prometheus:9090 (default: leave datasources alone)")
    push_p.add_argument("--dashboards-dir", type=Path, default=DASHBOARDS_DIR,
                        help=f"directory of dashboard JSON files (default: {DASHBOARDS_DIR})")
    push_p.add_argument("--no-overwrite", dest="overwrite", action="store_false",
                        help="fail instead of replacing a dashboard whose version in Grafana differs from the file's")
    push_p.set_defaults(run=run_dashboards_push)


def run_dashboards_push(args: argparse.Namespace) -> int:
    token = args.token or (None if args.user else os.environ.get("GRAFANA_TOKEN"))
    try:
        push(args.grafana_url, token=token, user=args.user, password=args.password,
             prometheus_url=args.prometheus_url, directory=args.dashboards_dir, overwrite=args.overwrite)
    except (GrafanaPushError, DashboardError) as e:
        print(f"tensorfleet dashboards push: {e}", file=sys.stderr)
        return 2
    return 0
