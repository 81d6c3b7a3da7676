"""The engine across TP x PP Ray workers on a simulated 2-node x 2-GPU cluster, two batches
in flight: concurrent greedy requests produce exactly Hugging Face's tokens for each
prompt alone (heads split evenly and unevenly), and seeded ones those of one process
without a pipeline, with preemption and chunked prefill in the mix; steps longer than the
health check's timeout are not mistaken for dead workers, nor is a cancelled request's call
(in an async actor, as in a Serve replica) the end of the steps in flight."""

import asyncio
import time

import pytest
import ray

from actors.ray_worker import RayWorker
from actors.sampling_params import SamplingParams
from actors.step_io import StageHandoff, StepInput, StepOutput
from cluster.config import TensorfleetConfig
from cluster.engine import Engine
from cluster.ray_executor import RayExecutor
from cluster.replica import build_engine, engine_limits, plan_replica
from tests.test_engine import make_engine, mixed_requests
from tests.tiny_models import hf_greedy, save_tiny, smollm2_like_config

pytestmark = pytest.mark.slow


def engine_config(path, *, num_kv_blocks: int, layer_partition=(2, 3), tensor_split=None,
                  max_num_batched_tokens: int = 256) -> TensorfleetConfig:
    return TensorfleetConfig.model_validate({
        "model": str(path), "dtype": "float32",
        "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "layer_partition": list(layer_partition),
                     "tensor_split": tensor_split, "device": "cpu"},
        "engine": {"max_model_len": 128, "block_size": 8, "num_kv_blocks": num_kv_blocks,
                   "max_num_seqs": 16, "max_num_batched_tokens": max_num_batched_tokens},
    })


async def run_concurrently(engine, requests):
    """Every request's tokens; a list per completion for n > 1."""
    async def one(rid, prompt, params):
        tokens = [[] for _ in range(params.n)]
        async for out in engine.generate(rid, prompt, params):
            for d in out.deltas:
                tokens[d.index] += d.token_ids
        return tokens[0] if params.n == 1 else tokens

    return await asyncio.gather(*(one(rid, p, params) for rid, (p, params) in requests.items()))


def count_in_flight(engine: Engine) -> list[int]:
    """Watch the engine's executor: [the most steps the engine held at once]. Counted as
    each step is sent, from the engine's own steps in flight (a step's future may be done
    before the engine has taken it back)."""
    most, submit = [0], engine.executor.submit

    def counting_submit(step):
        most[0] = max(most[0], len(engine.in_flight) + 1)
        return submit(step)

    engine.executor.submit = counting_submit
    return most


@pytest.mark.parametrize("num_kv_blocks,max_num_batched_tokens", [(256, 256), (20, 256), (64, 24)],
                         ids=["roomy", "preempting", "chunked"])
async def test_16_concurrent_requests_match_hf_and_one_process(ray_cluster_2x2, tiny_llama_dir, num_kv_blocks,
                                                                 max_num_batched_tokens):
    path, hf = tiny_llama_dir
    requests = mixed_requests(1000, 16, seed=41)
    seeded = {f"s{i}": (prompt, SamplingParams(max_tokens=12, temperature=0.8, top_p=0.95, seed=5 + i, n=1 + i % 2,
                                               ignore_eos=True))
              for i, (prompt, _) in enumerate(list(requests.values())[:4])}
    one_process = make_engine(path, max_tokens_per_step=max_num_batched_tokens)
    want_seeded = dict(zip(seeded, await run_concurrently(one_process, seeded)))
    engine = build_engine(engine_config(path, num_kv_blocks=num_kv_blocks, max_num_batched_tokens=max_num_batched_tokens))
    in_flight = count_in_flight(engine)
    try:
        got = dict(zip([*requests, *seeded], await run_concurrently(engine, {**requests, **seeded})))
        preemptions = engine.scheduler.stats.preemptions
        print(f"{num_kv_blocks} KV blocks, {max_num_batched_tokens} tokens a step: {preemptions} preemptions, "
              f"{in_flight[0]} steps in flight at most; stage busy shares "
              f"{[round(b / engine.stage_times().active_s, 2) for b in engine.stage_times().busy_s]}")
        assert in_flight[0] == 2
        if num_kv_blocks == 20:
            assert preemptions > 0
        for rid, (prompt, params) in requests.items():
            assert got[rid] == hf_greedy(hf, prompt, params.max_tokens), rid
        assert {rid: got[rid] for rid in seeded} == want_seeded
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        engine.shutdown()
        one_process.shutdown()


@pytest.mark.parametrize("tensor_split", [None, [2, 1]], ids=["uneven", "weighted"])
async def test_uneven_heads_greedy_requests_match_hf(ray_cluster_2x2, tmp_path, tensor_split):
    """SmolLM2's 9 heads / 3 KV heads at tp=2 (5 + 4 heads, or 6 + 3 weighted): decodes read
    unequal query groups per KV head; prompt chunks attend over cached context."""
    hf = save_tiny(smollm2_like_config(), tmp_path)
    engine = build_engine(engine_config(tmp_path, num_kv_blocks=256, layer_partition=(2, 1), tensor_split=tensor_split,
                                        max_num_batched_tokens=48))
    try:
        requests = mixed_requests(1000, 12, seed=43)
        got = await run_concurrently(engine, requests)
        for (rid, (prompt, params)), tokens in zip(requests.items(), got):
            assert tokens == hf_greedy(hf, prompt, params.max_tokens), rid
    finally:
        engine.executor.shutdown()


