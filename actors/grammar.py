"""Grammars that constrain what a sequence may generate (structured outputs), on llguidance.

The HTTP layer turns a request's `response_format`, `guided_*` or forced tool call into an
llguidance grammar string (the builders below) and checks it (`check`: a bad schema or
regex is a 400 naming the field). The string travels in `SamplingParams.grammar`; the
sampling rank compiles it into a matcher per sequence (`GrammarVocabulary.matcher`),
feeds it every generated token and fills a bitmask of the tokens allowed next
(`fill_bitmasks`: 1 bit per token, int32 words, bit t % 32 of word t // 32).

Why llguidance (measured against xgrammar 0.2.8 on SmolLM2's 49,152-token vocabulary,
README "Structured outputs"): both compile a JSON schema in a few ms and compute a mask in
microseconds on CPU; llguidance builds its matchers lazily, reports schema errors as plain
sentences, and installs as one wheel with no dependencies (xgrammar pulls triton and a
tvm runtime, a GPU compiler with no use on CPU).

JSON is generated in one fixed style, `{"a": 1, "b": [2, 3]}`: no free whitespace, so a
model cannot stall in endless newlines, and the style the tool-call parser expects.
"""

import copy
import json
from typing import Any

import llguidance
import torch

from actors.sampling_params import ParamError

JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_JSON_OBJECT = {"type": "object"}


def json_schema_grammar(schema: dict[str, Any] | bool, param: str) -> str:
    """JSON Schema's boolean schemas too: `true` is any value (as `{}`); `false` accepts
    none, so nothing could ever be generated."""
    if schema is False:
        raise ParamError(param, "the schema false accepts no JSON value, so no output could match it")
    if not isinstance(schema, (dict, bool)):
        raise ParamError(param, "a JSON schema must be an object")
    try:
        built = llguidance.LLMatcher.grammar_from_json_schema(_as_json({} if schema is True else schema, param), defaults=JSON_STYLE)
    except ValueError as e:  # what llguidance cannot even build is the request's error, as what it rejects
        raise ParamError(param, f"invalid: {e}") from None
    return check(built, param)


def regex_grammar(pattern: str, param: str) -> str:
    return check(llguidance.LLMatcher.grammar_from_regex(pattern), param)


def choice_grammar(choices: list[str], param: str) -> str:
    """Exactly one of `choices`, character for character."""
    if not choices:
        raise ParamError(param, "must list at least one choice")
    return lark_grammar("start: " + " | ".join(json.dumps(c) for c in choices), param)


def lark_grammar(lark: str, param: str) -> str:
    return check(llguidance.LLMatcher.grammar_from_lark(lark), param)


def json_in_lark(schema: dict[str, Any] | bool, param: str) -> str:
    """A Lark rule body matching one JSON value of `schema`, in the house JSON style."""
    styled = {**schema, "x-guidance": JSON_STYLE} if isinstance(schema, dict) else schema
    return "%json " + _as_json(styled, param)


def check(grammar: str, param: str) -> str:
    """`grammar` if llguidance accepts it; otherwise a ParamError naming `param`."""
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ParamError(param, f"invalid: {messages[0].strip()}")
    return grammar


def _as_json(value: Any, param: str) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParamError(param, f"must be plain JSON: {exc}") from exc


def tokenizer_json(tokenizer: Any) -> str | None:
    """A Hugging Face fast tokenizer as the JSON llguidance reads (None for a slow one),
    for `SamplerVocabulary.tokenizer_json`."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    backend = copy.copy(backend)  # what llguidance.hf does: no padding or truncation in the JSON
    backend.no_padding()
    backend.no_truncation()
    return backend.to_str()


class GrammarVocabulary:
    """The tokenizer as llguidance sees it: every token's bytes, and the EOS tokens a
    finished grammar allows. Built once per sampling rank (~1 s for 49k tokens)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: tuple[int, ...]):
        self.vocab_size = vocab_size
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                eos_token=list(eos_token_ids) or None)
        self.executor = llguidance.LLExecutor()

    def matcher(self, grammar: str) -> llguidance.LLMatcher:
        """A fresh matcher at the grammar's start. It never raises: a grammar that fails
        here (or a token it refuses) leaves it in an error state that allows only EOS."""
        return llguidance.LLMatcher(self.tokenizer, grammar)

    def bitmask(self, rows: int) -> torch.Tensor:
        """[rows, ceil(vocab / 32)] int32, every token allowed."""
        return torch.full((rows, (self.vocab_size + 31) // 32), -1, dtype=torch.int32)

    def fill_bitmasks(self, matchers: list[tuple[llguidance.LLMatcher, int]], bitmask: torch.Tensor) -> None:
        """Row `i` of `bitmask` gets the tokens its matcher allows next, for every
        (matcher, i); the matchers run in parallel threads, without the GIL. (What
        llguidance.torch.fill_next_token_bitmask_par does; that module is not imported,
        since it imports torch.compile's machinery, seconds of start-up in every worker.)"""
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and bitmask.device.type == "cpu"
        if matchers:
            rows, words = bitmask.shape
            self.executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, rows)
