"""Prefix-aware routing against Serve's default router, one run each, same workload:

    python -m deploy.bench.prefix_routing --out bench_results/prefix_routing.json

A chat product's traffic: 16 system prompts (`--system-len` random token ids each), each
followed by 8 follow-ups (the system prompt plus `--user-len` new tokens), 144 requests in a
seeded random order, `--max-concurrency` in flight, each asking for `--output-len` tokens
(default 1: the time to the first token is what a prefix hit saves). Served by the default model on a simulated
2-node cluster as 2 replicas at tp=1, each with `--kv-blocks` KV blocks: enough for half of
the system prompts, so a router that sends every prompt everywhere keeps evicting them, and
one that keeps each prompt on one replica holds them all (the effective cache doubles).

Per router: requests whose prompt hit the prefix cache, the share of prompt tokens served
from it (the server's usage.prompt_tokens_details.cached_tokens) and TTFT, then the ratios.
"""

import argparse
import asyncio
import json
import random
from pathlib import Path

from ray import serve

from cluster.config import TensorfleetConfig
from deploy.bench.loadgen import bench_online, free_port
from deploy.bench.report import machine
from deploy.bench.workload import Workload, WorkloadSpec
from deploy.default_model import default_config
from deploy.server.app import deploy

ROUTERS = ("prefix", "power_of_two")


def chat_workload(systems: int, follow_ups: int, system_len: int, user_len: int, output_len: int,
                  vocab_size: int, seed: int) -> Workload:
    """Each system prompt once, then its follow-ups, all shuffled (a prompt's first request
    may come after some of its follow-ups, as in real traffic)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(systems):
        system = [rng.randrange(vocab_size) for _ in range(system_len)]
        prompts += [system + [rng.randrange(vocab_size) for _ in range(user_len)] for _ in range(1 + follow_ups)]
    rng.shuffle(prompts)
    spec = WorkloadSpec(len(prompts), (system_len + user_len,) * 2, (output_len,) * 2, seed, vocab_size)
    return Workload(spec, prompts, [output_len] * len(prompts))


def serve_config(routing: str, kv_blocks: int, max_model_len: int) -> dict:
    cfg = default_config().model_dump()
    cfg["parallel"] = {**cfg["parallel"], "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "device": "cpu"}
    cfg["engine"] = {**cfg["engine"], "num_kv_blocks": kv_blocks, "max_model_len": max_model_len}
    cfg["serve"] = {**cfg["serve"], "num_replicas": 2, "routing": routing}
    return cfg


def run_router(routing: str, work: Workload, args: argparse.Namespace) -> dict:
    """Deploy as `tensorfleet serve` does, on a free port, run the workload, shut down."""
    port = free_port()
    config = TensorfleetConfig.model_validate(serve_config(routing, args.kv_blocks, args.max_model_len))
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    try:
        deploy(config)
        summary = asyncio.run(bench_online(f"http://127.0.0.1:{port}", work, max_concurrency=args.max_concurrency,
                                           progress=False))
    finally:
        serve.shutdown()
    summary["cache_hit_rate"] = summary["cached_prompt_tokens"] / max(1, summary["prompt_tokens"])
    return summary


def format_report(results: dict) -> str:
    w = results["workload"]
    lines = [f"{w['systems']} system prompts x {w['follow_ups']} follow-ups (+1 first ask each), "
             f"system {w['system_len']} + user {w['user_len']} tokens, {w['output_len']} out; 2 replicas at tp=1, "
             f"{w['kv_blocks']} KV blocks each, {w['max_concurrency']} in flight",
             f"{'router':<14}{'hit requests':>14}{'cached tokens':>15}{'TTFT mean ms':>14}{'p50':>8}{'p90':>8}"
             f"{'failed':>8}"]
    for name in ROUTERS:
        r = results[name]
        t = r["ttft_s"]
        lines.append(f"{name:<14}{r['requests_with_cache_hits']:>8}/{r['completed']:<5}{r['cache_hit_rate']:>15.1%}"
                     f"{t['mean'] * 1e3:>14.0f}{t['p50'] * 1e3:>8.0f}{t['p90'] * 1e3:>8.0f}{r['failed']:>8}")
    p, d = results["prefix"], results["power_of_two"]
    lines.append(f"prefix vs power_of_two: cache hit rate x{p['cache_hit_rate'] / max(d['cache_hit_rate'], 1e-9):.2f}, "
                 f"TTFT mean x{p['ttft_s']['mean'] / d['ttft_s']['mean']:.2f}, p90 x{p['ttft_s']['p90'] / d['ttft_s']['p90']:.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--systems", type=int, default=16)
    p.add_argument("--follow-ups", type=int, default=8)
    p.add_argument("--system-len", type=int, default=128)
    p.add_argument("--user-len", type=int, default=16)
    p.add_argument("--output-len", type=int, default=1)
    p.add_argument("--kv-blocks", type=int, default=96, help="per replica (16 tokens each)")
    p.add_argument("--max-model-len", type=int, default=256)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    from cluster.local_cluster import start_local_cluster

    vocab = 49152  # the default model's
    work = chat_workload(args.systems, args.follow_ups, args.system_len, args.user_len, args.output_len, vocab, args.seed)
    results = {"machine": machine(), "workload": {k: getattr(args, k) for k in (
        "systems", "follow_ups", "system_len", "user_len", "output_len", "kv_blocks", "max_concurrency", "seed")}}
    cluster = start_local_cluster(nodes=2, gpus_per_node=1)
    try:
        for name in ROUTERS:
            results[name] = run_router(name, work, args)
            if args.out:  # after each router: a slow machine may not see the end
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2, default=str))
    finally:
        cluster.shutdown()
    print(format_report(results))
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
