"""The HTTP API over a FakeEngine, in-process through FastAPI's TestClient (over a real
server: tests/test_api_live.py)."""

import json
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from cluster.engine import Engine, EngineLimits
from cluster.executor import InProcessExecutor
from deploy.server.api import build_api
from tests.fake_engine import FakeEngine, metaspace_tokenizer
from tests.tiny_models import random_prompts, worker_spec

MODEL = "fake-model"
API_KEY = "sk-test-key"
REPLY = "Hello world! 🌍 The quick brown fox says 你好 to the lazy dog."
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(reply=REPLY, max_model_len=256)


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(build_api(engine, served_model_name=MODEL))


def sse_events(text: str) -> list[dict]:
    """The JSON events of a server-sent event stream, checking its framing and [DONE]."""
    blocks = text.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], "the stream must end with data: [DONE]"
    assert all(b.startswith("data: ") for b in blocks[:-1])
    return [json.loads(b.removeprefix("data: ")) for b in blocks[:-2]]


def assert_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    return error


# ---- in-process ----

def test_completion(client: TestClient, engine: FakeEngine):
    r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hello there", "max_tokens": 100})
    assert r.status_code == 200
    body = r.json()
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["choices"] == [{"index": 0, "text": REPLY, "logprobs": None, "finish_reason": "stop"}]
    prompt_len = len(engine.tokenizer.encode("Hello there"))
    completion_len = len(engine.reply_ids(0)) + 1  # EOS
    assert body["usage"]["prompt_tokens"] == prompt_len
    assert body["usage"]["completion_tokens"] == completion_len
    assert body["usage"]["total_tokens"] == prompt_len + completion_len


@pytest.mark.parametrize("prompt", [[5, 6, 7], ["Hello there"]])
def test_completion_prompt_forms(client: TestClient, prompt: list):
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 3})
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert r.json()["usage"]["completion_tokens"] == 3


def test_stop_strings_and_stop_token_ids(client: TestClient, engine: FakeEngine):
    ids = engine.reply_ids(0)
    r = client.post("/v1/completions", json={"prompt": "Hi", "stop": "fox", "max_tokens": 100})
    assert r.json()["choices"][0] == {
        "index": 0, "text": REPLY[: REPLY.index("fox")], "logprobs": None, "finish_reason": "stop"}
    r = client.post("/v1/completions", json={"prompt": "Hi", "stop_token_ids": [ids[3]], "max_tokens": 100})
    assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(ids[:3])


def test_logprobs(client: TestClient, engine: FakeEngine):
    # The fake gives its token -0.25 and the next ids in the vocabulary -2, -3, ...; asked for
    # 2, the API sends the two most likely (the token and the id after it), as text.
    ids = engine.reply_ids(0)[:4]
    text = [engine.tokenizer.decode([t]) for t in ids]
    after = [engine.tokenizer.decode([t + 1]) for t in ids]
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "logprobs": 2})
    assert r.json()["choices"][0]["logprobs"] == {
        "tokens": text,
        "token_logprobs": [-0.25] * 4,
        "top_logprobs": [{t: -0.25, a: -2.0} for t, a in zip(text, after)],
        "text_offset": [sum(map(len, text[:i])) for i in range(4)],
    }
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "logprobs": True,
                                                   "top_logprobs": 2})

    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    assert r.json()["choices"][0]["logprobs"]["content"] == [
        entry(t, -0.25) | {"top_logprobs": [entry(t, -0.25), entry(a, -2.0)]} for t, a in zip(text, after)]


def test_chat(client: TestClient, engine: FakeEngine):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": CHAT})
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": REPLY}
    count = client.post("/tokenize", json={"messages": CHAT}).json()["count"]
    assert body["usage"]["prompt_tokens"] == count
    (_, prompt, params), = engine.requests
    assert len(prompt) == count and params.max_tokens == engine.max_model_len - count


