"""Pick the next token of each sequence from its full-vocabulary logits (last stage, TP rank 0).

One pass over the whole batch, whatever each row asks for:
1. `process_logits`: penalties, logit bias, min_tokens and grammar masks (rows that use them);
2. greedy rows (temperature 0) take the argmax;
3. sampled rows divide by their temperature, then keep, per row,
       min-p:  tokens with p_t >= min_p * p_max, i.e. l_t >= l_max + log(min_p),
       top-k:  the k largest logits (ties with the k-th kept),
       top-p:  of those, the smallest prefix of the sorted tokens whose probability
               (renormalized over them) reaches p,
   each vectorized over the rows that use it; then draw with the exponential race:
   argmax(p_t / E_t), E_t ~ Exp(1), which is a draw from p.
A seeded row draws its E from a generator seeded by (seed, output index), so its tokens
depend only on its own seed and position: the same alone, in any batch and after a
preemption. That draw is the one per-row loop left: a generator per row and step (its
cost is printed by `python -m deploy.bench.sampler`). Unseeded rows draw together.
Logprobs are those of the model's distribution (log-softmax of the raw logits).
"""

import math

import torch

from actors.logits_processors import SampleRow, process_logits
from actors.step_io import SampledToken

_GOLDEN = 0x9E3779B97F4A7C15


def seeded_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * _GOLDEN + output_index) % (1 << 63))
    return g


def filter_logits(logits: torch.Tensor, min_p: list[float], top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set each row's logits outside its min-p, top-k and top-p sets to -inf.
    logits: [rows, vocab] (temperature applied); one value per row in each list. Only
    top-p sorts, and only its rows (a sort of the vocabulary is the costly part)."""
    vocab, device = logits.shape[1], logits.device
    k = [t if 0 < t < vocab else vocab for t in top_k]

    def column(values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)[:, None]

    drop = None
    if any(p > 0 for p in min_p):
        floor = column([math.log(p) if p > 0 else -math.inf for p in min_p])
        drop = logits < logits.max(-1, keepdim=True).values + floor
    if any(t < vocab for t in k):
        largest = torch.topk(logits, max(t for t in k if t < vocab)).values
        kth = largest.gather(1, column([min(t, largest.shape[1]) - 1 for t in k], torch.long))
        kth = kth.masked_fill(column([t == vocab for t in k], torch.bool), float("-inf"))
        drop = logits < kth if drop is None else drop | (logits < kth)
    if drop is not None:
        logits = logits.masked_fill(drop, float("-inf"))
    if nucleus := [i for i, p in enumerate(top_p) if p < 1]:
        rows = logits[nucleus]
        sorted_logits, order = torch.sort(rows, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # a token goes when the tokens before it already reach top_p (the first always stays)
        gone = (probs.cumsum(-1) - probs) >= column([top_p[i] for i in nucleus])
        logits = logits.clone() if drop is None else logits
        logits[nucleus] = rows.masked_fill(gone.scatter(1, order, gone), float("-inf"))
    return logits


class Sampler:
    def __init__(self, device: torch.device, eos_token_ids: tuple[int, ...] = ()):
        self.device = device
        self.eos_token_ids = eos_token_ids  # masked until min_tokens
        self.unseeded = torch.Generator(device=device)
        self.unseeded.seed()

    def __call__(self, logits: torch.Tensor, rows: list[SampleRow], allowed: torch.Tensor | None = None
                 ) -> list[SampledToken]:
        """logits: [rows, vocab] float32, one row per sequence to sample; allowed: the rows'
        grammar bitmask ([rows, ceil(vocab / 32)] int32, -1 where unconstrained) or None."""
        processed = process_logits(logits, rows, self.eos_token_ids, allowed)
        chosen = processed.argmax(-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.greedy]
        if sampled:
            chosen[sampled] = self._sample(processed[sampled], [rows[i] for i in sampled])
        return self._with_logprobs(logits, rows, chosen.tolist())

    def _sample(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        temperature = torch.tensor([p.temperature for p in params], device=self.device)[:, None]
        filtered = filter_logits(logits / temperature, [p.min_p for p in params], [p.top_k for p in params],
                                 [p.top_p for p in params])
        return (filtered.softmax(-1) / self._exponentials(rows, logits.shape[1])).argmax(-1)

    def _exponentials(self, rows: list[SampleRow], vocab: int) -> torch.Tensor:
        """[rows, vocab] Exp(1) draws: a seeded row from its own generator, the rest from one."""
        race = torch.empty(len(rows), vocab, device=self.device)
        seeded = [i for i, r in enumerate(rows) if r.params.seed is not None]
        for i in seeded:
            race[i] = torch.empty(vocab, device=self.device).exponential_(
                generator=seeded_generator(rows[i].params.seed, rows[i].output_index, self.device))
        if len(seeded) < len(rows):
            unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
            race[unseeded] = torch.empty(len(unseeded), vocab, device=self.device).exponential_(generator=self.unseeded)
        return race

    @staticmethod
    def _with_logprobs(logits: torch.Tensor, rows: list[SampleRow], chosen: list[int]) -> list[SampledToken]:
        wanted = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
        if not wanted:
            return [SampledToken(t) for t in chosen]
        logprobs = logits[wanted].log_softmax(-1)
        k = max(rows[i].params.logprobs for i in wanted)
        top_values, top_ids = torch.topk(logprobs, k) if k else (logprobs[:, :0], logprobs[:, :0].long())
        chosen_lp = logprobs.gather(1, torch.tensor([chosen[i] for i in wanted], device=logits.device)[:, None])
        out = [SampledToken(t) for t in chosen]
        for i, values, ids, lp in zip(wanted, top_values.tolist(), top_ids.tolist(), chosen_lp[:, 0].tolist()):
            n = rows[i].params.logprobs
            out[i] = SampledToken(chosen[i], lp, dict(zip(ids[:n], values[:n])))
        return out
