"""Failure, re-layout and overload through the real Serve app (tp=2 x pp=2 on the simulated
2x2 cluster), nothing lost: a killed (SIGKILL) or stuck (SIGSTOP: the step deadline)
worker in the middle of 8 greedy streams costs a rebuild and a pause, and every stream
ends with the text of an undisturbed run, leaking nothing; a re-layout to tp=1 x pp=2 (by
saving the YAML `tensorfleet serve` follows) and back (through Serve's user_config) while
the streams run does the same; a layout the cluster cannot place is refused before
anything is touched; a full queue answers 429 with
Retry-After once the batch is full and exactly max_waiting_requests wait; 100 streaming
clients for 60 s, with a worker killed every 15 s, lose no request and each gets the
text of an undisturbed run. Each test prints the figures it measured."""

import asyncio
import json
import os
import signal
import time
from dataclasses import dataclass, field

import httpx
import pytest
import ray
import yaml
from ray import serve

from cluster.engine_client import EngineStats
from deploy.cli.serve import ConfigFollower
from tests.servers import TINY_MODEL, deployed_config, relayout, serve_tiny_2x2

pytestmark = pytest.mark.slow
MODEL = TINY_MODEL
MAX_WAITING = 8
STEP_DEADLINE_S = 3.0
PROMPTS = [f"def {name}(path):\n" for name in ("read", "write", "parse", "load", "save", "scan", "copy", "walk")]
MAX_TOKENS = 160
TP2_PP2 = {"parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}}


@pytest.fixture(scope="module")
def server(ray_cluster_2x2, chat_model_dir):
    engine = {"max_model_len": 512, "block_size": 16, "num_kv_blocks": 256, "max_num_seqs": 8,
              "step_deadline_s": STEP_DEADLINE_S}
    with serve_tiny_2x2(chat_model_dir, engine, {"max_waiting_requests": MAX_WAITING}) as url:
        yield url


@dataclass
class Stream:
    """What one streaming completion delivered, and when."""

    text: str = ""
    events: list[float] = field(default_factory=list)  # arrival of each text chunk
    error: str | None = None
    done: bool = False

    @property
    def longest_gap(self) -> float:
        return max((b - a for a, b in zip(self.events, self.events[1:])), default=0.0)


async def stream(http: httpx.AsyncClient, url: str, prompt: str, out: Stream) -> Stream:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True}
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            out.error = f"HTTP {r.status_code}"
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line.removeprefix("data: "))
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                else:
                    out.text += chunk["choices"][0]["text"]
                    out.events.append(time.monotonic())
    out.done = True
    return out


async def run_streams(url: str, disturb=None) -> tuple[list[Stream], float, object]:
    """The 8 streams at once; once every one has its first token, `await disturb()`.
    Returns the streams, the seconds until the last one ended, and what `disturb` returned."""
    streams = [Stream() for _ in PROMPTS]
    async with httpx.AsyncClient(timeout=300) as http:
        start = time.monotonic()
        tasks = [asyncio.create_task(stream(http, url, p, s)) for p, s in zip(PROMPTS, streams)]
        disturbed = None
        if disturb is not None:
            while not all(s.events or s.done for s in streams):
                await asyncio.sleep(0.01)
            disturbed = await disturb(streams)
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
    return streams, time.monotonic() - start, disturbed


@pytest.fixture(scope="module")
def undisturbed(server) -> tuple[list[str], float]:
    """The texts and wall time of the 8 streams with nothing going wrong."""
    streams, elapsed, _ = asyncio.run(run_streams(server))
    assert all(s.error is None and s.text for s in streams)
    return [s.text for s in streams], elapsed


def check_nothing_lost(what: str, streams: list[Stream], elapsed: float, undisturbed: tuple[list[str], float]) -> None:
    """Print what disturbing the 8 streams cost; assert it lost nothing."""
    want, calm_s = undisturbed
    errors = [s.error for s in streams if s.error]
    print(f"{what}: {8 - len(errors)}/8 streams complete, {len(errors)} errors, texts identical to the undisturbed "
          f"run: {[s.text for s in streams] == want}; the 8 streams took {elapsed:.1f} s against {calm_s:.1f} s "
          f"(+{elapsed - calm_s:.1f} s), longest pause in a stream {max(s.longest_gap for s in streams):.1f} s")
    assert errors == []
    assert [s.text for s in streams] == want


async def engine_stats() -> EngineStats:
    return await serve.get_app_handle("tensorfleet").stats.remote()


def live_workers_and_groups() -> tuple[int, int]:
    actors = ray._private.state.actors().values()
    workers = sum(a["ActorClassName"] == "RayWorker" and a["State"] == "ALIVE" for a in actors)
    groups = sum(pg["state"] == "CREATED" for pg in ray.util.placement_group_table().values())
    return workers, groups


