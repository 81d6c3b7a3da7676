"""The sampler against plain references: hand-worked top-k / top-p / min-p sets, sampled
frequencies against softmax(logits / T) after filtering (chi-square, fixed seeds), penalties
and logit bias against a per-token Python loop, min_tokens and grammar masks, the seeded
stream (the same alone, in any batch, bit-for-bit what the per-row sampler drew before the
vectorized one, and through a preemption in the engine)."""

import asyncio
import math

import pytest
import torch

from actors.logits_processors import SampleRow, process_logits, unpack_bitmask
from actors.sampler import Sampler, filter_logits, seeded_generator
from actors.sampling_params import SamplingParams
from cluster.engine import Engine, EngineLimits
from cluster.executor import InProcessExecutor
from tests.tiny_models import random_prompts, worker_spec

CPU = torch.device("cpu")
INF = float("inf")


def kept(logits: list[float], *, min_p: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> set[int]:
    out = filter_logits(torch.tensor([logits]), [min_p], [top_k], [top_p])[0]
    return {i for i, v in enumerate(out.tolist()) if v > -INF}


# ---- which tokens survive: worked by hand ----

P = [0.5, 0.3, 0.15, 0.05]  # probabilities of tokens 0..3
LOG_P = [math.log(p) for p in P]


def test_top_k_keeps_the_k_largest_and_ties():
    assert kept([1.0, 3.0, 2.0, 5.0, 4.0], top_k=2) == {3, 4}
    assert kept([1.0, 3.0, 2.0, 5.0, 4.0], top_k=1) == {3}
    assert kept([3.0, 3.0, 1.0], top_k=1) == {0, 1}  # a tie with the k-th stays
    assert kept([1.0, 3.0, 2.0], top_k=0) == kept([1.0, 3.0, 2.0], top_k=-1) == {0, 1, 2}
    assert kept([1.0, 3.0, 2.0], top_k=5) == {0, 1, 2}


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    # cumulative 0.5, 0.8, 0.95, 1.0: a token stays while the ones before it sum below p
    assert kept(LOG_P, top_p=0.4) == {0}
    assert kept(LOG_P, top_p=0.6) == {0, 1}
    assert kept(LOG_P, top_p=0.9) == {0, 1, 2}
    assert kept(LOG_P, top_p=0.99) == {0, 1, 2, 3}
    assert kept(list(reversed(LOG_P)), top_p=0.6) == {3, 2}  # by probability, not position


def test_min_p_keeps_tokens_within_a_ratio_of_the_best():
    assert kept(LOG_P, min_p=0.2) == {0, 1, 2}  # p >= 0.1
    assert kept(LOG_P, min_p=0.5) == {0, 1}  # p >= 0.25
    assert kept(LOG_P, min_p=1.0) == {0}
    # after temperature 2, p ~ sqrt(P): ratios to the best 1, 0.77, 0.55, 0.32
    sampler_view = filter_logits(torch.tensor([LOG_P]) / 2.0, [0.5], [0], [1.0])
    assert {i for i, v in enumerate(sampler_view[0].tolist()) if v > -INF} == {0, 1, 2}


def test_filters_combine_per_row_in_one_batch():
    logits = torch.tensor([LOG_P, LOG_P, LOG_P, LOG_P])
    out = filter_logits(logits, [0.0, 0.5, 0.0, 0.2], [0, 0, 3, 0], [0.6, 1.0, 1.0, 0.9])
    assert [{i for i, v in enumerate(row) if v > -INF} for row in out.tolist()] == [
        {0, 1}, {0, 1}, {0, 1, 2}, {0, 1, 2}]


# ---- sampled frequencies match the filtered distribution ----

def reference_distribution(logits: list[float], t: float, min_p: float, top_k: int, top_p: float) -> list[float]:
    """softmax(logits / T); min-p and top-k on it; top-p on what they left, renormalized;
    the result renormalized: plain Python."""
    scaled = [x / t for x in logits]
    z = sum(math.exp(x) for x in scaled)
    p = [math.exp(x) / z for x in scaled]
    order = sorted(range(len(p)), key=lambda i: -p[i])
    keep = {i for i in order if p[i] >= min_p * p[order[0]]}
    if top_k > 0:
        keep &= set(order[:top_k])
    kept_mass = sum(p[i] for i in keep)
    cum, nucleus = 0.0, set()
    for i in [i for i in order if i in keep]:
        if cum >= top_p:
            break
        nucleus.add(i)
        cum += p[i] / kept_mass
    total = sum(p[i] for i in nucleus)
    return [p[i] / total if i in nucleus else 0.0 for i in range(len(p))]


def chi_square_p_value(counts: list[int], expected: list[float]) -> float:
    cells = [(c, e) for c, e in zip(counts, expected) if e > 0]
    stat = sum((c - e) ** 2 / e for c, e in cells)
    dof = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64)))


