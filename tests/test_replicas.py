"""Many model replicas behind one endpoint: the config and the planner (fast), the prefix-aware
router's choices over fake replicas (fast), and on the simulated 2x2 cluster, two tp=1 replicas
of the tiny chat model behind the Serve app: follow-ups sharing a long system prompt land where
its KV blocks are (cached_tokens > 0), autoscaling goes 1 -> 2 under load and back, and the
engine's metrics carry a replica label."""

import asyncio
import json
import re
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import ray
import torch
from ray import serve

from actors.model_shape import ModelShape
from cluster.config import ConfigError, EngineConfig, ParallelConfig, ServeConfig, load_config
from cluster.kv_blocks import prefix_keys
from cluster.plan import ClusterSpec, PlanError, make_plan
from cluster.plan_report import format_plan
from deploy.cli.main import main
from deploy.server.app import APP_NAME, ENGINE
from deploy.server.router import HOLDER_ONLY_TRIES, STALE_CHOICE_S, PrefixAwareRouter
from tests.servers import serve_app

GiB = 1 << 30


# -- config and plan ------------------------------------------------------------------------

def test_num_replicas_and_autoscaling_are_exclusive_and_ordered():
    with pytest.raises(ValueError, match="set num_replicas or autoscaling, not both"):
        ServeConfig.model_validate({"num_replicas": 2, "autoscaling": {"max_replicas": 3}})
    with pytest.raises(ValueError, match="max_replicas=1 is below min_replicas=2"):
        ServeConfig.model_validate({"autoscaling": {"min_replicas": 2, "max_replicas": 1}})
    assert ServeConfig().max_replicas == 1
    assert ServeConfig(num_replicas=3).max_replicas == 3
    assert ServeConfig.model_validate({"autoscaling": {"max_replicas": 4}}).max_replicas == 4


def test_config_error_names_the_serve_field(tmp_path):
    (tmp_path / "c.yaml").write_text("model: m\nserve: {num_replicas: 0}\n")
    with pytest.raises(ConfigError, match=r"serve\.num_replicas"):
        load_config(tmp_path / "c.yaml")


def _plan(tp: int, pp: int, nodes: int, serve: dict):
    """Llama 3 8B on nodes of two 80 GiB GPUs."""
    shape = ModelShape.from_dir(Path(__file__).resolve().parents[1] / "deploy" / "model_configs" / "llama-3-8b")
    return make_plan(shape, ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp),
                     EngineConfig(), torch.bfloat16, ClusterSpec(nodes, 2, 80 * GiB),
                     ServeConfig.model_validate(serve))


def test_planner_checks_that_the_replicas_fit_the_cluster():
    assert _plan(2, 1, 2, {"num_replicas": 2}).replicas == 2
    with pytest.raises(PlanError, match=r"serve\.num_replicas: 2 replicas of tensor_parallel_size=2 x "
                                        r"pipeline_parallel_size=2 need 4 node-local groups .* hold 2; "
                                        r"use at most 1 replica"):
        _plan(2, 2, 2, {"num_replicas": 2})
    with pytest.raises(PlanError, match=r"serve\.autoscaling\.max_replicas: 5 replicas"):
        _plan(1, 1, 2, {"autoscaling": {"max_replicas": 5}})
    assert "4 replicas: 8 GPUs" in format_plan(_plan(1, 2, 4, {"num_replicas": 4}))


def test_the_two_replica_demo_config_fits_2x2_and_not_1x2(capsys):
    """deploy/configs/smollm2-2-replicas.yaml: the default model, two replicas of tp=2, one per
    node of `--simulate 2x2`; one node of two GPUs holds only one replica."""
    demo = str(Path(__file__).resolve().parents[1] / "deploy" / "configs" / "smollm2-2-replicas.yaml")
    assert main(["plan", demo, "--nodes", "2", "--gpus-per-node", "2", "--gpu-memory", "16GiB"]) == 0
    assert "2 replicas: 4 GPUs" in capsys.readouterr().out
    assert main(["plan", demo, "--nodes", "1", "--gpus-per-node", "2", "--gpu-memory", "16GiB"]) == 2
    assert "serve.num_replicas: 2 replicas" in capsys.readouterr().err


