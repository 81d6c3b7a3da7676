"""Benchmarks side by side: one model, one workload, one machine, one run.

    python -m deploy.bench.compare --out bench_results/

The ~125M-parameter benchmark Llama (`deploy.bench.workload`, random weights, fp32), or the
checkpoint `--model` names (`default`: SmolLM2-135M-Instruct's GGUF), on the mixed workload
(64 requests, prompts 32-512 tokens, outputs 16-256, all arriving at once), through, in
this order:

    tf-tp1      tensorfleet tp=1: the engine in this process, no Ray
    hf          Hugging Face `generate`, one process, static batches (the best batch size)
    hf-tp2      Hugging Face `tp_plan="auto"` under `torchrun --nproc-per-node 2`, static batches
    tf-pp2      tensorfleet pp=2 on a simulated 2-node x 1-GPU Ray cluster
    tf-tp2      tensorfleet tp=2 on a simulated 1-node x 2-GPU Ray cluster
    tf-tp2pp2   tensorfleet tp=2 x pp=2 on a simulated 2-node x 2-GPU Ray cluster

It prints a table of output tokens/s and latency percentiles with ratios against both HF
baselines and, for a pipeline, against the same tp without one; each tensorfleet rank's
all-reduce share of its forward time and each pipeline stage's busy share; it writes
results.json, table.md and chart.png (throughput and TTFT by system) under --out.
About 9 minutes a round on a quiet 2-core CPU machine (see README.md); `make bench` runs
three rounds, interleaved, and reports each system's median round.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from actors.checkpoint import open_checkpoint
from cluster.config import TensorfleetConfig
from deploy.bench.hf import check_tokens, local_params, static_batches
from deploy.bench.loadgen import bench_engine, free_port
from deploy.bench.report import draw_chart, format_rounds, format_system_shares, format_table, machine, ratios
from deploy.default_model import default_model_path
from deploy.bench.workload import (
    MIXED,
    Workload,
    WorkloadSpec,
    length_range,
    make_workload,
    save_bench_model,
)

SYSTEMS = {  # key: (label, tp, pp)
    "tf-tp1": ("tensorfleet tp=1", 1, 1),
    "hf": ("HF generate", 1, 1),
    "hf-tp2": ("HF tp_plan=auto tp=2", 2, 1),
    "tf-pp2": ("tensorfleet pp=2", 1, 2),
    "tf-tp2": ("tensorfleet tp=2", 2, 1),
    "tf-tp2pp2": ("tensorfleet tp=2 x pp=2", 2, 2),
}
HF_SYSTEMS = ("hf", "hf-tp2")


def engine_config(path: Path, tp: int, pp: int, device: str, max_model_len: int, max_num_batched_tokens: int,
                  layer_partition: list[int] | None = None) -> TensorfleetConfig:
    return TensorfleetConfig.model_validate({
        "model": str(path), "dtype": "float32",
        "parallel": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "device": device,
                     "layer_partition": layer_partition if pp > 1 else None},
        "engine": {"max_model_len": max_model_len, "max_num_seqs": 64,
                   "max_num_batched_tokens": max_num_batched_tokens, "block_size": 16, "num_kv_blocks": 4096,
                   "step_deadline_s": 600},  # a throughput run, not a liveness check: a loaded machine is not a stuck worker
    })


async def control_overhead_ms(engine, steps: int = 200) -> float:
    """Median round trip of an empty step through every stage (no forward)."""
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        await engine.empty_step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[20:]) * 1e3


def run_tensorfleet(path: Path, work: Workload, tp: int, pp: int, device: str, max_num_batched_tokens: int,
                    layer_partition: list[int] | None) -> dict:
    """tp=pp=1 in this process without Ray; otherwise on a fresh simulated cluster of pp
    nodes x tp logical GPUs, shut down afterwards."""
    from cluster.replica import build_engine

    cluster = None
    if tp * pp > 1:
        from cluster.local_cluster import start_local_cluster

        cluster = start_local_cluster(pp, tp)
    try:
        config = engine_config(path, tp, pp, device, work.max_total_len, max_num_batched_tokens, layer_partition)
        engine = build_engine(config, log=lambda m: None)

        async def bench() -> dict:
            return await bench_engine(engine, work, progress=False) | {
                "control_overhead_ms": await control_overhead_ms(engine)}

        try:
            return asyncio.run(bench())
        finally:
            engine.shutdown()
    finally:
        if cluster is not None:
            cluster.shutdown()


def run_hf(path: Path, work: Workload, batch_sizes: list[int], device: str) -> dict:
    """Every batch size; the best one's result, with the others' tokens/s beside it."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    dev = torch.device(device)
    by_size = static_batches(model, work, batch_sizes, dev, log=lambda m: print(m, flush=True))
    best = max(by_size, key=lambda bs: by_size[bs]["output_tok_s"])
    return {**by_size[best], "batch_size": best, "params": local_params(model),
            "check_tokens": check_tokens(model, work, dev),
            "tok_s_by_batch_size": {bs: r["output_tok_s"] for bs, r in by_size.items()}}


