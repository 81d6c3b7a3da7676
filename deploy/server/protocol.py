"""OpenAI-compatible request bodies (pydantic), and their mapping onto the engine's
`SamplingParams`; the response bodies are in `deploy.server.responses`.

Request models check types and shapes, refuse what this server does not implement (suffix,
best_of, non-text content parts) with a message naming the field, treat an explicit
`null` like an absent field, and refuse non-finite numbers (NaN, Infinity) anywhere in the
body. Ranges are checked once, by `SamplingParams.validate`, so a direct engine user gets
the same errors. Structured outputs (`response_format`, vLLM's `guided_*`) become one
llguidance grammar (`actors.grammar`); a schema or regex it refuses is a 400 naming the field.
"""

import json
import math
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, Field, model_validator

from actors import grammar
from actors.sampling_params import MAX_N, ParamError, SamplingParams

MAX_PROMPTS = MAX_N  # prompts in one /v1/completions request


def _non_finite(value: Any, path: str) -> str | None:
    """The path of the first NaN or infinity in a JSON value, or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        if (found := _non_finite(item, f"{path}.{key}" if path else str(key))) is not None:
            return found
    return None


def _prompts(value: Any) -> list[str | list[int]]:
    """One prompt or a batch, as OpenAI takes them: a string, token ids, or a list of either."""
    single = isinstance(value, str) or (isinstance(value, list) and bool(value) and _is_token_id(value[0]))
    prompts = [value] if single else value
    if not isinstance(prompts, list):
        raise ValueError("must be a string, a list of token ids, or a list of those")  # noqa: TRY004 - pydantic makes only ValueError a 400
    if not prompts:
        raise ValueError("must not be empty")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
    for i, p in enumerate(prompts):
        where = "" if single else f"prompt {i} "
        if isinstance(p, list) and all(_is_token_id(t) for t in p):
            if any(t < 0 for t in p):
                raise ValueError(f"{where}token ids must be >= 0")
        elif not isinstance(p, str):
            raise ValueError(f"{where}must be a string or a list of token ids")
        if not p:
            raise ValueError(f"{where}must not be empty")
    return prompts


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


# validated by `_prompts`; the union is what the OpenAPI schema advertises
Prompt = Annotated[str | list[int] | list[str | list[int]], BeforeValidator(_prompts)]
Stop = Annotated[list[str], BeforeValidator(_stop)]
Unsupported = Annotated[Any, _only((None, [], {}, ""), "not supported by this server")]


class _Request(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _normalize(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        if (path := _non_finite(data, "")) is not None:
            raise ParamError(path, "must be a finite number (NaN and Infinity are not JSON numbers)")
        return {k: v for k, v in data.items() if v is not None}


class StreamOptions(BaseModel):
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | bool = Field({}, alias="schema")  # {}: any JSON value
    strict: bool | None = None  # always enforced


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ParamError("response_format.json_schema", "is required when type is json_schema")
        return self


class _SamplingFields(_Request):
    """What completions and chat share; `_params` maps it onto SamplingParams."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (vLLM)
    min_p: float = 0.0  # extension (vLLM)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = []
    stop_token_ids: list[int] = []  # extension
    seed: int | None = None
    ignore_eos: bool = False  # extension
    min_tokens: int = 0  # extension (vLLM)
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # extension (vLLM)
    logit_bias: dict[str, float] = {}  # token id (as a string) -> bias in [-100, 100]
    response_format: ResponseFormat | None = None
    guided_json: dict[str, Any] | str | None = None  # extensions (vLLM): a JSON schema,
    guided_regex: str | None = None  # a regular expression,
    guided_choice: list[str] | None = None  # or exactly one of these strings

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> "_SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def output_grammar(self) -> tuple[str, str] | None:
        """(grammar, the field that asked for it) for a structured output, or None; a
        grammar llguidance refuses is a ParamError naming the field."""
        asked = [name for name in ("response_format", "guided_json", "guided_regex", "guided_choice")
                 if getattr(self, name) is not None and not (name == "response_format" and self.response_format.type == "text")]
        if len(asked) > 1:
            raise ParamError(asked[1], f"give only one of {', '.join(asked)}")
        if not asked:
            return None
        name = asked[0]
        if name == "guided_regex":
            return grammar.regex_grammar(self.guided_regex, name), name
        if name == "guided_choice":
            return grammar.choice_grammar(self.guided_choice, name), name
        if name == "guided_json":
            return grammar.json_schema_grammar(_json_value(self.guided_json, name), name), name
        if self.response_format.type == "json_object":
            return grammar.json_schema_grammar(grammar.ANY_JSON_OBJECT, name), name
        schema = self.response_format.json_schema.schema_
        return grammar.json_schema_grammar(schema, "response_format.json_schema.schema"), name

    def _params(self, max_tokens: int, logprobs: int | None, grammar: str | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            n=self.n,
            stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias=_logit_bias(self.logit_bias),
            grammar=grammar,
        )


