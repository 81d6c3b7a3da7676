"""Attention over this rank's heads and its paged KV cache.

The KV cache of one layer on one rank is a tensor [2, num_blocks * block_size, kv_heads, d]
holding only this rank's KV heads. Token t of a sequence lives in slot
block_table[t // block_size] * block_size + t % block_size; the driver's block manager hands
out the same block ids to every rank, so a block table means the same on all of them.

A step mixes sequences: a decode sequence brings one new token, a prefill (or a chunk of
one, or a prompt after a prefix-cache hit) brings several. New K, V are written to their
slots first; then each query attends to every cached key at or before its position.

Decode is bound by reading the cache, so it gathers as little as it can:
- decodes are sorted by context length and attended in groups of similar length, each
  padded only to its own longest context (one padded batch wastes half the reads on a
  mixed workload);
- whole rows [kv_heads, d] are gathered with `index_select` (advanced indexing with a
  2-D index is several times slower on CPU);
- GQA without repeating K and V: the G = heads / kv_heads query heads of one KV head act
  as G queries against that head's keys, q [b, kv, G, d] x K [b, kv, L, d] (unequal
  groups on a rank of an uneven head split: padded to the largest, see PagedAttention).
Prefills run one per sequence (causal SDPA, or a causal mask over the cached context).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Decodes per attention call. CPU: small groups, padding costs memory reads and the call
# overhead is small. CUDA: one group, a kernel launch costs more than padding.
DECODE_GROUP_SIZE = {"cpu": 4, "cuda": 1 << 16}


@dataclass(frozen=True)
class PrefillSlice:
    token_start: int  # rows of this sequence in the flat batch
    token_end: int
    slots: torch.Tensor | None  # [context_len] cache slots to attend to; None: only its own new tokens


@dataclass(frozen=True)
class DecodeGroup:
    """Decodes of similar context length, attended in one call, padded to `width` keys."""

    rows: torch.Tensor  # [b] rows of the flat batch
    slots: torch.Tensor  # [b * width] cache slots, row by row; padding points at slot 0
    width: int
    mask: torch.Tensor | None  # [b, 1, 1, width] True where the key is real; None: no padding


@dataclass(frozen=True)
class AttentionMetadata:
    """Per-step indexing shared by every layer of the step (built once per step)."""

    slot_mapping: torch.Tensor  # [tokens] where each new token's K, V go
    prefills: list[PrefillSlice]
    decodes: list[DecodeGroup]


def build_attention_metadata(
    query_lens: list[int],
    context_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Index tensors for one step. `context_lens[i]` counts sequence i's tokens *after*
    this step (cached + new); its new tokens are the last `query_lens[i]` of them."""
    device = torch.device(device)

    def slots_of(table: list[int], start: int, stop: int) -> torch.Tensor:
        pos = torch.arange(start, stop)
        return torch.tensor(table)[pos // block_size] * block_size + pos % block_size

    new_slots, prefills, decodes = [], [], []  # decodes: (context_len, row, seq index)
    row = 0
    for i, (q, ctx, table) in enumerate(zip(query_lens, context_lens, block_tables)):
        new_slots.append(slots_of(table, ctx - q, ctx))
        if q == 1:
            decodes.append((ctx, row, i))
        else:
            cached = None if q == ctx else slots_of(table, 0, ctx).to(device)
            prefills.append(PrefillSlice(row, row + q, cached))
        row += q

    decodes.sort()
    size = DECODE_GROUP_SIZE[device.type]
    groups = [_decode_group(decodes[g : g + size], block_tables, block_size, device)
              for g in range(0, len(decodes), size)]
    return AttentionMetadata(torch.cat(new_slots).to(device), prefills, groups)


def _decode_group(members: list[tuple[int, int, int]], block_tables: list[list[int]], block_size: int,
                  device: torch.device) -> DecodeGroup:
    ctx = torch.tensor([c for c, _, _ in members])
    width = int(ctx.max())
    blocks = -(-width // block_size)
    tables = torch.zeros(len(members), blocks, dtype=torch.long)
    for j, (_, _, i) in enumerate(members):
        table = block_tables[i][:blocks]
        tables[j, : len(table)] = torch.tensor(table)
    pos = torch.arange(width)
    slots = tables[:, pos // block_size] * block_size + pos % block_size
    real = pos.unsqueeze(0) < ctx.unsqueeze(1)
    slots = slots.masked_fill(~real, 0)
    mask = None if bool(real.all()) else real[:, None, None, :].to(device)
    rows = torch.tensor([r for _, r, _ in members], dtype=torch.long)
    return DecodeGroup(rows.to(device), slots.flatten().to(device), width, mask)


class PagedAttention(torch.nn.Module):
    """softmax(Q K^T / sqrt(d)) V for this rank's query heads against its KV heads.

    GQA: `groups[k]` consecutive query heads read KV head k (default: num_heads / num_kv_heads
    each). An uneven split of the heads can leave a rank unequal groups: its query heads are
    a contiguous range, so only its first and last KV heads may serve fewer than the others,
    e.g. query heads 0-4 over KV heads 0-1 as (3, 2), or 5-8 over 1-2 as (1, 3). Then
    - decode lays the query heads into a [KV, max(groups)] grid of slots, zeros before the
      first head and after the last (one F.pad), so each KV head's keys are still read
      once: the empty slots cost a little compute on a step bound by reading the cache;
    - prefill repeats each KV head for the query heads that read it (an index_select over
      heads), so compute-bound prefill spends nothing on padding: cheaper than padded
      slots, which cost at least what the even path over the padded head count does
      (deploy/bench/imbalance.py measures both).
    Equal groups take the plain GQA path, untouched.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, groups: tuple[int, ...] | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        groups = groups or (num_heads // num_kv_heads,) * num_kv_heads
        slots = max(groups)  # query slots per KV head in decode
        if len(groups) != num_kv_heads or sum(groups) != num_heads or any(g != slots for g in groups[1:-1]):
            raise ValueError(f"groups {groups} are not {num_heads} consecutive query heads over {num_kv_heads} KV heads")
        self.group_slots = slots
        self.uneven = len(set(groups)) > 1
        before = slots - groups[0]
        self.decode_pad = (0, 0, before, num_kv_heads * slots - before - num_heads)  # F.pad of [b, H, d] on H
        kv_of_head = [k for k, g in enumerate(groups) for _ in range(g)]
        self.register_buffer("kv_of_head", torch.tensor(kv_of_head), persistent=False)
        self.kv_cache: torch.Tensor | None = None  # set by the worker when it allocates KV

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, d], k and v: [T, KV, d] for the new tokens; returns [T, H * d]."""
        cache = self.kv_cache
        if cache is None:
            raise RuntimeError("KV cache not allocated: call allocate_kv before running a step")
        cache[0].index_copy_(0, meta.slot_mapping, k)
        cache[1].index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        for p in meta.prefills:  # 4-D [1, H, q, d]: SDPA takes its fused CPU kernel only for 4-D inputs
            qs = q[p.token_start : p.token_end].transpose(0, 1).unsqueeze(0)
            if p.slots is None:  # the whole context is this step's tokens
                ks, vs = k[p.token_start : p.token_end], v[p.token_start : p.token_end]
                mask = None
            else:
                ks, vs = cache[0].index_select(0, p.slots), cache[1].index_select(0, p.slots)
                n_q, n_ctx = qs.shape[2], ks.shape[0]
                # query j sits at position n_ctx - n_q + j and sees keys up to there
                mask = torch.ones(n_q, n_ctx, dtype=torch.bool, device=q.device).tril(n_ctx - n_q)
            if self.uneven:  # one KV head per query head: [ctx, KV, d] -> [ctx, H, d]
                ks, vs = ks.index_select(1, self.kv_of_head), vs.index_select(1, self.kv_of_head)
            ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
            out[p.token_start : p.token_end] = o[0].transpose(0, 1)
        kv, d, slots = self.num_kv_heads, self.head_dim, self.group_slots
        for g in meta.decodes:
            b = g.rows.numel()
            qg = q.index_select(0, g.rows)  # [b, H, d]
            if self.uneven:  # [b, KV * slots, d]: zeros in the empty slots
                qg = F.pad(qg, self.decode_pad)
            qg = qg.view(b, kv, slots, d)  # [b, KV, G, d]
            kg = cache[0].index_select(0, g.slots).view(b, g.width, kv, d).transpose(1, 2)  # [b, KV, L, d]
            vg = cache[1].index_select(0, g.slots).view(b, g.width, kv, d).transpose(1, 2)
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask).reshape(b, kv * slots, d)
            if self.uneven:
                o = o[:, self.decode_pad[2] : self.decode_pad[2] + self.num_heads]
            out.index_copy_(0, g.rows, o)
        return out.flatten(1)
