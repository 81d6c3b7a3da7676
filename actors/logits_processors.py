"""What changes a batch's logits before sampling, in this order, each vectorized over the
rows that use it (rows that do not are left bit-for-bit alone):

1. penalties on the model's logits l, with c_t the count of token t among the tokens
   generated so far and S the set of tokens seen in the prompt or generated:
       repetition (Hugging Face):  l_t -> l_t / r if l_t > 0 else l_t * r,   for t in S
       frequency, presence (OpenAI):  l_t -> l_t - f * c_t - p * [c_t > 0]
2. logit bias:  l_t -> l_t + b_t;
3. masks, set to -inf: EOS and stop tokens while fewer than min_tokens were generated,
   and every token the row's grammar does not allow next. Where both together would
   allow nothing (the grammar is complete but min_tokens is not reached), the grammar wins.
"""

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from actors.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleRow:
    """One sequence to sample this step."""

    params: SamplingParams
    output_index: int  # tokens generated before this one
    history: Sequence[int] = ()  # every token so far, prompt then generated, if params.needs_history

    @property
    def generated(self) -> Sequence[int]:
        return self.history[len(self.history) - self.output_index :]


def process_logits(logits: torch.Tensor, rows: list[SampleRow], eos_token_ids: tuple[int, ...],
                   allowed: torch.Tensor | None) -> torch.Tensor:
    """logits: [rows, vocab] float32 (not modified); allowed: [rows, ceil(vocab / 32)]
    int32 grammar bitmask or None. Returns the processed logits (`logits` itself when
    nothing applies)."""
    penalized = [i for i, r in enumerate(rows) if r.params.has_penalties]
    biased = [i for i, r in enumerate(rows) if r.params.logit_bias]
    short = [i for i, r in enumerate(rows) if r.output_index < r.params.min_tokens]
    if not (penalized or biased or short or allowed is not None):
        return logits
    out = logits.clone()
    if penalized:
        out[penalized] = apply_penalties(out[penalized], [rows[i] for i in penalized])
    if biased:
        r, t, b = zip(*((i, token, bias) for i in biased for token, bias in rows[i].params.logit_bias))
        out.index_put_((torch.tensor(r), torch.tensor(t)), torch.tensor(b, dtype=out.dtype, device=out.device),
                       accumulate=True)
    blocked = unpack_bitmask(allowed.to(out.device), out.shape[1]).logical_not_() if allowed is not None else None
    if stop_pairs := [(i, t) for i in short for t in (*eos_token_ids, *rows[i].params.stop_token_ids)]:
        stops = torch.zeros(len(rows), out.shape[1], dtype=torch.bool, device=out.device)
        r, t = zip(*stop_pairs)
        stops[list(r), list(t)] = True
        if blocked is None:
            blocked = stops
        else:
            with_stops = blocked | stops
            blocked = torch.where(with_stops.all(-1, keepdim=True), blocked, with_stops)
    if blocked is not None:
        out.masked_fill_(blocked, float("-inf"))
    return out


def apply_penalties(logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
    """logits: [rows, vocab] of the rows with penalties; returns them penalized."""
    vocab = logits.shape[1]
    counts = _token_counts([r.generated for r in rows], vocab, logits.device)
    seen = _token_counts([r.history for r in rows], vocab, logits.device) > 0
    def column(name: str) -> torch.Tensor:
        return torch.tensor([getattr(r.params, name) for r in rows], device=logits.device)[:, None]

    rep = column("repetition_penalty")
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)


def _token_counts(token_lists: list[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float32: how often each token occurs in each list."""
    lengths = torch.tensor([len(t) for t in token_lists])
    tokens = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(token_lists)), lengths)
    counts = torch.zeros(len(token_lists), vocab, device=device)
    return counts.index_put_((rows.to(device), tokens.to(device)), torch.ones(len(tokens), device=device),
                             accumulate=True)


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32, bit t % 32 of word t // 32 set for allowed token t ->
    [rows, vocab] bool."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.to(torch.int32).unsqueeze(-1) >> shifts) & 1
    return bits.flatten(1)[:, :vocab].bool()
