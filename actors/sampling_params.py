"""Per-request sampling parameters: what the engine needs to pick and stop tokens.

Internal data (a dataclass) that travels from the HTTP layer through the engine to the
sampling worker, so it imports nothing of tensorfleet. The HTTP layer validates user input
with pydantic first and builds one of these; `validate()` repeats the range checks so a
direct engine user gets the same clear errors, each naming the parameter.
"""

from dataclasses import dataclass

# Completions per request, as OpenAI allows: more would build n of everything before the
# engine could refuse the request for lack of room.
MAX_N = 128


class ParamError(ValueError):
    """A request parameter is out of range; `param` names it (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message

    def __reduce__(self):  # raised in a model replica, re-raised by the HTTP ingress
        return ParamError, (self.param, self.message)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    seed: int | None = None  # per request: same tokens whatever the batch-mates
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs returned with each chosen token
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, max_model_len: int, prompt_len: int) -> None:
        if self.max_tokens < 1:
            raise ParamError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        if prompt_len < 1:
            raise ParamError("prompt", "must contain at least one token")
        if prompt_len + self.max_tokens > max_model_len:
            raise ParamError(
                "max_tokens",
                f"prompt ({prompt_len} tokens) + max_tokens ({self.max_tokens}) exceeds "
                f"the model's context length max_model_len={max_model_len}",
            )
        if self.temperature < 0:
            raise ParamError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ParamError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ParamError("top_k", f"must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 1 <= self.n <= MAX_N:
            raise ParamError("n", f"must be between 1 and {MAX_N}, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ParamError("logprobs", f"must be between 0 and 20, got {self.logprobs}")