def _json_value(value: dict | str, param: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ParamError(param, f"is not valid JSON: {exc}") from exc


def _logit_bias(bias: dict[str, float]) -> tuple[tuple[int, float], ...]:
    pairs = []
    for key, value in bias.items():
        if not key.strip().isdigit():
            raise ParamError("logit_bias", f"keys must be token ids, got {key!r}")
        pairs.append((int(key), value))
    return tuple(pairs)


class CompletionRequest(_SamplingFields):
    prompt: Prompt
    max_tokens: int = 16
    logprobs: int | None = None
    echo: bool = False  # prepend the prompt to each choice's text
    suffix: Unsupported = None
    best_of: Annotated[int, _only((1,), "best_of other than 1 is not supported; use n")] = 1

    @model_validator(mode="after")
    def _echo_without_logprobs(self) -> "CompletionRequest":
        if self.echo and self.logprobs is not None:
            raise ParamError("echo", "echo with logprobs needs the prompt's logprobs, which this server does not "
                                     "compute; drop one of them")
        return self

    def to_sampling_params(self, grammar: str | None) -> SamplingParams:
        return self._params(self.max_tokens, self.logprobs, grammar)


class FunctionName(BaseModel):
    name: str


class FunctionDefinition(BaseModel):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # arguments always follow the schema


class ChatTool(BaseModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


class AssistantFunctionCall(BaseModel):
    name: str
    arguments: str = "{}"


class AssistantToolCall(BaseModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: AssistantFunctionCall


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, BeforeValidator(_content)]
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @model_validator(mode="before")
    @classmethod
    def _calls_need_no_content(cls, data: Any) -> Any:
        """An assistant message that only made tool calls may leave content out (or null)."""
        if isinstance(data, dict) and data.get("role") == "assistant" and data.get("tool_calls") \
                and data.get("content") is None:
            return {**data, "content": ""}
        return data


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # default: whatever room max_model_len leaves
    max_completion_tokens: int | None = None  # newer name, wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ChatTool] = []
    tool_choice: ToolChoice | None = None  # default: auto with tools, none without
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_combinations(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "requires logprobs: true")
        names = [t.function.name for t in self.tools]
        if len(set(names)) < len(names):
            raise ParamError("tools", f"function names must be unique, got {names}")
        if isinstance(self.tool_choice, NamedToolChoice) and self.tool_choice.function.name not in names:
            raise ParamError("tool_choice", f"names the function {self.tool_choice.function.name!r}, which is not "
                                            f"among the tools ({', '.join(names) or 'none given'})")
        if self.tool_choice == "required" and not self.tools:
            raise ParamError("tool_choice", "'required' needs tools")
        return self

    @property
    def tool_mode(self) -> str | NamedToolChoice:
        """none, auto, required, or the named function to call."""
        return self.tool_choice or ("auto" if self.tools else "none")

    @property
    def max_tokens_field(self) -> str:
        return "max_tokens" if self.max_completion_tokens is None else "max_completion_tokens"

    def to_sampling_params(self, *, max_model_len: int, prompt_len: int, grammar: str | None) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is None:
            max_tokens = max_model_len - prompt_len
        return self._params(max_tokens, (self.top_logprobs or 0) if self.logprobs else None, grammar)


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
