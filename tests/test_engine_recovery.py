"""The engine's failure and re-layout paths in one process (no Ray): a step that fails
pauses every request, the engine rebuilds its workers and each request resumes from its
prompt plus the tokens it had, so every stream is exactly Hugging Face's greedy tokens (or,
seeded, the tokens of an undisturbed run), none repeated and none missing; requests that
arrive while it heals wait instead of failing; a request interrupted more than max_resumes
times fails, and so does everything when the rebuilds give up (then the Serve replica's
health check fails) or there is no way to rebuild; a re-layout mid-stream changes the KV
cache and batch sizes without a visible trace; a full waiting queue refuses with
EngineOverloadedError and loses nothing it accepted."""

import asyncio
import threading
import time

import pytest

import cluster.worker_replacement
from actors.sampling_params import SamplingParams
from actors.step_io import StepInput, StepOutput
from cluster.engine import Engine, EngineLimits
from cluster.engine_client import EngineDeadError, EngineOverloadedError
from cluster.executor import InProcessExecutor
from deploy.server.engine_replica import EngineReplica
from tests.tiny_models import hf_greedy, llama_config, random_prompts, save_tiny, worker_spec

BLOCK = 8
LIMITS = EngineLimits(256, 4, 128, BLOCK, True, 64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, save_tiny(llama_config(), path)


class BreakingExecutor(InProcessExecutor):
    """A real in-process executor whose worker 'dies' at step `fail_at`; with `num_stages`
    2 the engine keeps two steps in flight, as for two pipeline stages."""

    def __init__(self, path, fail_at: int | None, num_blocks: int = 64, num_stages: int = 1):
        super().__init__(worker_spec(path, block_size=BLOCK), num_blocks)
        self.num_stages = num_stages
        self.fail_at, self.steps, self.shut_down = fail_at, 0, False
        self.submitted, self.next_submitted = 0, threading.Event()

    def submit(self, step: StepInput):
        self.submitted += 1
        if self.fail_at is not None and self.submitted > self.fail_at:
            self.next_submitted.set()
        return super().submit(step)

    def execute(self, step: StepInput) -> StepOutput:
        self.steps += 1
        if self.steps == self.fail_at:
            if self.num_stages > 1:  # fail once the engine has sent the step after this one
                assert self.next_submitted.wait(30), "the engine kept a single step in flight"
            raise EngineDeadError("worker 0 died (simulated)")
        return super().execute(step)

    def shutdown(self) -> None:
        self.shut_down = True
        super().shutdown()


def engine_with(path, first: BreakingExecutor, *, rebuild_fail_at: int | None = None, rebuild: bool = True,
                limits: EngineLimits = LIMITS) -> tuple[Engine, list[BreakingExecutor]]:
    """An engine over `first`; each rebuild makes an executor that fails at `rebuild_fail_at`."""
    built: list[BreakingExecutor] = []

    def rebuild_executor() -> BreakingExecutor:
        built.append(BreakingExecutor(path, rebuild_fail_at))
        return built[-1]

    return Engine(first, limits, model_name="tiny", vocab_size=1000, eos_token_ids=(2,),
                  rebuild=rebuild_executor if rebuild else None), built


async def collect(engine: Engine, rid: str, prompt: list[int], params: SamplingParams) -> list[int] | Exception:
    """Every token the stream delivers, in order, or the error it ended with."""
    try:
        return [t async for out in engine.generate(rid, prompt, params) for d in out.deltas for t in d.token_ids]
    except EngineDeadError as e:
        return e


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


# seeded, and penalized: the sampling rank's token counts are rebuilt on the new workers
SEEDED = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, seed=77, ignore_eos=True,
                        frequency_penalty=0.5, repetition_penalty=1.2)


