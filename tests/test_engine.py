"""The engine in one process (tp=1, no Ray): continuous batching, preemption, prefix
caching, sampling and aborts, checked against Hugging Face generate on each prompt alone;
and with two batches in flight, as a two-stage pipeline keeps them."""

import asyncio
import itertools

import pytest
import torch

from actors.sampling_params import ParamError, SamplingParams
from cluster.engine import Engine, EngineLimits
from cluster.engine_client import RequestOutput
from cluster.executor import InProcessExecutor
from tests.tiny_models import hf_greedy, llama_config, random_prompts, save_tiny, worker_spec

BLOCK = 8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    return path, save_tiny(llama_config(), path)


class TwoStepsInFlight(InProcessExecutor):
    """The in-process worker behind an executor that holds two steps at once, as two
    pipeline stages do: the engine keeps two disjoint batches in flight (they run one after
    the other here). Records how many were sent and not yet run, at most."""

    num_stages = 2

    def __init__(self, *args):
        super().__init__(*args)
        self.submitted = self.executed = self.most_in_flight = 0

    def submit(self, step):
        self.submitted += 1
        self.most_in_flight = max(self.most_in_flight, self.submitted - self.executed)
        return super().submit(step)

    def execute(self, step):
        try:
            return super().execute(step)
        finally:
            self.executed += 1  # before the output reaches the engine, which sends the next step only then


def make_engine(path, *, num_blocks=256, max_num_seqs=16, max_tokens_per_step=128, prefix_caching=True,
                executor_cls=InProcessExecutor) -> Engine:
    executor = executor_cls(worker_spec(path, block_size=BLOCK), num_blocks)
    limits = EngineLimits(256, max_num_seqs, max_tokens_per_step, BLOCK, prefix_caching)
    return Engine(executor, limits, model_name="tiny", vocab_size=1000, eos_token_ids=(2,))


def steps(engine: Engine, count: int | None = None) -> list[RequestOutput]:
    """Run `count` engine steps (None: until no work is left), the loop's own `step()`."""

    async def run() -> list[RequestOutput]:
        outputs = []
        for _ in itertools.count() if count is None else range(count):
            if count is None and not engine.scheduler.has_work():
                break
            outputs += await engine.step()
        return outputs

    return asyncio.run(run())


def run_all(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list[int]]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    tokens: dict[str, list[list[int]]] = {rid: [[] for _ in range(p.n)] for rid, (_, p) in requests.items()}
    for out in steps(engine):
        for d in out.deltas:
            tokens[out.request_id][d.index] += d.token_ids
    return {rid: t[0] if len(t) == 1 else t for rid, t in tokens.items()}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def mixed_requests(vocab: int, count: int, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(3, 60, (count,), generator=g).tolist()
    outs = torch.randint(1, 30, (count,), generator=g).tolist()
    prompts = random_prompts(vocab, lens, seed)
    return {f"r{i}": (p, greedy(n)) for i, (p, n) in enumerate(zip(prompts, outs))}


def test_concurrent_greedy_matches_hf_alone(tiny):
    path, hf = tiny
    requests = mixed_requests(1000, 16)
    got = run_all(make_engine(path), requests)
    for rid, (prompt, params) in requests.items():
        assert got[rid] == hf_greedy(hf, prompt, params.max_tokens), rid


def test_preemption_under_tiny_kv_budget_keeps_outputs_exact(tiny):
    path, hf = tiny
    requests = mixed_requests(1000, 8, seed=5)
    engine = make_engine(path, num_blocks=24)  # 192 token slots for ~8 x 60 tokens
    got = run_all(engine, requests)
    print(f"preemptions: {engine.scheduler.stats.preemptions}")
    assert engine.scheduler.stats.preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks
    for rid, (prompt, params) in requests.items():
        assert got[rid] == hf_greedy(hf, prompt, params.max_tokens), rid


def test_two_batches_in_flight_with_chunks_and_preemption_match_hf_alone(tiny):
    path, hf = tiny
    long = random_prompts(1000, [150], seed=9)[0]
    requests = {"long": (long, greedy(10)), **mixed_requests(1000, 10, seed=5)}
    engine = make_engine(path, num_blocks=40, max_tokens_per_step=32, executor_cls=TwoStepsInFlight)
    got = run_all(engine, requests)
    print(f"preemptions: {engine.scheduler.stats.preemptions}")
    assert engine.executor.most_in_flight == 2 and engine.scheduler.stats.preemptions > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.scheduler.in_flight
    for rid, (prompt, params) in requests.items():
        assert got[rid] == hf_greedy(hf, prompt, params.max_tokens), rid


def test_seeded_sampling_with_two_batches_in_flight_is_that_of_one(tiny):
    path, _ = tiny
    prompts = random_prompts(1000, [12, 40, 7, 25], seed=14)
    requests = {f"s{i}": (p, SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=100 + i, n=1 + i % 2,
                                            ignore_eos=True)) for i, p in enumerate(prompts)}
    one = run_all(make_engine(path, max_tokens_per_step=24), requests)
    two = run_all(make_engine(path, max_tokens_per_step=24, executor_cls=TwoStepsInFlight), requests)
    assert one == two