LOGITS = [2.0, 1.5, 1.2, 0.9, 0.3, -0.5, -1.0, -3.0]
DISTRIBUTIONS = [  # temperature, min_p, top_k, top_p: each filter, and all at once
    (1.0, 0.0, 0, 1.0),
    (0.7, 0.0, 0, 1.0),
    (2.0, 0.0, 0, 0.8),  # at T=2 the nucleus is wider than at T=1
    (2.0, 0.0, 5, 1.0),
    (2.0, 0.3, 0, 1.0),  # min_p after temperature: more tokens than at T=1
    (1.5, 0.1, 6, 0.9),
]


@pytest.mark.parametrize("t,min_p,top_k,top_p", DISTRIBUTIONS)
@pytest.mark.parametrize("seeded", [True, False])
def test_sampled_frequencies_match_the_filtered_softmax(t, min_p, top_k, top_p, seeded):
    draws = 6000
    sampler = Sampler(CPU)
    sampler.unseeded.manual_seed(1234)  # the unseeded path, made deterministic for the test
    params = [SamplingParams(temperature=t, min_p=min_p, top_k=top_k, top_p=top_p, seed=i if seeded else None)
              for i in range(draws)]
    tokens = sampler(torch.tensor([LOGITS]).expand(draws, -1), [SampleRow(p, 0) for p in params])
    counts = [0] * len(LOGITS)
    for tok in tokens:
        counts[tok.token_id] += 1
    want = reference_distribution(LOGITS, t, min_p, top_k, top_p)
    assert all(c == 0 for c, w in zip(counts, want) if w == 0), (counts, want)
    p_value = chi_square_p_value(counts, [w * draws for w in want])
    assert p_value > 1e-3, (counts, [round(w * draws) for w in want], p_value)


def test_greedy_rows_take_the_argmax_beside_sampled_rows():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=5.0, seed=1)] * 3
    tokens = Sampler(CPU)(logits, [SampleRow(p, 0) for p in params])
    assert [tokens[i].token_id for i in (0, 2, 4)] == logits[[0, 2, 4]].argmax(-1).tolist()


# ---- penalties and logit bias against a plain loop ----

def reference_logits(logits: list[float], p: SamplingParams, prompt: list[int], generated: list[int]) -> list[float]:
    out = list(logits)
    for t in set(prompt) | set(generated):  # repetition: prompt and generated tokens
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(generated):  # frequency and presence: generated tokens only
        out[t] -= p.frequency_penalty * generated.count(t) + p.presence_penalty
    for t, b in p.logit_bias:
        out[t] += b
    return out