async def test_failed_step_resumes_every_request_with_exact_tokens(tiny):
    path, hf = tiny
    prompts = random_prompts(1000, [5, 9, 13, 30], seed=3)
    undisturbed, _ = engine_with(path, BreakingExecutor(path, fail_at=None))
    want_seeded = await collect(undisturbed, "s", prompts[3], SEEDED)
    undisturbed.shutdown()

    first = BreakingExecutor(path, fail_at=6)  # mid-stream: prompts done, tokens flowing
    engine, built = engine_with(path, first)
    results = await asyncio.gather(*(collect(engine, f"r{i}", p, greedy(20)) for i, p in enumerate(prompts[:3])),
                                   collect(engine, "s", prompts[3], SEEDED))
    assert results[:3] == [hf_greedy(hf, p, 20) for p in prompts[:3]]
    assert results[3] == want_seeded
    assert engine.dead is None and engine.restarts == 1 and first.shut_down and len(built) == 1
    assert engine.executor is built[0] and engine.blocks.num_free == engine.blocks.num_blocks
    engine.shutdown()


async def test_a_failure_with_two_steps_in_flight_loses_nothing(tiny):
    path, hf = tiny
    prompts = random_prompts(1000, [5, 9, 13, 30, 17, 8], seed=6)
    first = BreakingExecutor(path, fail_at=7, num_stages=2)
    engine, built = engine_with(path, first)
    results = await asyncio.gather(*(collect(engine, f"r{i}", p, greedy(16)) for i, p in enumerate(prompts)))
    assert results == [hf_greedy(hf, p, 16) for p in prompts]
    assert first.next_submitted.is_set()  # it failed with two steps in flight
    assert engine.restarts == 1 and len(built) == 1 and not engine.in_flight
    assert engine.blocks.num_free == engine.blocks.num_blocks
    engine.shutdown()


async def test_requests_arriving_while_the_workers_rebuild_wait_and_complete(tiny):
    path, hf = tiny
    release = threading.Event()

    def slow_rebuild() -> BreakingExecutor:
        assert release.wait(30)
        return BreakingExecutor(path, None)

    engine = Engine(BreakingExecutor(path, fail_at=3), LIMITS, model_name="tiny", vocab_size=1000,
                    rebuild=slow_rebuild)
    prompt, late = random_prompts(1000, [7, 11], seed=5)
    running = asyncio.create_task(collect(engine, "a", prompt, greedy(12)))
    while engine.dead is None:
        await asyncio.sleep(0.01)
    arriving = asyncio.create_task(collect(engine, "b", late, greedy(6)))  # while down: queued, not refused
    await asyncio.sleep(0.2)
    assert not arriving.done() and "b" in engine.requests
    release.set()
    assert await running == hf_greedy(hf, prompt, 12)
    assert await arriving == hf_greedy(hf, late, 6)
    engine.shutdown()


async def test_a_request_interrupted_more_than_max_resumes_times_fails(tiny):
    path, hf = tiny
    limits = EngineLimits(256, 4, 128, BLOCK, True, 64, max_resumes=1)
    engine, built = engine_with(path, BreakingExecutor(path, fail_at=3), rebuild_fail_at=4, limits=limits)
    prompt = random_prompts(1000, [6], seed=7)[0]
    result = await collect(engine, "a", prompt, greedy(40))
    assert isinstance(result, EngineDeadError) and "engine.max_resumes" in str(result)
    while engine.dead is not None:  # it heals all the same
        await asyncio.sleep(0.01)
    assert len(built) == 2 and not engine.requests
    built[-1].fail_at = None
    assert await collect(engine, "b", prompt, greedy(5)) == hf_greedy(hf, prompt, 5)
    engine.shutdown()


