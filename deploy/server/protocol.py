"""OpenAI-compatible request and response bodies (pydantic), and their mapping onto the
engine's `SamplingParams`.

Request models check types and shapes, refuse what this server does not implement (echo,
penalties, tools, ...) with a message naming the field, and treat an explicit `null` like an
absent field. Ranges are checked once, by `SamplingParams.validate`, so a direct engine user
gets the same errors.
"""

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, model_validator

from actors.sampling_params import ParamError, SamplingParams
from cluster.engine_client import TokenLogprob, Usage


def _prompt(value: Any) -> Any:
    if isinstance(value, list) and len(value) > 1 and all(isinstance(p, str) for p in value):
        raise ValueError("a batch of prompts is not supported; send one request per prompt")
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        value = value[0]
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if any(t < 0 for t in value):
            raise ValueError("token ids must be >= 0")
    elif not isinstance(value, str):
        raise ValueError("must be a string, a list of token ids, or a list holding one string")
    if not value:
        raise ValueError("must not be empty")
    return value


def _stop(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _content(value: Any) -> Any:
    """A list of content parts becomes one string; only text parts are supported."""
    if not isinstance(value, list):
        return value
    for part in value:
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise ValueError("only text content parts ({'type': 'text', 'text': '...'}) are supported")
    return "\n".join(part["text"] for part in value)


def _only(accepted: tuple, message: str) -> AfterValidator:
    def check(value: Any) -> Any:
        if value not in accepted:
            raise ValueError(message)
        return value

    return AfterValidator(check)


Prompt = Annotated[str | list[int], BeforeValidator(_prompt)]
Stop = Annotated[list[str], BeforeValidator(_stop)]
Penalty = Annotated[float, _only((0,), "penalties are not supported by this server; only 0 is accepted")]
Unsupported = Annotated[Any, _only((None, [], {}, ""), "not supported by this server")]


class _Request(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingFields(_Request):
    """What completions and chat share; `_params` maps it onto SamplingParams."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (vLLM)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = []
    stop_token_ids: list[int] = []  # extension
    seed: int | None = None
    ignore_eos: bool = False  # extension
    user: str | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: Unsupported = None

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            n=self.n,
            stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int = 16
    logprobs: int | None = None
    echo: Annotated[bool, _only((False,), "echo is not supported by this server")] = False
    suffix: Unsupported = None
    best_of: Annotated[int, _only((1,), "best_of other than 1 is not supported; use n")] = 1

    def to_sampling_params(self) -> SamplingParams:
        return self._params(self.max_tokens, self.logprobs)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, BeforeValidator(_content)]
    name: str | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # default: whatever room max_model_len leaves
    max_completion_tokens: int | None = None  # newer name, wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: Unsupported = None
    tool_choice: Unsupported = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _check_combinations(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "requires logprobs: true")
        if self.response_format not in (None, {"type": "text"}):
            raise ParamError("response_format", "only {'type': 'text'} is supported")
        return self

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def to_sampling_params(self, *, max_model_len: int, prompt_len: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is None:
            max_tokens = max_model_len - prompt_len
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None)


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses: the same models serve full responses and stream chunks ----

TokenText = Callable[[int], str]


def now() -> int:
    return int(time.time())


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


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


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
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


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
