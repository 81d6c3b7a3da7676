"""The Grafana dashboards: structure of the JSON, its PromQL against the metric catalogue of
cluster/metrics.py, the provisioning YAMLs, and `tensorfleet dashboards push` against
tests/fake_grafana.py (a fake of Grafana's HTTP API) and, when GRAFANA_URL is set, a real Grafana."""

import ast
import itertools
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from grafana_client import GrafanaApi

from deploy.cli.main import main
from deploy.grafana.dashboards import (
    DASHBOARDS_DIR,
    dashboard_files,
    dashboard_queries,
    iter_panels,
    load_dashboard,
    render_query,
)
from deploy.grafana.push import DATASOURCE_UID, FOLDER_UID, GrafanaPushError, push
from tests.fake_grafana import FakeGrafana

ROOT = Path(__file__).resolve().parent.parent
DS_REF = {"type": "prometheus", "uid": "${datasource}"}
DASHBOARDS = [load_dashboard(path) for path in dashboard_files()]
PROMETHEUS = "http://127.0.0.1:9090"


def _catalogue() -> dict[str, str]:
    """Exported name -> type, read from the docstring of cluster/metrics.py (no Ray import)."""
    doc = ast.get_docstring(ast.parse((ROOT / "cluster" / "metrics.py").read_text()))
    found = dict(re.findall(r"^\s+(ray_tensorfleet_\w+)\s+(histogram|counter|gauge)\b", doc, re.MULTILINE))
    assert len(found) > 10, "the catalogue in cluster/metrics.py's docstring changed shape"
    return found


CATALOGUE = _catalogue()
QUERYABLE = {name + suffix for name, kind in CATALOGUE.items()
             for suffix in (("_bucket", "_sum", "_count") if kind == "histogram" else ("",))}


def _visible_panels(dashboard: dict) -> list[dict]:
    return [p for p in iter_panels(dashboard) if p["type"] != "row"]


# --- structure --------------------------------------------------------------------------


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d["uid"])
def test_schema_and_template_variables(dashboard):
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["id"] is None and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
    assert ds["current"]["value"] == DATASOURCE_UID  # what the push and the provisioning YAML create
    model = variables["model_name"]
    assert model["type"] == "query" and model["datasource"] == DS_REF
    assert model["definition"] == "label_values(ray_tensorfleet_requests_running, model_name)"
    assert {p["type"] for p in _visible_panels(dashboard)} <= {"timeseries", "stat", "bargauge"}


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d["uid"])
def test_panel_ids_unique_and_grid_fits_without_overlap(dashboard):
    panels = list(iter_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids: {sorted(ids)}"
    for p in panels:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["y"] >= 0 and g["w"] > 0 and g["h"] > 0 and g["x"] + g["w"] <= 24, p["title"]
    for a, b in itertools.combinations(panels, 2):
        ga, gb = a["gridPos"], b["gridPos"]
        apart = (ga["x"] + ga["w"] <= gb["x"] or gb["x"] + gb["w"] <= ga["x"]
                 or ga["y"] + ga["h"] <= gb["y"] or gb["y"] + gb["h"] <= ga["y"])
        assert apart, f"panels {a['title']!r} and {b['title']!r} overlap"


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d["uid"])
def test_every_panel_and_target_uses_the_datasource_variable(dashboard):
    for panel in _visible_panels(dashboard):
        assert panel["datasource"] == DS_REF, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS_REF, panel["title"]


@pytest.mark.parametrize("dashboard", DASHBOARDS, ids=lambda d: d["uid"])
def test_every_query_uses_catalogue_metrics_the_model_filter_and_grafana_windows(dashboard):
    for title, expr in dashboard_queries(dashboard):
        names = set(re.findall(r"ray_tensorfleet_\w+", expr))
        assert names and names <= QUERYABLE, f"{title}: {names - QUERYABLE or 'no metric'} not in cluster/metrics.py"
        for selector in re.findall(r"ray_tensorfleet_\w+(\{[^}]*\})?", expr):
            assert selector == '{model_name=~"$model_name"}', f"{title}: {expr}"
        assert set(re.findall(r"\[([^\]]+)\]", expr)) <= {"$__rate_interval", "$__range"}, f"{title}: {expr}"
        assert expr.count("(") == expr.count(")"), f"{title}: {expr}"


def test_every_catalogue_metric_has_a_panel():
    exprs = [expr for d in DASHBOARDS for _, expr in dashboard_queries(d)]
    used = {name for expr in exprs for name in re.findall(r"ray_tensorfleet_\w+", expr)}
    unused = [name for name in CATALOGUE if not any(u == name or u.startswith(name + "_") for u in used)]
    assert not unused, f"metrics without a panel: {unused}"


