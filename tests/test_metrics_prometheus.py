"""Metrics end to end: a real Prometheus (Debian's `prometheus`, started here on 127.0.0.1
with a temporary data dir) scrapes the metrics agent of every node of the simulated 2x2
cluster while the Serve app (tp=2 x pp=2) serves a workload that exercises every series:
streams, n=2, a client that hangs up, preemptions, a full queue (429), a killed worker
mid-stream (a rebuild, the stream resumed) and another one (the same stream, past
engine.max_resumes, fails). Through Prometheus's HTTP API: every metric of the catalogue has data, and
every PromQL expression of the dashboards parses and returns series."""

import asyncio
import os
import shutil
import signal
import subprocess
import time

import httpx
import pytest
import ray
from ray import serve

from deploy.grafana.dashboards import dashboard_files, dashboard_queries, render_query
from tests.servers import TINY_MODEL, free_port, serve_tiny_2x2
from tests.test_dashboards import CATALOGUE

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="needs Debian's prometheus (make test installs it via .ci/system-packages)"),
]
MODEL = TINY_MODEL


@pytest.fixture(scope="module")
def server(ray_cluster_2x2, chat_model_dir):
    # few KV blocks and a short queue, so preemptions and 429s happen
    engine = {"max_model_len": 256, "block_size": 16, "num_kv_blocks": 24, "max_num_seqs": 8, "step_deadline_s": 5,
              "max_resumes": 1}
    with serve_tiny_2x2(chat_model_dir, engine, {"max_waiting_requests": 8}) as url:
        yield url


