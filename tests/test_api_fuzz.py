"""Hostile input: requests generated from the app's own OpenAPI schema by schemathesis,
both valid ones and ones that break the schema (wrong types, missing and extra fields,
out-of-range values), sent to the real engine in this process (tp=1, no Ray). No request
may get a server error; every refusal is an OpenAI-shaped error; afterwards a normal
request still returns Hugging Face's greedy tokens."""

import json

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from starlette.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

from cluster.engine import Engine, EngineLimits
from cluster.executor import InProcessExecutor
from deploy.server.api import build_api
from tests.tiny_models import worker_spec

MODEL = "fuzzed"
# examples per operation and generation mode: completions and chat get most of them
EXAMPLES = {"POST /v1/completions": 300, "POST /v1/chat/completions": 300}
OTHER_EXAMPLES = 40
MAX_MODEL_LEN = 128


@pytest.fixture(scope="module")
def app(chat_model_dir):
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    spec = worker_spec(chat_model_dir, max_model_len=MAX_MODEL_LEN, block_size=16, tokenizer=tok)
    executor = InProcessExecutor(spec, 64)
    engine = Engine(executor, EngineLimits(MAX_MODEL_LEN, 8, 256, 16, True, 64), model_name=MODEL,
                    vocab_size=executor.worker.spec.shape.vocab_size, tokenizer=tok, eos_token_ids=(tok.eos_token_id,))
    yield build_api(engine, served_model_name=MODEL, max_body_bytes=64 * 1024)
    engine.shutdown()


def check(response, tally: dict[str, int]) -> None:
    tally["requests"] += 1
    status = response.status_code
    tally[f"{status // 100}xx"] = tally.get(f"{status // 100}xx", 0) + 1
    assert status < 500, f"{status}: {response.text[:500]}"
    if status >= 400:
        error = response.json()["error"]
        assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    elif response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])


def send(client: TestClient, case) -> httpx.Response:
    """Send a generated case with our own client: schemathesis' requests-based transport
    breaks where urllib3-future (a grafana-client dependency) shadows urllib3."""
    kw = case.as_transport_kwargs(base_url="http://testserver")
    body = {"json": kw["json"]} if "json" in kw else {"content": kw.get("data")}
    return client.request(kw["method"], kw["url"], headers=kw["headers"], params=kw["params"], **body)


def test_1000_generated_requests_get_no_server_error(app, chat_model_dir):
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    tally = {"requests": 0}
    # One client, so one event loop, for every request: the engine's step loop lives there.
    with TestClient(app) as client:
        for result in schema.get_all_operations():
            operation = result.ok()
            label = f"{operation.method.upper()} {operation.path}"
            for mode in GenerationMode:
                @settings(max_examples=EXAMPLES.get(label, OTHER_EXAMPLES), deadline=None, database=None,
                          suppress_health_check=list(HealthCheck))
                @given(case=operation.as_strategy(generation_mode=mode))
                def fuzz(case):
                    check(send(client, case), tally)

                try:
                    fuzz()
                except Unsatisfiable:  # nothing to break in an operation without parameters
                    assert mode is GenerationMode.NEGATIVE and not operation.body, label
        print(f"\nfuzzed {tally['requests']} requests: {tally}")
        assert tally["requests"] >= 1000
        assert tally["2xx"] > 100 and tally["4xx"] > 100  # both valid and invalid bodies got through

        # the engine still serves the right tokens
        tok = AutoTokenizer.from_pretrained(chat_model_dir)
        hf = AutoModelForCausalLM.from_pretrained(chat_model_dir, dtype=torch.float32).eval()
        prompt = "def main():\n"
        ids = tok.encode(prompt)
        with torch.no_grad():
            want = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 16,
                                                 "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tok.decode(want, skip_special_tokens=True)