def test_per_rank_panels_are_keyed_by_stage_and_tp_rank():
    per_rank = [(p, t) for d in DASHBOARDS for p in _visible_panels(d) for t in p["targets"] if "_worker_" in t["expr"]]
    assert len(per_rank) >= 5
    for panel, target in per_rank:
        assert "by (stage, tp_rank)" in target["expr"], panel["title"]
        assert "{{stage}}" in target["legendFormat"] and "{{tp_rank}}" in target["legendFormat"], panel["title"]
    memory = [p for p, t in per_rank if "memory_bytes" in t["expr"]]
    assert len(memory) == 3 and all(p["type"] == "bargauge" for p in memory)


def test_dashboard_queries_reads_paths_dicts_and_collapsed_rows():
    path = DASHBOARDS_DIR / "tensorfleet.json"
    assert dashboard_queries(path) == dashboard_queries(str(path)) == dashboard_queries(load_dashboard(path))
    folded = {"uid": "x", "panels": [{"type": "row", "title": "r", "panels": [
        {"title": "inner", "targets": [{"expr": "up"}, {"refId": "B"}]}]}]}
    assert dashboard_queries(folded) == [("inner", "up")]


def test_render_query_substitutes_grafana_variables():
    expr = 'sum(rate(m{model_name=~"$model_name"}[$__rate_interval])) + x{a="${model_name}"}[${__range}]'
    assert render_query(expr, {"model_name": "tiny", "__range": "1h"}) == \
        'sum(rate(m{model_name=~"tiny"}[1m])) + x{a="tiny"}[1h]'
    with pytest.raises(KeyError, match=r"\$stage"):
        render_query("m{stage=\"$stage\"}", {})
    for d in DASHBOARDS:
        for _, expr in dashboard_queries(d):
            assert "$" not in render_query(expr, {"model_name": "tiny"})


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Prometheus) not installed")
def test_every_query_parses_as_promql(tmp_path):
    queries = [render_query(expr, {"model_name": "tiny"}) for d in DASHBOARDS for _, expr in dashboard_queries(d)]
    rules = {"groups": [{"name": "dashboards", "rules": [{"record": f"panel_query_{i}", "expr": q}
                                                          for i, q in enumerate(queries)]}]}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yaml")],
                           check=False, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_provisioning_yamls_match_the_dashboard():
    prov = DASHBOARDS_DIR / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert [(d["uid"], d["type"]) for d in ds] == [(DATASOURCE_UID, "prometheus")]
    (provider,) = yaml.safe_load((prov / "dashboards" / "tensorfleet.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["folderUid"] == FOLDER_UID and provider["options"]["path"]


# --- push, against the fake --------------------------------------------------------------


@pytest.fixture
def grafana(monkeypatch):
    for var in ("GRAFANA_TOKEN", "GRAFANA_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    with FakeGrafana() as fake:
        yield fake


def _versions(grafana: FakeGrafana) -> dict[str, int]:
    return {uid: d["dashboard"]["version"] for uid, d in grafana.dashboards.items()}


def test_push_creates_then_updates_in_place(grafana, capsys):
    argv = ["dashboards", "push", "--grafana-url", grafana.url, "--user", "admin", "--password", "admin",
            "--prometheus-url", PROMETHEUS]
    assert main(argv) == 0
    assert "datasource 'Prometheus (tensorfleet)' (uid tensorfleet-prometheus)" in capsys.readouterr().out
    assert list(grafana.datasources) == [DATASOURCE_UID] and list(grafana.folders) == [FOLDER_UID]
    assert _versions(grafana) == {d["uid"]: 1 for d in DASHBOARDS}

    assert main(["dashboards", "push", "--grafana-url", grafana.url, "--token", grafana.token,
                 "--prometheus-url", "http://prometheus:9090"]) == 0
    out = capsys.readouterr().out
    assert "updated" in out and "version 2" in out
    assert list(grafana.datasources) == [DATASOURCE_UID] and list(grafana.folders) == [FOLDER_UID]
    assert grafana.datasources[DATASOURCE_UID]["url"] == "http://prometheus:9090"
    assert _versions(grafana) == {d["uid"]: 2 for d in DASHBOARDS}
    api = GrafanaApi.from_url(grafana.url, credential=grafana.token)  # what a Grafana user would see
    assert sorted(d["uid"] for d in api.search.search_dashboards(type_="dash-db")) == sorted(d["uid"] for d in DASHBOARDS)
    assert [d["uid"] for d in api.datasource.list_datasources()] == [DATASOURCE_UID]
    saved = grafana.dashboards["tensorfleet"]
    assert saved["folderUid"] == FOLDER_UID and saved["dashboard"]["panels"] == DASHBOARDS[0]["panels"]


@pytest.mark.parametrize("credentials", [["--token", "wrong"], ["--user", "admin", "--password", "wrong"], []])
def test_auth_failure_names_the_credential_flags(grafana, capsys, credentials):
    assert main(["dashboards", "push", "--grafana-url", grafana.url, *credentials]) == 2
    err = capsys.readouterr().err
    assert "401 Unauthorized" in err and "--token" in err and "--user and --password" in err
    assert not grafana.dashboards


def test_forbidden_write_names_the_missing_role(grafana, capsys):
    assert main(["dashboards", "push", "--grafana-url", grafana.url, "--token", grafana.viewer_token]) == 2
    err = capsys.readouterr().err
    assert "403 Forbidden" in err and "Editor role" in err


def test_unreachable_grafana_names_the_url(capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    assert main(["dashboards", "push", "--grafana-url", url, "--token", "t"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach Grafana at {url}" in err and "--grafana-url" in err


@pytest.mark.parametrize("url", ["localhost:3000", "ftp://h/", "http://"])
def test_malformed_grafana_url(url, capsys):
    assert main(["dashboards", "push", "--grafana-url", url, "--token", "t"]) == 2
    assert "is not an http(s) URL" in capsys.readouterr().err


def test_version_conflict_is_explained_and_overwrite_resolves_it(grafana):
    push(grafana.url, token=grafana.token, log=lambda m: None)
    grafana.dashboards["tensorfleet"]["dashboard"]["version"] = 7  # someone saved edits in the Grafana UI
    with pytest.raises(GrafanaPushError, match=r"412 version-mismatch.*Grafana holds version 7, the file says 1.*--no-overwrite"):
        push(grafana.url, token=grafana.token, overwrite=False, log=lambda m: None)
    assert grafana.dashboards["tensorfleet"]["dashboard"]["version"] == 7  # left alone
    (result,) = push(grafana.url, token=grafana.token, log=lambda m: None)  # the default: the repo wins
    assert result["version"] == 8


def test_title_taken_by_another_dashboard(grafana):
    push(grafana.url, token=grafana.token, log=lambda m: None)
    grafana.dashboards["someone-elses"] = grafana.dashboards.pop("tensorfleet")
    with pytest.raises(GrafanaPushError, match=r"412 name-exists.*rename or delete"):
        push(grafana.url, token=grafana.token, overwrite=False, log=lambda m: None)


def test_datasource_name_taken_by_another_uid(grafana):
    grafana.datasources["other"] = {"uid": "other", "name": "Prometheus (tensorfleet)", "id": 1, "version": 1}
    with pytest.raises(GrafanaPushError, match=r"already has a datasource named .* rename or delete"):
        push(grafana.url, token=grafana.token, prometheus_url=PROMETHEUS, log=lambda m: None)


def test_missing_dashboards_directory(grafana, tmp_path, capsys):
    argv = ["dashboards", "push", "--grafana-url", grafana.url, "--token", grafana.token]
    assert main([*argv, "--dashboards-dir", str(tmp_path / "nope")]) == 2
    assert "no dashboards directory" in capsys.readouterr().err
    (tmp_path / "broken.json").write_text("{")
    assert main([*argv, "--dashboards-dir", str(tmp_path)]) == 2
    assert "broken.json is not valid JSON" in capsys.readouterr().err
    assert not grafana.requests  # nothing is sent before every file has loaded


# --- push, against a real Grafana ---------------------------------------------------------


@pytest.mark.skipif("GRAFANA_URL" not in os.environ, reason="GRAFANA_URL not set: no real Grafana to push to")
def test_push_to_a_real_grafana():
    """GRAFANA_URL, and GRAFANA_TOKEN or GRAFANA_USER / GRAFANA_PASSWORD (default admin/admin);
    PROMETHEUS_URL for the datasource (default http://127.0.0.1:9090)."""
    url = os.environ["GRAFANA_URL"]
    token = os.environ.get("GRAFANA_TOKEN")
    user, password = (None, None) if token else (os.environ.get("GRAFANA_USER", "admin"),
                                                 os.environ.get("GRAFANA_PASSWORD", "admin"))
    prometheus = os.environ.get("PROMETHEUS_URL", PROMETHEUS)
    first = push(url, token=token, user=user, password=password, prometheus_url=prometheus, log=lambda m: None)
    second = push(url, token=token, user=user, password=password, prometheus_url=prometheus, log=lambda m: None)
    assert [r["version"] for r in second] == [r["version"] + 1 for r in first]

    api = GrafanaApi.from_url(url, credential=token or (user, password))
    assert api.datasource.get_datasource_by_uid(DATASOURCE_UID)["url"] == prometheus
    named = [d for d in api.datasource.list_datasources() if d["name"] == "Prometheus (tensorfleet)"]
    assert len(named) == 1
    for dashboard in DASHBOARDS:
        saved = api.dashboard.get_dashboard(dashboard["uid"])
        assert saved["meta"]["folderUid"] == FOLDER_UID
        titles = [(p["id"], p["title"]) for p in iter_panels(saved["dashboard"])]
        assert titles == [(p["id"], p["title"]) for p in iter_panels(dashboard)]
