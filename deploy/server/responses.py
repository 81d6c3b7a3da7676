"""OpenAI-compatible response bodies (pydantic): the same models serve full responses and
stream chunks. Optional fields OpenAI omits (a chat delta's role, tool calls) are left out
of the JSON when empty."""

import time
from collections.abc import Callable
from typing import Literal

from pydantic import BaseModel, Field

from cluster.engine_client import TokenLogprob, Usage

TokenText = Callable[[int], str]


def now() -> int:
    return int(time.time())


def _omitted_if_none(default=None):
    return Field(default, exclude_if=lambda v: v is None)


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: dict[str, int]

    @classmethod
    def from_engine(cls, usage: Usage) -> "UsageInfo":
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens,
            prompt_tokens_details={"cached_tokens": usage.cached_prompt_tokens},
        )


def _top(logprob: TokenLogprob, k: int) -> list[tuple[int, float]]:
    return sorted(logprob.top.items(), key=lambda item: -item[1])[:k]


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]

    @classmethod
    def from_engine(
        cls, logprobs: list[TokenLogprob], k: int, token_text: TokenText, offset: int
    ) -> "CompletionLogprobs":
        """`k` alternatives per token plus the chosen one; offsets count from `offset`."""
        out = cls(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
        for lp in logprobs:
            text = token_text(lp.token_id)
            out.tokens.append(text)
            out.token_logprobs.append(lp.logprob)
            top = {token_text(t): v for t, v in _top(lp, k)}
            out.top_logprobs.append(top | {text: lp.logprob})
            out.text_offset.append(offset)
            offset += len(text)
        return out


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]

    @classmethod
    def of(cls, token_id: int, logprob: float, token_text: TokenText) -> "ChatTopLogprob":
        text = token_text(token_id)
        return cls(token=text, logprob=logprob, bytes=list(text.encode()))


class ChatTokenLogprob(ChatTopLogprob):
    top_logprobs: list[ChatTopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]

    @classmethod
    def from_engine(cls, logprobs: list[TokenLogprob], k: int, token_text: TokenText) -> "ChatLogprobs":
        content = []
        for lp in logprobs:
            chosen = ChatTopLogprob.of(lp.token_id, lp.logprob, token_text)
            top = [ChatTopLogprob.of(t, v, token_text) for t, v in _top(lp, k)]
            content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
        return cls(content=content)


class FunctionCall(BaseModel):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionCallDelta(BaseModel):
    name: str | None = _omitted_if_none()
    arguments: str = ""


class ToolCallDelta(BaseModel):
    """A streamed piece of a tool call: the first carries id, type and name, the rest
    fragments of the arguments."""

    index: int
    id: str | None = _omitted_if_none()
    type: Literal["function"] | None = _omitted_if_none()
    function: FunctionCallDelta


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = _omitted_if_none()


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = _omitted_if_none()
    content: str | None = _omitted_if_none()
    tool_calls: list[ToolCallDelta] | None = _omitted_if_none()


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None