async def wait_until_serving(timeout_s: float = 180) -> EngineStats:
    deadline = time.monotonic() + timeout_s
    while not (stats := await engine_stats()).healthy or not stats.worker_pids:
        assert time.monotonic() < deadline, "the replica did not rebuild its workers"
        await asyncio.sleep(0.2)
    return stats


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "stuck"])
async def test_failed_worker_mid_stream_loses_nothing(server, undisturbed, signum):
    before = await engine_stats()
    assert before.healthy and live_workers_and_groups() == (4, 2)
    victim = before.worker_pids[-1]  # the last stage's TP rank 1

    async def hit(streams):
        os.kill(victim, signum)

    streams, elapsed, _ = await run_streams(server, hit)
    after = await wait_until_serving()
    check_nothing_lost(f"\n{signal.Signals(signum).name} of a worker mid-stream, {after.restarts - before.restarts} "
                       "rebuild", streams, elapsed, undisturbed)
    assert after.restarts == before.restarts + 1
    assert after.kv_blocks_free == after.kv_blocks  # nothing held by the resumed requests
    assert victim not in after.worker_pids
    assert live_workers_and_groups() == (4, 2)  # the old actors and placement groups are gone
    if signum == signal.SIGSTOP:
        with pytest.raises(ProcessLookupError):  # the stuck process was killed, not left stopped
            os.kill(victim, 0)