@pytest.fixture(scope="module")
def prometheus(ray_cluster_2x2, tmp_path_factory):
    """Prometheus scraping every node's metrics agent once a second."""
    targets = [f"127.0.0.1:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
    work = tmp_path_factory.mktemp("prometheus")
    (work / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs:\n  - job_name: ray\n    static_configs:\n      - targets: {targets}\n")
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(work / "prometheus.log", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, (work / "prometheus.log").read_text()[-2000:]
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


async def workload(url: str) -> dict[str, int]:
    codes: dict[str, int] = {}

    async def one(http, body, hang_up=False):
        async with http.stream("POST", f"{url}/v1/completions", json={"model": MODEL, **body}) as r:
            codes[str(r.status_code)] = codes.get(str(r.status_code), 0) + 1
            async for line in r.aiter_lines():
                if hang_up and line.startswith("data: {"):
                    return

    async with httpx.AsyncClient(timeout=120) as http:
        await one(http, {"prompt": "import os\n" * 4, "max_tokens": 8, "temperature": 0})  # a prefix to reuse
        await one(http, {"prompt": "x = 1\n", "max_tokens": 40, "stop": ["\n", " ", "("]})  # finish_reason stop
        await asyncio.gather(  # fits 8 running + 8 waiting; 24 KV blocks force preemptions
            *(one(http, {"prompt": "import os\n" * 4 + f"def f{i}():\n", "max_tokens": 64, "stream": True,
                         "ignore_eos": True}) for i in range(8)),
            one(http, {"prompt": "class A:\n", "max_tokens": 16, "n": 2, "temperature": 0.8, "seed": 1}),
        )
        await one(http, {"prompt": "def g():\n", "max_tokens": 200, "stream": True, "ignore_eos": True},
                  hang_up=True)  # finish_reason abort
        await asyncio.gather(*(one(http, {"prompt": "y = 2\n", "max_tokens": 32, "ignore_eos": True})
                               for _ in range(30)))  # more than fit: 429s
    return codes


def query(prometheus: str, promql: str) -> list[dict]:
    r = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
    assert r["status"] == "success", f"{promql}: {r}"
    return r["data"]["result"]


def eventually(probe, timeout_s: float = 30):
    """Poll `probe` until it returns something truthy; its last answer otherwise."""
    deadline = time.monotonic() + timeout_s
    while not (result := probe()) and time.monotonic() < deadline:
        time.sleep(1)
    return result


def wait_for_series(prometheus: str, names: list[str], timeout_s: float) -> list[str]:
    """The names that still have no series after `timeout_s`."""
    missing = list(names)
    deadline = time.monotonic() + timeout_s
    while missing and time.monotonic() < deadline:
        missing = [n for n in missing if not query(prometheus, n)]
        time.sleep(1)
    return missing


async def test_every_metric_and_dashboard_query_has_data(server, prometheus):
    codes = await workload(server)
    print(f"\nworkload answers by status: {codes}")
    assert codes.get("429", 0) > 0 and codes.get("200", 0) > 0
    # a worker dies mid-stream: a rebuild, the stream resumes; a second death fails it
    handle = serve.get_app_handle("tensorfleet")

    async def kill_a_worker_and_wait_for_the_rebuild() -> None:
        stats = await handle.stats.remote()
        os.kill(stats.worker_pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while (await handle.stats.remote()).restarts == stats.restarts:
            assert time.monotonic() < deadline, "the replica did not rebuild its workers"
            await asyncio.sleep(0.5)

    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream("POST", f"{server}/v1/completions", json={
                "model": MODEL, "prompt": "def h():\n", "max_tokens": 200, "stream": True, "ignore_eos": True}) as r:
            lines = aiter(r.aiter_lines())
            await anext(lines)
            await kill_a_worker_and_wait_for_the_rebuild()
            resumed = []  # a few may be from before the kill; most are from the new workers
            async for line in lines:
                if line.startswith("data: {"):
                    resumed.append(line)
                    if len(resumed) == 20:
                        break
            assert not any('"error"' in line for line in resumed)
            await kill_a_worker_and_wait_for_the_rebuild()
            assert any(['"error"' in line async for line in lines])
        r = await http.post(f"{server}/v1/completions", json={"model": MODEL, "prompt": "y = 2\n", "max_tokens": 8})
        assert r.status_code == 200, r.text

    exported = [n + ("_count" if kind == "histogram" else "") for n, kind in CATALOGUE.items()]
    missing = await asyncio.to_thread(wait_for_series, prometheus, exported, 60)
    assert not missing, f"no series in Prometheus for {missing}"
    # the rebuilt workers export every few seconds; the killed ones' series go stale
    all_ranks = {("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")}

    def ranks_reporting():
        ranks = {(s["metric"]["stage"], s["metric"]["tp_rank"])
                 for s in query(prometheus, "ray_tensorfleet_worker_weight_memory_bytes")}
        return ranks if ranks == all_ranks else None

    ranks = await asyncio.to_thread(eventually, ranks_reporting, 60)
    assert ranks == all_ranks
    def finish_reasons():  # an abort is counted once the server notices the hang-up
        reasons = {s["metric"]["finish_reason"] for s in query(prometheus, "ray_tensorfleet_requests_finished_total")}
        return reasons if {"stop", "length", "abort", "error"} <= reasons else None

    reasons = await asyncio.to_thread(eventually, finish_reasons, 60)
    assert reasons is not None, {s["metric"]["finish_reason"]: s["value"][1]
                                 for s in query(prometheus, "ray_tensorfleet_requests_finished_total")}

    variables = {"model_name": MODEL, "__rate_interval": "2m", "__range": "10m"}
    panels = [(title, render_query(expr, variables)) for path in dashboard_files()
              for title, expr in dashboard_queries(path)]
    assert len(panels) > 20
    empty = []
    for title, promql in panels:
        result = await asyncio.to_thread(eventually, lambda: query(prometheus, promql) or None)  # parse errors fail here
        if not result:
            empty.append(title)
            continue
        sample = ", ".join(f"{_labels(s['metric'])}={float(s['value'][1]):.4g}" for s in result[:4])
        print(f"  {title}: {promql}\n      -> {sample}")
    assert not empty, f"dashboard panels with no series: {empty}"


def _labels(metric: dict[str, str]) -> str:
    keep = {k: v for k, v in metric.items() if k in ("stage", "tp_rank", "finish_reason", "reason", "cause", "le")}
    return "{" + ",".join(f"{k}={v}" for k, v in keep.items()) + "}"
