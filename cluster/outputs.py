"""What the engine streams back for a request: one `RequestOutput` per step that produced
tokens, carrying only the new tokens (deltas), never the whole sequence."""

from dataclasses import dataclass


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