# -- the router over fake replicas ----------------------------------------------------------

def _replica(name: str) -> SimpleNamespace:
    return SimpleNamespace(replica_id=name, max_ongoing_requests=100)


def _request(request_id: str, prompt: list[int] | None, method: str = "generate") -> SimpleNamespace:
    kwargs = {"prompt_token_ids": prompt} if prompt is not None else {}
    return SimpleNamespace(kwargs=kwargs, metadata=SimpleNamespace(call_method=method, internal_request_id=request_id),
                           future=Future())  # Serve sets the chosen replica on it


def _router(max_load_imbalance: int = 2) -> PrefixAwareRouter:
    router = PrefixAwareRouter.__new__(PrefixAwareRouter)  # no Serve around: only the routing state
    router.initialize_state(block_size=4, max_load_imbalance=max_load_imbalance, max_blocks=64)
    return router


def _choose(router, replicas, request) -> str:
    return asyncio.run(router.choose_replicas(replicas, request))[0][0].replica_id


def _route(router, replicas, request) -> str:
    """Choose for `request` and route it there."""
    chosen = _choose(router, replicas, request)
    router.on_request_routed(request, chosen, None)
    return chosen


def test_router_follows_the_prefix_and_spreads_new_ones():
    router, replicas = _router(), [_replica("a"), _replica("b")]
    system_a, system_b = list(range(100, 112)), list(range(200, 212))  # 3 blocks each
    first_a = _route(router, replicas, _request("1", system_a + [1]))
    first_b = _route(router, replicas, _request("2", system_b + [2]))
    assert {first_a, first_b} == {"a", "b"}  # new prefixes go where load and memory are least
    for i in range(3, 9):  # one at a time: the load stays balanced
        assert _route(router, replicas, _request(str(i), system_a + [i, i])) == first_a
        router.on_request_completed(first_a, str(i))
    # the longest match wins: a replica that holds only the first block loses to one with two
    router2 = _router(max_load_imbalance=10)
    _route(router2, replicas, _request("x", system_a[:4]))  # -> one replica, 1 block
    other = _route(router2, replicas, _request("y", [9] * 4))  # the other, for balance
    router2.on_request_routed(_request("z", system_a[:8] + [5]), other, None)
    assert _route(router2, replicas, _request("w", system_a + [7])) == other


def test_router_spreads_a_burst_chosen_before_any_is_routed():
    """Serve routes a burst side by side: each request is chosen for, then waits for its
    replica to accept it. Chosen counts as load at once, so 8 new prompts go 4 and 4; a
    request chosen again does not count against its own choice; a cancelled or stale one stops counting."""

    router, replicas = _router(), [_replica("a"), _replica("b")]
    burst = [_request(str(i), [i] * 8) for i in range(8)]
    chosen = [_choose(router, replicas, r) for r in burst]
    assert Counter(chosen) == {"a": 4, "b": 4}
    assert _choose(router, replicas, burst[0]) == chosen[0]  # a retry, as before
    for request, replica in zip(burst, chosen):
        if replica == "a":
            request.future.cancel()
    assert [_choose(router, replicas, _request(f"n{i}", [50 + i] * 8)) for i in range(4)] == ["a"] * 4
    router.on_request_routed(burst[1], chosen[1], None)  # accepted: counted once, as in flight
    assert sum(router._load().values()) == 8
    for routing in router.routing.values():  # choices nobody renewed (their calls failed unseen)
        routing.chosen_at -= STALE_CHOICE_S + 1
    assert router._load() == {chosen[1]: 1}


def test_router_offers_only_the_holder_for_its_first_tries():
    """A slow queue-length answer from the holder must not send the request elsewhere at once."""
    router, replicas = _router(), [_replica("a"), _replica("b")]
    prompt = list(range(16))
    holder = _route(router, replicas, _request("0", prompt))
    router.on_request_completed(holder, "0")
    follow_up = _request("1", prompt + [99])
    for _ in range(HOLDER_ONLY_TRIES):
        ranks = asyncio.run(router.choose_replicas(replicas, follow_up))
        assert [[r.replica_id for r in rank] for rank in ranks] == [[holder]]
    ranks = asyncio.run(router.choose_replicas(replicas, follow_up))
    assert [[r.replica_id for r in rank] for rank in ranks] == [[holder], [r.replica_id for r in replicas if r.replica_id != holder]]


