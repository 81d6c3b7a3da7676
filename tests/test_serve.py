"""The real Ray Serve application on 127.0.0.1, called with the official openai client:
tp=2 x pp=2 workers on a simulated 2-node cluster behind the OpenAI-compatible routes."""

import asyncio

import httpx
import openai
import pytest
import torch
from ray import serve
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.servers import TINY_MODEL, serve_tiny_2x2

pytestmark = pytest.mark.slow
MODEL = TINY_MODEL


@pytest.fixture(scope="module")
def server(ray_cluster_2x2, chat_model_dir):
    engine = {"max_model_len": 512, "block_size": 16, "num_kv_blocks": 256, "max_num_seqs": 32}
    with serve_tiny_2x2(chat_model_dir, engine) as url:
        yield url


@pytest.fixture(scope="module")
def reference(chat_model_dir):
    return AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval(), \
        AutoTokenizer.from_pretrained(chat_model_dir)


def hf_greedy_text(reference, prompt_ids: list[int], n: int) -> str:
    model, tok = reference
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():  # an explicit mask: a chat prompt holds the pad token (<|im_end|>), not padding
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True)


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_completion_matches_hf_greedy_streaming_and_not(server, reference):
    prompt = "def read_file(path):\n"
    ids = reference[1].encode(prompt)
    want = hf_greedy_text(reference, ids, 24)
    c = client(server)
    done = c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True})
    assert done.choices[0].text == want
    assert done.usage.prompt_tokens == len(ids) and done.usage.completion_tokens == 24
    chunks = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == 24


def test_chat_matches_hf_greedy_streaming_and_not(server, reference):
    messages = [{"role": "user", "content": "import os"}]
    tok = reference[1]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                     add_special_tokens=False)
    want = hf_greedy_text(reference, ids, 16)
    c = client(server)
    done = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                     extra_body={"ignore_eos": True})
    assert done.choices[0].message.content == want
    stream = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == want


def test_models_health_tokenize(server, reference):
    assert [m.id for m in client(server).models.list().data] == [MODEL]
    assert httpx.get(f"{server}/health").status_code == 200
    tokens = httpx.post(f"{server}/tokenize", json={"prompt": "print('hi')"}).json()["tokens"]
    assert tokens == reference[1].encode("print('hi')")  # special tokens added as the tokenizer does, like vLLM
    assert httpx.post(f"{server}/detokenize", json={"tokens": tokens}).json()["prompt"].endswith("print('hi')")


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": 100000}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "", "max_tokens": 4}, 400, "prompt"),
    ({"prompt": "x", "model": "nope"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(server, body, status, param):
    r = httpx.post(f"{server}/v1/completions", json={"model": MODEL, **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


async def test_32_concurrent_streams_complete_and_disconnects_do_no_harm(server, reference):
    c = openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    prompts = [f"def f{i}(x):\n" for i in range(32)]

    async def one(prompt):
        stream = await c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in stream if ch.choices])

    async def hang_up():  # a client that leaves mid-stream
        async with httpx.AsyncClient(timeout=30) as h:
            async with h.stream("POST", f"{server}/v1/completions", json={
                    "model": MODEL, "prompt": "class A:", "max_tokens": 480, "stream": True, "ignore_eos": True}) as r:
                async for _ in r.aiter_lines():
                    break

    results = await asyncio.gather(*(one(p) for p in prompts), hang_up(), hang_up())
    texts = results[:32]
    # the two clients that hung up asked for 480 tokens each (many seconds of decoding):
    # their requests must be aborted and every KV block back in the free pool within 3 s
    handle = serve.get_app_handle("tensorfleet")
    for _ in range(15):
        stats = await handle.stats.remote()
        if stats.running == 0 and stats.kv_blocks_free == stats.kv_blocks:
            break
        await asyncio.sleep(0.2)
    assert stats.running == 0 and stats.waiting == 0, stats
    assert stats.kv_blocks_free == stats.kv_blocks, stats
    tok = reference[1]
    for prompt, text in list(zip(prompts, texts))[:4]:
        assert text == hf_greedy_text(reference, tok.encode(prompt), 12)
    assert all(len(t) > 0 for t in texts)
