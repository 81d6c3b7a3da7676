"""Attention over this rank's heads and its paged KV cache.

The KV cache of one layer on one rank is a tensor [2, num_blocks * block_size, kv_heads, d]
holding only this rank's KV heads. Token t of a sequence lives in slot
block_table[t // block_size] * block_size + t % block_size; the driver's block manager hands
out the same block ids to every rank, so a block table means the same on all of them.

A step mixes sequences: a decode sequence brings one new token, a prefill (or a chunk of
one, or a prompt after a prefix-cache hit) brings several. New K, V are written to their
slots first; then each query attends to every cached key at or before its position.
Decodes are batched into one padded SDPA call; prefills run one per sequence.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class PrefillSlice:
    token_start: int  # rows of this sequence in the flat batch
    token_end: int
    slots: torch.Tensor | None  # [context_len] cache slots to attend to; None: only its own new tokens


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step indexing shared by every layer of the step (built once per step)."""

    slot_mapping: torch.Tensor  # [tokens] where each new token's K, V go
    prefills: list[PrefillSlice]
    decode_rows: torch.Tensor  # [B] rows of the flat batch that are decodes
    decode_slots: torch.Tensor  # [B, L] cache slots each decode attends to (padded)
    decode_mask: torch.Tensor  # [B, 1, 1, L] True where the slot is real


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Index tensors for one step. `context_lens[i]` counts sequence i's tokens *after*
    this step (cached + new); its new tokens are the last `query_lens[i]` of them."""

    def slots_of(table: list[int], start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        return torch.tensor(table)[pos // block_size] * block_size + pos % block_size

    new_slots, prefills, decode_seqs, decode_rows = [], [], [], []
    row = 0
    for i, (q, ctx, table) in enumerate(zip(query_lens, context_lens, block_tables)):
        new_slots.append(slots_of(table, ctx - q, ctx))
        if q == 1:
            decode_seqs.append(i)
            decode_rows.append(row)
        else:
            cached = None if q == ctx else slots_of(table, 0, ctx).to(device)
            prefills.append(PrefillSlice(row, row + q, cached))
        row += q

    if decode_seqs:
        ctx = torch.tensor([context_lens[i] for i in decode_seqs])
        width = -(-int(ctx.max()) // block_size)
        tables = torch.zeros(len(decode_seqs), width, dtype=torch.long)
        for j, i in enumerate(decode_seqs):
            blocks = block_tables[i][:width]
            tables[j, : len(blocks)] = torch.tensor(blocks)
        pos = torch.arange(width * block_size)
        decode_slots = tables[:, pos // block_size] * block_size + pos % block_size
        decode_mask = (pos.unsqueeze(0) < ctx.unsqueeze(1))[:, None, None, :]
    else:
        decode_slots = torch.zeros(0, 0, dtype=torch.long)
        decode_mask = torch.zeros(0, 1, 1, 0, dtype=torch.bool)
    return AttentionMetadata(
        slot_mapping=torch.cat(new_slots).to(device),
        prefills=prefills,
        decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
        decode_slots=decode_slots.to(device),
        decode_mask=decode_mask.to(device),
    )


class PagedAttention(torch.nn.Module):
    """softmax(Q K^T / sqrt(d)) V for this rank's query heads against its KV heads (GQA:
    each KV head serves num_heads / num_kv_heads consecutive query heads)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_cache: torch.Tensor | None = None  # set by the worker when it allocates KV

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, d], k and v: [T, KV, d] for the new tokens; returns [T, H * d]."""
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("KV cache not allocated: call allocate_kv before running a step")
        cache[0].index_copy_(0, meta.slot_mapping, k)
        cache[1].index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for p in meta.prefills:
            qs = q[p.token_start : p.token_end].transpose(0, 1)  # [H, q, d]
            if p.slots is None:  # the whole context is this step's tokens
                ks = k[p.token_start : p.token_end].transpose(0, 1)
                vs = v[p.token_start : p.token_end].transpose(0, 1)
                o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:
                ks, vs = cache[0][p.slots].transpose(0, 1), cache[1][p.slots].transpose(0, 1)
                n_q, n_ctx = qs.shape[1], ks.shape[1]
                # query j sits at position n_ctx - n_q + j and sees keys up to there
                mask = torch.ones(n_q, n_ctx, dtype=torch.bool, device=q.device).tril(n_ctx - n_q)
                o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, enable_gqa=True)
            out[p.token_start : p.token_end] = o.transpose(0, 1)
        if meta.decode_rows.numel():
            qd = q[meta.decode_rows].unsqueeze(2)  # [B, H, 1, d]
            kd = cache[0][meta.decode_slots].transpose(1, 2)  # [B, KV, L, d]
            vd = cache[1][meta.decode_slots].transpose(1, 2)
            o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
            out[meta.decode_rows] = o.squeeze(2)
        return out.flatten(1)
