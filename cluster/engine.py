"""The engine: requests in, token deltas out. One per model replica.

    step() = schedule -> execute on the workers -> process outputs -> deliver

`generate()` queues a request and streams its deltas; a background task calls `step()`
while there is work, the blocking executor call in a thread so the event loop (and the HTTP
server on it) stays responsive. All engine state is touched only from the event loop.

Failure loses nothing. When a step fails (a worker died, or missed the step deadline) or a
health check finds a worker gone, the loop tears the workers (actors, placement groups)
down and builds new ones with `rebuild`, with backoff, while requests keep their place and
new ones queue. Each sequence then resumes from its prompt plus the tokens it produced,
recomputed as a prefill (the prefix cache shares what sequences have in common): its
stream goes on with the next token, none repeated, none missing, greedy or seeded tokens
those of an undisturbed run (the seeded draw is keyed by output index). A request fails
with `EngineDeadError` only past `max_resumes` interruptions, or when every rebuild fails
(`gave_up`: Serve replaces the replica); without `rebuild`, the engine stays down.
`relayout()` swaps the workers for another layout the same way, on purpose.
A full waiting queue refuses new requests with `EngineOverloadedError`.
"""

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any

from actors.sampling_params import ParamError, SamplingParams
from actors.step_io import RankStats, SeqStep, StepInput
from cluster.detokenizer import IncrementalDetokenizer
from cluster.engine_client import EngineDeadError, EngineGaveUpError, EngineOverloadedError, EngineStats, RequestOutput
from cluster.executor import Executor
from cluster.kv_blocks import BlockManager
from cluster.metrics import EngineMetrics, render_prometheus
from cluster.output import OutputProcessor, RequestState
from cluster.scheduler import ScheduledSeq, Scheduler
from cluster.sequence import Sequence


@dataclass(frozen=True)
class EngineLimits:
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    block_size: int
    enable_prefix_caching: bool = True
    max_waiting_requests: int = 256
    max_resumes: int = 3  # worker failures one request may live through

    def misfit(self, prompt_tokens: int, max_tokens: int, num_kv_blocks: int) -> str | None:
        """Why a request of this size can never run within these limits, or None."""
        if prompt_tokens + max_tokens > self.max_model_len:
            return f"prompt + max_tokens exceeds max_model_len={self.max_model_len}"
        if prompt_tokens + max_tokens > num_kv_blocks * self.block_size:
            return f"prompt + max_tokens exceeds the whole KV cache ({num_kv_blocks * self.block_size} tokens)"
        return None


# Rebuild attempts after a failure, and the pause before each (a node may be coming back).
REBUILD_BACKOFF_S = (0.0, 2.0, 5.0, 10.0, 30.0)
logger = logging.getLogger("tensorfleet.engine")


@dataclass
class _Relayout:
    """A swap of workers the loop is to make between two steps."""

    limits: EngineLimits
    build: Callable[[], Executor]
    done: asyncio.Future  # the seconds requests were paused, or why it failed


def seed_for_completion(seed: int | None, index: int) -> int | None:
    """Completion i of a seeded request gets its own stream, the same every time."""
    return seed if seed is None or index == 0 else hash((seed, index)) & (2**62 - 1)