async def test_when_every_rebuild_fails_the_engine_gives_up_and_fails_the_replica_health_check(tiny, monkeypatch):
    """Every rebuild fails: the engine fails what it holds, and the Serve replica's health
    check, which passes while the engine is merely rebuilding, now raises, so Serve
    replaces the replica (Serve's contract for a health check that raises)."""
    path, _ = tiny
    monkeypatch.setattr(cluster.worker_replacement, "REBUILD_BACKOFF_S", (0.0, 0.0, 0.0))
    attempts: list[int] = []
    rebuilding = threading.Event()

    def broken_rebuild():
        attempts.append(len(attempts))
        assert rebuilding.wait(30)
        raise RuntimeError("no GPUs left")

    engine = Engine(BreakingExecutor(path, fail_at=2), LIMITS, model_name="tiny", vocab_size=1000,
                    rebuild=broken_rebuild)
    replica = object.__new__(EngineReplica.func_or_class)  # the deployment's class, without its constructor
    replica.engine = engine
    await replica.check_health()
    result = asyncio.create_task(collect(engine, "a", [5, 6, 7], greedy(8)))
    deadline = time.monotonic() + 30
    while not attempts:
        assert time.monotonic() < deadline, "no rebuild was attempted"
        await asyncio.sleep(0.01)
    await replica.check_health()  # a rebuild under way is the engine's to finish, not Serve's
    rebuilding.set()
    result = await result
    assert isinstance(result, EngineDeadError) and "could not rebuild the workers (3 attempts)" in str(result)
    assert attempts == [0, 1, 2] and engine.gave_up and not engine.requests
    with pytest.raises(EngineDeadError, match="engine is down"):
        engine.add_request("b", [5, 6, 7], greedy(4))
    with pytest.raises(RuntimeError, match="could not rebuild its workers"):
        await replica.check_health()
    engine.shutdown()


async def test_without_rebuild_the_engine_stays_down_and_says_why(tiny):
    path, _ = tiny
    engine, _ = engine_with(path, BreakingExecutor(path, fail_at=1), rebuild=False)
    result = await collect(engine, "a", [5, 6, 7], greedy(4))
    assert isinstance(result, EngineDeadError)
    with pytest.raises(EngineDeadError, match="simulated"):
        await engine.check_health()
    with pytest.raises(EngineDeadError, match="engine is down"):
        engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=4))
    engine.shutdown()


async def test_relayout_mid_stream_changes_sizes_without_a_trace(tiny):
    """Smaller KV cache and batch mid-stream; then a layout whose workers fail to start:
    the old layout comes back, the error reaches the caller, and still nothing fails."""
    path, hf = tiny
    engine, _ = engine_with(path, BreakingExecutor(path, fail_at=None))
    prompts = random_prompts(1000, [5, 9, 13, 30], seed=8)
    streams = [asyncio.create_task(collect(engine, f"r{i}", p, greedy(24))) for i, p in enumerate(prompts)]
    while not all(s.status.value == "running" for st in engine.requests.values() for s in st.seqs):
        await asyncio.sleep(0.01)
    smaller = EngineLimits(256, 2, 64, BLOCK, True, 64)
    paused = await engine.relayout(smaller, lambda: BreakingExecutor(path, None, num_blocks=20))
    assert paused >= 0 and engine.blocks.num_blocks == 20 and engine.scheduler.max_num_seqs == 2

    def cannot_start():
        raise RuntimeError("placement timed out")

    with pytest.raises(RuntimeError, match="placement timed out"):
        await engine.relayout(LIMITS, cannot_start)
    assert await asyncio.gather(*streams) == [hf_greedy(hf, p, 24) for p in prompts]
    assert engine.blocks.num_blocks == 20 and engine.restarts == 1  # the previous layout, rebuilt
    engine.shutdown()


async def test_full_queue_refuses_and_keeps_what_it_accepted(tiny):
    path, hf = tiny
    limits = EngineLimits(256, 4, 128, BLOCK, True, 3)
    engine, _ = engine_with(path, BreakingExecutor(path, fail_at=None), rebuild=False, limits=limits)
    prompts = random_prompts(1000, [6] * 3, seed=4)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, greedy(4))
    with pytest.raises(EngineOverloadedError, match="3 requests are waiting"):
        engine.add_request("one-too-many", prompts[0], SamplingParams(max_tokens=4))
    outputs: dict[str, list[int]] = {}
    while engine.scheduler.has_work():
        for out in await engine.step():
            outputs.setdefault(out.request_id, []).extend(t for d in out.deltas for t in d.token_ids)
    assert outputs == {f"r{i}": hf_greedy(hf, p, 4) for i, p in enumerate(prompts)}
    engine.shutdown()