def test_router_falls_back_to_the_least_loaded_past_the_imbalance():
    router, replicas = _router(max_load_imbalance=2), [_replica("a"), _replica("b")]
    prompt = list(range(16))
    holder = _route(router, replicas, _request("0", prompt))
    for i in range(1, 3):  # holder: 3 in flight, the other 0 -> past the threshold of 2
        assert _route(router, replicas, _request(str(i), prompt)) == holder
    assert _route(router, replicas, _request("3", prompt)) != holder


def test_router_forgets_a_dead_replica_and_routes_other_calls_by_load():
    router, replicas = _router(), [_replica("a"), _replica("b")]
    prompt = list(range(16))
    holder = _route(router, replicas, _request("0", prompt))
    router._forget(holder)
    survivor = [r for r in replicas if r.replica_id != holder]
    assert _route(router, survivor, _request("1", prompt)) == survivor[0].replica_id
    assert router.blocks_held[survivor[0].replica_id] == len(list(prefix_keys(prompt, 4)))
    assert _route(router, replicas, _request("2", None, method="stats")) == holder  # holds nothing now


# -- two replicas on the simulated cluster ---------------------------------------------------

MODEL = "tiny-replicas"
ENGINE_SIZES = {"max_model_len": 512, "block_size": 16, "num_kv_blocks": 256, "max_num_seqs": 16}


def _app(chat_model_dir, serve_options: dict) -> dict:
    return {"model": str(chat_model_dir), "served_model_name": MODEL, "dtype": "float32",
            "parallel": {"device": "cpu"}, "engine": ENGINE_SIZES, "serve": serve_options}


def _running_replicas() -> int:
    return serve.status().applications[APP_NAME].deployments[ENGINE].replica_states.get("RUNNING", 0)


@pytest.mark.slow
async def test_autoscaling_adds_a_replica_under_load_and_removes_it_after(ray_cluster_2x2, chat_model_dir):
    """From 1 replica (target: 2 requests in flight each), streams that keep 6 in flight
    bring a second one; once they stop, it goes again."""
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
                   "downscale_delay_s": 2, "look_back_period_s": 2}
    with serve_app(_app(chat_model_dir, {"autoscaling": autoscaling})) as url:
        assert _running_replicas() == 1
        stop = asyncio.Event()

        async def keep_busy(http: httpx.AsyncClient, i: int) -> None:
            while not stop.is_set():
                await chat(http, url, system_prompt(i), "Tell me a long story.", max_tokens=64)

        async with httpx.AsyncClient(timeout=120) as http:
            load = [asyncio.ensure_future(keep_busy(http, i)) for i in range(6)]
            try:
                deadline = time.monotonic() + 180
                while _running_replicas() < 2:
                    assert time.monotonic() < deadline, "no second replica under load"
                    assert not any(t.done() and t.exception() for t in load)
                    await asyncio.sleep(1)
            finally:
                stop.set()
                await asyncio.gather(*load)
        deadline = time.monotonic() + 180
        while _running_replicas() > 1:
            assert time.monotonic() < deadline, "the second replica stayed without load"
            await asyncio.sleep(1)


@pytest.fixture(scope="module")
def two_replicas(ray_cluster_2x2, chat_model_dir):
    with serve_app(_app(chat_model_dir, {"num_replicas": 2})) as url:
        yield url


def system_prompt(i: int) -> str:
    return f"You are assistant number {i}. " + "Answer briefly, politely and in plain English. " * 12


