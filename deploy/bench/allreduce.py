"""TP all-reduce on one CPU host: gloo (TCP) against shared memory, side by side.

    python -m deploy.bench.allreduce                 # tp=2 and 3, hidden 576 (SmolLM2-135M)
    python -m deploy.bench.allreduce --tp 2 --rounds 9
    python -m deploy.bench.allreduce --tp 3 --spin-polls 0 64 100000000   # waiting variants

`tp` processes (torch.multiprocessing spawn, gloo on 127.0.0.1, one torch thread each) call
`TPGroup.all_reduce`, the call the model's row-parallel layers make, once with the group's
shared-memory segment and once with it switched off (`shm=None`: what
`CpuAllReduce.GLOO` builds). Messages go from one decode token to a 512-token prefill,
[rows, hidden] for rows in 1, 8, 64, 512, in float32 and bfloat16. In each round every
case runs `calls` back-to-back calls per path, the paths alternating which goes first;
the per-call times of TP rank 0 from all rounds give the median and p90. `--spin-polls`
adds shared-memory columns that poll the flags that many times before yielding the core
between polls (`shm` alone picks by core count; see ShmAllReduce).

The decode rows are one token of a 30-layer model: two all-reduces of [1, hidden] per
layer (after o_proj and down_proj), `pure` back to back, and `layer` with the two
row-parallel matmuls in between (ranks then arrive at each all-reduce with the skew real
compute gives); the time is per token, median over the round's tokens.
"""

import argparse
import os
import queue as queue_module
import statistics
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from actors.comm import CommStats, TPGroup, init_parallel
from deploy.bench.loadgen import free_port

ROWS = (1, 8, 64, 512)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
CALLS = {1: 200, 8: 200, 64: 100, 512: 30}  # per path, case and round
INTERMEDIATE = 1536  # SmolLM2-135M's MLP width: down_proj's input


def _rank_main(rank: int, tp: int, init_method: str, args: argparse.Namespace, queue) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    ctx = init_parallel(stage=0, tp_rank=rank, tp_size=tp, pp_size=1, init_method=init_method,
                        backend="gloo", timeout_s=120)
    if ctx.tp.shm is None:
        raise RuntimeError("the shared-memory all-reduce was not set up; nothing to compare")
    shm, default_polls = ctx.tp.shm, ctx.tp.shm.spin_polls
    # path name -> (group, spin polls of the shared-memory wait; unused by gloo)
    paths = {"gloo": (replace(ctx.tp, shm=None, stats=CommStats()), default_polls), "shm": (ctx.tp, default_polls)}
    paths.update({f"spin {p}": (ctx.tp, p) for p in args.spin_polls})
    samples: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        order = list(paths) if r % 2 else list(paths)[::-1]
        for dtype_name, dtype in DTYPES.items():
            for rows in ROWS:
                x = torch.randn(rows, args.hidden).to(dtype)
                for name in order:
                    group, shm.spin_polls = paths[name]
                    samples.setdefault((dtype_name, f"[{rows}, {args.hidden}]", name), []).extend(
                        _time_calls(group, x, CALLS[rows]))
        for name in order:
            group, shm.spin_polls = paths[name]
            for kind, per_token in _decode_tokens(group, args, rank, tp).items():
                samples.setdefault(("float32", f"token, {kind}", name), []).extend(per_token)
    if rank == 0:
        queue.put((default_polls, samples))
    dist.barrier()
    ctx.tp.shm.close()
    dist.destroy_process_group()


def _time_calls(tp: TPGroup, x: torch.Tensor, calls: int) -> list[float]:
    dist.barrier()
    out = []
    for _ in range(calls):
        start = time.perf_counter()
        tp.all_reduce(x)
        out.append(time.perf_counter() - start)
        x.mul_(1.0 / tp.size)  # keep values bounded across calls
    return out


def _decode_tokens(tp: TPGroup, args: argparse.Namespace, rank: int, size: int) -> dict[str, list[float]]:
    """Seconds per token: `pure` (60 all-reduces), `layer` (matmuls between; all-reduce share
    from CommStats reported as `layer AR`)."""
    h = args.hidden
    gen = torch.Generator().manual_seed(rank)
    o_proj = torch.randn(h // size, h, generator=gen) / h**0.5  # [hidden/tp, hidden]
    down = torch.randn(INTERMEDIATE // size, h, generator=gen) / INTERMEDIATE**0.5
    attn_in, mlp_in = torch.randn(1, h // size), torch.randn(1, INTERMEDIATE // size)
    pure, layer, layer_ar = [], [], []
    for _ in range(args.tokens):
        x = torch.randn(1, h)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(2 * args.layers):
            tp.all_reduce(x)
            x.mul_(1.0 / size)
        pure.append(time.perf_counter() - start)
        dist.barrier()
        ar_before, start = tp.stats.all_reduce_seconds, time.perf_counter()
        for _ in range(args.layers):
            tp.all_reduce(attn_in @ o_proj)  # [1, hidden]
            tp.all_reduce(mlp_in @ down)
        layer.append(time.perf_counter() - start)
        layer_ar.append(tp.stats.all_reduce_seconds - ar_before)
    return {"pure": pure, "layer": layer, "layer AR": layer_ar}


def run(tp: int, args: argparse.Namespace) -> tuple[int, dict[tuple, list[float]]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    init_method = f"tcp://127.0.0.1:{free_port()}"
    procs = [ctx.Process(target=_rank_main, args=(r, tp, init_method, args, queue)) for r in range(tp)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=args.timeout_s)  # before join: rank 0 blocks until it is read
    except queue_module.Empty:
        raise RuntimeError(f"tp={tp}: no result within {args.timeout_s:g} s; exit codes "
                           f"{[p.exitcode for p in procs]}") from None
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _p90(values: list[float]) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]


def report(tp: int, layers: int, default_polls: int, samples: dict[tuple, list[float]]) -> list[str]:
    paths = sorted(dict.fromkeys(k[2] for k in samples), key=lambda p: (p != "gloo", p != "shm"))
    lines = [(f"tp={tp}: microseconds per call (p50 / p90 of TP rank 0); 'token' rows: per decode token "
              f"({2 * layers} all-reduces); shm spins {default_polls} polls before yielding"),
             f"{'dtype':9} {'message':16}" + "".join(f"{p:>20}" for p in paths) + f"{'gloo/shm':>10}"]
    for dtype, message, _ in [k for k in samples if k[2] == "shm"]:
        cells, medians = "", {}
        for p in paths:
            v = samples[(dtype, message, p)]
            medians[p] = statistics.median(v) * 1e6
            cells += f"{medians[p]:11.1f} /{_p90(v) * 1e6:7.1f}"
        lines.append(f"{dtype:9} {message:16}{cells}{medians['gloo'] / medians['shm']:9.1f}x")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=10, help="decode tokens per path and round")
    parser.add_argument("--spin-polls", type=int, nargs="*", default=[], help="extra shm wait variants")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, hidden {args.hidden}, {args.rounds} rounds")
    for tp in args.tp:
        print("\n".join(report(tp, args.layers, *run(tp, args))), flush=True)


if __name__ == "__main__":
    main()
