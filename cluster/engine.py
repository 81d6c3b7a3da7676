"""The engine: requests in, token deltas out. One per model replica.

    step() = schedule -> executor.execute(one StepInput) -> postprocess

`generate()` queues a request and streams its deltas; a background task runs steps while
there is work, the blocking executor call in a thread so the event loop (and the HTTP
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
from dataclasses import dataclass, field, replace
from typing import Any

from actors.step_io import SeqStep, StepInput
from cluster.detokenizer import IncrementalDetokenizer
from cluster.engine_client import EngineDeadError, EngineOverloadedError
from cluster.executor import Executor
from cluster.kv_blocks import BlockManager
from cluster.metrics import EngineMetrics
from cluster.outputs import CompletionDelta, RequestOutput, TokenLogprob, Usage
from cluster.sampling_params import ParamError, SamplingParams
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


@dataclass
class RequestState:
    request_id: str
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.seqs[0].prompt_ids),
            completion_tokens=sum(len(s.output_ids) for s in self.seqs),
            cached_prompt_tokens=self.seqs[0].num_cached_prompt,
        )


def seed_for_completion(seed: int | None, index: int) -> int | None:
    """Completion i of a seeded request gets its own stream, the same every time."""
    return seed if seed is None or index == 0 else hash((seed, index)) & (2**62 - 1)


class Engine:
    def __init__(self, executor: Executor, limits: EngineLimits, *, model_name: str, tokenizer: Any = None,
                 eos_token_ids: tuple[int, ...] = (), rebuild: Callable[[], Executor] | None = None):
        self.limits = limits
        self.model_name = model_name
        self.max_model_len = limits.max_model_len
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.metrics = EngineMetrics(model_name)
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

    # -- the step ------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> RequestState:
        if self.dead is not None:
            raise EngineDeadError(f"engine is down: {self.dead}")
        if self.draining:
            raise EngineDeadError("the server is shutting down and takes no new requests")
        if request_id in self.requests:
            raise ParamError("request_id", f"{request_id!r} is already running")
        params.validate(self.max_model_len, len(prompt_ids))
        if len(self.scheduler.waiting) + params.n > self.limits.max_waiting_requests:
            self.metrics.rejected_request("overloaded")
            raise EngineOverloadedError(
                f"{len(self.scheduler.waiting)} requests are waiting (limit {self.limits.max_waiting_requests}); retry later")
        capacity = self.blocks.num_blocks * self.limits.block_size
        if len(prompt_ids) + params.max_tokens > capacity:
            raise ParamError("max_tokens", f"prompt + max_tokens exceeds the whole KV cache ({capacity} tokens)")
        if params.stop and self.tokenizer is None:
            raise ParamError("stop", "stop strings need a tokenizer; this engine has none")
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

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        step_input = self._step_input(scheduled)
        return [out for _, out in self._postprocess(scheduled, self.executor.execute(step_input).tokens)]

    def _record_scheduler_state(self) -> None:
        s, b = self.scheduler, self.blocks
        self.metrics.scheduler_state(len(s.running), len(s.waiting), b.usage(), s.stats.preemptions,
                                     b.stats.queried_tokens, b.stats.hit_tokens)

    def _step_input(self, scheduled: list[ScheduledSeq]) -> StepInput:
        seqs = []
        for s in scheduled:
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
            ))
            seq.blocks_sent = len(ids)
            seq.needs_params = False
        return StepInput(next(self._step_ids), seqs, self.scheduler.take_released())

    def _postprocess(self, scheduled: list[ScheduledSeq], tokens) -> list[tuple[RequestState, RequestOutput]]:
        sampled = iter(tokens)
        deltas: dict[str, list[CompletionDelta]] = {}
        now = time.monotonic()
        for s in scheduled:
            seq = s.seq
            seq.num_computed += s.num_tokens
            if seq.num_computed < seq.num_tokens:
                continue  # a prompt chunk: nothing sampled yet
            token = next(sampled)
            if seq.is_finished:
                continue  # aborted while the step ran
            seq.output_ids.append(token.token_id)
            self.blocks.register_full_blocks(seq.blocks, seq.tokens, seq.num_computed)
            self._record_token(seq, now)
            deltas.setdefault(seq.request_id, []).append(self._delta(seq, token))
        self.metrics.tokens_sampled(sum(len(ds) for ds in deltas.values()))
        outputs = []
        for request_id, ds in deltas.items():
            state = self.requests[request_id]
            finished = state.finished
            if finished:
                del self.requests[request_id]
                usage = state.usage()
                self.metrics.request_finished(state.arrival, now, usage.prompt_tokens, usage.completion_tokens,
                                              [s.finish_reason for s in state.seqs])
            outputs.append((state, RequestOutput(request_id, ds, finished, state.usage())))
        self._record_scheduler_state()
        return outputs

    def _record_token(self, seq: Sequence, now: float) -> None:
        state = self.requests[seq.request_id]
        if state.first_token_at is None:
            state.first_token_at = now
            self.metrics.first_token(state.arrival, seq.admitted_at, len(seq.prompt_ids), now)
        elif seq.last_token_at is not None:
            self.metrics.next_token(now - seq.last_token_at)
        seq.last_token_at = now

    def _delta(self, seq: Sequence, token) -> CompletionDelta:
        p = seq.params
        reason = None
        if (token.token_id in self.eos_token_ids and not p.ignore_eos) or token.token_id in p.stop_token_ids:
            reason = "stop"
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        text = ""
        detok = self.requests[seq.request_id].detokenizers[seq.index]
        if detok is not None:
            text, hit_stop = detok.step([token.token_id])
            if hit_stop:
                reason = "stop"
            elif reason is not None:
                text += detok.flush()
        if reason is not None:
            self.scheduler.finish(seq, reason)
        logprobs = None
        if token.logprob is not None:
            logprobs = [TokenLogprob(token.token_id, token.logprob, token.top_logprobs or {})]
        return CompletionDelta(seq.index, [token.token_id], text, logprobs, reason)

    # -- async API ---------------------------------------------------------------------

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
            scheduled = self.scheduler.schedule()
            if not scheduled:
                await asyncio.sleep(0.001)
                continue
            step_input = self._step_input(scheduled)
            try:
                result = await asyncio.to_thread(self.executor.execute, step_input)
            except Exception as e:  # a dead or stuck worker: fail every request, clearly
                self._fail(EngineDeadError(f"a model worker failed: {e}"))
                continue
            if self.dead is None:  # else a health check failed the batch while it ran
                for state, out in self._postprocess(scheduled, result.tokens):
                    state.queue.put_nowait(out)

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