def test_prefix_hits_with_two_batches_in_flight_match_hf_alone(tiny):
    """Requests sharing a system prompt arrive while two batches are in flight: they reuse
    the blocks its first request wrote once that step came back, chunked (40 tokens a
    step) beside unrelated requests."""
    path, hf = tiny
    system = random_prompts(1000, [48], seed=21)[0]
    shared = {f"p{i}": (system + t, greedy(8)) for i, t in enumerate(random_prompts(1000, [5, 9, 13, 7, 11], seed=23))}
    others = mixed_requests(1000, 6, seed=24)
    first = {"p0": shared["p0"], **dict(list(others.items())[:3])}
    later = {rid: r for rid, r in {**shared, **others}.items() if rid not in first}
    engine = make_engine(path, max_tokens_per_step=40, executor_cls=TwoStepsInFlight)

    async def run() -> dict[str, list[int]]:
        tokens = {rid: [] for rid in [*first, *later]}
        for n, arrivals in ((8, first), (None, later)):
            for rid, (prompt, params) in arrivals.items():
                engine.add_request(rid, prompt, params)
            for _ in itertools.count() if n is None else range(n):
                if n is None and not engine.has_work():
                    break
                for out in await engine.step():
                    tokens[out.request_id] += [t for d in out.deltas for t in d.token_ids]
        return tokens

    got = asyncio.run(run())
    hits = engine.scheduler.stats.prefix_hit_tokens
    print(f"prefix hit tokens: {hits}")
    assert engine.executor.most_in_flight == 2 and hits >= 4 * 40  # 4 later requests reuse >= 5 full blocks each
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.scheduler.in_flight
    for rid, (prompt, params) in {**first, **later}.items():
        assert got[rid] == hf_greedy(hf, prompt, params.max_tokens), rid


