"""The engine's failure paths in one process (no Ray): a step that fails fails every
in-flight request at once with EngineDeadError, the engine rebuilds its workers and serves
Hugging Face's tokens again; without a way to rebuild it stays down; a full waiting queue
refuses with EngineOverloadedError and loses nothing it accepted."""

import asyncio

import pytest

from actors.sampling_params import SamplingParams
from actors.step_io import StepInput, StepOutput
from cluster.engine import Engine, EngineLimits
from cluster.engine_client import EngineDeadError, EngineOverloadedError
from cluster.executor import InProcessExecutor
from tests.tiny_models import hf_greedy, llama_config, random_prompts, save_tiny, worker_spec

BLOCK = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, save_tiny(llama_config(), path)


class BreakingExecutor(InProcessExecutor):
    """A real in-process executor whose worker 'dies' at step `fail_at`."""

    def __init__(self, path, fail_at: int | None):
        super().__init__(worker_spec(path, block_size=BLOCK), 64)
        self.fail_at, self.steps, self.shut_down = fail_at, 0, False

    def execute(self, step: StepInput) -> StepOutput:
        self.steps += 1
        if self.steps == self.fail_at:
            raise EngineDeadError("worker 0 died (simulated)")
        return super().execute(step)

    def shutdown(self) -> None:
        self.shut_down = True
        super().shutdown()


def engine_with(path, first: BreakingExecutor, *, rebuild: bool, max_waiting: int = 64) -> tuple[Engine, list]:
    built: list[BreakingExecutor] = []

    def rebuild_executor() -> BreakingExecutor:
        built.append(BreakingExecutor(path, None))
        return built[-1]

    limits = EngineLimits(256, 4, 128, BLOCK, True, max_waiting)
    return Engine(first, limits, model_name="tiny", vocab_size=1000, eos_token_ids=(2,),
                  rebuild=rebuild_executor if rebuild else None), built


async def collect(engine: Engine, rid: str, prompt: list[int], n: int) -> list[int] | Exception:
    try:
        return [t async for out in engine.generate(rid, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                for d in out.deltas for t in d.token_ids]
    except EngineDeadError as e:
        return e


async def test_failed_step_fails_everything_in_flight_then_engine_rebuilds(tiny):
    path, hf = tiny
    first = BreakingExecutor(path, fail_at=5)
    engine, built = engine_with(path, first, rebuild=True)
    prompts = random_prompts(1000, [5, 9, 13], seed=3)
    results = await asyncio.gather(*(collect(engine, f"r{i}", p, 20) for i, p in enumerate(prompts)))
    assert all(isinstance(r, EngineDeadError) and "simulated" in str(r) for r in results)
    assert not engine.requests
    for _ in range(200):  # the rebuild runs on the engine's loop
        if engine.dead is None:
            break
        await asyncio.sleep(0.05)
    assert engine.dead is None and engine.restarts == 1 and first.shut_down and len(built) == 1
    assert engine.executor is built[0] and engine.blocks.num_free == engine.blocks.num_blocks
    again = await asyncio.gather(*(collect(engine, f"s{i}", p, 12) for i, p in enumerate(prompts)))
    assert again == [hf_greedy(hf, p, 12) for p in prompts]
    engine.shutdown()


async def test_without_rebuild_the_engine_stays_down_and_says_why(tiny):
    path, _ = tiny
    engine, _ = engine_with(path, BreakingExecutor(path, fail_at=1), rebuild=False)
    result = await collect(engine, "a", [5, 6, 7], 4)
    assert isinstance(result, EngineDeadError)
    with pytest.raises(EngineDeadError, match="simulated"):
        await engine.check_health()
    with pytest.raises(EngineDeadError, match="engine is down"):
        engine.add_request("b", [5, 6, 7], SamplingParams(max_tokens=4))
    engine.shutdown()


async def test_full_queue_refuses_and_keeps_what_it_accepted(tiny):
    path, hf = tiny
    engine, _ = engine_with(path, BreakingExecutor(path, fail_at=None), rebuild=False, max_waiting=3)
    prompts = random_prompts(1000, [6] * 3, seed=4)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    with pytest.raises(EngineOverloadedError, match="3 requests are waiting"):
        engine.add_request("one-too-many", prompts[0], SamplingParams(max_tokens=4))
    outputs: dict[str, list[int]] = {}
    while engine.scheduler.has_work():
        for out in await engine.step():
            outputs.setdefault(out.request_id, []).extend(t for d in out.deltas for t in d.token_ids)
    assert outputs == {f"r{i}": hf_greedy(hf, p, 4) for i, p in enumerate(prompts)}
    engine.shutdown()
