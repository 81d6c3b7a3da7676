"""Sharding arithmetic shared by the layers (what a rank holds) and the planner (what a
layout costs), so the two can never disagree. Any tensor_parallel_size from 1 to the
number of query heads works; `tensor_split` weights (one positive number per TP rank, like
llama.cpp's --tensor-split) give a rank a larger share.

Conventions, for tp ranks with weights w_i (all equal by default):
- Counts are split by largest remainder: rank i gets floor(n * w_i / sum(w)) and the
  leftovers go to the largest fractional parts, earliest rank first on ties; every rank
  gets at least one. Ranges are contiguous, in rank order. Evenly, 9 heads at tp=2 are
  5 + 4; with tensor_split [2, 1] they are 6 + 3.
- Query heads are split that way. With GQA, query head j reads KV head j // G
  (G = heads / kv_heads), so a rank holds the contiguous range of KV heads its query heads
  read, a KV head whose queries straddle ranks being replicated on each of them (as every
  KV head is when tp > kv_heads). `HeadShard.groups` counts the rank's query heads per KV
  head; they need not be equal: 9 heads / 3 KV heads at tp=2 gives rank 0 query heads 0-4
  over KV heads 0-1, groups (3, 2), and rank 1 query heads 5-8 over KV heads 1-2, (1, 3).
- The MLP's intermediate dimension is split the same way, in units of MLP_SPLIT_UNIT = 32
  columns (one GGUF quant block), so no rank's slice of down_proj cuts a block; in units
  of 1 when the intermediate size is not a multiple of 32 or has fewer such units than
  ranks (then GGUF reads round out to whole blocks, still exact).
- The vocabulary is padded to a multiple of 64 * tp so any tp works and each shard is
  64-aligned; padded rows are never sampled (their logits are cut before sampling).
  Vocabulary shards are always even (tensor_split does not apply).
- Layers are split over pipeline stages so that the busiest stage has as little work as
  possible, the last stage's LM head counted as `head_layers` layers (the planner's
  estimate), extra layers going to the earliest stages, unless the user gives an explicit
  partition. With head_layers=0 this is the plain even split.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate, pairwise

from actors.model_shape import ModelShape

VOCAB_PAD_MULTIPLE = 64
MLP_SPLIT_UNIT = 32  # columns: a GGUF quantization block


class ShardingError(ValueError):
    """A layout that cannot be sharded; the message says what would work."""


@dataclass(frozen=True)
class Span:
    """The contiguous range [start, stop) of a dimension that one rank holds."""

    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def scaled(self, factor: int) -> "Span":
        """Heads -> rows: heads [a, b) are rows [a * d, b * d) for head_dim d."""
        return Span(self.start * factor, self.stop * factor)


def check_tensor_split(tp: int, weights: Sequence[float] | None) -> None:
    """A ShardingError unless `weights` is None or one positive number per TP rank."""
    if weights is None:
        return
    shown = "[" + ", ".join(f"{w:g}" for w in weights) + "]"
    if len(weights) != tp:
        raise ShardingError(
            f"tensor_split={shown} has {len(weights)} weight(s) but tensor_parallel_size={tp}; "
            f"give one weight per TP rank (e.g. [{', '.join(['1'] * tp)}] for an even split), "
            "or leave it out"
        )
    if not all(math.isfinite(w) and w > 0 for w in weights):
        raise ShardingError(
            f"tensor_split={shown}: every weight must be a positive number (a rank's share of "
            "the heads and MLP columns, e.g. [24, 16] for a 24 GB GPU beside a 16 GB one)"
        )


def split_sizes(total: int, parts: int, weights: Sequence[float] | None = None) -> list[int]:
    """`total` units over `parts` ranks by largest remainder on `weights`, each rank >= 1."""
    if not 1 <= parts <= total:
        raise ShardingError(f"cannot split {total} unit(s) over {parts} ranks, each getting at least one")
    check_tensor_split(parts, weights)
    w = [Fraction(x) for x in weights] if weights is not None else [Fraction(1)] * parts
    quotas = [total * x / sum(w) for x in w]
    sizes = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(parts), key=lambda i: (sizes[i] - quotas[i], i))
    for i in by_remainder[: total - sum(sizes)]:
        sizes[i] += 1
    for i in range(parts):  # a rank with no unit takes one from the rank most above its quota
        if sizes[i] == 0:
            donor = max((j for j in range(parts) if sizes[j] > 1), key=lambda j: (sizes[j] - quotas[j], -j))
            sizes[donor] -= 1
            sizes[i] = 1
    return sizes


def spans(sizes: Sequence[int], unit: int = 1) -> list[Span]:
    """Consecutive ranges of `sizes[i] * unit` elements, rank by rank."""
    bounds = [unit * b for b in accumulate(sizes, initial=0)]
    return [Span(a, b) for a, b in pairwise(bounds)]


def even_span(total: int, tp: int, tp_rank: int) -> Span:
    """Rank tp_rank's share of `total` split as evenly as possible (extras to early ranks)."""
    return spans(split_sizes(total, tp))[tp_rank]


