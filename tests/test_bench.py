"""The benchmarks: `tensorfleet bench` against a real HTTP server (a fake engine behind the
real API on uvicorn) and offline on a tiny model without Ray, the summary statistics
against numpy, the Hugging Face static-batching baseline, `tp_plan="auto"` under torchrun
against one process, and the side-by-side report."""

import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from deploy.bench.hf import run_static
from deploy.bench.stats import RequestRecord, percentile, summarize
from deploy.bench.workload import WorkloadSpec, arrival_offsets, make_workload
from deploy.cli.main import main
from deploy.server.api import build_api
from tests.fake_engine import FakeEngine
from tests.servers import uvicorn_server

MODEL = "fake-model"


class CountingEngine(FakeEngine):
    """Records how many requests it runs at once."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.active = self.max_active = 0

    async def _run(self, request_id, prompt, params):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            async for out in super()._run(request_id, prompt, params):
                yield out
        finally:
            self.active -= 1


@pytest.fixture
def server() -> Iterator[tuple[str, CountingEngine]]:
    engine = CountingEngine(max_model_len=256, step_delay_s=0.002)
    with uvicorn_server(build_api(engine, served_model_name=MODEL)) as url:
        yield url, engine


def assert_ordered(summary: dict) -> None:
    for key in ("ttft_s", "itl_s", "tpot_s", "e2e_s"):
        d = summary[key]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"], key
    assert summary["ttft_s"]["p99"] <= summary["e2e_s"]["p99"]


def test_online_bench_streams_every_request_and_counts_what_the_server_sent(server, tmp_path):
    url, engine = server
    out = tmp_path / "online.json"
    spec = WorkloadSpec(12, (4, 16), (3, 20), seed=7, vocab_size=256)
    code = main(["bench", "--url", url, "--num-requests", "12", "--prompt-len", "4:16", "--output-len", "3:20",
                 "--seed", "7", "--max-concurrency", "4", "--out", str(out), "--no-progress"])
    assert code == 0
    result = json.loads(out.read_text())
    work = make_workload(spec)
    assert result["workload"] == json.loads(json.dumps(spec.to_json()))
    assert (result["requests"], result["completed"], result["failed"]) == (12, 12, 0)
    # every request reached the engine as drawn: its token ids, its length, EOS ignored
    sent = sorted((p, params.max_tokens) for _, p, params in engine.requests)
    assert sent == sorted(zip(work.prompts, work.output_lens))
    assert all(params.ignore_eos and params.greedy for _, _, params in engine.requests)
    assert result["output_tokens"] == work.output_tokens
    assert result["prompt_tokens"] == sum(map(len, work.prompts))
    assert engine.max_active == 4
    assert math.isclose(result["output_tok_s"], result["output_tokens"] / result["duration_s"])
    assert_ordered(result)


def test_online_bench_reports_failed_requests(server, tmp_path):
    url, engine = server
    engine.dead = True
    out = tmp_path / "failed.json"
    assert main(["bench", "--url", url, "--num-requests", "3", "--prompt-len", "4:8", "--output-len", "2:4",
                 "--out", str(out), "--no-progress"]) == 1
    result = json.loads(out.read_text())
    assert (result["completed"], result["failed"]) == (0, 3)
    assert "HTTP 503" in result["errors"][0]


def test_offline_bench_tp1_runs_without_ray(tiny_llama_dir, tmp_path):
    ray = pytest.importorskip("ray")
    was_connected = ray.is_initialized()
    path, _ = tiny_llama_dir
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps({
        "model": str(path), "dtype": "float32",
        "parallel": {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "device": "cpu"},
        "engine": {"max_model_len": 128, "block_size": 8, "num_kv_blocks": 256, "max_num_seqs": 8},
    }))
    out = tmp_path / "offline.json"
    assert main(["bench", "--offline", str(config), "--num-requests", "10", "--prompt-len", "5:40",
                 "--output-len", "2:12", "--max-concurrency", "6", "--out", str(out), "--no-progress"]) == 0
    assert ray.is_initialized() == was_connected  # tp=1 never starts Ray
    result = json.loads(out.read_text())
    work = make_workload(WorkloadSpec(10, (5, 40), (2, 12), vocab_size=1000))
    assert result["workload"]["vocab_size"] == 1000  # the model's, from its config.json
    assert (result["completed"], result["output_tokens"]) == (10, work.output_tokens)
    [rank] = result["ranks"]
    assert rank["steps"] > 0 and rank["forward_s"] > 0 and rank["all_reduces"] == 0
    [stage] = result["stages"]  # one stage: busy all the time the engine had work, but between steps
    assert 0 < stage["busy_s"] <= stage["busy_s"] + stage["bubble_s"] <= result["duration_s"]
    assert_ordered(result)


# Runs `deploy.bench.decode` in a fresh interpreter where `import ray` fails, as on a GPU
# machine without Ray.
WITHOUT_RAY = """
import importlib.abc, sys
class NoRay(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("ray is not installed here")
sys.meta_path.insert(0, NoRay())
from deploy.bench.decode import main
sys.exit(main(sys.argv[1:]))
"""


def test_decode_bench_runs_the_engine_where_ray_is_not_installed(tmp_path):
    out = tmp_path / "decode.json"
    proc = subprocess.run([sys.executable, "-c", WITHOUT_RAY, "--layers", "2", "--new-tokens", "24",
                           "--repeats", "1", "--device", "cpu", "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["tokens_match"], report  # the engine's greedy tokens equal HF generate's
    model = report["model"]
    embed = model["vocab_size"] * model["hidden_size"] * 4
    assert embed < report["weight_bytes_per_token"] < 2.5 * embed  # LM head + 2 layers, not the embedding
    assert report["bound_tok_s"] == pytest.approx(report["copy_bandwidth_gb_s"] * 1e9 / report["weight_bytes_per_token"])
    for system in report["systems"].values():
        assert system["decode_tok_s"] > 0
        assert system["share_of_bound"] == pytest.approx(system["decode_tok_s"] / report["bound_tok_s"])


def test_workload_is_seeded_and_in_range():
    spec = WorkloadSpec(50, (3, 9), (1, 4), seed=3, vocab_size=100)
    work = make_workload(spec)
    assert work == make_workload(spec) and work != make_workload(WorkloadSpec(50, (3, 9), (1, 4), seed=4))
    assert all(3 <= len(p) <= 9 and all(10 <= t < 100 for t in p) for p in work.prompts)
    assert all(1 <= n <= 4 for n in work.output_lens)
    with pytest.raises(ValueError, match="prompt_len"):
        WorkloadSpec(prompt_len=(10, 5))


def test_arrivals_all_at_once_or_poisson():
    assert arrival_offsets(5, math.inf, 0) == [0.0] * 5
    offsets = arrival_offsets(4000, 20.0, 0)
    gaps = np.diff(offsets)
    assert offsets == sorted(offsets) and offsets == arrival_offsets(4000, 20.0, 0)
    assert abs(gaps.mean() - 1 / 20) < 0.005 and abs(gaps.std() - 1 / 20) < 0.005  # exponential: std = mean


def test_percentiles_match_numpy():
    values = torch.rand(101, generator=torch.Generator().manual_seed(0)).tolist()
    for q in (0, 50, 90, 99, 100):
        assert math.isclose(percentile(values, q), float(np.percentile(values, q)))


def test_summary_of_records():
    records = [RequestRecord(4, 3, start=0.0, chunk_times=[1.0, 1.5, 2.5], output_tokens=3),
               RequestRecord(6, 1, start=1.0, chunk_times=[1.5], output_tokens=1),
               RequestRecord(5, 2, start=0.0, error="HttpError: HTTP 400")]
    s = summarize(records, duration_s=4.0)
    assert (s["completed"], s["failed"], s["output_tokens"], s["prompt_tokens"]) == (2, 1, 4, 10)
    assert s["output_tok_s"] == 1.0 and s["request_throughput"] == 0.5
    assert s["ttft_s"]["mean"] == 0.75 and s["e2e_s"]["p50"] == 1.5
    assert s["itl_s"]["p50"] == 0.75 and s["tpot_s"]["mean"] == 0.75  # 1.0-token request: no TPOT


def test_hf_static_batching_times_each_request_to_its_own_last_token(tiny_llama_dir):
    _, hf = tiny_llama_dir
    work = make_workload(WorkloadSpec(6, (4, 12), (2, 9), seed=1, vocab_size=1000))
    records, seconds = run_static(hf, work, batch_size=4, device=torch.device("cpu"))
    assert [r.output_tokens for r in records] == work.output_lens
    assert all(len(r.chunk_times) == n for r, n in zip(records, work.output_lens))
    order = sorted(range(6), key=lambda i: len(work.prompts[i]))
    first, second = records[order[0]], records[order[-1]]  # batches [0:4] and [4:6]
    assert first.ttft < second.ttft  # the second batch waits for the whole first one
    assert max(r.e2e for r in records) <= seconds


@pytest.mark.slow
def test_hf_tp_plan_auto_shards_and_matches_one_process(tiny_llama_dir, tmp_path):
    from deploy.bench.compare import check_hf_tp, run_hf_tp
    from deploy.bench.hf import check_tokens

    path, hf = tiny_llama_dir
    work = make_workload(WorkloadSpec(4, (4, 12), (2, 6), seed=2, vocab_size=1000))
    tp = run_hf_tp(path, work, [4], tmp_path)
    assert tp["completed"] == 4 and tp["output_tokens"] == work.output_tokens
    assert tp["world_size"] == 2 and tp["params_full"] == sum(p.numel() for p in hf.parameters())
    assert all(n < 0.6 * tp["params_full"] for n in tp["params_per_rank"])
    assert tp["check_tokens"] == check_tokens(hf, work, torch.device("cpu"))
    assert check_hf_tp({"hf-tp2": tp, "hf": {"check_tokens": tp["check_tokens"]}}) == []


def test_side_by_side_report(tmp_path):
    from deploy.bench.report import draw_chart, format_table, ratios

    def run(label: str, tok_s: float) -> dict:
        rec = RequestRecord(8, 4, start=0.0, chunk_times=[0.5, 0.6, 0.7, 0.8], output_tokens=4)
        return {**summarize([rec], 4 / tok_s), "label": label}

    systems = {"tf-tp1": run("tensorfleet tp=1", 150.0), "hf": run("HF generate", 100.0),
               "hf-tp2": run("HF tp_plan=auto tp=2", 60.0), "tf-tp2": run("tensorfleet tp=2", 90.0),
               "tf-pp2": run("tensorfleet pp=2", 144.0)}
    assert ratios(systems) == pytest.approx({"tf-tp1/hf": 1.5, "tf-tp1/hf-tp2": 2.5, "tf-tp2/hf": 0.9,
                                             "tf-tp2/hf-tp2": 1.5, "tf-pp2/hf": 1.44, "tf-pp2/hf-tp2": 2.4,
                                             "tf-pp2/tf-tp1": 0.96})
    table = format_table(systems).splitlines()
    assert table[0].endswith("| vs HF 1 proc | vs HF tp=2 | vs same tp, pp=1 |") and len(table) == 2 + len(systems)
    assert table[2].startswith("| tensorfleet tp=1 | 150.0 |") and table[2].endswith("| 1.50x | 2.50x | - |")
    assert table[-1].startswith("| tensorfleet pp=2 | 144.0 |") and table[-1].endswith("| 2.40x | 0.96x |")
    draw_chart(systems, "test", tmp_path / "chart.png")
    assert (tmp_path / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_system_reports_its_median_round_with_every_round():
    from deploy.bench.compare import median_run

    runs = [{"output_tok_s": t, "round": i, "load_average": 2.0 + i} for i, t in enumerate([120.0, 100.0, 140.0])]
    assert median_run(runs) == {"output_tok_s": 120.0, "round": 0, "load_average": 2.0,
                                "tok_s_of_runs": [120.0, 100.0, 140.0], "load_average_of_runs": [2.0, 3.0, 4.0]}
    assert median_run(runs[:2])["output_tok_s"] == 100.0  # an even count: the lower middle


@pytest.mark.slow
def test_imbalance_bench_times_every_rank_of_both_layouts(tmp_path):
    from deploy.bench.imbalance import main as imbalance

    out = tmp_path / "imbalance.json"
    assert imbalance(["--layers", "1", "--rounds", "2", "--steps", "1", "--batch", "2", "--context", "16",
                      "--prompt", "16", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    heads = {name: [(r["q_heads"], r["groups"]) for r in rows if r["phase"] == "decode"]
             for name, rows in report["layouts"].items()}
    assert list(heads.values()) == [[(5, [3, 2]), (4, [1, 3])], [(3, [3])] * 3]
    for rows in report["layouts"].values():
        assert {r["phase"] for r in rows} == {"decode", "prefill"}
        for r in rows:
            assert 0 < r["compute_ms"] < r["forward_ms"] and r["all_reduce_ms"] > 0
    assert len(report["attention"]) == 8 and all(a["ms"] > 0 for a in report["attention"])