def test_penalties_and_logit_bias_match_a_plain_loop():
    g = torch.Generator().manual_seed(3)
    vocab = 40
    logits = torch.randn(6, vocab, generator=g) * 3
    prompt = [3, 4, 4, 5, 9]  # 3 and 9 appear in the prompt only
    generated = [4, 7, 7, 7, 11, 5]
    params = [
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=1.5),
        SamplingParams(repetition_penalty=1.3),
        SamplingParams(),  # no options: untouched
        SamplingParams(frequency_penalty=-0.7, presence_penalty=0.3, repetition_penalty=0.8,
                       logit_bias=((9, 2.5), (0, -100.0))),
        SamplingParams(frequency_penalty=0.4, presence_penalty=0.2, logit_bias=((3, 1.0),)),  # nothing generated yet
    ]
    rows = [SampleRow(p, len(generated), prompt + generated) for p in params[:5]] + [SampleRow(params[5], 0, prompt)]
    got = process_logits(logits, rows, (), None)
    for i, (p, gen) in enumerate(zip(params, [generated] * 5 + [[]])):
        want = reference_logits(logits[i].tolist(), p, prompt, gen)
        assert got[i].tolist() == pytest.approx(want, rel=1e-6, abs=1e-6), i
    assert torch.equal(got[3], logits[3])


def test_logit_bias_100_forces_its_token():
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(4))
    params = [SamplingParams(temperature=1.0, seed=s, logit_bias=((42, 100.0),)) for s in range(3)]
    assert [t.token_id for t in Sampler(CPU)(logits, [SampleRow(p, 0) for p in params])] == [42, 42, 42]
    banned = SamplingParams(temperature=0.0, logit_bias=((int(logits[0].argmax()), -100.0),))
    assert Sampler(CPU)(logits[:1], [SampleRow(banned, 0)])[0].token_id != int(logits[0].argmax())


def test_min_tokens_masks_eos_and_stop_tokens_until_reached():
    logits = torch.zeros(3, 10)
    logits[:, 2] = 50.0  # EOS is by far the best
    logits[:, 7] = 40.0  # then a stop token
    params = SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(7,))
    sampler = Sampler(CPU, eos_token_ids=(2,))
    picks = [sampler(logits[:1], [SampleRow(params, index)])[0].token_id for index in (0, 2, 3)]
    assert picks[0] not in (2, 7) and picks[1] not in (2, 7) and picks[2] == 2
    # nothing to mask (no EOS known, no stop tokens): min_tokens changes nothing
    assert Sampler(CPU)(logits[:1], [SampleRow(SamplingParams(temperature=0.0, min_tokens=3), 0)])[0].token_id == 2


def test_grammar_bitmask_allows_only_its_tokens_and_wins_over_min_tokens():
    vocab = 70  # three int32 words, the last one partly padding
    allowed = [{5, 33, 64}, {2}, set(range(vocab))]
    bitmask = torch.zeros(3, 3, dtype=torch.int32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            bitmask[row, t // 32] |= torch.tensor(1 << (t % 32)).to(torch.int32)
    assert [set(torch.nonzero(r).flatten().tolist()) for r in unpack_bitmask(bitmask, vocab)] == allowed
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(5))
    rows = [SampleRow(SamplingParams(temperature=1.0, seed=s, min_tokens=5), 0) for s in range(3)]
    for index in range(20):
        rows = [SampleRow(r.params, index) for r in rows]
        got = [t.token_id for t in Sampler(CPU, eos_token_ids=(2,))(logits, rows, bitmask)]
        assert got[0] in allowed[0] and got[1] == 2  # only EOS allowed: EOS despite min_tokens
        assert got[2] != 2


# ---- the seeded stream ----

def per_row_sampler(logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]) -> list[int]:
    """The sampler as it was before it was vectorized (temperature, top-k, top-p, race per
    row): its seeded streams must come out of the vectorized one bit for bit."""
    chosen = logits.argmax(-1)
    for row, p in enumerate(params):
        if p.greedy:
            continue
        scaled = logits[row] / p.temperature
        if 0 < p.top_k < scaled.shape[-1]:
            scaled = scaled.masked_fill(scaled < torch.topk(scaled, p.top_k).values[-1], -INF)
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(scaled, descending=True)
            probs = sorted_logits.softmax(-1)
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            scaled = scaled.masked_fill(drop.scatter(0, order, drop), -INF)
        race = torch.empty_like(scaled).exponential_(generator=seeded_generator(p.seed, output_index[row], CPU))
        chosen[row] = (scaled.softmax(-1) / race).argmax()
    return chosen.tolist()


