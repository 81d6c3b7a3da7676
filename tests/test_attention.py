"""Paged attention against plain attention on each sequence's own keys: a step that mixes
fresh prefills, prefill chunks over a cached context and decodes of many lengths (several
padded decode groups), with GQA, on scattered KV blocks; with equal query groups per KV head
and with the unequal ones an uneven head split leaves a rank."""

import pytest
import torch

from actors.attention import DECODE_GROUP_SIZE, PagedAttention, build_attention_metadata

D, BLOCK = 16, 4


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: tuple[int, ...]) -> torch.Tensor:
    """q [n, H, d] at the last n positions of k, v [L, KV, d]; query heads read KV heads in
    consecutive runs of `groups`; causal; returns [n, H * d]."""
    n, length = q.shape[0], k.shape[0]
    k = k.repeat_interleave(torch.tensor(groups), dim=1)
    v = v.repeat_interleave(torch.tensor(groups), dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    visible = torch.ones(n, length, dtype=torch.bool).tril(length - n)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v).flatten(1)


@pytest.mark.parametrize("groups", [(3, 3), (3, 2), (1, 3), (1, 3, 2), (2, 3, 3), (1,)], ids=str)
def test_mixed_step_matches_attention_per_sequence(groups):
    heads, kv_heads = sum(groups), len(groups)
    g = torch.Generator().manual_seed(0)
    # (cached tokens, new tokens): fresh prefills, chunks over a cache, decodes of 9 lengths
    seqs = [(0, 7), (5, 6), (0, 1)] + [(c, 1) for c in (3, 30, 4, 17, 8, 8, 25, 1, 12)] + [(9, 3)]
    num_blocks = 64
    free = torch.randperm(num_blocks, generator=g).tolist()
    tables = [[free.pop() for _ in range(-(-(c + n) // BLOCK))] for c, n in seqs]
    attn = PagedAttention(heads, kv_heads, D, groups)
    assert attn.uneven == (len(set(groups)) > 1)
    attn.kv_cache = torch.randn(2, num_blocks * BLOCK, kv_heads, D, generator=g)
    full_k = [torch.randn(c + n, kv_heads, D, generator=g) for c, n in seqs]
    full_v = [torch.randn(c + n, kv_heads, D, generator=g) for c, n in seqs]
    for (c, _), table, k, v in zip(seqs, tables, full_k, full_v):  # the cached part is already there
        slots = [table[t // BLOCK] * BLOCK + t % BLOCK for t in range(c)]
        attn.kv_cache[0, slots], attn.kv_cache[1, slots] = k[:c], v[:c]
    q = [torch.randn(n, heads, D, generator=g) for _, n in seqs]

    meta = build_attention_metadata([n for _, n in seqs], [c + n for c, n in seqs], tables, BLOCK)
    assert len(meta.decodes) == -(-10 // DECODE_GROUP_SIZE["cpu"]) > 1
    assert any(group.mask is not None for group in meta.decodes)
    out = attn(torch.cat(q), torch.cat([k[c:] for (c, _), k in zip(seqs, full_k)]),
               torch.cat([v[c:] for (c, _), v in zip(seqs, full_v)]), meta)

    expected = torch.cat([reference(qi, k, v, groups) for qi, k, v in zip(q, full_k, full_v)])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_groups_must_be_consecutive_heads():
    with pytest.raises(ValueError, match="not 5 consecutive query heads over 2 KV heads"):
        PagedAttention(5, 2, D, (3, 3))
    with pytest.raises(ValueError, match="not 5 consecutive query heads over 3 KV heads"):
        PagedAttention(5, 3, D, (2, 1, 2))  # a KV head between two others serves all its queries