SLOW_STEP_S = 2.0
HEALTH_CHECK_TIMEOUT_S = 0.5


class SlowWorker(RayWorker):
    """A worker whose every step takes SLOW_STEP_S longer, as a large prefill would."""

    def step(self, step: StepInput, prev: list[ray.ObjectRef] | None = None) -> StageHandoff | StepOutput | None:
        time.sleep(SLOW_STEP_S)
        return super().step(step, prev)


def slow_engine(cfg: TensorfleetConfig, **executor_options) -> Engine:
    """An engine on SlowWorkers that never rebuilds them: a busy worker taken for a dead
    one, or a cancelled step, fails the requests."""
    plan, spec = plan_replica(cfg)
    executor = RayExecutor(spec, plan.num_kv_blocks, step_deadline_s=30, worker_cls=SlowWorker,
                           placement_timeout_s=300,  # its workers import this test module, and torch with it
                           **executor_options)
    return Engine(executor, engine_limits(cfg), model_name="tiny", vocab_size=plan.shape.vocab_size, rebuild=None)


async def test_steps_longer_than_the_health_check_timeout_are_not_deaths(ray_cluster_2x2, tiny_llama_dir):
    """Each step takes 4x the health check's timeout while health checks run every 0.1 s:
    the workers answer them beside the step, nothing fails and nothing is rebuilt."""
    path, hf = tiny_llama_dir
    engine = slow_engine(engine_config(path, num_kv_blocks=64), health_check_timeout_s=HEALTH_CHECK_TIMEOUT_S)
    checks: list[float] = []

    async def probe() -> None:
        while True:
            start = time.monotonic()
            await engine.check_health()
            checks.append(time.monotonic() - start)
            await asyncio.sleep(0.1)

    prober = asyncio.create_task(probe())
    try:
        requests = dict(list(mixed_requests(1000, 3, seed=43).items()))
        requests = {rid: (prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))
                    for rid, (prompt, _) in requests.items()}
        start = time.monotonic()
        got = await run_concurrently(engine, requests)
        elapsed = time.monotonic() - start
        assert not prober.done(), prober.exception()
        print(f"\n{engine.executor.spec.tp}x{engine.executor.spec.pp} workers, steps of >= {SLOW_STEP_S} s, health "
              f"check timeout {HEALTH_CHECK_TIMEOUT_S} s: {len(checks)} health checks passed in {elapsed:.1f} s "
              f"(slowest answer {max(checks):.3f} s), {engine.restarts} rebuilds")
        assert [tokens for tokens in got] == [hf_greedy(hf, p, 3) for p, _ in requests.values()]
        assert engine.restarts == 0 and engine.dead is None
        assert len(checks) > 3 * elapsed / SLOW_STEP_S  # several checks during every step
    finally:
        prober.cancel()
        engine.shutdown()


@ray.remote(num_cpus=0)
class EngineHost:
    """An engine inside an async Ray actor, as in a Serve replica: `generate` is a streaming
    actor task, which its caller cancels when it stops reading (Serve's handle does). Slow
    steps keep the second stage's step queued on its worker, where a cancel reaches it."""

    def __init__(self, config: dict):
        self.engine = slow_engine(TensorfleetConfig.model_validate(config))

    async def generate(self, request_id: str, prompt: list[int], max_tokens: int):
        params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
        async for out in self.engine.generate(request_id, prompt, params):
            yield [t for d in out.deltas for t in d.token_ids]

    def shutdown(self) -> None:
        self.engine.shutdown()


async def test_cancelling_the_request_that_started_the_loop_cancels_none_of_its_steps(ray_cluster_2x2, tiny_llama_dir):
    """The engine's loop starts inside the first request's actor task, and Ray cancels a
    task's pending children with it: steps sent from a loop that kept that task's context
    would die when the ingress cancels that request's call (its client went away), failing
    every other request on the replica (or, with rebuilds on, pausing them all)."""
    path, hf = tiny_llama_dir
    host = EngineHost.remote(engine_config(path, num_kv_blocks=64).model_dump())
    try:
        first = host.generate.options(num_returns="streaming").remote("first", [5, 6, 7], 100)  # starts the loop
        await (await first.__anext__())
        second = host.generate.options(num_returns="streaming").remote("second", [8, 9, 10], 3)
        await asyncio.sleep(SLOW_STEP_S)  # the second request's steps are on the workers
        ray.cancel(first)
        assert [t async for ref in second for t in await ref] == hf_greedy(hf, [8, 9, 10], 3)
        await host.shutdown.remote()
    finally:
        ray.kill(host)
