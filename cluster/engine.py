"""The engine: requests in, token deltas out. One per model replica.

    step() = fill the pipeline (schedule -> send) -> take back the oldest step -> process outputs -> deliver

`generate()` queues a request and streams its deltas; a background task calls `step()`
while there is work. With pp pipeline stages up to pp steps are in flight, one per stage,
on disjoint batches (`cluster.scheduler`): while the workers run them, the event loop
awaits their results, so scheduling and output processing of one batch overlap the
execution of the others, and the HTTP server on the same loop stays responsive. All
engine state is touched only from the event loop. Worker failures and re-layouts are
`cluster.worker_replacement`'s. A full waiting queue refuses new requests with
`EngineOverloadedError`.
"""

import asyncio
import contextvars
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from actors.sampling_params import ParamError, SamplingParams
from actors.step_io import RankStats, SeqStep, StepInput
from cluster.detokenizer import IncrementalDetokenizer
from cluster.engine_client import EngineDeadError, EngineLimits, EngineOverloadedError, EngineStats, RequestOutput
from cluster.executor import Executor
from cluster.in_flight import InFlight, StageTimes
from cluster.kv_blocks import BlockManager
from cluster.metrics import EngineMetrics, render_prometheus
from cluster.output import OutputProcessor, RequestState
from cluster.scheduler import ScheduledSeq, Scheduler
from cluster.sequence import Sequence
from cluster.worker_replacement import WorkerReplacement


def seed_for_completion(seed: int | None, index: int) -> int | None:
    """Completion i of a seeded request gets its own stream, the same every time."""
    return seed if seed is None or index == 0 else hash((seed, index)) & (2**62 - 1)


class Engine(WorkerReplacement):
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
        self.draining = False  # shutting down: finish what runs, take nothing new
        self._init_replacement(rebuild)
        self._use(executor, limits)

    def _use(self, executor: Executor, limits: EngineLimits) -> None:
        """Fresh KV bookkeeping and pipeline for a (new) set of workers."""
        self.executor = executor
        self.limits = limits
        self.max_model_len = limits.max_model_len
        self.blocks = BlockManager(executor.num_kv_blocks, limits.block_size, limits.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, limits.max_num_seqs, limits.max_num_batched_tokens,
                                   micro_batches=executor.num_stages)
        self.in_flight = InFlight(executor.num_stages, self.metrics)
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
        """One turn of the loop: fill the pipeline (schedule a batch and send it while a
        stage is free and a batch can be formed), then take back the oldest step in flight:
        its sampled tokens become deltas, each handed to its request's stream. Raises what
        the step raised."""
        self.in_flight.active(True)
        if self._relayout is None:  # a re-layout waits for the steps in flight and sends no more
            while self.in_flight.has_room() and (batch := self.scheduler.schedule()):
                self.in_flight.add(batch, self.executor.submit(self._step_input(batch)))
        if not self.in_flight:  # nothing fits right now (or no work): let the event loop run
            await asyncio.sleep(0.001)
            return []
        batch, result = await self.in_flight.pop_oldest()
        if self.dead is not None:
            return []  # a health check failed this batch while it ran; it will be recomputed
        sampled = self.scheduler.update(batch, result.tokens)
        delivered = self.output.process(sampled, self.requests, self.scheduler)
        self._record_scheduler_state()
        for state, out in delivered:
            state.queue.put_nowait(out)
        self.in_flight.active(self.has_work())
        return [out for _, out in delivered]

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self.in_flight)

    async def empty_step(self) -> None:
        """A step with no sequences through every stage: the control overhead of a step,
        for the benchmarks. Only while no request runs."""
        await self.executor.submit(StepInput(next(self._step_ids), []))

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
            if self._relayout is not None and not self.in_flight:
                await self._switch(self._relayout)
                continue
            if self.dead is not None:
                if self._rebuild is None or self.gave_up:
                    return
                await self._recover()
                continue
            if not self.has_work():
                self.in_flight.active(False)
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

    def stage_times(self) -> StageTimes:
        """Each pipeline stage's busy time and the engine's active time so far (a copy)."""
        return self.in_flight.times.copy()

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
        self.in_flight.steps.clear()  # their workers go now; nobody will await them
        self.executor.shutdown()

    def _ensure_loop(self) -> None:
        """Start the loop in a context of its own, not the request's that starts it: inside a
        Ray actor that context carries the request's task id, the parent of every worker call
        the loop makes, and Ray cancels a task's pending children with it (Serve cancels a
        request's call when its caller stops reading), which would kill steps in flight."""
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
