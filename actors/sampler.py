"""Pick the next token of each sequence from its full-vocabulary logits (last stage, TP rank 0).

Greedy rows take the argmax. Sampled rows apply temperature, then top-k, then top-p
(nucleus: keep the smallest set of tokens whose probability reaches p), and draw with the
exponential race: argmax(p_i / E_i), E_i ~ Exp(1), which is a draw from p. A seeded row
draws its E from a generator seeded by (seed, output index), so its tokens depend only on
its own seed and position: the same alone, in any batch, and after a preemption.
Logprobs are those of the model's distribution (log-softmax of the raw logits).
"""

import torch

from actors.sampling_params import SamplingParams
from actors.step_io import SampledToken

_GOLDEN = 0x9E3779B97F4A7C15


def seeded_generator(seed: int, output_index: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed((seed * _GOLDEN + output_index) % (1 << 63))
    return g


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside top-k and outside the top-p nucleus to -inf (one row)."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the tokens before it already reach top_p (the first always stays)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    return logits


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device
        self.unseeded = torch.Generator(device=device)
        self.unseeded.seed()

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]
    ) -> list[SampledToken]:
        """logits: [rows, vocab] float32, one row per sequence to sample."""
        chosen = logits.argmax(-1)
        for row, p in enumerate(params):
            if p.greedy:
                continue
            scaled = filter_top_k_top_p(logits[row] / p.temperature, p.top_k, p.top_p)
            g = seeded_generator(p.seed, output_index[row], self.device) if p.seed is not None else self.unseeded
            race = torch.empty_like(scaled).exponential_(generator=g)
            chosen[row] = (scaled.softmax(-1) / race).argmax()
        chosen_list = chosen.tolist()
        if all(p.logprobs is None for p in params):
            return [SampledToken(t) for t in chosen_list]
        logprobs = logits.log_softmax(-1)
        out = []
        for row, (p, token) in enumerate(zip(params, chosen_list)):
            if p.logprobs is None:
                out.append(SampledToken(token))
                continue
            top = torch.topk(logprobs[row], p.logprobs) if p.logprobs else None
            alternatives = dict(zip(top.indices.tolist(), top.values.tolist())) if top is not None else {}
            out.append(SampledToken(token, float(logprobs[row, token]), alternatives))
        return out
