"""Put the Prometheus datasource and the dashboards of `dashboards/` into a running Grafana
through its HTTP API (grafana-client); `tensorfleet dashboards push` calls `push`.

Idempotent: everything has a fixed uid, so a second push updates what the first created
(the datasource in place, the dashboards as a new version) and never duplicates it. The
JSON in the repository is the source of truth, so dashboards overwrite by default; with
`overwrite=False` Grafana refuses (HTTP 412) to replace a dashboard whose version differs
from the file's, and the error says so instead of losing someone's edits.
"""

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlparse

import niquests.exceptions
from grafana_client import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaTimeoutError,
    GrafanaUnauthorizedError,
)

from deploy.grafana.dashboards import DASHBOARDS_DIR, dashboard_files, load_dashboard

DATASOURCE_UID = "tensorfleet-prometheus"  # what the dashboards' $datasource selects by default
DATASOURCE_NAME = "Prometheus (tensorfleet)"
FOLDER_UID = "tensorfleet"
FOLDER_TITLE = "tensorfleet"
DEFAULT_TIMEOUT_S = 10.0


class GrafanaPushError(Exception):
    """Why the push failed, phrased for the person running the command."""


def connect(url: str, token: str | None = None, user: str | None = None, password: str | None = None,
            timeout: float = DEFAULT_TIMEOUT_S) -> GrafanaApi:
    """A client for the Grafana at `url` with a bearer token or basic auth (or none)."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise GrafanaPushError(f"--grafana-url {url!r} is not an http(s) URL, e.g. http://127.0.0.1:3000")
    if token and user:
        raise GrafanaPushError("pass either --token or --user/--password, not both")
    if user and password is None:
        raise GrafanaPushError("--user needs --password (or GRAFANA_PASSWORD in the environment)")
    # grafana-client appends "api" to the path as it is: a sub-path needs its trailing slash.
    if parsed.path.strip("/"):
        url = parsed._replace(path=parsed.path.rstrip("/") + "/").geturl()
    credential = token or ((user, password) if user else None)
    return GrafanaApi.from_url(url, credential=credential, timeout=timeout)


@contextlib.contextmanager
def _explained(url: str, action: str) -> Iterator[None]:
    """Turn what grafana-client and niquests raise into a GrafanaPushError that says what to do."""
    try:
        yield
    except GrafanaUnauthorizedError:
        raise GrafanaPushError(
            f"Grafana at {url} answered 401 Unauthorized when asked to {action}: "
            f"pass a valid --token (a service account token), or --user and --password"
        ) from None
    except GrafanaTimeoutError:
        raise GrafanaPushError(f"Grafana at {url} did not answer in time when trying to {action}") from None
    except GrafanaClientError as e:
        if e.status_code == 403:
            raise GrafanaPushError(
                f"Grafana at {url} refused to {action} (403 Forbidden): the --token or --user lacks the "
                f"permission; datasources need the Admin role, dashboards and folders the Editor role"
            ) from None
        raise GrafanaPushError(f"Grafana at {url} refused to {action}: {e.message}") from None
    except GrafanaException as e:  # 5xx, or a transport error grafana-client wrapped
        raise GrafanaPushError(f"Grafana at {url} failed to {action}: {e.message}") from None
    except niquests.exceptions.RequestException as e:
        raise GrafanaPushError(
            f"cannot reach Grafana at {url} ({type(e).__name__}): check --grafana-url and that Grafana is running"
        ) from None


def _exists(get: Callable[[], object]) -> bool:
    try:
        get()
    except GrafanaClientError as e:
        if e.status_code == 404:
            return False
        raise
    return True


def ensure_folder(api: GrafanaApi, url: str) -> str:
    """Create the tensorfleet folder if absent; 'created' or 'exists'."""
    with _explained(url, f"look up folder {FOLDER_UID!r}"):
        if _exists(lambda: api.folder.get_folder(FOLDER_UID)):
            return "exists"
    with _explained(url, f"create folder {FOLDER_TITLE!r}"):
        api.folder.create_folder(FOLDER_TITLE, uid=FOLDER_UID)
    return "created"


def ensure_datasource(api: GrafanaApi, url: str, prometheus_url: str) -> str:
    """Create the Prometheus datasource with its fixed uid, or update it; 'created' or 'updated'."""
    parsed = urlparse(prometheus_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise GrafanaPushError(f"--prometheus-url {prometheus_url!r} is not an http(s) URL, e.g. http://prometheus:9090")
    body = {
        "uid": DATASOURCE_UID, "name": DATASOURCE_NAME, "type": "prometheus", "access": "proxy",
        "url": prometheus_url, "isDefault": False, "jsonData": {"httpMethod": "POST"},
    }
    with _explained(url, f"look up datasource {DATASOURCE_UID!r}"):
        exists = _exists(lambda: api.datasource.get_datasource_by_uid(DATASOURCE_UID))
    with _explained(url, f"{'update' if exists else 'create'} datasource {DATASOURCE_NAME!r}"):
        try:
            if exists:
                api.datasource.update_datasource_by_uid(DATASOURCE_UID, body)
                return "updated"
            api.datasource.create_datasource(body)
            return "created"
        except GrafanaClientError as e:
            if e.status_code != 409:
                raise
            raise GrafanaPushError(
                f"Grafana at {url} already has a datasource named {DATASOURCE_NAME!r} with another uid "
                f"than {DATASOURCE_UID!r}: rename or delete it, then push again"
            ) from None


def push_dashboard(api: GrafanaApi, url: str, dashboard: dict, overwrite: bool = True) -> dict:
    """Save one dashboard into the tensorfleet folder; Grafana's answer (uid, url, version)."""
    uid, title = dashboard["uid"], dashboard.get("title", dashboard["uid"])
    # No id: Grafana matches on the uid, and a foreign id would name another dashboard.
    body = {"dashboard": {**dashboard, "id": None}, "folderUid": FOLDER_UID, "overwrite": overwrite,
            "message": "tensorfleet dashboards push"}
    with _explained(url, f"save dashboard {title!r} (uid {uid})"):
        try:
            return api.dashboard.update_dashboard(body)
        except GrafanaClientError as e:
            if e.status_code != 412:
                raise
            raise GrafanaPushError(_conflict_message(api, url, dashboard, e, overwrite)) from None


