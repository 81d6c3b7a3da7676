"""Grammars: the builders and their errors, and constrained generation in the engine (tp=1,
in-process) with a real tokenizer: seeded JSON-schema output that parses and validates, a
regex and a choice, the same tokens through a preemption, after a prefix-cache hit and on
new workers after one died (the sampling rank rebuilds its history and matcher from the
tokens the driver resends)."""

import asyncio
import json
import re

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from actors import grammar
from actors.sampling_params import ParamError, SamplingParams
from actors.sampling_state import SequenceStates
from actors.step_io import SeqStep
from cluster.engine import Engine, EngineLimits
from cluster.engine_client import EngineDeadError
from cluster.executor import InProcessExecutor
from tests.tiny_models import worker_spec

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("build,param", [
    (lambda: grammar.json_schema_grammar({"type": "strng"}, "p"), "Invalid type"),
    (lambda: grammar.json_schema_grammar({"$ref": "#/$defs/missing"}, "p"), "missing"),
    (lambda: grammar.json_schema_grammar({"type": "string", "minLength": 5, "maxLength": 2}, "p"), "minLength"),
    (lambda: grammar.json_schema_grammar([1], "p"), "object"),
    (lambda: grammar.json_schema_grammar(False, "p"), "accepts no JSON value"),
    (lambda: grammar.regex_grammar("a(b", "p"), "regex"),
    (lambda: grammar.choice_grammar([], "p"), "at least one"),
    (lambda: grammar.lark_grammar("start: nope", "p"), "nope"),
])
def test_bad_grammars_are_param_errors_that_say_why(build, param):
    with pytest.raises(ParamError) as error:
        build()
    assert error.value.param == "p" and param in error.value.message


def test_the_schema_true_is_any_json_value():
    assert grammar.json_schema_grammar(True, "p") == grammar.json_schema_grammar({}, "p")


@pytest.fixture(scope="module")
def tokenizer(chat_model_dir):
    return AutoTokenizer.from_pretrained(chat_model_dir)


def matcher_accepts(tokenizer, g: str, text: str) -> bool:
    vocab = grammar.GrammarVocabulary(grammar.tokenizer_json(tokenizer), len(tokenizer), (tokenizer.eos_token_id,))
    m = vocab.matcher(g)
    return m.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and m.is_accepting()


def test_choices_match_character_for_character(tokenizer):
    choices = ['say "hi"', "a\nb", "back\\slash", "plain"]
    g = grammar.choice_grammar(choices, "guided_choice")
    assert all(matcher_accepts(tokenizer, g, c) for c in choices)
    assert not matcher_accepts(tokenizer, g, "plai") and not matcher_accepts(tokenizer, g, "say hi")


def test_json_comes_in_one_style(tokenizer):
    g = grammar.json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}}}, "p")
    assert matcher_accepts(tokenizer, g, '{"a": 1}')
    assert not matcher_accepts(tokenizer, g, '{"a":1}') and not matcher_accepts(tokenizer, g, '{ "a": 1}')


def make_engine(chat_model_dir, tokenizer, num_blocks: int = 256) -> Engine:
    spec = worker_spec(chat_model_dir, max_model_len=512, block_size=8, tokenizer=tokenizer)
    executor = InProcessExecutor(spec, num_blocks)
    return Engine(executor, EngineLimits(512, 16, 128, 8), model_name="tiny-chat", vocab_size=spec.shape.vocab_size,
                  tokenizer=tokenizer, eos_token_ids=(tokenizer.eos_token_id,))


def run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[list[int]]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens = {rid: [[] for _ in range(p.n)] for rid, (_, p) in requests.items()}

    async def drive() -> None:
        while engine.scheduler.has_work():
            for out in await engine.step():
                for d in out.deltas:
                    tokens[out.request_id][d.index] += d.token_ids

    asyncio.run(drive())
    return tokens


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])


def test_seeded_json_schema_output_parses_and_validates(chat_model_dir, tokenizer):
    """A random-weight model at temperature 1: only the grammar makes its output JSON."""
    engine = make_engine(chat_model_dir, tokenizer)
    g = grammar.json_schema_grammar(SCHEMA, "response_format")
    prompt = tokenizer.encode("Describe a person as JSON:")
    requests = {f"r{seed}": (prompt, SamplingParams(max_tokens=150, temperature=1.0, seed=seed, grammar=g))
                for seed in range(8)}
    for rid, (tokens,) in run(engine, requests).items():
        assert tokens[-1] == tokenizer.eos_token_id, (rid, text_of(tokenizer, tokens))  # the grammar completed
        jsonschema.validate(json.loads(text_of(tokenizer, tokens)), SCHEMA)


def test_regex_and_choice_outputs(chat_model_dir, tokenizer):
    engine = make_engine(chat_model_dir, tokenizer)
    prompt = tokenizer.encode("Answer:")
    choices = ["yes", "no", "maybe later"]
    out = run(engine, {
        "regex": (prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=1, n=3,
                                         grammar=grammar.regex_grammar(r"[0-9]{3}-[a-z]{2,4}", "guided_regex"))),
        "choice": (prompt, SamplingParams(max_tokens=40, temperature=1.0, seed=2, n=3,
                                          grammar=grammar.choice_grammar(choices, "guided_choice"))),
    })
    assert all(re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text_of(tokenizer, t)) for t in out["regex"])
    assert all(text_of(tokenizer, t) in choices for t in out["choice"])