class Engine:
    def __init__(self, executor: Executor, limits: EngineLimits, *, model_name: str, vocab_size: int,
                 tokenizer: Any = None, eos_token_ids: tuple[int, ...] = (),
                 rebuild: Callable[[], Executor] | None = None, replica: str = ""):
        self.model_name = model_name
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.metrics = EngineMetrics(model_name, replica)  # replica: its name among the model's
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._rebuild = rebuild  # builds workers like the current ones
        self._relayout: _Relayout | None = None  # a swap of workers the loop has yet to make
        self._switching = False  # the workers are being swapped: none to ask
        self.dead: EngineDeadError | None = None  # set while down: failed, healing, or given up
        self.gave_up = False  # every rebuild attempt failed: only replacing the replica helps
        self.restarts = 0
        self.draining = False  # shutting down: finish what runs, take nothing new
        self._use(executor, limits)

    def _use(self, executor: Executor, limits: EngineLimits) -> None:
        """Fresh KV bookkeeping for a (new) set of workers."""
        self.executor = executor
        self.limits = limits
        self.max_model_len = limits.max_model_len
        self.blocks = BlockManager(executor.num_kv_blocks, limits.block_size, limits.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, limits.max_num_seqs, limits.max_num_batched_tokens)
        self.output = OutputProcessor(eos_token_ids=self.eos_token_ids, max_model_len=limits.max_model_len,
                                      metrics=self.metrics)

    # -- requests ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestState:
        if self.gave_up or (self.dead is not None and self._rebuild is None):
            raise EngineDeadError(f"engine is down: {self.dead}")
        if self.draining:
            raise EngineDeadError("the server is shutting down and takes no new requests")
        if request_id in self.requests:
            raise ParamError("request_id", f"{request_id!r} is already running")
        params.validate(self.max_model_len, len(prompt_ids))
        params.check_token_ids(self.vocab_size)
        if len(self.scheduler.waiting) + params.n > self.limits.max_waiting_requests:
            self.metrics.rejected_request("overloaded")
            raise EngineOverloadedError(
                f"{len(self.scheduler.waiting)} requests are waiting (limit {self.limits.max_waiting_requests}); retry later")
        if (why := self.limits.misfit(len(prompt_ids), params.max_tokens, self.blocks.num_blocks)) is not None:
            raise ParamError("max_tokens", why)
        if params.stop and self.tokenizer is None:
            raise ParamError("stop", "stop strings need a tokenizer; this engine has none")
        if params.grammar is not None and self.executor.spec.vocabulary.tokenizer_json is None:
            raise ParamError("grammar", "structured outputs need the tokenizer on the workers; this replica's have none")
        seqs, detoks = [], []
        for i in range(params.n):
            seq_params = replace(params, seed=seed_for_completion(params.seed, i))
            seqs.append(Sequence(next(self._seq_ids), request_id, i, list(prompt_ids), seq_params))
            detoks.append(
                IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens, stop=params.stop)
                if self.tokenizer is not None else None
            )
        state = RequestState(request_id, seqs, detoks)
        self.requests[request_id] = state
        for seq in seqs:
            self.scheduler.add(seq)
        return state

    def abort_request(self, request_id: str, reason: str = "abort") -> None:
        state = self.requests.pop(request_id, None)
        if state is not None:
            for seq in state.seqs:
                if not seq.is_finished:
                    self.metrics.completion_ended(reason)
                self.scheduler.finish(seq, reason)

    def _fail_request(self, state: RequestState, error: EngineDeadError) -> None:
        state.queue.put_nowait(error)
        self.abort_request(state.request_id, reason="error")

    # -- the step ------------------------------------------------------------------------

    async def step(self) -> list[RequestOutput]:
        """One step: schedule a batch, run it on the workers, turn the sampled tokens into
        deltas and hand each to its request's stream. Raises what the executor raises."""
        batch = self.scheduler.schedule()
        if not batch:  # nothing fits right now (or no work): let the event loop run
            await asyncio.sleep(0.001)
            return []
        result = await asyncio.to_thread(self.executor.execute, self._step_input(batch))
        if self.dead is not None:
            return []  # a health check failed this batch while it ran; it will be recomputed
        sampled = self.scheduler.update(batch, result.tokens)
        delivered = self.output.process(sampled, self.requests, self.scheduler)
        self._record_scheduler_state()
        for state, out in delivered:
            state.queue.put_nowait(out)
        return [out for _, out in delivered]

    def empty_step(self) -> None:
        """A step with no sequences through every worker: the control overhead of a step,
        for the benchmarks. Only while no request runs."""
        self.executor.execute(StepInput(next(self._step_ids), []))

    def _step_input(self, batch: list[ScheduledSeq]) -> StepInput:
        seqs = []
        for s in batch:
            seq = s.seq
            ids = seq.blocks.block_ids
            seqs.append(SeqStep(
                seq_id=seq.seq_id,
                token_ids=seq.tokens[seq.num_computed : seq.num_computed + s.num_tokens],
                start_pos=seq.num_computed,
                new_blocks=ids[seq.blocks_sent :],
                sample=seq.num_computed + s.num_tokens == seq.num_tokens,
                params=seq.params if seq.needs_params else None,
                output_index=len(seq.output_ids),
                prefix_ids=seq.tokens[: seq.num_computed] if seq.needs_params and seq.params.needs_history else [],
            ))
            seq.blocks_sent = len(ids)
            seq.needs_params = False
        return StepInput(next(self._step_ids), seqs, self.scheduler.take_released())

    def _record_scheduler_state(self) -> None:
        s, b = self.scheduler, self.blocks
        self.metrics.scheduler_state(len(s.running), len(s.waiting), b.usage(), s.stats.preemptions,
                                     s.stats.prefix_queried_tokens, s.stats.prefix_hit_tokens)

    async def _run(self) -> None:
        while True:
            if self._relayout is not None:
                await self._switch(self._relayout)
                continue
            if self.dead is not None:
                if self._rebuild is None or self.gave_up:
                    return
                await self._recover()
                continue
            if not self.scheduler.has_work():
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.step()
            except Exception as e:  # a dead or stuck worker: rebuild, then resume
                self._fail(EngineDeadError(f"a model worker failed: {e}"))

    # -- async API -----------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> AsyncIterator[RequestOutput]:
        state = self.add_request(request_id, prompt_token_ids, params)
        self._ensure_loop()
        self._wake.set()
        try:
            while True:
                out = await state.queue.get()
                if isinstance(out, Exception):
                    raise out
                yield out
                if out.finished:
                    return
        finally:
            if request_id in self.requests:  # the consumer went away early: free everything
                self.abort_request(request_id)

    async def abort(self, request_id: str) -> None:
        self.abort_request(request_id)

    async def check_health(self) -> None:
        """Raise `EngineDeadError` while the engine is down; a worker that does not answer
        starts the recovery. While a re-layout swaps the workers there are none to ask."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is down: {self.dead}")
        if self.draining:
            raise EngineDeadError("the server is shutting down")
        executor = self.executor
        if self._switching:
            return
        try:
            await asyncio.to_thread(executor.check_health)
        except EngineDeadError as e:
            if executor is not self.executor or self._switching:
                return  # those workers were retired while we asked
            self._fail(EngineDeadError(f"health check: {e}"))
            raise

    async def stats(self) -> EngineStats:
        pids: list[int] = []
        if self.dead is None and not self._switching:
            try:
                pids = await asyncio.to_thread(self.executor.worker_pids)
            except Exception:  # noqa: BLE001 - a worker just died; the health check will notice
                pids = []
        return EngineStats(
            running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
            kv_blocks=self.blocks.num_blocks, kv_blocks_free=self.blocks.num_free, restarts=self.restarts,
            healthy=self.dead is None, gave_up=self.gave_up, draining=self.draining, worker_pids=pids,
        )

    async def rank_stats(self) -> list[RankStats]:
        return await asyncio.to_thread(self.executor.rank_stats)

    async def prometheus_metrics(self) -> bytes:
        ranks: list[RankStats] = []
        if self.dead is None:
            try:
                ranks = await self.rank_stats()
            except Exception:  # noqa: BLE001 - a worker just died: the engine's own series still count
                ranks = []
        return render_prometheus(self.metrics, ranks)

    def drain(self) -> None:
        self.draining = True

    def shutdown(self) -> None:
        """Stop the workers; in-flight requests fail."""
        if self._loop_task is not None:
            self._loop_task.cancel()
        error = EngineDeadError("the engine was shut down")
        if self._relayout is not None and not self._relayout.done.done():
            self._relayout.done.set_exception(error)
        self._fail_all(error)
        self.gave_up = True
        self.executor.shutdown()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    # -- new workers: after a failure, or for another layout -----------------------------

    async def relayout(self, limits: EngineLimits, build: Callable[[], Executor]) -> float:
        """Swap the workers for those `build` makes (another layout, other sizes) without
        failing a request: the loop pauses after the step in flight, the old workers go,
        the new ones load, every request resumes on them; returns the seconds of the pause.
        The old workers are gone before `build` runs, so the caller checks first that it
        can succeed; if it fails all the same, the old layout is rebuilt as after a worker
        failure and the error is raised."""
        if self.gave_up or self._rebuild is None:
            raise EngineDeadError(f"engine is down: {self.dead}" if self.dead
                                  else "this engine cannot rebuild its workers")
        if self._relayout is not None:
            raise RuntimeError("a re-layout is already under way")
        self._relayout = _Relayout(limits, build, asyncio.get_running_loop().create_future())
        self._ensure_loop()
        self._wake.set()
        return await asyncio.shield(self._relayout.done)  # a caller that goes away stops nothing

    async def _switch(self, relayout: _Relayout) -> None:
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
        """Tear the old workers down and build new ones, with backoff, and resume every
        request on them; give up (and let Serve replace the replica) when every attempt
        fails, failing what is left."""
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