async def test_relayout_while_streaming_and_back_loses_nothing(server, undisturbed, tmp_path):
    """tp=2 x pp=2 -> tp=1 x pp=2 while the 8 streams run, by saving the YAML (what
    `tensorfleet serve` does with it), then back while they still run, through Serve's
    user_config; first, a layout the cluster cannot place is refused and changes nothing."""
    before = await engine_stats()
    refused = await asyncio.to_thread(relayout, {"parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 3}})
    print(f"\ntp=2 x pp=3 on 2 nodes of 2: refused: {refused.reason}")
    assert refused.refused is not None and "pipeline_parallel_size=3" in refused.reason
    assert (await engine_stats()).worker_pids == before.worker_pids  # untouched

    deployed = deployed_config()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(deployed.model_dump()))
    follower = ConfigFollower(path, deployed)

    async def save_yaml_with_tp1() -> asyncio.Task:
        """Save the YAML with tp=1; a request sent meanwhile waits for the new workers."""
        edited = deployed.model_dump()
        edited["parallel"]["tensor_parallel_size"] = 1
        path.write_text(yaml.safe_dump(edited))
        applying = asyncio.create_task(asyncio.to_thread(follower.poll))
        await asyncio.sleep(1.0)  # the replica is re-laying out now
        late = asyncio.create_task(http.post(f"{server}/v1/completions", json={
            "model": MODEL, "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}))
        news = await applying
        print(news)
        assert news.startswith("re-laid out to tp=1 x pp=2")
        return late

    async def there_and_back(streams):
        running, start = sum(not s.done for s in streams), time.monotonic()
        late = await save_yaml_with_tp1()
        assert len((await engine_stats()).worker_pids) == 2
        timings = [(running, time.monotonic() - start)]
        running, start = sum(not s.done for s in streams), time.monotonic()
        await asyncio.to_thread(relayout, TP2_PP2)
        assert len((await engine_stats()).worker_pids) == 4
        timings.append((running, time.monotonic() - start))
        return timings, await late

    async with httpx.AsyncClient(timeout=300) as http:
        streams, elapsed, (timings, late) = await run_streams(server, there_and_back)
    check_nothing_lost(f"re-layout 2x2 -> 1x2 with {timings[0][0]} streams running ({timings[0][1]:.1f} s), back to "
                       f"2x2 with {timings[1][0]} running ({timings[1][1]:.1f} s)", streams, elapsed, undisturbed)
    print(f"a request sent during the first re-layout: HTTP {late.status_code}, text identical: "
          f"{late.status_code == 200 and late.json()['choices'][0]['text'] == undisturbed[0][0]}")
    assert late.status_code == 200 and late.json()["choices"][0]["text"] == undisturbed[0][0]
    assert timings[0][0] > 0 and timings[1][0] > 0  # both changes happened during the streams
    after = await engine_stats()
    assert after.restarts == before.restarts and after.kv_blocks_free == after.kv_blocks
    assert live_workers_and_groups() == (4, 2)


async def test_full_queue_answers_429_with_retry_after(server):
    """8 running + 8 waiting fill the engine; the rest get 429 at once and nothing is lost."""
    async def one(http):
        r = await http.post(f"{server}/v1/completions", json={
            "model": MODEL, "prompt": "import sys\n", "max_tokens": 48, "temperature": 0, "ignore_eos": True})
        return r

    peak_waiting = 0

    async def watch_the_queue():
        nonlocal peak_waiting
        while True:
            peak_waiting = max(peak_waiting, (await engine_stats()).waiting)

    async with httpx.AsyncClient(timeout=120) as http:
        # Fill the running batch first: a burst alone may reach the engine before its first
        # step admits anything, and then only the waiting queue's 8 would be served.
        running = [asyncio.create_task(one(http)) for _ in range(8)]
        deadline = time.monotonic() + 30
        while (before := await engine_stats()).running < 8:
            assert time.monotonic() < deadline, f"8 requests did not fill the batch: {before}"
            await asyncio.sleep(0.02)
        assert before.waiting == 0
        watcher = asyncio.create_task(watch_the_queue())
        # 48 tokens take the full batch many steps: the burst's first 8 wait that long
        replies = await asyncio.gather(*(one(http) for _ in range(32))) + await asyncio.gather(*running)
        watcher.cancel()
    codes = [r.status_code for r in replies]
    refused = [r for r in replies if r.status_code == 429]
    print(f"\n40 concurrent requests: {codes.count(200)} served, {len(refused)} refused with 429; "
          f"the batch was full ({before.running} running) before the burst, at most {peak_waiting} waited")
    assert peak_waiting == MAX_WAITING
    assert set(codes) == {200, 429}
    assert codes.count(200) >= 8 + MAX_WAITING
    assert all(r.headers["Retry-After"] == "1" for r in refused)
    assert all(r.json()["error"]["code"] == "engine_overloaded" for r in refused)
    assert all(r.json()["usage"]["completion_tokens"] == 48 for r in replies if r.status_code == 200)
    assert (await engine_stats()).waiting == 0


def soak_request(i: int) -> dict:
    """Client i's request in the soak test: greedy, 8 to 15 tokens."""
    return {"model": MODEL, "prompt": f"def f{i}():\n", "max_tokens": 8 + i % 8, "temperature": 0,
            "ignore_eos": True}


async def test_100_streaming_clients_for_60_s_with_a_worker_killed_every_15_s_lose_nothing(server):
    """Each client streams requests back to back for 60 s, waiting Retry-After on a 429,
    while a worker is SIGKILLed every 15 s (once the replica serves again); every request
    must end with [DONE] (or a 429), none may fail or hang, and each completed stream is
    its max_tokens tokens of the text an undisturbed request gave."""
    duration_s, kill_every_s, per_request_timeout_s = 60.0, 15.0, 180.0
    tally = {"tried": 0, "completed": 0, "refused": 0, "failed": 0, "hung": 0, "wrong": 0, "tokens": 0}
    kills: list[float] = []
    wrong: list[str] = []
    before = await engine_stats()
    async with httpx.AsyncClient(timeout=per_request_timeout_s) as http:
        want = []
        for group in range(0, 100, MAX_WAITING):  # what an idle engine's queue takes at once
            replies = await asyncio.gather(*(http.post(f"{server}/v1/completions", json=soak_request(i))
                                             for i in range(group, min(group + MAX_WAITING, 100))))
            want += [r.json()["choices"][0]["text"] for r in replies]

    async def client(http, i):
        deadline = time.monotonic() + duration_s
        body = soak_request(i) | {"stream": True, "stream_options": {"include_usage": True}}
        while time.monotonic() < deadline:
            tally["tried"] += 1
            try:
                async with asyncio.timeout(per_request_timeout_s):
                    async with http.stream("POST", f"{server}/v1/completions", json=body) as r:
                        if r.status_code == 429:
                            tally["refused"] += 1
                            await asyncio.sleep(float(r.headers["Retry-After"]))
                            continue
                        lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                ok = r.status_code == 200 and lines[-1] == "data: [DONE]" and '"error"' not in "".join(lines)
                tally["completed" if ok else "failed"] += 1
                if ok:
                    *chunks, usage = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
                    text = "".join(c["choices"][0]["text"] for c in chunks)
                    tokens = usage["usage"]["completion_tokens"]
                    tally["tokens"] += tokens
                    reason = chunks[-1]["choices"][0]["finish_reason"]
                    if (text, tokens, reason) != (want[i], body["max_tokens"], "length"):
                        tally["wrong"] += 1
                        wrong.append(f"client {i}: {tokens} tokens {text!r}, want {body['max_tokens']} {want[i]!r}")
            except TimeoutError:
                tally["hung"] += 1
            except httpx.HTTPError:
                tally["failed"] += 1

    async def killer(start: float):
        for k in range(1, int(duration_s // kill_every_s)):
            await asyncio.sleep(max(0.0, start + k * kill_every_s - time.monotonic()))
            stats = await wait_until_serving()
            os.kill(stats.worker_pids[k % len(stats.worker_pids)], signal.SIGKILL)
            kills.append(time.monotonic() - start)

    limits = httpx.Limits(max_connections=200)
    start = time.monotonic()
    async with httpx.AsyncClient(timeout=per_request_timeout_s, limits=limits) as http:
        await asyncio.gather(killer(start), *(client(http, i) for i in range(100)))
    elapsed = time.monotonic() - start
    after = await wait_until_serving()
    print(f"\n100 clients, {elapsed:.0f} s, workers killed at {', '.join(f'{t:.0f}' for t in kills)} s: {tally}, "
          f"{tally['tokens'] / elapsed:.0f} streamed tokens/s, {after.restarts - before.restarts} rebuilds")
    assert tally["failed"] == 0 and tally["hung"] == 0 and tally["completed"] > 0
    assert wrong == []
    assert after.restarts - before.restarts == len(kills) == 3
    assert after.running == after.waiting == 0 and after.kv_blocks_free == after.kv_blocks