def run_hf_tp(path: Path, work: Workload, batch_sizes: list[int], workdir: Path, ranks: int = 2) -> dict:
    """`deploy.bench.hf` under torchrun, once per batch size; the best one's result."""
    spec = workdir / "workload.json"
    spec.write_text(json.dumps(work.spec.to_json()))
    by_size = {}
    for bs in batch_sizes:
        out = workdir / f"hf_tp_{bs}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={ranks}",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}", "-m", "deploy.bench.hf",
               "--model", str(path), "--workload", str(spec), "--batch-size", str(bs), "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        if proc.returncode != 0:
            raise RuntimeError(f"torchrun failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        by_size[bs] = json.loads(out.read_text())
        print(f"  HF tp_plan=auto static batch {bs}: {by_size[bs]['output_tok_s']:.1f} output tok/s", flush=True)
    best = max(by_size, key=lambda bs: by_size[bs]["output_tok_s"])
    return {**by_size[best], "tok_s_by_batch_size": {bs: r["output_tok_s"] for bs, r in by_size.items()}}


def check_hf_tp(results: dict) -> list[str]:
    """Problems with the HF tp_plan run: weights not split, or tokens unlike one process's."""
    if "hf-tp2" not in results:
        return []
    tp, problems = results["hf-tp2"], []
    if max(tp["params_per_rank"]) > 0.6 * tp["params_full"]:
        problems.append(f"HF tp_plan=auto did not shard: {tp['params_per_rank']} of {tp['params_full']} params")
    if "hf" in results and tp["check_tokens"] != results["hf"]["check_tokens"]:
        problems.append("HF tp_plan=auto greedy tokens differ from the single-process model's")
    return problems


def run_system(key: str, path: Path, work: Workload, *, batch_sizes: list[int], device: str, workdir: Path,
               max_num_batched_tokens: int, layer_partition: list[int] | None) -> dict:
    label, tp, pp = SYSTEMS[key]
    start = time.perf_counter()
    if key == "hf":
        result = run_hf(path, work, batch_sizes, device)
    elif key == "hf-tp2":
        result = run_hf_tp(path, work, batch_sizes, workdir, tp)
    else:
        result = run_tensorfleet(path, work, tp, pp, device, max_num_batched_tokens, layer_partition)
    return result | {"label": label, "wall_s": time.perf_counter() - start}


def median_run(runs: list[dict]) -> dict:
    """The run with the median output tokens/s (the lower middle of an even count), with
    every run's tokens/s and load average beside it."""
    ranked = sorted(runs, key=lambda r: r["output_tok_s"])
    return ranked[(len(ranked) - 1) // 2] | {"tok_s_of_runs": [r["output_tok_s"] for r in runs],
                                             "load_average_of_runs": [r.get("load_average", 0.0) for r in runs]}


def run_all(work: Workload, systems: list[str], *, batch_sizes: list[int], device: str, layers: int,
            model: Path | None = None, max_num_batched_tokens: int = 2048, layer_partition: list[int] | None = None,
            repeats: int = 1, log: Callable[[str], None] = print) -> dict:
    """Every system `repeats` times, in interleaved rounds (so a slow spell of the machine
    hits all systems alike); each system's median run is reported. `model`: a checkpoint
    to run instead of the benchmark Llama of `layers` layers; `layer_partition`: layers per
    stage of the pipelines."""
    runs: dict[str, list[dict]] = {key: [] for key in systems}
    with tempfile.TemporaryDirectory() as tmp:
        if model is None:
            path = Path(tmp) / "bench-llama"
            params = sum(p.numel() for p in save_bench_model(path, num_hidden_layers=layers).parameters())
            name = f"Llama {params / 1e6:.0f}M params ({layers} layers, random weights)"
        else:
            path, params, layers = model, None, open_checkpoint(model).shape.num_hidden_layers
            name = f"{model.name} ({layers} layers)"
        log(f"model: {name}, fp32, {device}; workload: {len(work.prompts)} requests, {work.output_tokens} output "
            f"tokens, all at once; max_num_batched_tokens {max_num_batched_tokens}")
        for round_ in range(1, repeats + 1):
            for key in systems:
                log(f"{SYSTEMS[key][0]} (round {round_}/{repeats}, load average {os.getloadavg()[0]:.1f}) ...")
                r = run_system(key, path, work, batch_sizes=batch_sizes, device=device, workdir=Path(tmp),
                               max_num_batched_tokens=max_num_batched_tokens, layer_partition=layer_partition)
                runs[key].append(r | {"load_average": os.getloadavg()[0]})
                log(f"  {r['output_tok_s']:.1f} output tok/s, {r['completed']}/{r['requests']} requests, "
                    f"{r['wall_s']:.0f} s with setup")
    results = {key: median_run(rs) for key, rs in runs.items()}
    return {"machine": machine(), "model": {"name": name, "params": params, "layers": layers, "dtype": "float32"},
            "workload": work.spec.to_json(), "max_num_batched_tokens": max_num_batched_tokens,
            "layer_partition": layer_partition, "device": device,
            "repeats": repeats, "systems": results, "ratios": ratios(results), "problems": check_hf_tp(results)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench_results"), help="directory for JSON, table, PNG")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    p.add_argument("--num-requests", type=int, default=MIXED.num_requests)
    p.add_argument("--prompt-len", type=length_range, default=MIXED.prompt_len, metavar="MIN:MAX")
    p.add_argument("--output-len", type=length_range, default=MIXED.output_len, metavar="MIN:MAX")
    p.add_argument("--seed", type=int, default=MIXED.seed)
    p.add_argument("--hf-batch-sizes", default="32",
                   help="static batch sizes to try for both HF baselines; the best is reported "
                        "(default 32, the best of 16/32/64 on the mixed workload)")
    p.add_argument("--layers", type=int, default=12, help="decoder layers of the benchmark Llama")
    p.add_argument("--model", help="a checkpoint to run instead of the benchmark Llama: a Hugging Face folder, "
                                   "a .gguf file, or `default` (SmolLM2-135M-Instruct's GGUF)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048, help="engine.max_num_batched_tokens")
    p.add_argument("--layer-partition", type=lambda t: [int(n) for n in t.split(",")], metavar="N,N",
                   help="parallel.layer_partition of the two-stage pipelines (default: balanced, see actors/sharding.py)")
    p.add_argument("--repeats", type=int, default=1,
                   help="rounds of every system, interleaved; each system's median run is reported")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    systems = [s.strip() for s in args.systems.split(",")]
    if unknown := [s for s in systems if s not in SYSTEMS]:
        p.error(f"unknown systems {unknown}; choose from {','.join(SYSTEMS)}")
    model = None
    if args.model:
        model = default_model_path() if args.model == "default" else Path(args.model)
        if model.suffix == ".gguf" and (hf := [s for s in systems if s in HF_SYSTEMS]):
            p.error(f"{','.join(hf)} load a Hugging Face folder; --model {model} is a GGUF file")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    vocab = open_checkpoint(model).shape.vocab_size if model else MIXED.vocab_size
    work = make_workload(WorkloadSpec(args.num_requests, args.prompt_len, args.output_len, args.seed, vocab))
    start = time.perf_counter()
    report = run_all(work, systems, batch_sizes=[int(b) for b in args.hf_batch_sizes.split(",")],
                     device=args.device, layers=args.layers, model=model,
                     max_num_batched_tokens=args.max_num_batched_tokens, layer_partition=args.layer_partition,
                     repeats=args.repeats)
    report["wall_s"] = time.perf_counter() - start
    systems, m = report["systems"], report["machine"]
    where = f"{m['cpu']}, {m['cores']} cores, torch {m['torch']}" + (f", {m['gpu']}" if "gpu" in m else "")
    loads = [r for s in systems.values() for r in s["load_average_of_runs"]]
    where += f"; load average {min(loads):.1f}-{max(loads):.1f} during the runs"
    text = (f"{format_table(systems)}\n\neach round's output tok/s (median shown; {args.repeats} rounds):\n"
            f"{format_rounds(systems)}\n\n{format_system_shares(systems)}\n\nmachine: {where}")
    print(f"\n{text}")
    print(f"total {report['wall_s']:.0f} s")
    for problem in report["problems"]:
        print(f"PROBLEM: {problem}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    (args.out / "table.md").write_text(f"{text}\n")
    draw_chart(report["systems"], f"{report['model']['name']} fp32, {len(work.prompts)} "
               f"requests ({args.prompt_len[0]}-{args.prompt_len[1]} in, {args.output_len[0]}-"
               f"{args.output_len[1]} out), {where}", args.out / "chart.png")
    print(f"wrote {args.out}/results.json, table.md, chart.png")
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
