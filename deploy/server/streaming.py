"""Running one request on the engine for the HTTP layer: collect it, or stream it as
server-sent events, aborting the engine request whenever the client goes away first."""

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import TypeVar

from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from actors.sampling_params import SamplingParams
from cluster.engine_client import EngineClient, RequestOutput, TokenLogprob, Usage
from deploy.server.errors import APIError, to_api_error

logger = logging.getLogger(__name__)
T = TypeVar("T")


async def engine_outputs(
    engine: EngineClient, request_id: str, prompts: list[list[int]], params: SamplingParams
) -> AsyncGenerator[RequestOutput, None]:
    """The engine's outputs for a request of one or more prompts, as one request: prompt i
    runs as its own engine request, its completion j becomes choice i * n + j (OpenAI's
    numbering), `finished` means every prompt finished, usage sums them. Closing this early,
    or a failure of any prompt, aborts them all."""
    queue: asyncio.Queue = asyncio.Queue()
    ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]

    async def pump(i: int) -> None:
        outputs, finished = None, False
        try:
            outputs = engine.generate(ids[i], prompts[i], params)
            async for out in outputs:
                finished = out.finished
                queue.put_nowait((i, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            queue.put_nowait((i, exc))
        finally:
            if not finished:
                await asyncio.shield(engine.abort(ids[i]))
            if hasattr(outputs, "aclose"):
                await outputs.aclose()

    tasks = [asyncio.ensure_future(pump(i)) for i in range(len(prompts))]
    usage = [Usage(0, 0)] * len(prompts)
    running = len(prompts)
    try:
        while running:
            i, out = await queue.get()
            if isinstance(out, Exception):
                raise out
            usage[i] = out.usage
            running -= out.finished
            yield RequestOutput(request_id, [replace(d, index=i * params.n + d.index) for d in out.deltas],
                                running == 0, _sum(usage))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sum(usage: list[Usage]) -> Usage:
    return Usage(sum(u.prompt_tokens for u in usage), sum(u.completion_tokens for u in usage),
                 sum(u.cached_prompt_tokens for u in usage))


@dataclass
class Completion:
    """One of the n completions, accumulated for a non-streaming answer."""

    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


async def collect(outputs: AsyncIterator[RequestOutput], n: int) -> tuple[list[Completion], Usage]:
    results, usage = [Completion() for _ in range(n)], Usage(0, 0)
    async for out in outputs:
        usage = out.usage
        for d in out.deltas:
            r = results[d.index]
            r.text += d.text
            r.logprobs += d.logprobs or []
            r.finish_reason = d.finish_reason or r.finish_reason
    return results, usage


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`; if the client disconnects first, cancel it (aborting its engine request)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait([task, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for t in (watcher, task):
            t.cancel()
        await asyncio.gather(watcher, task, return_exceptions=True)
    if task.cancelled():
        raise APIError(499, "The client closed the request", code="client_closed_request")
    return task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def stream_events(
    request: Request,
    outputs: AsyncGenerator[RequestOutput, None],
    head: list[BaseModel],
    chunks: Callable[[RequestOutput], Iterator[BaseModel]],
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> Response:
    """Wait for the first output before answering, so that what fails at once (overloaded,
    rejected by the engine) still gets its own HTTP status; then stream server-sent events."""
    first = await until_disconnect(request, anext(outputs))
    return EventStream(_sse_events(first, outputs, head, chunks, usage_chunk))


async def _sse_events(
    first: RequestOutput,
    outputs: AsyncGenerator[RequestOutput, None],
    head: list[BaseModel],
    chunks: Callable[[RequestOutput], Iterator[BaseModel]],
    usage_chunk: Callable[[Usage], BaseModel] | None,
) -> AsyncIterator[str]:
    """`data: {chunk}` events, the usage chunk last when asked for, then `data: [DONE]`.
    A failure midway (the engine died) becomes an error event before [DONE]."""
    try:
        for chunk in head:
            yield f"data: {chunk.model_dump_json()}\n\n"
        out: RequestOutput | None = first
        while out is not None:
            for chunk in chunks(out):
                yield f"data: {chunk.model_dump_json()}\n\n"
            if out.finished and usage_chunk is not None:
                yield f"data: {usage_chunk(out.usage).model_dump_json()}\n\n"
            out = await anext(outputs, None)
    except Exception as exc:  # noqa: BLE001 - whatever it was, the client gets an error event
        error = to_api_error(exc)
        logger.warning("stream failed with %d: %s", error.status, error.message)
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        await outputs.aclose()
    yield "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """A server-sent event stream that closes its event generator (so the engine request is
    aborted) as soon as the client disconnects or the response task is cancelled, whatever
    the server's ASGI version; Starlette alone may leave the generator suspended."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str]):
        super().__init__(events, headers={"Cache-Control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        streaming = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait([streaming, watcher], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (watcher, streaming):
                t.cancel()
            await asyncio.gather(watcher, streaming, return_exceptions=True)
            await self.body_iterator.aclose()
