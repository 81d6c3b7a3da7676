"""The Grafana dashboards shipped in the repository's `dashboards/` directory: loading them
and reading their PromQL back out.

`dashboard_queries` lists (panel title, expr) for every target of every panel, and
`render_query` substitutes the Grafana variables an expr uses (`$model_name`,
`${model_name}`, `$__rate_interval`, `$__interval`, `$__range`) so that the expr can be
sent to Prometheus as it is, e.g. to check each panel against a real Prometheus:

    for title, expr in dashboard_queries(DASHBOARDS_DIR / "tensorfleet.json"):
        promql = render_query(expr, {"model_name": "SmolLM2-135M-Instruct"})
"""

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

# deploy/ sits next to dashboards/ in the repository, which is also where an editable
# install (`pip install -e .`) imports deploy/ from.
DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "dashboards"

# What Grafana would put in for its built-in time variables when nobody says otherwise:
# $__rate_interval is at least 4 scrape intervals (15 s scrapes -> 1m).
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

# $name, ${name} and ${name:format}; the format is ignored (values are substituted raw).
_VARIABLE = re.compile(r"\$\{(\w+)(?::[\w-]+)?\}|\$(\w+)")


class DashboardError(Exception):
    """A dashboard file that is missing or is not a Grafana dashboard."""


def dashboard_files(directory: Path = DASHBOARDS_DIR) -> list[Path]:
    """The dashboard JSON files directly in `directory` (not the provisioning YAMLs)."""
    if not directory.is_dir():
        raise DashboardError(
            f"no dashboards directory at {directory}: run from a checkout or an editable install "
            f"(pip install -e .), or pass the directory holding tensorfleet.json"
        )
    files = sorted(directory.glob("*.json"))
    if not files:
        raise DashboardError(f"no *.json dashboards in {directory}")
    return files


def load_dashboard(path: Path | str) -> dict:
    """One dashboard JSON file; the error names the file and what is wrong with it."""
    path = Path(path)
    try:
        dashboard = json.loads(path.read_text())
    except OSError as e:
        raise DashboardError(f"cannot read dashboard {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise DashboardError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(dashboard, dict) or "panels" not in dashboard or not dashboard.get("uid"):
        raise DashboardError(f"{path} is not a Grafana dashboard: it needs a uid and panels")
    return dashboard


def iter_panels(dashboard: dict) -> Iterator[dict]:
    """Every panel, rows included, and the panels folded inside collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: Path | str | dict) -> list[tuple[str, str]]:
    """(panel title, PromQL expr) for every target with an expr, in panel order."""
    if not isinstance(dashboard, dict):
        dashboard = load_dashboard(dashboard)
    return [
        (panel.get("title", ""), target["expr"])
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def render_query(expr: str, variables: Mapping[str, str]) -> str:
    """`expr` with its Grafana variables replaced by `variables`, falling back to
    BUILTIN_VARIABLES for $__rate_interval / $__interval / $__range."""
    values = {**BUILTIN_VARIABLES, **variables}

    def value(match: re.Match) -> str:
        name = match.group(1) or match.group(2)
        if name not in values:
            raise KeyError(f"query uses ${name} but no value was given for it: {expr}")
        return values[name]

    return _VARIABLE.sub(value, expr)
