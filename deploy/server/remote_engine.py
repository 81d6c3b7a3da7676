"""The `EngineClient` the ingress serves HTTP over: the model replicas behind a Serve handle.

`generate` is a streaming call to the engine deployment; the handle's request router picks
the replica (`deploy/server/router.py` reads the `prompt_token_ids` keyword). Closing the
stream cancels the call, which aborts the request on its replica and frees its KV blocks,
so `abort` only has to close the stream of that request. Errors the engine raises for a
request (bad parameters, overloaded, down) come back as themselves, so the HTTP layer maps
them to the same statuses as with an engine in the same process.

Draining (graceful shutdown) happens here, where every request enters: new requests are
refused and /health answers 503 while those in flight finish.
"""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from ray.exceptions import RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from actors.sampling_params import SamplingParams
from actors.step_io import RankStats
from cluster.engine_client import EngineDeadError, EngineStats, RequestOutput


def _unwrapped(error: RayTaskError) -> BaseException:
    """The exception the replica raised, when Ray could carry it over."""
    return error.cause if isinstance(error.cause, BaseException) else error


class RemoteEngine:
    def __init__(self, handle: DeploymentHandle, *, model_name: str, max_model_len: int, vocab_size: int,
                 tokenizer: Any):
        self.handle = handle
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.draining = False
        self.streams: dict[str, DeploymentResponseGenerator] = {}  # request id -> its call, while open

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self.draining:
            raise EngineDeadError("the server is shutting down and takes no new requests")
        stream = self.handle.options(stream=True).generate.remote(
            request_id=request_id, prompt_token_ids=prompt_token_ids, params=params)
        self.streams[request_id] = stream
        try:
            async for out in stream:
                yield out
        except RayTaskError as e:
            raise _unwrapped(e) from None
        finally:
            if self.streams.pop(request_id, None) is not None:
                stream.cancel()  # a no-op once the stream has ended

    async def abort(self, request_id: str) -> None:
        if (stream := self.streams.pop(request_id, None)) is not None:
            stream.cancel()

    async def check_health(self) -> None:
        """Healthy when a replica answers that its engine is up."""
        if self.draining:
            raise EngineDeadError("the server is shutting down")
        try:
            await self.handle.healthy.remote()
        except RayTaskError as e:
            raise _unwrapped(e) from None

    async def stats(self) -> EngineStats:
        """One replica's stats (each call may be routed to another)."""
        return await self.handle.stats.remote()

    async def rank_stats(self) -> list[RankStats]:
        return await self.handle.rank_stats.remote()

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    def drain(self) -> None:
        self.draining = True

    def shutdown(self) -> None:
        for request_id in list(self.streams):
            asyncio.ensure_future(self.abort(request_id))
