"""Per-request sampling parameters: what the engine needs to pick and stop tokens.

Internal data (a dataclass) that travels from the HTTP layer through the engine to the
sampling worker, so it imports nothing of tensorfleet. The HTTP layer validates user input
with pydantic first and builds one of these; `validate()` repeats the range checks so a
direct engine user gets the same clear errors, each naming the parameter.
"""

import math
from dataclasses import dataclass

# Completions per request, as OpenAI allows: more would build n of everything before the
# engine could refuse the request for lack of room.
MAX_N = 128
# OpenAI's bounds: a bias of +-100 bans or forces a token; at most 300 biased tokens.
MAX_LOGIT_BIAS = 100.0
MAX_LOGIT_BIAS_TOKENS = 300


class ParamError(ValueError):
    """A request parameter is out of range; `param` names it (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param
        self.message = message


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0  # keep tokens with p >= min_p * p_max (0 disables)
    seed: int | None = None  # per request: same tokens whatever the batch-mates
    n: int = 1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS, stop tokens and stop strings are ignored before this many tokens
    logprobs: int | None = None  # top-k logprobs returned with each chosen token
    skip_special_tokens: bool = True
    # OpenAI's penalties subtract from a token's logit, over the tokens generated so far:
    # frequency_penalty * count + presence_penalty * (count > 0).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # Hugging Face's, over prompt and generated tokens: a logit l of a token seen anywhere
    # becomes l / r if l > 0, else l * r (1 disables).
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    grammar: str | None = None  # an llguidance grammar the output must follow (actors.grammar)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_history(self) -> bool:
        """The sampling rank must know every token of the sequence, not just the new ones."""
        return self.has_penalties or self.grammar is not None

    def validate(self, max_model_len: int, prompt_len: int) -> None:
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ParamError(name, f"must be a finite number, got {getattr(self, name)}")
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
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ParamError("min_tokens", f"must be between 0 and max_tokens ({self.max_tokens}), got {self.min_tokens}")
        if self.temperature < 0:
            raise ParamError("temperature", f"must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ParamError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ParamError("top_k", f"must be -1, 0 (disabled) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ParamError("min_p", f"must be in [0, 1], got {self.min_p}")
        if not 1 <= self.n <= MAX_N:
            raise ParamError("n", f"must be between 1 and {MAX_N}, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ParamError("logprobs", f"must be between 0 and 20, got {self.logprobs}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ParamError(name, f"must be between -2 and 2, got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ParamError("repetition_penalty", f"must be > 0 (1 disables it), got {self.repetition_penalty}")
        self._validate_logit_bias()

    def _validate_logit_bias(self) -> None:
        if len(self.logit_bias) > MAX_LOGIT_BIAS_TOKENS:
            raise ParamError("logit_bias", f"at most {MAX_LOGIT_BIAS_TOKENS} tokens, got {len(self.logit_bias)}")
        for token, bias in self.logit_bias:
            if not (math.isfinite(bias) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS):
                raise ParamError("logit_bias", f"biases must be between -100 and 100, got {bias} for token {token}")

    def check_token_ids(self, vocab_size: int) -> None:
        """Token ids the request names must exist in the model's vocabulary."""
        for param, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", [t for t, _ in self.logit_bias])):
            if bad := [t for t in ids if not 0 <= t < vocab_size]:
                raise ParamError(param, f"token ids must be in [0, {vocab_size}); got {bad[:5]}")
