"""How an `Engine` replaces its workers without losing a request: after a failure, or for
another layout. The part of the engine that is not the step; `cluster.engine.Engine`
inherits it, and its loop calls `_recover` and `_switch` between steps.

Failure loses nothing. When a step fails (a worker died, or missed the step deadline) or a
health check finds a worker gone, the loop tears the workers (actors, placement groups)
down and builds new ones with `rebuild`, with backoff, while requests keep their place and
new ones queue. The steps in flight are dropped with the workers. Each sequence then
resumes from its prompt plus the tokens it produced, recomputed as a prefill (the prefix
cache shares what sequences have in common): its stream goes on with the next token, none
repeated, none missing, greedy or seeded tokens those of an undisturbed run (the seeded
draw is keyed by output index). A request fails with `EngineDeadError` only past
`max_resumes` interruptions, or when every rebuild fails (`gave_up`: Serve replaces the
replica); without `rebuild`, the engine stays down.

`relayout()` swaps the workers for another layout the same way, on purpose: the loop sends
no new step, lets those in flight return, and swaps.
"""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cluster.engine_client import EngineDeadError, EngineGaveUpError, EngineLimits
from cluster.executor import Executor

# Rebuild attempts after a failure, and the pause before each (a node may be coming back).
REBUILD_BACKOFF_S = (0.0, 2.0, 5.0, 10.0, 30.0)
logger = logging.getLogger("tensorfleet.engine")


@dataclass
class Relayout:
    """A swap of workers the loop is to make once no step is in flight."""

    limits: EngineLimits
    build: Callable[[], Executor]
    done: asyncio.Future  # the seconds requests were paused, or why it failed


