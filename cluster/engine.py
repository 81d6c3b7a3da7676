"""The engine: requests in, token deltas out. One per model replica.

    step() = schedule -> execute on the workers -> process outputs -> deliver

`generate()` queues a request and streams its deltas; a background task calls `step()`
while there is work, the blocking executor call in a thread so the event loop (and the HTTP
server on it) stays responsive. All engine state is touched only from the event loop.

Failure: when a step fails (a worker died, or missed the step deadline) or a health check
finds a worker gone, every in-flight request gets `EngineDeadError` at once, new requests
are refused with it while the engine heals, and the loop tears the workers (actors,
placement groups) down and builds new ones with `rebuild`. Without `rebuild` the engine
stays down. A full waiting queue refuses new requests with `EngineOverloadedError`.
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
from cluster.engine_client import (
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    RequestOutput,
)
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


# Rebuild attempts after a failure, and the pause before each (a node may be coming back).
REBUILD_BACKOFF_S = (0.0, 2.0, 5.0, 10.0, 30.0)
logger = logging.getLogger("tensorfleet.engine")


def seed_for_completion(seed: int | None, index: int) -> int | None:
    """Completion i of a seeded request gets its own stream, the same every time."""
    return seed if seed is None or index == 0 else hash((seed, index)) & (2**62 - 1)


class Engine:
    def __init__(self, executor: Executor, limits: EngineLimits, *, model_name: str, vocab_size: int,
                 tokenizer: Any = None, eos_token_ids: tuple[int, ...] = (),
                 rebuild: Callable[[], Executor] | None = None):
        self.limits = limits
        self.model_name = model_name
        self.max_model_len = limits.max_model_len
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.metrics = EngineMetrics(model_name)
        self.output = OutputProcessor(eos_token_ids=frozenset(eos_token_ids), max_model_len=limits.max_model_len,
                                      metrics=self.metrics)
        self.requests: dict[str, RequestState] = {}
        self._seq_ids = itertools.count()
        self._step_ids = itertools.count()
        self._wake: asyncio.Event | None = None
        self._loop_task: asyncio.Task | None = None
        self._rebuild = rebuild
        self.dead: EngineDeadError | None = None  # set while down: failed, healing, or given up
        self.gave_up = False  # every rebuild attempt failed: only replacing the replica helps
        self.restarts = 0
        self.draining = False  # shutting down: finish what runs, take nothing new
        self._use(executor)

    def _use(self, executor: Executor) -> None:
        """Fresh KV bookkeeping for a (new) set of workers."""
        self.executor = executor
        self.blocks = BlockManager(executor.num_kv_blocks, self.limits.block_size, self.limits.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, self.limits.max_num_seqs, self.limits.max_num_batched_tokens)

    # -- requests ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestState:
        if self.dead is not None:
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
        capacity = self.blocks.num_blocks * self.limits.block_size
        if len(prompt_ids) + params.max_tokens > capacity:
            raise ParamError("max_tokens", f"prompt + max_tokens exceeds the whole KV cache ({capacity} tokens)")
        if params.stop and self.tokenizer is None:
            raise ParamError("stop", "stop strings need a tokenizer; this engine has none")
        if params.grammar is not None and self.executor.spec.tokenizer_json is None:
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
            return []  # a health check failed this batch while it ran
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
            except Exception as e:  # a dead or stuck worker: fail every request, clearly
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
        starts the recovery."""
        if self.dead is not None:
            raise EngineDeadError(f"engine is down: {self.dead}")
        if self.draining:
            raise EngineDeadError("the server is shutting down")
        try:
            await asyncio.to_thread(self.executor.check_health)
        except EngineDeadError as e:
            self._fail(EngineDeadError(f"health check: {e}"))
            raise

    async def stats(self) -> EngineStats:
        pids: list[int] = []
        if self.dead is None:
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
        self._fail_all(EngineDeadError("the engine was shut down"))
        self.gave_up = True
        self.executor.shutdown()

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    # -- failure -------------------------------------------------------------------------

    def _fail(self, error: EngineDeadError) -> None:
        """Fail everything in flight now; the loop then rebuilds the workers."""
        if self.dead is not None:
            return
        logger.error("%s; failing %d requests and rebuilding the workers", error, len(self.requests))
        self._fail_all(error)
        self._ensure_loop()
        self._wake.set()

    def _fail_all(self, error: EngineDeadError) -> None:
        self.dead = error
        for request_id, state in list(self.requests.items()):
            state.queue.put_nowait(error)
            self.abort_request(request_id, reason="error")

    async def _recover(self) -> None:
        """Tear the old workers down and build new ones, with backoff; give up (and let
        Serve replace the replica) when every attempt fails."""
        await asyncio.to_thread(self.executor.shutdown)
        for pause in REBUILD_BACKOFF_S:
            await asyncio.sleep(pause)
            start = time.perf_counter()
            try:
                executor = await asyncio.to_thread(self._rebuild)
            except Exception as e:
                logger.error("rebuilding the workers failed: %s", e)
                continue
            self._use(executor)
            self.restarts += 1
            self.metrics.replica_restarted()
            logger.warning("workers rebuilt in %.1fs; serving again", time.perf_counter() - start)
            self.dead = None
            return
        self.gave_up = True