async def chat(http: httpx.AsyncClient, url: str, system: str, user: str, max_tokens: int = 4) -> dict:
    r = await http.post(f"{url}/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.slow
async def test_follow_ups_sharing_a_prefix_hit_the_cache(two_replicas):
    """8 system prompts, each asked once, then 4 rounds of follow-ups (8 at a time): every
    follow-up lands where its system prompt's blocks are (random routing: about half)."""
    systems = [system_prompt(i) for i in range(8)]
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(chat(http, two_replicas, s, "Hello.") for s in systems))
        follow_ups = []
        for round_ in range(4):
            follow_ups += await asyncio.gather(*(chat(http, two_replicas, s, f"Question {round_} about {i}?")
                                                 for i, s in enumerate(systems)))
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in follow_ups]
    hits = sum(c > 0 for c in cached)
    assert hits >= 0.95 * len(cached), f"{hits} of {len(cached)} follow-ups hit the cache: {cached}"
    assert min(c for c in cached if c > 0) >= 16 * 6  # the system prompt's blocks (~120 tokens), not the template's


@pytest.mark.slow
async def test_engine_metrics_carry_a_replica_label(two_replicas):
    """Both replicas served requests (the router spreads new prefixes), and each one's series
    carry its own `replica` label, scraped from the nodes' metrics agents (which may still
    hold the series of replicas of earlier apps of this model name)."""
    async with httpx.AsyncClient(timeout=120) as http:
        await asyncio.gather(*(chat(http, two_replicas, system_prompt(100 + i), "Hi.") for i in range(4)))
    live = set(engine_replicas())
    pattern = re.compile(rf'^ray_tensorfleet_requests_finished_total\{{[^}}]*model_name="{MODEL}"[^}}]*\}}', re.MULTILINE)
    deadline, labels = time.monotonic() + 60, set()
    async with httpx.AsyncClient(timeout=10) as http:
        while time.monotonic() < deadline and not live <= labels:
            labels = set()
            for node in ray.nodes():
                if node["Alive"]:
                    text = (await http.get(f"http://127.0.0.1:{node['MetricsExportPort']}/metrics")).text
                    labels |= {m for line in pattern.findall(text) for m in re.findall(r'replica="([^"]+)"', line)}
            await asyncio.sleep(2)
    assert len(live) == 2 and live <= labels, f"replicas {live}, labels seen: {labels}"


async def stream_text(http: httpx.AsyncClient, url: str, prompt: str, progress: list[int], i: int) -> str:
    """A greedy 256-token completion, streamed; counts the chunks received in `progress[i]`."""
    text = ""
    async with http.stream("POST", f"{url}/v1/completions", json={
            "model": MODEL, "prompt": prompt, "max_tokens": 256, "temperature": 0, "ignore_eos": True,
            "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event
                text += event["choices"][0]["text"]
                progress[i] += 1
    return text


def engine_replicas() -> dict[str, ray.actor.ActorHandle]:
    """The EngineReplica actors by replica id (Serve names them SERVE_REPLICA::app#deployment#id)."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#{ENGINE}#"
    return {a["name"].removeprefix(prefix): ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)}


@pytest.mark.slow
async def test_a_replica_dies_during_8_streams_and_they_finish_on_its_sibling(two_replicas):
    """8 streams over the two replicas (new prompts shorter than a block, routed by load: 4
    and 4); one replica's process is killed while every stream runs: all 8 complete, with
    the texts of an undisturbed run."""
    prompts = [f"{i} def function(x):\n    return" for i in range(8)]
    async with httpx.AsyncClient(timeout=300) as http:
        undisturbed = await asyncio.gather(*(stream_text(http, two_replicas, p, [0], 0) for p in prompts))
        progress = [0] * 8
        streams = [asyncio.ensure_future(stream_text(http, two_replicas, p, progress, i))
                   for i, p in enumerate(prompts)]
        deadline = time.monotonic() + 120
        while min(progress) < 4:
            assert time.monotonic() < deadline and not any(s.done() for s in streams)
            await asyncio.sleep(0.05)
        replicas = list(engine_replicas().values())
        assert len(replicas) == 2 and not any(s.done() for s in streams)
        ray.kill(replicas[0], no_restart=True)  # as a crash: the process ends, Serve starts another
        texts = await asyncio.gather(*streams)
    assert texts == undisturbed
    assert await serve.get_app_handle(APP_NAME).failovers.remote() >= 1  # the killed replica had streams