def random_params(g: torch.Generator) -> SamplingParams:
    r = torch.rand(4, generator=g).tolist()
    return SamplingParams(temperature=0.0 if r[0] < 0.15 else 0.1 + 1.9 * r[1],
                          top_k=0 if r[2] < 0.5 else int(1 + r[2] * 60),
                          top_p=1.0 if r[3] < 0.4 else 0.05 + 0.95 * r[3],
                          seed=int(torch.randint(0, 2**40, (1,), generator=g)))


def test_seeded_streams_are_bit_for_bit_those_of_the_per_row_sampler():
    g = torch.Generator().manual_seed(0)
    sampler = Sampler(CPU)
    for _ in range(100):
        rows, vocab = int(torch.randint(1, 12, (1,), generator=g)), int(torch.randint(50, 3000, (1,), generator=g))
        logits = torch.randn(rows, vocab, generator=g) * float(torch.rand(1, generator=g) * 8 + 0.5)
        params = [random_params(g) for _ in range(rows)]
        index = torch.randint(0, 500, (rows,), generator=g).tolist()
        got = [t.token_id for t in sampler(logits, [SampleRow(p, i) for p, i in zip(params, index)])]
        assert got == per_row_sampler(logits, params, index)


def test_a_seeded_row_draws_the_same_alone_and_in_any_batch():
    g = torch.Generator().manual_seed(1)
    vocab = 500
    row_logits = torch.randn(1, vocab, generator=g) * 2
    me = SamplingParams(temperature=0.9, top_p=0.95, min_p=0.01, seed=77, presence_penalty=0.4)
    history = [1, 2, 3, 10, 11]
    sampler = Sampler(CPU)
    for index in range(2, 12):
        alone = sampler(row_logits, [SampleRow(me, index, history + [4] * index)])[0].token_id
        others = [SampleRow(random_params(g), 0) for _ in range(7)]
        others[3] = SampleRow(SamplingParams(temperature=1.0, frequency_penalty=1.0), 2, [5, 6, 6])
        logits = torch.cat([torch.randn(3, vocab, generator=g), row_logits, torch.randn(4, vocab, generator=g)])
        batch = others[:3] + [SampleRow(me, index, history + [4] * index)] + others[3:]
        assert sampler(logits, batch)[3].token_id == alone


def test_a_seeded_request_gives_the_same_tokens_through_a_preemption(tiny_llama_dir):
    """Engine level: the same seeded, penalized request alone with room to spare, and
    squeezed between others into a KV cache so small that it is preempted and recomputed
    (its penalty counts rebuilt on the sampling rank from the resent tokens)."""
    path, _ = tiny_llama_dir
    mine = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=123, frequency_penalty=0.8,
                          repetition_penalty=1.2, ignore_eos=True)
    prompt = random_prompts(1000, [20], seed=9)[0]

    def run(num_blocks: int, crowd: int) -> tuple[list[int], int]:
        executor = InProcessExecutor(worker_spec(path, block_size=8), num_blocks)
        engine = Engine(executor, EngineLimits(256, 16, 64, 8), model_name="tiny", vocab_size=1000, eos_token_ids=(2,))
        for i, p in enumerate(random_prompts(1000, [30] * crowd, seed=10)):
            engine.add_request(f"crowd{i}", p, SamplingParams(max_tokens=40, temperature=1.0, ignore_eos=True))
        engine.add_request("mine", prompt, mine)
        tokens = []

        async def drive() -> None:
            while engine.scheduler.has_work():
                for out in await engine.step():
                    if out.request_id == "mine":
                        tokens.extend(t for d in out.deltas for t in d.token_ids)

        asyncio.run(drive())
        return tokens, engine.scheduler.stats.preemptions

    alone, none = run(256, 0)
    crowded, preemptions = run(14, 5)  # 112 token slots for ~6 x 60 tokens
    assert none == 0 and preemptions > 0
    assert crowded == alone and len(alone) == 40
