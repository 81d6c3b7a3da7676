"""What an uneven head split costs: per-rank forward time and all-reduce wait at tp=2 on
SmolLM2-135M's shape (9 heads: 5 | 4), beside the even tp=3 split (3 | 3 | 3).

    python -m deploy.bench.imbalance [--rounds 5] [--steps 8] [--layers 30] [--out imbalance.json]

The model has SmolLM2-135M's exact config with random weights (the shape, not the
weights, sets the cost). Each layout's ranks are processes (gloo, one thread each) that
stay up for the whole run; in each round every layout runs, in turn, `--steps` decode
steps (a batch of `--batch` sequences at `--context` cached tokens) and `--steps` prefills
of `--prompt` tokens, so a slow spell of the machine hits every layout alike. A step is
the decoder only (embedding, layers, final norm: no LM head or sampling, which are split
evenly whatever the heads), started on all ranks at once behind a barrier. Per rank:
  forward    the step's wall time on that rank
  all-reduce wall time inside the all-reduces: transfer, plus waiting for the slower rank
  compute    CPU time of the rank's thread in the step outside the all-reduces: its own
             work, which time slices lost to other processes on a busy machine do not
             inflate
The table shows medians over all steps. The cost of the imbalance is the busiest rank's
compute over the others', paid as all-reduce wait by the less loaded rank.

Then one layer's paged attention alone (one thread, in this process), uneven query groups
(padded slots in decode, K/V repeated per query head in prefill) against the even path.
"""

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.attention import PagedAttention, build_attention_metadata
from actors.model_shape import ModelShape
from actors.sharding import rank_shards
from actors.worker import Worker, WorkerSpec
from deploy.bench.report import machine
from deploy.bench.workload import save_bench_model

# SmolLM2-135M's config.json (HuggingFaceTB/SmolLM2-135M), the default served model.
SMOLLM2_135M = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
LAYOUTS = {"tp=2 (heads 5 | 4)": 2, "tp=3 (heads 3 | 3 | 3)": 3}
BLOCK_SIZE = 16


