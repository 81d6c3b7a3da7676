"""Prompt batches, echo, tool calls (the wire shapes, streamed and not) and /metrics over a
FakeEngine; what the grammar makes a real model write is tested in tests/test_openai_real.py."""

import json

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from deploy.server.api import build_api
from deploy.server.tools import call_text
from tests.fake_engine import FakeEngine
from tests.test_api import CHAT, WEATHER_TOOL, sse_events
from tests.test_dashboards import CATALOGUE

MODEL = "fake-model"
REPLY = "One two three four five six"


def fake(reply: str = REPLY) -> FakeEngine:
    return FakeEngine(reply=reply, max_model_len=2048)  # room for the tool definitions


def client_for(engine: FakeEngine) -> TestClient:
    return TestClient(build_api(engine, served_model_name=MODEL))


def test_a_prompt_list_gives_prompt_times_n_choices_indexed_as_openai_does():
    engine = fake()
    client = client_for(engine)
    prompts = ["Hello", [5, 6, 7], "Bonjour tout le monde"]
    body = {"prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0.5, "seed": 4}
    r = client.post("/v1/completions", json=body).json()
    assert [c["index"] for c in r["choices"]] == list(range(6))
    one_by_one = [client.post("/v1/completions", json=body | {"prompt": p}).json() for p in prompts]
    assert [c["text"] for c in r["choices"]] == [c["text"] for o in one_by_one for c in o["choices"]]
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert r["usage"][key] == sum(o["usage"][key] for o in one_by_one)
    prompt_lens = sorted(len(p) for _, p, _ in engine.requests[:3])
    assert prompt_lens == sorted([len(engine.tokenizer.encode(prompts[0])), 3, len(engine.tokenizer.encode(prompts[2]))])

    events = sse_events(client.post("/v1/completions", json=body | {"stream": True,
                                                                     "stream_options": {"include_usage": True}}).text)
    streamed = {}
    for e in events[:-1]:
        (c,) = e["choices"]
        streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert streamed == {c["index"]: c["text"] for c in r["choices"]}
    assert events[-1]["usage"] == r["usage"]


def test_echo_prepends_each_prompt():
    client = client_for(fake())
    body = {"prompt": ["Say:", [72, 105]], "max_tokens": 3, "echo": True, "temperature": 0}
    choices = client.post("/v1/completions", json=body).json()["choices"]
    plain = client.post("/v1/completions", json=body | {"echo": False}).json()["choices"]
    decoded = client.post("/detokenize", json={"tokens": [72, 105]}).json()["prompt"]
    assert [c["text"] for c in choices] == ["Say:" + plain[0]["text"], decoded + plain[1]["text"]]
    events = sse_events(client.post("/v1/completions", json=body | {"stream": True}).text)
    assert [e["choices"][0]["text"] for e in events[:2]] == ["Say:", decoded]  # the prompts come first


CALLS = (call_text("get_weather", {"city": "Paris"}) + "\n"
         + call_text("get_weather", {"city": "Tokyo, \"Japan\" }\n</tool_call>"}))


@pytest.mark.parametrize("reply,content", [(CALLS, None), ("Let me look. " + CALLS, "Let me look.")])
def test_tool_calls_come_back_as_openai_sends_them(reply: str, content: str | None):
    engine = fake(reply)
    client = client_for(engine)
    body = {"messages": CHAT, "tools": [WEATHER_TOOL], "temperature": 0, "max_tokens": 200}
    r = client.post("/v1/chat/completions", json=body).json()
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == content
    calls = choice["message"]["tool_calls"]
    assert [c["type"] for c in calls] == ["function", "function"] and len({c["id"] for c in calls}) == 2
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo, \"Japan\" }\n</tool_call>"})]
    (_, _, params), = engine.requests
    assert params.grammar is not None  # auto: text, or calls that follow the schema

    events = sse_events(client.post("/v1/chat/completions", json=body | {"stream": True}).text)
    deltas = [e["choices"][0]["delta"] for e in events[1:]]
    assert "".join(d.get("content") or "" for d in deltas) == (content or "")
    pieces = [tc for d in deltas for tc in d.get("tool_calls", [])]
    heads = [p for p in pieces if "id" in p]  # the first piece of a call: id, type, name
    assert [(h["index"], h["type"], h["function"]["name"], h["function"]["arguments"]) for h in heads] == [
        (0, "function", "get_weather", ""), (1, "function", "get_weather", "")]
    assert all(set(p) == {"index", "function"} and set(p["function"]) == {"arguments"} for p in pieces if "id" not in p)
    for i, call in enumerate(calls):
        assert "".join(p["function"]["arguments"] for p in pieces if p["index"] == i) == call["function"]["arguments"]
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_leaves_the_tools_out():
    engine = fake(CALLS)
    client = client_for(engine)
    r = client.post("/v1/chat/completions", json={"messages": CHAT, "tools": [WEATHER_TOOL], "tool_choice": "none"})
    message = r.json()["choices"][0]["message"]
    assert message == {"role": "assistant", "content": CALLS} and r.json()["choices"][0]["finish_reason"] == "stop"
    (_, prompt, params), = engine.requests
    assert params.grammar is None and "get_weather" not in engine.tokenizer.decode(prompt)


def test_the_tools_reach_a_template_without_tool_support_as_text():
    engine = fake(CALLS)  # its template knows nothing of tools
    client = client_for(engine)
    history = [*CHAT, {"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "-3 C"}]
    client.post("/v1/chat/completions", json={"messages": history, "tools": [WEATHER_TOOL], "tool_choice": "required"})
    (_, prompt, _), = engine.requests
    text = engine.tokenizer.decode(prompt)
    assert '"name": "get_weather"' in text and "The weather in a city" in text  # the definition
    assert call_text("get_weather", {"city": "Oslo"}) in text  # the earlier call
    assert "<tool_response>\n-3 C\n</tool_response>" in text  # its result


def test_metrics_are_prometheus_text_with_the_catalogued_names():
    client = client_for(fake())
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    exported = {name.removesuffix("_total"): kind for name, kind in CATALOGUE.items()}
    assert families == exported