def check_tp(num_heads: int, tp: int) -> None:
    """Raise a `ShardingError` saying what works when tp cannot split the query heads."""
    if not 1 <= tp <= num_heads:
        raise ShardingError(
            f"tensor_parallel_size={tp} exceeds num_attention_heads={num_heads}: every TP rank "
            f"needs at least one query head; use a tensor_parallel_size from 1 to {num_heads} "
            "(and pipeline_parallel_size for more GPUs)"
        )


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one TP rank holds."""

    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (replicated where its queries straddle ranks)
    head_start: int  # first query head
    kv_head_start: int  # first KV head (in the checkpoint's numbering)
    groups: tuple[int, ...]  # query heads of this rank per KV head of it, in order

    @property
    def heads(self) -> Span:
        return Span(self.head_start, self.head_start + self.num_heads)

    @property
    def kv_heads(self) -> Span:
        return Span(self.kv_head_start, self.kv_head_start + self.num_kv_heads)


def head_shards(num_heads: int, num_kv_heads: int, tp: int,
                weights: Sequence[float] | None = None) -> list[HeadShard]:
    """Every rank's heads. Needs num_kv_heads to divide num_heads (ModelShape checks it)."""
    check_tp(num_heads, tp)
    group = num_heads // num_kv_heads  # query heads per KV head in the checkpoint
    shards = []
    for q in spans(split_sizes(num_heads, tp, weights)):
        kv = Span(q.start // group, (q.stop - 1) // group + 1)
        groups = tuple(min(q.stop, (k + 1) * group) - max(q.start, k * group) for k in range(kv.start, kv.stop))
        shards.append(HeadShard(q.size, kv.size, q.start, kv.start, groups))
    return shards


def intermediate_spans(intermediate_size: int, tp: int, weights: Sequence[float] | None = None) -> list[Span]:
    """Every rank's columns of the MLP's intermediate dimension (gate/up rows, down columns)."""
    unit = MLP_SPLIT_UNIT
    if intermediate_size % unit or intermediate_size // unit < tp:
        unit = 1
    return spans(split_sizes(intermediate_size // unit, tp, weights), unit)


@dataclass(frozen=True)
class RankShard:
    """What one TP rank holds of every decoder layer of its stage."""

    heads: HeadShard
    intermediate: Span  # its columns of the MLP's intermediate dimension


def rank_shards(shape: ModelShape, tp: int, weights: Sequence[float] | None = None) -> list[RankShard]:
    """The split of each decoder layer over the ranks of a TP group, indexed by tp_rank."""
    heads = head_shards(shape.num_attention_heads, shape.num_key_value_heads, tp, weights)
    inter = intermediate_spans(shape.intermediate_size, tp, weights)
    return [RankShard(h, i) for h, i in zip(heads, inter)]


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


def layer_partition(num_layers: int, pp: int, explicit: list[int] | None = None, head_layers: float = 0.0) -> list[int]:
    """Layers per stage: `explicit` checked, or balanced: the last stage takes n layers
    plus the LM head (worth `head_layers` layers), the others share the rest as evenly as
    possible (extras to early stages), n making the busiest stage's work least, then the
    spread between stages, then n itself."""
    if pp < 1 or pp > num_layers:
        raise ShardingError(
            f"pipeline_parallel_size={pp} must be between 1 and num_hidden_layers={num_layers}"
        )
    if explicit is not None:
        if len(explicit) != pp or sum(explicit) != num_layers or min(explicit) < 1:
            raise ShardingError(
                f"layer_partition={explicit} must have pipeline_parallel_size={pp} entries, "
                f"each >= 1, summing to num_hidden_layers={num_layers}"
            )
        return list(explicit)
    if pp == 1:
        return [num_layers]

    def split(last: int) -> list[int]:
        return [*split_sizes(num_layers - last, pp - 1), last]

    def cost(last: int) -> tuple[float, float, int]:
        work = split(last)[:-1] + [last + head_layers]
        return max(work), max(work) - min(work), last

    return split(min(range(1, num_layers - pp + 2), key=cost))


def stage_layers(partition: list[int], stage: int) -> range:
    """The global layer indices stage `stage` owns."""
    start = sum(partition[:stage])
    return range(start, start + partition[stage])
