"""The `EngineClient` the ingress serves HTTP over: the model replicas behind a Serve handle.

`generate` is a streaming call to the engine deployment; the handle's request router picks
the replica (`deploy/server/router.py` reads the `prompt_token_ids` keyword). Closing the
stream cancels the call, which aborts the request on its replica and frees its KV blocks,
so `abort` only has to close the stream of that request. Errors the engine raises for a
request (bad parameters, overloaded, down) come back as themselves, so the HTTP layer maps
them to the same statuses as with an engine in the same process.

Failover: when a replica dies (its actor is gone) or gives up (its engine could not rebuild
its workers), its requests carry on on a sibling: the ingress re-submits each one's prompt
plus the tokens it has streamed so far, for the tokens still to come, and the client's stream
goes on with the next token, none repeated, none missing (a worker death inside a replica
is that replica's to heal: `cluster/engine.py` resumes its requests on rebuilt workers).
Greedy completions are those of an undisturbed run; a sampled one goes on validly from what
it had, but its seeded draws restart (they are keyed by output index within a request).
Requests with n > 1 are not moved (their completions diverge); they fail as before.

Draining (graceful shutdown) happens here, where every request enters: new requests are
refused and /health answers 503 while those in flight finish.
"""

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from actors.sampling_params import SamplingParams
from actors.step_io import RankStats
from cluster.engine_client import EngineDeadError, EngineGaveUpError, EngineStats, RequestOutput, Usage

logger = logging.getLogger("ray.serve")
# Times one request may move to another replica before it fails: a move may reach a replica
# that died too but is not yet known dead (its siblings' requests learn it at the same moment).
MAX_FAILOVERS = 3


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
        self.failovers = 0  # requests moved to another replica, since start

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        if self.draining:
            raise EngineDeadError("the server is shutting down and takes no new requests")
        produced: list[int] = []  # tokens streamed to the client so far (n == 1)
        first_usage: Usage | None = None
        for attempt in range(MAX_FAILOVERS + 1):
            prompt = prompt_token_ids + produced
            resumed = replace(params, max_tokens=params.max_tokens - len(produced))
            try:
                async with aclosing(self._stream(request_id, attempt, prompt, resumed)) as outs:
                    async for out in outs:
                        first_usage = first_usage or out.usage
                        if params.n == 1:
                            produced += [t for d in out.deltas for t in d.token_ids]
                        if attempt > 0:  # counted as one request: its prompt, all its tokens
                            out = replace(out, request_id=request_id, usage=Usage(
                                len(prompt_token_ids), len(produced), first_usage.cached_prompt_tokens))
                        yield out
                        if out.finished:
                            return  # what follows is the end of the stream: nothing to fail over
                return
            except (RayActorError, ActorUnavailableError, EngineGaveUpError) as e:  # not one request's own failures
                if params.n > 1 or attempt == MAX_FAILOVERS or self.draining:
                    raise EngineDeadError(f"the model replica failed: {e}") from None
                self.failovers += 1
                logger.warning("request %s: its replica failed (%s); resuming on a sibling after %d tokens",
                               request_id, type(e).__name__, len(produced))

    async def _stream(self, request_id: str, attempt: int, prompt: list[int],
                      params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """One call to a replica; the engine's own errors come back as themselves."""
        stream = self.handle.options(stream=True).generate.remote(
            request_id=request_id if attempt == 0 else f"{request_id}-{attempt}",
            prompt_token_ids=prompt, params=params)
        self.streams[request_id] = stream
        ended = False
        try:
            async for out in stream:
                ended = out.finished  # the replica is done with it: closing early cancels nothing
                yield out
            ended = True
        except RayTaskError as e:
            raise _unwrapped(e) from None
        finally:
            if self.streams.pop(request_id, None) is not None and not ended:
                stream.cancel()  # the caller went away: abort the request on its replica

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

    async def prometheus_metrics(self) -> bytes:
        """One replica's series (each scrape may reach another; all carry its `replica`
        label). Prometheus scraping Ray's metrics agents sees every replica at once."""
        return await self.handle.prometheus_metrics.remote()

    @property
    def in_flight(self) -> int:
        return len(self.streams)

    def drain(self) -> None:
        self.draining = True

    def shutdown(self) -> None:
        for request_id in list(self.streams):
            asyncio.ensure_future(self.abort(request_id))
