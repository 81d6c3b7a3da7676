"""The HTTP API over a real uvicorn server on 127.0.0.1, with the official openai client and
httpx, a FakeEngine behind it (the in-process cases: tests/test_api.py)."""

import asyncio
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from deploy.server.api import build_api
from tests.fake_engine import FakeEngine
from tests.servers import uvicorn_server
from tests.test_api import API_KEY, CHAT, MODEL, REPLY


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, FakeEngine]]:
    engine = FakeEngine(reply=REPLY)
    app = build_api(engine, served_model_name=MODEL, api_key=API_KEY)
    with uvicorn_server(app) as url:
        yield url, engine


@pytest.fixture
def live(server: tuple[str, FakeEngine]) -> tuple[str, FakeEngine]:
    url, engine = server
    engine.step_delay_s, engine.fail_after_steps, engine.overloaded = 0.0, None, False
    engine.requests.clear()
    engine.aborted.clear()
    return url, engine


@pytest.fixture
def oai(live: tuple[str, FakeEngine]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{live[0]}/v1", api_key=API_KEY, max_retries=0) as client:
        yield client


def test_openai_completions(oai: openai.OpenAI):
    done = oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=100)
    assert done.choices[0].text == REPLY and done.choices[0].finish_reason == "stop"
    assert done.usage.completion_tokens == 27
    chunks = list(oai.completions.create(model=MODEL, prompt="Hello there", max_tokens=100, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == REPLY
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == done.usage.total_tokens


def test_openai_chat_n2(oai: openai.OpenAI):
    args = {"model": MODEL, "messages": CHAT, "n": 2, "temperature": 0.8, "seed": 1}
    done = oai.chat.completions.create(**args)
    assert [c.index for c in done.choices] == [0, 1]
    assert done.choices[0].message.content != done.choices[1].message.content
    texts = {0: "", 1: ""}
    chunks = list(oai.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    for chunk in chunks[:-1]:
        texts[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
    assert texts == {c.index: c.message.content for c in done.choices}
    assert chunks[-1].usage.completion_tokens == done.usage.completion_tokens


def test_openai_errors(oai: openai.OpenAI, live: tuple[str, FakeEngine]):
    url, engine = live
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model=MODEL, prompt="Hi", temperature=-0.5)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        oai.chat.completions.create(model="gpt-9", messages=CHAT)
    assert missing.value.param == "model"
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            stranger.models.list()
    assert engine.requests == []
    engine.overloaded = True
    with pytest.raises(openai.RateLimitError):
        oai.completions.create(model=MODEL, prompt="Hi")
    engine.overloaded, engine.fail_after_steps = False, 3
    with pytest.raises(openai.APIError, match="unavailable"):
        for _ in oai.completions.create(model=MODEL, prompt="Hi", stream=True):
            pass


def wait_for_abort(engine: FakeEngine, request_id: str) -> None:
    deadline = time.monotonic() + 5
    while request_id not in engine.aborted:
        assert time.monotonic() < deadline, f"{request_id} was never aborted"
        time.sleep(0.01)


def test_disconnect_mid_stream_aborts(live: tuple[str, FakeEngine]):
    url, engine = live
    engine.step_delay_s = 0.02  # 200 tokens take 4 s: the client leaves long before
    body = {"prompt": "Hi", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        with http.stream("POST", f"{url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        (request_id, _, _), = engine.requests
        wait_for_abort(engine, request_id)


def test_disconnect_while_waiting_for_full_answer_aborts(live: tuple[str, FakeEngine]):
    url, engine = live
    engine.step_delay_s = 0.02
    body = {"prompt": "Hi", "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/v1/completions", json=body, timeout=0.3,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    (request_id, _, _), = engine.requests
    wait_for_abort(engine, request_id)


async def test_32_concurrent_streams(live: tuple[str, FakeEngine]):
    url, engine = live
    engine.step_delay_s = 0.001

    async def one(client: openai.AsyncOpenAI, i: int) -> str:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"client {i}"}], stream=True)
        return "".join([c.choices[0].delta.content or "" async for c in stream])

    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0) as client:
        texts = await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(32))), 20)
    assert texts == [REPLY] * 32
    assert len(engine.requests) == 32 and not engine.aborted
