"""The interface the HTTP layer depends on, and what flows through it, so the server can be
tested with a fake engine.

`cluster.engine.Engine` implements it over real TP x PP workers; tests implement it with a
few lines that need no model. The engine streams one `RequestOutput` per step that produced
tokens, carrying only the new tokens (deltas), never the whole sequence.
"""

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from actors.sampling_params import SamplingParams
from actors.step_io import RankStats


class EngineDeadError(RuntimeError):
    """The engine's workers are gone or stuck; in-flight requests fail with this (HTTP 503)."""


class EngineGaveUpError(EngineDeadError):
    """Every rebuild of the engine's workers failed: its requests fail with this, and only
    another replica can serve them (the HTTP ingress moves them to a sibling)."""


class EngineOverloadedError(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class EngineLimits:
    """What one engine holds at most; a request that can never fit is refused (HTTP 400)."""

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


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: dict[int, float]  # the top-k alternatives (token id -> logprob), chosen one included


@dataclass(frozen=True)
class CompletionDelta:
    index: int  # which of the request's n completions
    token_ids: list[int]
    text: str  # the new text, never a broken UTF-8 sequence; stop strings cut off
    logprobs: list[TokenLogprob] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class RequestOutput:
    request_id: str
    deltas: list[CompletionDelta]
    finished: bool  # all n completions finished
    usage: Usage  # counts so far; final when finished


@dataclass(frozen=True)
class EngineStats:
    """Occupancy and health, for operators, the Serve health check and tests."""

    running: int
    waiting: int
    kv_blocks: int
    kv_blocks_free: int
    restarts: int  # worker rebuilds after a failure
    healthy: bool  # False while failed or rebuilding
    gave_up: bool  # every rebuild failed: only replacing the replica helps
    draining: bool
    worker_pids: list[int] = field(default_factory=list)  # mesh order; empty while down


class EngineClient(Protocol):
    model_name: str
    max_model_len: int
    vocab_size: int  # token ids run from 0 to vocab_size - 1
    tokenizer: Any  # a Hugging Face tokenizer (encode/decode/chat template), or None

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and stream its deltas until it finishes.

        Raises `ParamError` at once for a request that can never run (prompt longer than
        max_model_len); closing the iterator early aborts the request and frees its blocks.
        """
        ...

    async def abort(self, request_id: str) -> None: ...

    async def check_health(self) -> None:
        """Return when every worker answers; raise `EngineDeadError` otherwise."""
        ...

    async def stats(self) -> EngineStats: ...

    async def rank_stats(self) -> list[RankStats]:
        """Every rank's running totals (forward and all-reduce time, memory), mesh order."""
        ...

    async def prometheus_metrics(self) -> bytes:
        """The engine's and its ranks' metrics in Prometheus text format (`cluster.metrics`)."""
        ...

    def drain(self) -> None:
        """Refuse new requests from now on; running ones finish."""
        ...

    def shutdown(self) -> None:
        """Stop the workers; in-flight requests fail."""
        ...
