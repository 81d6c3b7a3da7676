"""A load generator in the spirit of vLLM's serving benchmark (`tensorfleet bench`).

Sends a seeded synthetic workload (`deploy.bench.workload`) either to a running server's
OpenAI API (`/v1/completions`, streaming, token-id prompts, `ignore_eos` so each request
generates exactly its drawn length) or, with `--offline CONFIG`, straight to an engine
built in this process (no HTTP; tp=1 runs without Ray, on `parallel.device`). Requests
arrive all at once, or as a Poisson process at `--request-rate`, optionally capped at
`--max-concurrency` in flight. Prints throughput and latency percentiles (and, offline,
each rank's all-reduce share of its forward time and each pipeline stage's busy share)
and writes them as JSON.
"""

import asyncio
import contextlib
import itertools
import json
import math
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from tqdm import tqdm

from deploy.bench.stats import RequestRecord, all_reduce_shares, stage_shares, summarize
from deploy.bench.workload import Workload, arrival_offsets

if TYPE_CHECKING:  # the CLI imports this module: httpx (the `bench` extra) only when benchmarking a URL
    import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a server or rendezvous a benchmark starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

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
        record.cached_tokens = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens", 0)

    return send


def engine_sender(engine) -> Sender:
    """Requests straight into a `cluster.engine.Engine` (greedy, EOS ignored)."""
    from actors.sampling_params import SamplingParams

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
    all-reduce share and each pipeline stage's busy share over the timed run."""
    if work.max_total_len > engine.max_model_len:
        raise ValueError(f"the workload needs prompt + output up to {work.max_total_len} tokens; "
                         f"raise engine.max_model_len (now {engine.max_model_len}) or shorten the workload")
    send = engine_sender(engine)
    await send(work.prompts[0][:8], 2, RequestRecord(8, 2))
    before, stages_before = await engine.rank_stats(), engine.stage_times()
    records, seconds = await run_load(work, send, request_rate=request_rate, max_concurrency=max_concurrency,
                                      progress=progress)
    summary = summarize(records, seconds)
    summary["ranks"] = all_reduce_shares(before, await engine.rank_stats())
    summary["stages"] = stage_shares(stages_before, engine.stage_times())
    return summary
