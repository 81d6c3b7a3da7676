"""Run a TP x PP layout as plain processes (torch.multiprocessing + gloo, no Ray)."""

import os
import socket
from dataclasses import replace

import torch
import torch.multiprocessing as mp

from actors.worker import Worker, WorkerSpec


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(spec: WorkerSpec, stage: int, tp_rank: int, init_method: str, prompts, queue) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    try:
        worker = Worker(spec, stage, tp_rank)
        worker.init_groups(init_method)
        load = worker.load()
        blocks = sum(-(-len(p) // spec.block_size) for p in prompts)
        worker.allocate_kv(blocks)
        before = worker.rank_stats().all_reduces
        logits = worker.prompt_logits(prompts)
        report = {
            **load,
            "all_reduces_per_forward": worker.rank_stats().all_reduces - before,
            "gathers": worker.ctx.tp.stats.gathers,
            "param_names": [n for n, _ in worker.model.named_parameters()],
        }
        # numpy, not tensors: torch shares tensors through this process's memory, gone once it exits
        arrays = [t.numpy() for t in logits] if logits is not None else None
        queue.put(((stage, tp_rank), arrays, report, None))
    except Exception as e:  # surfaced in the parent with its rank
        queue.put(((stage, tp_rank), None, None, f"{type(e).__name__}: {e}"))


def run_layout(spec: WorkerSpec, prompts: list[list[int]], timeout_s: float = 120.0):
    """Logits of every prompt from TP rank 0 of the last stage, and each rank's report."""
    spec = replace(spec, cpu_threads=1)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [
        ctx.Process(target=_rank_main, args=(spec, stage, r, init_method, prompts, queue))
        for stage in range(spec.pp)
        for r in range(spec.tp)
    ]
    for p in procs:
        p.start()
    try:
        results = {}
        for _ in procs:
            rank, logits, report, error = queue.get(timeout=timeout_s)
            if error:
                raise RuntimeError(f"rank (stage, tp_rank)={rank} failed: {error}")
            results[rank] = (logits, report)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    logits = [torch.from_numpy(a) for a in results[(spec.pp - 1, 0)][0]]
    return logits, {rank: rep for rank, (_, rep) in results.items()}