def test_a_constrained_request_survives_preemption_and_prefix_hits_exactly(chat_model_dir, tokenizer):
    """The same seeded, constrained request alone, then squeezed into a KV cache so small
    that it is preempted and recomputed, and twice more behind a prefix-cache hit of its
    own prompt and first outputs: every run gives the same tokens."""
    g = grammar.json_schema_grammar(SCHEMA, "response_format")
    prompt = tokenizer.encode("Describe a person as JSON, please, with a name and an age:")
    mine = SamplingParams(max_tokens=60, temperature=1.0, seed=7, grammar=g, ignore_eos=False)
    alone = run(make_engine(chat_model_dir, tokenizer), {"mine": (prompt, mine)})["mine"][0]

    crowded_engine = make_engine(chat_model_dir, tokenizer, num_blocks=16)  # 128 token slots
    crowd = {f"c{i}": (tokenizer.encode(f"Tell me a story number {i}."),
                       SamplingParams(max_tokens=60, temperature=1.0, ignore_eos=True)) for i in range(4)}
    crowded = run(crowded_engine, crowd | {"mine": (prompt, mine)})["mine"][0]
    assert crowded_engine.scheduler.stats.preemptions > 0
    assert crowded == alone

    warm = make_engine(chat_model_dir, tokenizer)
    first = run(warm, {"a": (prompt, mine)})["a"][0]
    again = run(warm, {"b": (prompt, mine)})["b"][0]  # its prompt's blocks come from the cache
    assert warm.scheduler.stats.prefix_hit_tokens > 0
    assert first == again == alone


def test_the_sampling_rank_rebuilds_history_and_matcher_from_a_prefix_hit(tokenizer):
    """A sequence resent after a preemption, its prompt and first outputs found in the prefix
    cache (so they arrive once as prefix_ids), gives the sampler the same history and the
    same grammar mask as the undisturbed sequence that saw every token come as input."""
    vocab = grammar.GrammarVocabulary(grammar.tokenizer_json(tokenizer), len(tokenizer), (tokenizer.eos_token_id,))
    params = SamplingParams(max_tokens=50, temperature=1.0, repetition_penalty=1.2,
                            grammar=grammar.json_schema_grammar(SCHEMA, "response_format"))
    prompt = tokenizer.encode("Describe a person as JSON:")
    generated = tokenizer.encode('{"name": "Bo", "age": 4', add_special_tokens=False)

    undisturbed = SequenceStates(vocab)
    undisturbed.absorb(SeqStep(1, prompt, 0, [], True, params, 0))
    for k, token in enumerate(generated):
        step = SeqStep(1, [token], len(prompt) + k, [], True, None, k + 1)
        undisturbed.absorb(step)
        want_mask = undisturbed.start_masks([step]).result()
    want_rows = undisturbed.rows([step])

    resent = SequenceStates(vocab)
    history = prompt + generated
    last = SeqStep(1, history[-1:], len(history) - 1, [], True, params, len(generated), prefix_ids=history[:-1])
    resent.absorb(last)
    assert resent.rows([last]) == want_rows and want_rows[0].generated == generated
    assert torch.equal(resent.start_masks([last]).result(), want_mask)
    resent.release([1])
    assert resent.states == {}


class DyingOnce(InProcessExecutor):
    """An in-process executor whose worker 'dies' at its `fail_at`-th step."""

    def __init__(self, spec, fail_at: int | None):
        super().__init__(spec, 256)
        self.fail_at, self.steps = fail_at, 0

    def execute(self, step):
        self.steps += 1
        if self.steps == self.fail_at:
            raise EngineDeadError("the worker died (simulated)")
        return super().execute(step)


async def test_a_constrained_request_resumes_on_new_workers_exactly(chat_model_dir, tokenizer):
    """A worker dies mid-stream; on the rebuilt worker the sequence is resent from its
    prompt and the tokens it had, and its grammar state is rebuilt from them."""
    spec = worker_spec(chat_model_dir, max_model_len=512, block_size=8, tokenizer=tokenizer)
    params = SamplingParams(max_tokens=60, temperature=1.0, seed=11, presence_penalty=0.5,
                            grammar=grammar.json_schema_grammar(SCHEMA, "response_format"))
    prompt = tokenizer.encode("Describe a person as JSON:")

    async def tokens(first: InProcessExecutor) -> tuple[list[int], int]:
        engine = Engine(first, EngineLimits(512, 16, 128, 8), model_name="tiny-chat", vocab_size=spec.shape.vocab_size,
                        tokenizer=tokenizer, eos_token_ids=(tokenizer.eos_token_id,),
                        rebuild=lambda: DyingOnce(spec, None))
        out = [t async for o in engine.generate("r", prompt, params) for d in o.deltas for t in d.token_ids]
        engine.shutdown()
        return out, engine.restarts

    undisturbed, _ = await tokens(DyingOnce(spec, None))
    resumed, restarts = await tokens(DyingOnce(spec, 12))  # the prompt is done; tokens are flowing
    assert restarts == 1 and resumed == undisturbed