class WorkerReplacement:
    """New workers for a running engine; every request resumes on them. Works on the
    engine's requests, scheduler, executor and steps in flight."""

    def _init_replacement(self, rebuild: Callable[[], Executor] | None) -> None:
        self._rebuild = rebuild  # builds workers like the current ones
        self._relayout: Relayout | None = None  # a swap of workers the loop has yet to make
        self._switching = False  # the workers are being swapped: none to ask
        self.dead: EngineDeadError | None = None  # set while down: failed, healing, or given up
        self.gave_up = False  # every rebuild attempt failed: only replacing the replica helps
        self.restarts = 0

    async def relayout(self, limits: EngineLimits, build: Callable[[], Executor]) -> float:
        """Swap the workers for those `build` makes (another layout, other sizes) without
        failing a request: the loop stops sending steps, lets those in flight return, the
        old workers go, the new ones load, every request resumes on them; returns the
        seconds of the pause. The old workers are gone before `build` runs, so the caller
        checks first that it can succeed; if it fails all the same, the old layout is
        rebuilt as after a worker failure and the error is raised."""
        if self.gave_up or self._rebuild is None:
            raise EngineDeadError(f"engine is down: {self.dead}" if self.dead
                                  else "this engine cannot rebuild its workers")
        if self._relayout is not None:
            raise RuntimeError("a re-layout is already under way")
        self._relayout = Relayout(limits, build, asyncio.get_running_loop().create_future())
        self._ensure_loop()
        self._wake.set()
        return await asyncio.shield(self._relayout.done)  # a caller that goes away stops nothing

    async def _switch(self, relayout: Relayout) -> None:
        start = time.monotonic()
        self._pause_requests(count_resume=False)
        self._switching = True
        try:
            await asyncio.to_thread(self.executor.shutdown)
            try:
                executor = await asyncio.to_thread(relayout.build)
            except Exception as e:  # noqa: BLE001 - reported to the caller; the old layout comes back
                logger.error("re-layout failed (%s); rebuilding the previous layout", e)
                self.dead = self.dead or EngineDeadError(f"re-layout failed: {e}")
                relayout.done.set_exception(e)
                return
        finally:
            self._switching = False
            self._relayout = None
        self._rebuild = relayout.build
        self.dead = None
        self._resume_on(executor, relayout.limits, cause="relayout")
        paused = time.monotonic() - start
        logger.warning("re-laid out in %.1fs; %d requests resumed", paused, len(self.requests))
        relayout.done.set_result(paused)

    def misfits(self, limits: EngineLimits, num_kv_blocks: int) -> dict[str, str]:
        """The requests held now that could not run within `limits` and `num_kv_blocks`:
        request id -> why."""
        return {rid: why for rid, state in self.requests.items()
                if (why := limits.misfit(len(state.seqs[0].prompt_ids), state.seqs[0].params.max_tokens,
                                         num_kv_blocks)) is not None}

    def _fail(self, error: EngineDeadError) -> None:
        """Workers failed: pause the requests (those interrupted too often fail); the loop
        rebuilds the workers and resumes them."""
        if self.dead is not None:
            return
        if self._rebuild is None:
            logger.error("%s; failing %d requests (no way to rebuild the workers)", error, len(self.requests))
            self._fail_all(error)
            return
        self.dead = error
        failed = self._pause_requests(count_resume=True, error=error)
        logger.error("%s; rebuilding the workers: %d requests will resume, %d failed (engine.max_resumes=%d)",
                     error, len(self.requests), failed, self.limits.max_resumes)
        self._ensure_loop()
        self._wake.set()

    def _pause_requests(self, *, count_resume: bool, error: EngineDeadError | None = None) -> int:
        """Mark the requests holding KV on the workers as interrupted; with `count_resume`,
        those already resumed `max_resumes` times fail instead. Returns how many failed."""
        now, failed = time.monotonic(), 0
        for state in list(self.requests.values()):
            if not state.on_workers:
                continue  # only waiting: it loses nothing
            if count_resume:
                if state.resumes >= self.limits.max_resumes:
                    self._fail_request(state, EngineDeadError(
                        f"{error}; this request was already resumed {state.resumes} times (engine.max_resumes)"))
                    failed += 1
                    continue
                state.resumes += 1
            if state.paused_at is None:
                state.paused_at = now
        return failed

    def _resume_on(self, executor: Executor, limits: EngineLimits, *, cause: str) -> None:
        """Adopt new workers: every unfinished sequence goes back to the queue (those that
        ran first, in their order) to be recomputed from its prompt and its tokens so far."""
        old = self.scheduler
        self._use(executor, limits)
        self.scheduler.adopt(old)
        for rid, why in self.misfits(limits, executor.num_kv_blocks).items():  # came in during the swap
            self._fail_request(self.requests[rid], EngineDeadError(f"the request does not fit the new layout: {why}"))
        self.metrics.requests_resumed(sum(s.paused_at is not None for s in self.requests.values()), cause)

    def _fail_all(self, error: EngineDeadError) -> None:
        self.dead = error
        for state in list(self.requests.values()):
            self._fail_request(state, error)

    async def _recover(self) -> None:
        """Drop the steps in flight, tear the old workers down and build new ones, with
        backoff, and resume every request on them; give up (and let Serve replace the
        replica) when every attempt fails, failing what is left."""
        self.in_flight.discard()
        await asyncio.to_thread(self.executor.shutdown)
        for pause in REBUILD_BACKOFF_S:
            await asyncio.sleep(pause)
            start = time.perf_counter()
            try:
                executor = await asyncio.to_thread(self._rebuild)
            except Exception as e:
                logger.error("rebuilding the workers failed: %s", e)
                continue
            self._resume_on(executor, self.limits, cause="failure")
            self.restarts += 1
            self.metrics.replica_restarted()
            logger.warning("workers rebuilt in %.1fs; %d requests resume", time.perf_counter() - start,
                           len(self.requests))
            self.dead = None
            return
        self.gave_up = True
        attempts = len(REBUILD_BACKOFF_S)
        self._fail_all(EngineGaveUpError(f"could not rebuild the workers ({attempts} attempts): {self.dead}"))
