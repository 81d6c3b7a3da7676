"""A model-free `EngineClient` for the HTTP tests, and tiny tokenizers built offline.

The fake "generates" a fixed reply (its words rotated by completion index and seed when
sampling, so n > 1 gives distinct completions), then EOS; it honours max_tokens,
stop_token_ids, stop strings (through the real `IncrementalDetokenizer`), ignore_eos, n and
logprobs. It records every request that reaches it and every abort, and can be told to die
mid-stream, to be dead, or to be overloaded.
"""

import asyncio
import json
from collections.abc import AsyncIterator
from functools import cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from actors.sampling_params import SamplingParams
from actors.step_io import RankStats
from cluster.detokenizer import IncrementalDetokenizer
from cluster.engine_client import (
    CompletionDelta,
    EngineDeadError,
    EngineOverloadedError,
    EngineStats,
    RequestOutput,
    TokenLogprob,
    Usage,
)
from cluster.metrics import EngineMetrics, render_prometheus

CORPUS = [
    "Hello world, this is a test of the tensorfleet serving cluster.",
    "The quick brown fox jumps over the lazy dog.",
    "Pipeline stages cross nodes; tensor parallel groups stay inside a node.",
    "你好世界，这是一个测试。 こんにちは世界。",
    "Café, naïve, façade and résumé are French words.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]


@cache
def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """GPT-2 style byte-level BPE: an emoji or an unmerged CJK character is several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", chat_template=CHAT_TEMPLATE
    )


@cache
def metaspace_tokenizer() -> PreTrainedTokenizerFast:
    """Llama-2 style SentencePiece BPE with byte fallback (<0xF0> tokens) and a decoder that
    drops the leading space of whatever it decodes first. No chat template."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    specials = ["<unk>", "<s>", "</s>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    trained.train_from_iterator(CORPUS[:3], trainer)  # ASCII only: the rest falls back to bytes
    spec = json.loads(trained.to_str())["model"]
    vocab = dict(spec["vocab"])
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = trained.pre_tokenizer
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


class FakeEngine:
    def __init__(
        self,
        *,
        reply: str = "Hello world! 🌍 The quick brown fox says 你好 to the lazy dog.",
        max_model_len: int = 256,
        step_delay_s: float = 0.0,
    ):
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.tokenizer = byte_level_tokenizer()
        self.vocab_size = len(self.tokenizer)
        self.reply_words = reply.split(" ")
        self.step_delay_s = step_delay_s
        self.dead = False  # check_health and generate fail at once
        self.overloaded = False  # generate raises EngineOverloadedError at once
        self.fail_after_steps: int | None = None  # EngineDeadError after this many steps
        self.requests: list[tuple[str, list[int], SamplingParams]] = []
        self.aborted: set[str] = set()
        self.draining = False
        self.metrics = EngineMetrics(self.model_name)  # records nothing by itself

    def reply_ids(self, rotation: int) -> list[int]:
        r = rotation % len(self.reply_words)
        words = self.reply_words[r:] + self.reply_words[:r]
        return self.tokenizer.encode(" ".join(words), add_special_tokens=False)

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        if self.dead:
            raise EngineDeadError("fake engine is dead")
        if self.overloaded:
            raise EngineOverloadedError("fake engine queue is full")
        params.validate(self.max_model_len, len(prompt_token_ids))
        self.requests.append((request_id, list(prompt_token_ids), params))
        return self._run(request_id, list(prompt_token_ids), params)

    async def _run(
        self, request_id: str, prompt: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        seed = params.seed or 0
        scripts = [self.reply_ids(0 if params.greedy else i + seed) for i in range(params.n)]
        detoks = [
            IncrementalDetokenizer(
                self.tokenizer, prompt, skip_special_tokens=params.skip_special_tokens, stop=params.stop
            )
            for _ in range(params.n)
        ]
        counts = [0] * params.n
        done = [False] * params.n
        steps = 0
        try:
            while not all(done):
                await asyncio.sleep(self.step_delay_s)
                if self.fail_after_steps is not None and steps >= self.fail_after_steps:
                    raise EngineDeadError("fake engine died mid-stream")
                steps += 1
                deltas = []
                for i in range(params.n):
                    if done[i]:
                        continue
                    token = self._next_token(scripts[i], counts[i])
                    counts[i] += 1
                    text, reason = self._text(detoks[i], token, counts[i], params)
                    done[i] = reason is not None
                    deltas.append(CompletionDelta(i, [token], text, self._logprobs(token, params), reason))
                yield RequestOutput(request_id, deltas, all(done), Usage(len(prompt), sum(counts)))
        except (GeneratorExit, asyncio.CancelledError):
            self.aborted.add(request_id)
            raise

    def _next_token(self, script: list[int], count: int) -> int:
        cycle = [*script, self.tokenizer.eos_token_id]  # with ignore_eos it goes round again
        return cycle[count % len(cycle)]

    def _text(
        self, detok: IncrementalDetokenizer, token: int, count: int, params: SamplingParams
    ) -> tuple[str, str | None]:
        """The text delta for `token` and the finish reason it causes, if any."""
        eos = token == self.tokenizer.eos_token_id and not params.ignore_eos
        if eos or token in params.stop_token_ids:
            return detok.flush(), "stop"  # the stopping token's own text is not emitted
        text, stopped = detok.step([token])
        if stopped:
            return text, "stop"
        if count >= params.max_tokens:
            return text + detok.flush(), "length"
        return text, None

    def _logprobs(self, token: int, params: SamplingParams) -> list[TokenLogprob] | None:
        if params.logprobs is None:
            return None
        alternatives = [(token + 1 + k) % len(self.tokenizer) for k in range(params.logprobs)]
        top = {token: -0.25} | {alt: -2.0 - k for k, alt in enumerate(alternatives) if alt != token}
        return [TokenLogprob(token, -0.25, top)]

    async def abort(self, request_id: str) -> None:
        self.aborted.add(request_id)

    async def check_health(self) -> None:
        if self.dead:
            raise EngineDeadError("fake engine is dead")

    async def stats(self) -> EngineStats:
        return EngineStats(running=0, waiting=0, kv_blocks=0, kv_blocks_free=0, restarts=0,
                           healthy=not self.dead, gave_up=False, draining=self.draining)

    async def rank_stats(self) -> list[RankStats]:
        return []

    async def prometheus_metrics(self) -> bytes:
        return render_prometheus(self.metrics, [])

    def drain(self) -> None:
        self.draining = True

    def shutdown(self) -> None:
        self.dead = True