def test_chat_text_parts(client: TestClient):
    content = [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]
    parts = [{"role": "user", "content": content}]
    assert client.post("/v1/chat/completions", json={"messages": parts}).status_code == 200


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 100}),
    ("/v1/chat/completions", {"messages": CHAT}),
])
def test_streaming_with_usage(client: TestClient, path: str, body: dict):
    r = client.post(path, json=body | {"stream": True, "stream_options": {"include_usage": True}})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    *chunks, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 27
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    if path == "/v1/completions":
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == REPLY and "\ufffd" not in text
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_n2(client: TestClient):
    body = {"prompt": "Hi", "n": 2, "temperature": 0.8, "seed": 3, "max_tokens": 100}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert choices[0]["text"] != choices[1]["text"]
    events = sse_events(client.post("/v1/completions", json=body | {"stream": True}).text)
    for c in choices:
        streamed = [e["choices"][0] for e in events if e["choices"][0]["index"] == c["index"]]
        assert "".join(s["text"] for s in streamed) == c["text"]
        assert streamed[-1]["finish_reason"] == "stop"


LONG_PROMPT = list(range(10, 10 + 250))  # with max_model_len=256, no room for 16 tokens
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "Hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": LONG_PROMPT}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": list(range(300))}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [3, 10**6]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["Hi"] * 129}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"text": "Hi"}}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 1}, 400, "echo"),
    ("/v1/completions", {"prompt": "Hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "Hi", "frequency_penalty": -3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "Hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "Hi", "min_p": 1.5}, 400, "min_p"),
    ("/v1/completions", {"prompt": "Hi", "min_tokens": 20, "max_tokens": 10}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "Hi", "temperature": float("nan")}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "top_p": float("inf")}, 400, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"5": float("-inf")}}, 400, "logit_bias.5"),
    ("/v1/completions", {"prompt": "Hi", "guided_json": {"minimum": float("nan")}}, 400, "guided_json.minimum"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"100000": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"fox": 5}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "guided_json": {"type": "strng"}}, 400, "guided_json"),
    ("/v1/completions", {"prompt": "Hi", "guided_json": "{not json"}, 400, "guided_json"),
    ("/v1/completions", {"prompt": "Hi", "guided_regex": "(["}, 400, "guided_regex"),
    ("/v1/completions", {"prompt": "Hi", "guided_choice": []}, 400, "guided_choice"),
    ("/v1/completions", {"prompt": "Hi", "guided_regex": "a+", "guided_choice": ["a"]}, 400, "guided_choice"),
    ("/v1/completions", {"prompt": "Hi", "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 10**9, "stream": True}, 400, "n"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "Hi", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-9"}, 404, "model"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "Hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 10**4}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": CHAT, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "fox " * 300}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools.0.function"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [WEATHER_TOOL],
                              "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [WEATHER_TOOL, WEATHER_TOOL]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "nope"}}}}}]}, 400,
     "tools.0.function.parameters"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [WEATHER_TOOL], "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": 5}}}}, 400, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None}]}, 400, "messages.0.content"),
    ("/v1/chat/completions", {"messages": CHAT, "seed": 1, "temperature": float("-inf")}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": CHAT, "model": "gpt-9", "stream": True}, 404, "model"),
    ("/v1/chat/completions", {"messages": CHAT, "temperature": -1, "stream": True}, 400, "temperature"),
]


@pytest.mark.parametrize("path,body,status,param", BAD_REQUESTS)
def test_bad_requests_never_reach_the_engine(
    client: TestClient, engine: FakeEngine, path: str, body: dict, status: int, param: str
):
    # json.dumps writes NaN and Infinity as Python's json module reads them (httpx refuses to)
    r = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert_error(r, status, param)
    assert engine.requests == []


def test_malformed_json(client: TestClient, engine: FakeEngine):
    r = client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert_error(r, 400, None)
    assert engine.requests == []