def _conflict_message(api: GrafanaApi, url: str, dashboard: dict, error: GrafanaClientError, overwrite: bool) -> str:
    uid, title = dashboard["uid"], dashboard.get("title", dashboard["uid"])
    status = error.response.get("status") if isinstance(error.response, dict) else None
    head = f"Grafana at {url} refused to save dashboard {title!r} (uid {uid}), 412 {status or 'conflict'}"
    if status == "version-mismatch" and not overwrite:
        try:
            theirs = api.dashboard.get_dashboard(uid)["dashboard"].get("version")
        except GrafanaException:
            theirs = "?"
        return (f"{head}: Grafana holds version {theirs}, the file says {dashboard.get('version')} (saved since, "
                f"in the UI or by an earlier push); push without --no-overwrite to replace it with the "
                f"repository's copy, or copy the changes into the JSON first")
    if status == "name-exists":
        return (f"{head}: another dashboard titled {title!r} already exists in folder {FOLDER_TITLE!r} "
                f"with a different uid; rename or delete that one, then push again")
    return f"{head}: {error.message}"


def push(url: str, *, token: str | None = None, user: str | None = None, password: str | None = None,
         prometheus_url: str | None = None, directory: Path = DASHBOARDS_DIR, overwrite: bool = True,
         log: Callable[[str], None] = print) -> list[dict]:
    """Datasource (when `prometheus_url` is given), folder and every dashboard of `directory`;
    Grafana's answers for the dashboards."""
    dashboards = [(path, load_dashboard(path)) for path in dashboard_files(directory)]
    api = connect(url, token, user, password)
    base = url.rstrip("/")
    log(f"folder {FOLDER_TITLE!r} (uid {FOLDER_UID}): {ensure_folder(api, base)}")
    if prometheus_url:
        state = ensure_datasource(api, base, prometheus_url)
        log(f"datasource {DATASOURCE_NAME!r} (uid {DATASOURCE_UID}) -> {prometheus_url}: {state}")
    results = []
    for path, dashboard in dashboards:
        result = push_dashboard(api, base, dashboard, overwrite)
        log(f"dashboard {dashboard.get('title')!r} from {path.name}: version {result.get('version')}, "
            f"{base}{result.get('url', '')}")
        results.append(result)
    return results
