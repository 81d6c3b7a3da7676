"""The OpenAI API people actually call, with the official openai client, against the real
SmolLM2-135M-Instruct (engine in this process behind uvicorn, `smollm2_api` below):
json_schema outputs that parse and validate, forced tool calls whose arguments follow their
schema (streamed and not), penalties equal to a reference written here on token ids, a
logit bias that forces its token, a prompt list equal to its prompts sent one by one, and
/metrics as Prometheus text."""

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from actors.sampling_params import SamplingParams
from tests.test_sampler import reference_logits

MODEL = "SmolLM2-135M-Instruct"
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 40}, "maxItems": 4},
    },
    "required": ["name", "age", "hobbies"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 60}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ASK_WEATHER = [{"role": "user", "content": "What's the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def smollm2_api(smollm2_gguf):
    """The real model's engine in this process (tp=1; on the session's Ray cluster if one is
    connected) behind uvicorn on 127.0.0.1: (base URL, engine). Module-scoped: on a shared
    Ray cluster its worker holds a GPU, which later modules' layouts need back."""
    from cluster.config import TensorfleetConfig
    from cluster.replica import build_engine
    from deploy.server.api import build_api
    from tests.servers import uvicorn_server

    config = TensorfleetConfig.model_validate({
        "model": str(smollm2_gguf), "served_model_name": "SmolLM2-135M-Instruct", "dtype": "float32",
        "parallel": {"device": "cpu"},
        "engine": {"max_model_len": 2048, "max_num_seqs": 32, "block_size": 16},
    })
    engine = build_engine(config, log=lambda m: None)
    try:
        with uvicorn_server(build_api(engine, served_model_name=config.served_model_name)) as url:
            yield url, engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def client(smollm2_api):
    url, _ = smollm2_api
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(smollm2_api):
    return smollm2_api[1].tokenizer


@pytest.fixture(scope="module")
def reference(smollm2_reference):
    """transformers' model of the same weights."""
    return smollm2_reference


def test_json_schema_outputs_of_20_seeded_requests_parse_and_validate(smollm2_api):
    url, _ = smollm2_api

    async def one(c: openai.AsyncOpenAI, seed: int):
        return await c.chat.completions.create(
            model=MODEL, temperature=0.9, seed=seed, max_tokens=200,
            messages=[{"role": "user", "content": "Invent a person and describe them."}],
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})

    async def all_of_them():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as c:
            return await asyncio.gather(*(one(c, seed) for seed in range(20)))

    answers = asyncio.run(all_of_them())
    for seed, answer in enumerate(answers):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
    assert len({a.choices[0].message.content for a in answers}) > 10  # sampled, not one answer


@pytest.mark.parametrize("tool_choice", [{"type": "function", "function": {"name": "get_weather"}}, "required"])
def test_a_forced_tool_call_has_arguments_valid_for_its_schema(client, tool_choice):
    args = {"model": MODEL, "messages": ASK_WEATHER, "tools": [WEATHER], "tool_choice": tool_choice,
            "temperature": 0.7, "seed": 3, "max_tokens": 100, "parallel_tool_calls": False}
    done = client.chat.completions.create(**args)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    chunks = list(client.chat.completions.create(**args, stream=True))
    pieces = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert pieces[0].id and pieces[0].type == "function" and pieces[0].function.name == "get_weather"
    assert all(p.index == 0 and p.id is None and p.function.name is None for p in pieces[1:])
    streamed = "".join(p.function.arguments or "" for p in pieces)
    assert streamed == call.function.arguments  # the same seed: the same call
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tool_choice_answers_with_text_or_valid_calls(client):
    """The model decides (SmolLM2-135M answers this one in prose); whatever calls it makes
    follow the schema."""
    done = client.chat.completions.create(model=MODEL, messages=ASK_WEATHER, tools=[WEATHER], temperature=0,
                                          max_tokens=100)
    choice = done.choices[0]
    for call in choice.message.tool_calls or []:
        jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert choice.message.tool_calls or choice.message.content
    assert choice.finish_reason in (("tool_calls", "length") if choice.message.tool_calls else ("stop", "length"))


def test_regex_and_choice_outputs(client):
    phone = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=20, temperature=1.0, seed=5,
                                      extra_body={"guided_regex": r" \d{3}-\d{4}"})
    assert phone.choices[0].text[:1] == " " and phone.choices[0].text[1:4].isdigit()
    colour = client.chat.completions.create(model=MODEL, temperature=1.0, seed=2, max_tokens=10,
                                            messages=[{"role": "user", "content": "Pick a colour."}],
                                            extra_body={"guided_choice": ["red", "green", "blue"]})
    assert colour.choices[0].message.content in ("red", "green", "blue")