def test_body_too_large(engine: FakeEngine):
    client = TestClient(build_api(engine, served_model_name=MODEL, max_body_bytes=1000))
    assert_error(client.post("/v1/completions", json={"prompt": "x" * 2000}), 413, None)

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while reading
        yield b'{"prompt": "'
        yield b"x" * 2000
        yield b'"}'

    assert_error(client.post("/v1/completions", content=chunked()), 413, None)
    assert client.post("/v1/completions", json={"prompt": "x" * 100}).status_code == 200
    assert len(engine.requests) == 1


def test_api_key(engine: FakeEngine):
    client = TestClient(build_api(engine, served_model_name=MODEL, api_key=API_KEY))
    body = {"prompt": "Hi"}
    assert_error(client.post("/v1/completions", json=body), 401, None)
    wrong = {"Authorization": "Bearer nope"}
    assert_error(client.post("/v1/completions", json=body, headers=wrong), 401, None)
    assert_error(client.get("/v1/models"), 401, None)
    assert engine.requests == []
    ok = client.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})
    assert ok.status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key


def test_chat_without_template(engine: FakeEngine):
    engine.tokenizer = metaspace_tokenizer()
    client = TestClient(build_api(engine, served_model_name=MODEL))
    error = assert_error(client.post("/v1/chat/completions", json={"messages": CHAT}), 400, "messages")
    assert "chat template" in error["message"]


def test_models_health_and_dead_engine(client: TestClient, engine: FakeEngine):
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    assert client.get("/health").status_code == 200
    engine.dead = True
    assert_error(client.get("/health"), 503, None)
    assert_error(client.post("/v1/completions", json={"prompt": "Hi"}), 503, None)


def test_tokenize_detokenize_round_trip(client: TestClient, engine: FakeEngine):
    text = "Hello 🌍 world, 你好!"
    tok = client.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert tok["tokens"] == engine.tokenizer.encode(text)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 256
    assert client.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": text}
    assert_error(client.post("/detokenize", json={"tokens": [10**6]}), 400, "tokens")
    assert_error(client.post("/tokenize", json={}), 400, "prompt")


@pytest.mark.parametrize("stream", [False, True])
def test_overloaded_is_429_with_retry_after(client: TestClient, engine: FakeEngine, stream: bool):
    engine.overloaded = True
    r = client.post("/v1/completions", json={"prompt": "Hi", "stream": stream})
    assert_error(r, 429, None)
    assert int(r.headers["Retry-After"]) >= 1


def test_engine_dies(client: TestClient, engine: FakeEngine):
    engine.fail_after_steps = 3
    assert_error(client.post("/v1/completions", json={"prompt": "Hi"}), 503, None)
    events = sse_events(client.post("/v1/completions", json={"prompt": "Hi", "stream": True}).text)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["Hello", " world", "!"]
    assert events[-1]["error"]["type"] == "service_unavailable_error"
    engine.fail_after_steps = 0  # dies before the first token: still a plain 503
    assert_error(client.post("/v1/completions", json={"prompt": "Hi", "stream": True}), 503, None)


def test_an_engine_without_a_tokenizer_takes_token_ids(tiny_llama_dir):
    """A checkpoint without tokenizer files: token-id prompts run, text gets a 400 naming
    the field (it was a 500 from the token-id check once)."""
    path, hf = tiny_llama_dir
    executor = InProcessExecutor(worker_spec(path, block_size=16), 32)
    engine = Engine(executor, EngineLimits(256, 4, 64, 16), model_name="no-tok", vocab_size=1000, eos_token_ids=(2,))
    client = TestClient(build_api(engine, served_model_name="no-tok"))
    prompt = random_prompts(1000, [9])[0]
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 5
    assert_error(client.post("/v1/completions", json={"prompt": "text", "max_tokens": 5}), 400, "prompt")
    assert_error(client.post("/v1/completions", json={"prompt": [5, 1000]}), 400, "prompt")
    engine.shutdown()