@dataclass(frozen=True)
class Workload:
    batch: int  # decode sequences per step
    context: int  # cached tokens of each decode sequence
    prompt: int  # prefill tokens
    steps: int  # of each phase per round

    def phases(self, device: torch.device):
        """(phase, token ids, positions, attention metadata) of one step of each phase, over
        a KV cache of random values."""
        blocks = -(-self.context // BLOCK_SIZE)
        tables = [list(range(i * blocks, (i + 1) * blocks)) for i in range(self.batch)]
        decode = build_attention_metadata([1] * self.batch, [self.context] * self.batch, tables, BLOCK_SIZE, device)
        prefill_table = [list(range(-(-self.prompt // BLOCK_SIZE)))]
        prefill = build_attention_metadata([self.prompt], [self.prompt], prefill_table, BLOCK_SIZE, device)
        return [
            ("decode", torch.full((self.batch,), 11), torch.full((self.batch,), self.context - 1), decode),
            ("prefill", torch.arange(11, 11 + self.prompt), torch.arange(self.prompt), prefill),
        ]

    @property
    def num_blocks(self) -> int:
        return max(self.batch * -(-self.context // BLOCK_SIZE), -(-self.prompt // BLOCK_SIZE))


def rank_main(spec: WorkerSpec, tp_rank: int, init_method: str, workload: Workload, conn) -> None:
    """One rank: load, then per round run every phase `steps` times and send the timings."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    worker = Worker(spec, 0, tp_rank)
    worker.init_groups(init_method)
    worker.load()
    worker.allocate_kv(workload.num_blocks)
    for attn in worker.model.modules():  # a zeroed cache maps the zero page: reads would be free
        if isinstance(attn, PagedAttention):
            attn.kv_cache.normal_()
    phases = workload.phases(worker.device)
    tp = worker.ctx.tp
    stats, group, reduce_cpu = tp.stats, tp.group, [0.0]
    all_reduce = tp.all_reduce

    def timed_all_reduce(x: torch.Tensor) -> torch.Tensor:
        """The all-reduce, counting its CPU time: a shared-memory one polls while it waits."""
        cpu = time.thread_time()
        try:
            return all_reduce(x)
        finally:
            reduce_cpu[0] += time.thread_time() - cpu

    tp.all_reduce = timed_all_reduce  # this process's group only, for the benchmark
    conn.send("ready")
    while conn.recv() == "round":
        times = {}
        for phase, ids, pos, meta in phases:
            rows = []
            for _ in range(workload.steps):
                dist.barrier(group=group)
                reduce_before, reduce_cpu_before = stats.all_reduce_seconds, reduce_cpu[0]
                start, cpu = time.perf_counter(), time.thread_time()
                with torch.inference_mode():
                    worker.model(ids, pos, meta)
                forward, cpu = time.perf_counter() - start, time.thread_time() - cpu
                rows.append((forward, stats.all_reduce_seconds - reduce_before, cpu - (reduce_cpu[0] - reduce_cpu_before)))
            times[phase] = rows
        conn.send(times)


class Layout:
    """The ranks of one TP layout, as processes that stay up between rounds."""

    def __init__(self, spec: WorkerSpec, workload: Workload, rendezvous: Path):
        ctx = mp.get_context("spawn")
        init_method = f"file://{rendezvous}"  # a file store: no port to find
        self.conns, self.procs = [], []
        for r in range(spec.tp):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=rank_main, args=(spec, r, init_method, workload, child), daemon=True)
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            if not c.poll(600) or c.recv() != "ready":
                raise RuntimeError("a rank did not start within 10 minutes")

    def round(self) -> list[dict[str, list[tuple[float, float, float]]]]:
        """Per rank, per phase: (forward, all-reduce, compute) seconds of each step."""
        for c in self.conns:
            c.send("round")
        return [c.recv() for c in self.conns]

    def close(self) -> None:
        for c in self.conns:
            c.send("stop")
        for p in self.procs:
            p.join(timeout=30)


def median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


def summarize(rounds: list[list[dict]], spec: WorkerSpec) -> list[dict]:
    """One row per (phase, rank): its heads and columns, median forward / all-reduce / compute."""
    shards = rank_shards(spec.shape, spec.tp)
    rows = []
    for phase in rounds[0][0]:
        for r, shard in enumerate(shards):
            steps = [step for rnd in rounds for step in rnd[r][phase]]
            rows.append({
                "phase": phase, "rank": r, "q_heads": shard.heads.num_heads, "kv_heads": shard.heads.num_kv_heads,
                "groups": list(shard.heads.groups), "mlp_cols": shard.intermediate.size,
                "forward_ms": median_ms([f for f, _, _ in steps]), "all_reduce_ms": median_ms([a for _, a, _ in steps]),
                "compute_ms": median_ms([c for _, _, c in steps]),
            })
    return rows


def attention_costs(workload: Workload, repeats: int) -> list[dict]:
    """One layer's paged attention per rank shape, uneven groups against even ones (CPU
    time of this thread per call)."""
    torch.set_num_threads(1)
    random.seed(0)
    d = 64
    cases = {"5 heads over 2 KV (3, 2), tp=2 rank 0": (3, 2), "4 heads over 2 KV (1, 3), tp=2 rank 1": (1, 3),
             "6 heads over 2 KV (3, 3), even": (3, 3), "3 heads over 1 KV (3), tp=3 rank": (3,)}
    out = []
    for phase, _, _, meta in workload.phases(torch.device("cpu")):
        tokens = meta.slot_mapping.numel()
        timings = {name: [] for name in cases}
        layers = {}
        for name, groups in cases.items():
            attn = PagedAttention(sum(groups), len(groups), d, groups)
            attn.kv_cache = torch.randn(2, workload.num_blocks * BLOCK_SIZE, len(groups), d)
            q = torch.randn(tokens, sum(groups), d)
            kv = torch.randn(tokens, len(groups), d)
            layers[name] = (attn, q, kv)
        order = list(layers)
        for _ in range(repeats):  # interleaved, in a fresh order each time
            random.shuffle(order)
            for name in order:
                attn, q, kv = layers[name]
                start = time.thread_time()
                attn(q, kv, kv, meta)
                timings[name].append(time.thread_time() - start)
        out += [{"phase": phase, "case": name, "ms": median_ms(t)} for name, t in timings.items()]
    return out


def format_report(results: dict) -> str:
    w = results["workload"]
    lines = [
        (f"SmolLM2-135M shape ({results['layers']} layers), fp32, one thread per rank, {results['rounds']} rounds x "
         f"{w['steps']} steps; decode: {w['batch']} sequences at {w['context']} cached tokens; "
         f"prefill: {w['prompt']} tokens; medians"),
        "",
        "| layout | phase | rank | q heads (groups) | MLP cols | forward ms | compute ms (CPU) | all-reduce ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for layout, rows in results["layouts"].items():
        for r in rows:
            groups = "+".join(map(str, r["groups"]))
            lines.append(f"| {layout} | {r['phase']} | {r['rank']} | {r['q_heads']} ({groups}) | {r['mlp_cols']} | "
                         f"{r['forward_ms']:.1f} | {r['compute_ms']:.1f} | {r['all_reduce_ms']:.1f} |")
    lines.append("")
    for layout, rows in results["layouts"].items():
        for phase in dict.fromkeys(r["phase"] for r in rows):
            ph = [r for r in rows if r["phase"] == phase]
            busy, idle = max(ph, key=lambda r: r["compute_ms"]), min(ph, key=lambda r: r["compute_ms"])
            lines.append(f"- {layout} {phase}: rank {busy['rank']} computes {busy['compute_ms'] / idle['compute_ms']:.2f}x "
                         f"rank {idle['rank']}'s time; step {max(r['forward_ms'] for r in ph):.1f} ms")
    lines += ["", "one layer's paged attention, 1 thread, CPU time per call:", "",
              "| phase | rank's heads | ms |", "| --- | --- | --- |"]
    lines += [f"| {a['phase']} | {a['case']} | {a['ms']:.3f} |" for a in results["attention"]]
    lines += ["", "machine: " + ", ".join(f"{k} {v}" for k, v in results["machine"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=8, help="steps of each phase per round")
    p.add_argument("--layers", type=int, default=SMOLLM2_135M["num_hidden_layers"])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    args = p.parse_args(argv)
    workload = Workload(args.batch, args.context, args.prompt, args.steps)

    with tempfile.TemporaryDirectory() as tmp:
        save_bench_model(Path(tmp), **{**SMOLLM2_135M, "num_hidden_layers": args.layers})
        shape = ModelShape.from_dir(tmp)
        specs = {name: WorkerSpec(tmp, shape, tp, 1, None, "float32", "cpu", max_model_len=args.context + args.prompt,
                                  block_size=BLOCK_SIZE, cpu_threads=1) for name, tp in LAYOUTS.items()}
        layouts = {name: Layout(spec, workload, Path(tmp) / f"rendezvous-tp{spec.tp}") for name, spec in specs.items()}
        try:
            rounds = {name: [] for name in layouts}
            for i in range(args.rounds):
                for name, layout in layouts.items():
                    rounds[name].append(layout.round())
                print(f"round {i + 1}/{args.rounds} done", flush=True)
        finally:
            for layout in layouts.values():
                layout.close()
    results = {
        "layers": args.layers, "rounds": args.rounds, "workload": asdict(workload),
        "layouts": {name: summarize(rounds[name], specs[name]) for name in layouts},
        "attention": attention_costs(workload, repeats=max(20, args.rounds * args.steps)),
        "machine": machine(),
    }
    print(format_report(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
