"""`tensorfleet bench`: a load generator in the spirit of vLLM's serving benchmark.

Sends a seeded synthetic workload (`deploy.bench_workload`) either to a running server's
OpenAI API (`/v1/completions`, streaming, token-id prompts, `ignore_eos` so each request
generates exactly its drawn length) or, with `--offline CONFIG`, straight to an engine
built in this process (no HTTP; tp=1 runs without Ray, on `parallel.device`). Requests
arrive all at once, or as a Poisson process at `--request-rate`, optionally capped at
`--max-concurrency` in flight. Prints throughput and latency percentiles (and, offline,
each rank's all-reduce share of its forward time) and writes them as JSON.
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from deploy.bench_stats import RequestRecord, all_reduce_shares, format_shares, format_summary, summarize
from deploy.bench_workload import MIXED, Workload, WorkloadSpec, arrival_offsets, make_workload

if TYPE_CHECKING:  # the CLI imports this module: httpx (the `bench` extra) only when benchmarking a URL
    import httpx

# Fits any byte-level vocabulary; pass the model's size for realistic prompts.
DEFAULT_ONLINE_VOCAB = 256

# Fills one record (chunk times, output tokens) while running one request.
Sender = Callable[[list[int], int, RequestRecord], Awaitable[None]]


async def run_load(work: Workload, send: Sender, *, request_rate: float = math.inf,
                   max_concurrency: int | None = None, progress: bool = True) -> tuple[list[RequestRecord], float]:
    """Send every request of `work` on its schedule; (records in workload order, seconds)."""
    offsets = arrival_offsets(len(work.prompts), request_rate, work.spec.seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    bar = tqdm(total=len(work.prompts), unit="req", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()

    async def one(i: int) -> RequestRecord:
        await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        async with limit:
            record = RequestRecord(len(work.prompts[i]), work.output_lens[i], start=time.perf_counter())
            try:
                await send(work.prompts[i], work.output_lens[i], record)
            except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
                record.error = f"{type(e).__name__}: {e}"
        bar.update(1)
        return record

    try:
        records = await asyncio.gather(*(one(i) for i in range(len(work.prompts))))
    finally:
        bar.close()
    return records, time.perf_counter() - start


class HttpError(RuntimeError):
    pass


def http_sender(client: "httpx.AsyncClient", url: str, model: str | None, api_key: str | None) -> Sender:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def send(prompt: list[int], max_tokens: int, record: RequestRecord) -> None:
        body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "stream": True, "stream_options": {"include_usage": True}}
        if model is not None:
            body["model"] = model
        chunks, usage = 0, None
        async with client.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                raise HttpError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    raise HttpError(event["error"].get("message", str(event["error"])))
                if event.get("choices"):
                    record.chunk_times.append(time.perf_counter())
                    chunks += 1
                usage = event.get("usage") or usage
        # Several tokens may share an event (held-back text): count what the server says it sent.
        record.output_tokens = usage["completion_tokens"] if usage else chunks

    return send


def engine_sender(engine) -> Sender:
    """Requests straight into a `cluster.engine.Engine` (greedy, EOS ignored)."""
    from cluster.sampling_params import SamplingParams

    ids = itertools.count()

    async def send(prompt: list[int], max_tokens: int, record: RequestRecord) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        async for out in engine.generate(f"bench-{next(ids)}", prompt, params):
            if tokens := sum(len(d.token_ids) for d in out.deltas):
                record.chunk_times.append(time.perf_counter())
                record.output_tokens += tokens

    return send


async def bench_online(url: str, work: Workload, *, model: str | None = None, api_key: str | None = None,
                       request_rate: float = math.inf, max_concurrency: int | None = None,
                       progress: bool = True) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), limits=limits) as client:
        send = http_sender(client, url.rstrip("/"), model, api_key)
        records, seconds = await run_load(work, send, request_rate=request_rate,
                                          max_concurrency=max_concurrency, progress=progress)
    return summarize(records, seconds)


async def bench_engine(engine, work: Workload, *, request_rate: float = math.inf,
                       max_concurrency: int | None = None, progress: bool = True) -> dict:
    """The workload on an engine, after one short warm-up request; adds each rank's
    all-reduce share over the timed run."""
    if work.max_total_len > engine.max_model_len:
        raise ValueError(f"the workload needs prompt + output up to {work.max_total_len} tokens; "
                         f"raise engine.max_model_len (now {engine.max_model_len}) or shorten the workload")
    send = engine_sender(engine)
    await send(work.prompts[0][:8], 2, RequestRecord(8, 2))
    before = engine.executor.rank_stats()
    records, seconds = await run_load(work, send, request_rate=request_rate, max_concurrency=max_concurrency,
                                      progress=progress)
    summary = summarize(records, seconds)
    summary["ranks"] = all_reduce_shares(before, engine.executor.rank_stats())
    return summary


# --- the command ------------------------------------------------------------------------


def length_range(text: str) -> tuple[int, int]:
    """'32:512' -> (32, 512); '64' -> (64, 64)."""
    try:
        lo, _, hi = text.partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX or N, got {text!r}") from None


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="load-test a running server (OpenAI API) or, with --offline, an engine in this process",
        description="Send a seeded synthetic workload (random token-id prompts, exact output lengths) "
                    "and report request throughput, output tokens/s, TTFT, inter-token latency and "
                    "end-to-end latency (mean, p50, p90, p99). Writes JSON with --out.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--offline", metavar="CONFIG", help="build the engine of this YAML config here, no HTTP")
    p.add_argument("--model", help="model name to send (default: the server's)")
    p.add_argument("--api-key", help="bearer token for the server")
    p.add_argument("--num-requests", type=int, default=MIXED.num_requests)
    p.add_argument("--prompt-len", type=length_range, default=MIXED.prompt_len, metavar="MIN:MAX",
                   help="prompt tokens, uniform (default %(default)s)")
    p.add_argument("--output-len", type=length_range, default=MIXED.output_len, metavar="MIN:MAX",
                   help="output tokens, uniform, EOS ignored (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int,
                   help=f"prompt ids are drawn below this (default: the model's offline, "
                        f"{DEFAULT_ONLINE_VOCAB} online)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    from deploy.cli import add_cluster_args

    add_cluster_args(p)
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from cluster.config import ConfigError

    options = dict(request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                   progress=not args.no_progress)
    try:
        if args.url:
            spec = _spec(args, args.vocab_size or DEFAULT_ONLINE_VOCAB)
            summary = asyncio.run(bench_online(args.url, make_workload(spec), model=args.model,
                                               api_key=args.api_key, **options))
        else:
            spec, summary = _bench_offline(args, options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(format_summary(summary))
    if summary.get("ranks"):
        print("all-reduce share of each rank's forward time:\n" + format_shares(summary["ranks"]))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rate = args.request_rate if math.isfinite(args.request_rate) else "inf"  # JSON has no Infinity
        result = {"target": args.url or args.offline, "workload": spec.to_json(), "request_rate": rate,
                  "max_concurrency": args.max_concurrency, **summary}
        args.out.write_text(json.dumps(result, indent=2, default=str))
        print(f"wrote {args.out}")
    return 0 if summary["failed"] == 0 else 1


def _spec(args: argparse.Namespace, vocab_size: int) -> WorkloadSpec:
    return WorkloadSpec(args.num_requests, args.prompt_len, args.output_len, args.seed, vocab_size)


def _bench_offline(args: argparse.Namespace, options: dict) -> tuple[WorkloadSpec, dict]:
    from cluster.config import ModelShape, load_config
    from cluster.replica import build_engine
    from deploy.cli import ray_session

    config = load_config(args.offline)
    spec = _spec(args, args.vocab_size or ModelShape.from_dir(config.model).vocab_size)
    par = config.parallel
    if par.tensor_parallel_size * par.pipeline_parallel_size > 1 and not (args.simulate or args.address):
        args.simulate = f"1x{par.tensor_parallel_size * par.pipeline_parallel_size}"
    with ray_session(args):
        engine = build_engine(config, log=lambda m: print(m, flush=True))
        try:
            return spec, asyncio.run(bench_engine(engine, make_workload(spec), **options))
        finally:
            engine.executor.shutdown()