def hf_penalized_greedy(model, prompt: list[int], params: SamplingParams, eos: int) -> list[int]:
    """Greedy decoding with the penalties applied by `reference_logits`, on token ids."""
    generated: list[int] = []
    for _ in range(params.max_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + generated])).logits[0, -1].float()
        scores = reference_logits(logits.tolist(), params, prompt, generated)
        generated.append(max(range(len(scores)), key=scores.__getitem__))
        if generated[-1] == eos:
            break
    return generated


@pytest.mark.parametrize("penalties", [
    {"frequency_penalty": 1.0},
    {"presence_penalty": 1.5},
    {"repetition_penalty": 1.5},
    {"frequency_penalty": 0.6, "presence_penalty": 0.4, "repetition_penalty": 1.2},
])
def test_penalties_match_a_reference_on_token_ids(client, tokenizer, reference, penalties):
    model = reference
    prompt = tokenizer.encode("The cat sat on the mat. The cat sat on the mat. The cat sat on")
    params = SamplingParams(max_tokens=24, temperature=0.0, **penalties)
    want = hf_penalized_greedy(model, prompt, params, tokenizer.eos_token_id)
    plain = hf_penalized_greedy(model, prompt, SamplingParams(max_tokens=24, temperature=0.0), tokenizer.eos_token_id)
    assert want != plain  # the penalties matter here
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, logprobs=0,
                                    frequency_penalty=penalties.get("frequency_penalty", 0),
                                    presence_penalty=penalties.get("presence_penalty", 0),
                                    extra_body={"repetition_penalty": penalties.get("repetition_penalty", 1)})
    assert got.choices[0].logprobs.tokens == [tokenizer.decode([t]) for t in want]


def test_logit_bias_100_forces_its_token(client, tokenizer):
    (banana,) = tokenizer.encode(" banana", add_special_tokens=False)
    got = client.completions.create(model=MODEL, prompt="My favourite colour is", max_tokens=6, temperature=1.0,
                                    seed=9, logit_bias={str(banana): 100})
    assert got.choices[0].text == " banana" * 6


def test_a_prompt_list_equals_its_prompts_sent_one_by_one(client, tokenizer):
    prompts = ["The capital of France is", tokenizer.encode("def fibonacci(n):"), "Once upon a time"]
    together = client.completions.create(model=MODEL, prompt=prompts, max_tokens=16, temperature=0, n=2)
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=16, temperature=0, n=2) for p in prompts]
    assert [c.index for c in together.choices] == list(range(6))
    assert [c.text for c in together.choices] == [c.text for a in alone for c in a.choices]
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


def test_metrics_parse_as_prometheus_text(client, smollm2_api):
    url, _ = smollm2_api
    client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, temperature=0)
    body = httpx.get(f"{url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(body)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    # an engine outside Ray Serve has no replica name
    assert samples[("ray_tensorfleet_generation_tokens_total", (("model_name", MODEL), ("replica", "")))] > 0
    forward = [v for (name, _), v in samples.items() if name == "ray_tensorfleet_worker_forward_seconds_total"]
    assert forward and all(v > 0 for v in forward)
    assert any(name == "ray_tensorfleet_time_to_first_token_seconds_count" and v > 0 for (name, _), v in samples.items())
