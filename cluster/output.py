"""From sampled tokens to what each request's stream receives.

For every sequence that sampled a token this step, in order:
1. append the token;
2. decide whether the completion ends: EOS (unless ignore_eos), a stop token, max_tokens,
   or the context limit; a stop string found by the detokenizer also ends it, once
   min_tokens were generated (the sampler keeps EOS and stop tokens out until then);
3. detokenize incrementally (never a broken character, stop strings cut off), flushing the
   held-back text when the completion ends for another reason;
4. finish ended sequences at once, so their KV blocks are free for the next schedule;
then group the deltas per request, one `RequestOutput` per request that moved.
"""

import asyncio
import time
from dataclasses import dataclass, field

from actors.step_io import SampledToken
from cluster.detokenizer import IncrementalDetokenizer
from cluster.engine_client import CompletionDelta, RequestOutput, TokenLogprob, Usage
from cluster.metrics import EngineMetrics
from cluster.scheduler import Scheduler
from cluster.sequence import SeqStatus, Sequence


@dataclass
class RequestState:
    """One request: its n sequences, their detokenizers and the stream it feeds."""

    request_id: str
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer | None]
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    resumes: int = 0  # worker failures it lived through
    paused_at: float | None = None  # interrupted (failure or re-layout) and not yet moving again

    @property
    def finished(self) -> bool:
        return all(s.is_finished for s in self.seqs)

    @property
    def on_workers(self) -> bool:
        """Some of its sequences hold KV on the workers (they would lose it with them)."""
        return any(s.status is SeqStatus.RUNNING for s in self.seqs)

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=len(self.seqs[0].prompt_ids),
            completion_tokens=sum(len(s.output_ids) for s in self.seqs),
            cached_prompt_tokens=self.seqs[0].num_cached_prompt,
        )


class OutputProcessor:
    def __init__(self, *, eos_token_ids: frozenset[int], max_model_len: int, metrics: EngineMetrics):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.metrics = metrics

    def process(self, sampled: list[tuple[Sequence, SampledToken]], requests: dict[str, RequestState],
                scheduler: Scheduler) -> list[tuple[RequestState, RequestOutput]]:
        """Append, stop, detokenize and finish; finished requests leave `requests`."""
        now = time.monotonic()
        deltas: dict[str, list[CompletionDelta]] = {}
        for seq, token in sampled:
            state = requests[seq.request_id]
            seq.output_ids.append(token.token_id)
            self._record_token(state, seq, now)
            delta = self._delta(seq, token, state.detokenizers[seq.index])
            if delta.finish_reason is not None:
                scheduler.finish(seq, delta.finish_reason)
            deltas.setdefault(seq.request_id, []).append(delta)
        self.metrics.tokens_sampled(len(sampled))
        outputs = []
        for request_id, request_deltas in deltas.items():
            state = requests[request_id]
            finished = state.finished
            if finished:
                del requests[request_id]
                usage = state.usage()
                self.metrics.request_finished(state.arrival, now, usage.prompt_tokens, usage.completion_tokens,
                                              [s.finish_reason for s in state.seqs])
            outputs.append((state, RequestOutput(request_id, request_deltas, finished, state.usage())))
        return outputs

    def _record_token(self, state: RequestState, seq: Sequence, now: float) -> None:
        if state.paused_at is not None:
            self.metrics.resume_waited(now - state.paused_at)
            state.paused_at = None
        if state.first_token_at is None:
            state.first_token_at = now
            self.metrics.first_token(state.arrival, seq.admitted_at, len(seq.prompt_ids), now)
        elif seq.last_token_at is not None:
            self.metrics.next_token(now - seq.last_token_at)
        seq.last_token_at = now

    def _stop_reason(self, seq: Sequence, token_id: int) -> str | None:
        p = seq.params
        if (token_id in self.eos_token_ids and not p.ignore_eos) or token_id in p.stop_token_ids:
            return "stop"
        if len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _delta(self, seq: Sequence, token: SampledToken, detok: IncrementalDetokenizer | None) -> CompletionDelta:
        reason = self._stop_reason(seq, token.token_id)
        text = ""
        if detok is not None:
            text, hit_stop_string = detok.step([token.token_id],
                                               check_stop=len(seq.output_ids) >= seq.params.min_tokens)
            if hit_stop_string:
                reason = "stop"
            elif reason is not None:
                text += detok.flush()
        logprobs = None
        if token.logprob is not None:
            logprobs = [TokenLogprob(token.token_id, token.logprob, token.top_logprobs or {})]
        return CompletionDelta(seq.index, [token.token_id], text, logprobs, reason)
