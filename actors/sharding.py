"""Sharding arithmetic shared by the layers (what a rank holds) and the planner (what a
layout costs), so the two can never disagree.

Conventions:
- Query heads are split evenly: rank i holds heads [i*h/tp, (i+1)*h/tp).
- KV heads (GQA): when tp <= kv, rank i holds kv/tp consecutive KV heads; when tp > kv,
  each KV head is replicated on tp/kv consecutive ranks and rank i holds head i // (tp/kv).
  Either way the query heads of a rank attend to KV heads it holds.
- The vocabulary is padded to a multiple of 64 * tp so any tp works and each shard is
  64-aligned; padded rows are never sampled (their logits are cut before sampling).
- Layers are split over pipeline stages so that the busiest stage has as little work as
  possible, the last stage's LM head counted as `head_layers` layers (the planner's
  estimate), extra layers going to the earliest stages, unless the user gives an explicit
  partition. With head_layers=0 this is the plain even split.
"""

from dataclasses import dataclass

VOCAB_PAD_MULTIPLE = 64


class ShardingError(ValueError):
    """A layout that cannot be sharded; the message says what would work."""


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def divide(numerator: int, denominator: int, what: str = "") -> int:
    """numerator / denominator, or a clear error when it does not divide."""
    if denominator <= 0 or numerator % denominator:
        label = f"{what}: " if what else ""
        raise ShardingError(f"{label}{denominator} does not divide {numerator}")
    return numerator // denominator


def check_tp(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Raise a `ShardingError` that lists the valid sizes when tp cannot split the heads."""
    valid = [d for d in divisors(num_heads) if num_kv_heads % d == 0 or d % num_kv_heads == 0]
    if num_heads % tp:
        raise ShardingError(
            f"tensor_parallel_size={tp} does not divide num_attention_heads={num_heads}; "
            f"use one of {', '.join(map(str, valid))}"
        )
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ShardingError(
            f"tensor_parallel_size={tp} and num_key_value_heads={num_kv_heads} do not divide "
            f"one another, so KV heads can be neither split nor replicated evenly; "
            f"use one of {', '.join(map(str, valid))}"
        )


@dataclass(frozen=True)
class HeadShard:
    """The attention heads one TP rank holds."""

    num_heads: int  # query heads on this rank
    num_kv_heads: int  # KV heads on this rank (after replication)
    head_start: int  # first query head
    kv_head_start: int  # first KV head (in the checkpoint's numbering)


def head_shard(num_heads: int, num_kv_heads: int, tp: int, tp_rank: int) -> HeadShard:
    check_tp(num_heads, num_kv_heads, tp)
    heads = num_heads // tp
    if tp <= num_kv_heads:
        kv = num_kv_heads // tp
        return HeadShard(heads, kv, tp_rank * heads, tp_rank * kv)
    replicas = tp // num_kv_heads
    return HeadShard(heads, 1, tp_rank * heads, tp_rank // replicas)


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
        base, extra = divmod(num_layers - last, pp - 1)
        return [base + (1 if s < extra else 0) for s in range(pp - 1)] + [last]

    def cost(last: int) -> tuple[float, float, int]:
        work = split(last)[:-1] + [last + head_layers]
        return max(work), max(work) - min(work), last

    return split(min(range(1, num_layers - pp + 2), key=cost))


def stage_layers(partition: list[int], stage: int) -> range:
    """The global layer indices stage `stage` owns."""
    start = sum(partition[:stage])
    return range(start, start + partition[stage])