def test_chunked_prefill_of_long_prompt(tiny):
    path, hf = tiny
    prompt = random_prompts(1000, [150], seed=9)[0]
    engine = make_engine(path, max_tokens_per_step=32)
    got = run_all(engine, {"long": (prompt, greedy(10)), **mixed_requests(1000, 3)})
    assert got["long"] == hf_greedy(hf, prompt, 10)


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(tiny):
    path, _ = tiny
    prompt = random_prompts(1000, [12], seed=11)[0]
    params = SamplingParams(max_tokens=20, temperature=0.9, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = run_all(make_engine(path), {"s": (prompt, params)})["s"]
    others = {f"o{i}": (p, SamplingParams(max_tokens=15, temperature=1.0, ignore_eos=True))
              for i, p in enumerate(random_prompts(1000, [5, 30, 9], seed=12))}
    batched = run_all(make_engine(path), {**others, "s": (prompt, params)})["s"]
    assert alone == batched
    different_seed = run_all(make_engine(path), {"s": (prompt, SamplingParams(**{**params.__dict__, "seed": 99}))})["s"]
    assert different_seed != alone


def test_n_completions_and_logprobs(tiny):
    path, hf = tiny
    prompt = random_prompts(1000, [10], seed=13)[0]
    engine = make_engine(path)
    engine.add_request("g", prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=3))
    deltas = [d for out in steps(engine, 8) for d in out.deltas]
    with torch.no_grad():
        want = hf(torch.tensor([prompt])).logits[0, -1].log_softmax(-1)
    first = deltas[0].logprobs[0]
    assert first.token_id == int(want.argmax())
    assert first.logprob == pytest.approx(float(want.max()), abs=1e-4)
    assert set(first.top) == set(want.topk(3).indices.tolist())
    two = run_all(make_engine(path), {"n": (prompt, SamplingParams(max_tokens=12, temperature=1.0, n=2, seed=7, ignore_eos=True))})
    assert len(two["n"]) == 2 and two["n"][0] != two["n"][1]


def test_prefix_cache_computes_fewer_prefill_tokens_with_identical_outputs(tiny):
    path, hf = tiny
    system = random_prompts(1000, [48], seed=21)[0]
    tails = random_prompts(1000, [5, 9, 13, 7], seed=22)
    requests = {f"p{i}": (system + t, greedy(6)) for i, t in enumerate(tails)}
    counts, outputs = {}, {}
    for caching in (False, True):
        engine = make_engine(path, prefix_caching=caching)
        first = dict(list(requests.items())[:1])
        outputs[caching] = run_all(engine, first) | run_all(engine, dict(list(requests.items())[1:]))
        counts[caching] = engine.scheduler.stats.prefill_tokens_computed
    print(f"prefill tokens computed: {counts[False]} without prefix caching, {counts[True]} with")
    assert counts[True] <= counts[False] - 3 * 40  # 3 later requests reuse >= 5 full blocks each
    assert outputs[True] == outputs[False]
    for rid, (prompt, params) in requests.items():
        assert outputs[True][rid] == hf_greedy(hf, prompt, params.max_tokens)


def test_abort_frees_every_block(tiny):
    path, _ = tiny
    engine = make_engine(path)
    for rid, (p, params) in mixed_requests(1000, 6).items():
        engine.add_request(rid, p, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    steps(engine, 3)
    assert engine.blocks.num_free < engine.blocks.num_blocks
    for rid in list(engine.requests):
        engine.abort_request(rid)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert not engine.scheduler.has_work()


async def test_closing_a_stream_aborts_its_request(tiny):
    path, _ = tiny
    engine = make_engine(path)
    prompt = random_prompts(1000, [20])[0]
    stream = engine.generate("x", prompt, SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    assert "x" not in engine.requests
    assert engine.blocks.num_free == engine.blocks.num_blocks


async def test_async_streams_run_concurrently(tiny):
    path, hf = tiny
    engine = make_engine(path)
    requests = mixed_requests(1000, 6, seed=31)

    async def collect(rid, prompt, params):
        return [t async for out in engine.generate(rid, prompt, params) for d in out.deltas for t in d.token_ids]

    got = await asyncio.gather(*(collect(rid, p, params) for rid, (p, params) in requests.items()))
    for (rid, (prompt, params)), tokens in zip(requests.items(), got):
        assert tokens == hf_greedy(hf, prompt, params.max_tokens)


def test_too_long_request_rejected_up_front(tiny):
    path, _ = tiny
    engine = make_engine(path)
    with pytest.raises(ParamError) as e:
        engine.add_request("big", [5] * 250, SamplingParams(max_tokens=10))
    assert e.value.param == "max_tokens"
    assert not engine.scheduler.has_work()
