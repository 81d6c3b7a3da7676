"""The split arithmetic of actors/sharding.py: counts by largest remainder, heads with the KV
heads their queries read, MLP columns in whole GGUF blocks, and the refusals."""

import itertools
from fractions import Fraction

import pytest

from actors.sharding import (
    ShardingError,
    Span,
    check_tensor_split,
    head_shards,
    intermediate_spans,
    layer_partition,
    spans,
    split_sizes,
)


@pytest.mark.parametrize("total,parts,want", [(9, 2, [5, 4]), (8, 3, [3, 3, 2]), (9, 3, [3, 3, 3]),
                                              (32, 3, [11, 11, 10]), (5, 5, [1] * 5), (30, 4, [8, 8, 7, 7])])
def test_even_split_puts_extras_on_early_ranks(total, parts, want):
    assert split_sizes(total, parts) == want


@pytest.mark.parametrize("total,weights,want", [
    (9, (2, 1), [6, 3]),
    (32, (24, 16), [19, 13]),  # quotas 19.2 | 12.8
    (48, (3, 1, 2), [24, 8, 16]),
    (10, (1, 1, 1), [4, 3, 3]),  # equal remainders: the earliest rank first
    (9, (10, 1), [8, 1]),  # quotas 8.18 | 0.82
    (48, (100, 1), [47, 1]),  # quota 0.48 rounds to 0; rank 0, most above its quota, gives one
    (6, (0.6, 5, 0.4), [1, 4, 1]),  # the donor is never left empty
])
def test_weighted_split_by_largest_remainder(total, weights, want):
    assert split_sizes(total, len(weights), weights) == want


def test_split_properties_over_a_grid():
    for total, parts in itertools.product(range(1, 40), range(1, 9)):
        if parts > total:
            continue
        sizes = split_sizes(total, parts)
        assert sum(sizes) == total and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
        for weights in [(1,) * (parts - 1) + (3,), tuple(range(1, parts + 1))]:
            sizes = split_sizes(total, parts, weights)
            quotas = [Fraction(total) * w / sum(weights) for w in weights]
            assert sum(sizes) == total and min(sizes) >= 1
            if all(q >= 1 for q in quotas):  # no rank lifted to one: each within 1 of its quota
                assert all(abs(s - q) < 1 for s, q in zip(sizes, quotas))


def test_spans_are_contiguous_and_cover():
    assert spans([5, 4]) == [Span(0, 5), Span(5, 9)]
    assert spans([3, 2, 1], unit=32) == [Span(0, 96), Span(96, 160), Span(160, 192)]
    assert Span(2, 5).scaled(64) == Span(128, 320) and Span(2, 5).size == 3


def kv_heads_read(shard, group: int) -> list[int]:
    return sorted({j // group for j in range(shard.head_start, shard.head_start + shard.num_heads)})


@pytest.mark.parametrize("heads,kv_heads", [(9, 3), (8, 4), (12, 3), (32, 8), (10, 2), (6, 6), (4, 1)])
def test_every_query_head_on_one_rank_with_the_kv_heads_it_reads(heads, kv_heads):
    group = heads // kv_heads
    for tp in range(1, heads + 1):
        for weights in (None, tuple(range(tp, 0, -1))):
            shards = head_shards(heads, kv_heads, tp, weights)
            assert [s.head_start for s in shards] == list(itertools.accumulate([s.num_heads for s in shards], initial=0))[:-1]
            assert sum(s.num_heads for s in shards) == heads
            for s in shards:
                assert list(range(s.kv_head_start, s.kv_head_start + s.num_kv_heads)) == kv_heads_read(s, group)
                assert sum(s.groups) == s.num_heads and len(s.groups) == s.num_kv_heads
                assert all(1 <= g <= group for g in s.groups)


def test_smollm2_heads_by_hand():
    # 9 heads, 3 KV heads (3 query heads each)
    tp2 = head_shards(9, 3, 2)
    assert [(s.heads, s.kv_heads, s.groups) for s in tp2] == [
        (Span(0, 5), Span(0, 2), (3, 2)), (Span(5, 9), Span(1, 3), (1, 3))]
    tp4 = head_shards(9, 3, 4)
    assert [(s.heads, s.kv_heads, s.groups) for s in tp4] == [
        (Span(0, 3), Span(0, 1), (3,)), (Span(3, 5), Span(1, 2), (2,)),
        (Span(5, 7), Span(1, 3), (1, 1)), (Span(7, 9), Span(2, 3), (2,))]
    weighted = head_shards(9, 3, 2, (2, 1))
    assert [(s.heads, s.kv_heads, s.groups) for s in weighted] == [
        (Span(0, 6), Span(0, 2), (3, 3)), (Span(6, 9), Span(2, 3), (3,))]


def test_even_layouts_as_before():
    # tp <= KV heads: KV heads split; tp > KV heads: each replicated on tp / kv ranks
    assert [(s.num_heads, s.kv_head_start, s.num_kv_heads) for s in head_shards(32, 8, 4)] == [
        (8, 0, 2), (8, 2, 2), (8, 4, 2), (8, 6, 2)]
    assert [s.kv_head_start for s in head_shards(64, 8, 16)] == [k // 2 for k in range(16)]


@pytest.mark.parametrize("size,tp,weights,want", [
    (1536, 2, None, [768, 768]),  # SmolLM2: 48 blocks of 32
    (1536, 3, None, [512, 512, 512]),
    (1536, 4, None, [384] * 4),
    (1536, 2, (2, 1), [1024, 512]),
    (14336, 3, None, [4800, 4768, 4768]),  # Llama-3-8B: 448 blocks -> 150 | 149 | 149
    (192, 4, None, [64, 64, 32, 32]),
])
def test_intermediate_split_in_whole_blocks_of_32(size, tp, weights, want):
    parts = intermediate_spans(size, tp, weights)
    assert [p.size for p in parts] == want
    assert all(p.start % 32 == 0 for p in parts) and parts[-1].stop == size


def test_intermediate_falls_back_to_single_columns():
    assert [p.size for p in intermediate_spans(100, 4)] == [25] * 4  # not a multiple of 32
    assert [p.size for p in intermediate_spans(64, 4)] == [16] * 4  # 2 blocks for 4 ranks


def test_refusals_say_what_works():
    with pytest.raises(ShardingError, match=r"tensor_parallel_size=10 exceeds num_attention_heads=9.*from 1 to 9"):
        head_shards(9, 3, 10)
    with pytest.raises(ShardingError, match=r"tensor_split=\[2, 1, 1\] has 3 weight\(s\) but tensor_parallel_size=2"):
        check_tensor_split(2, [2, 1, 1])
    for bad in ([2, 0], [1, -1], [float("nan"), 1]):
        with pytest.raises(ShardingError, match="every weight must be a positive number"):
            check_tensor_split(2, bad)
    check_tensor_split(2, None)
    check_tensor_split(2, [24, 16])


def test_layer_partition():
    assert layer_partition(30, 4) == [8, 8, 7, 7]
    assert layer_partition(5, 2, [2, 3]) == [2, 3]
    with pytest.raises(ShardingError, match="between 1 and num_hidden_layers=5"):
        layer_partition(5, 6)
    with pytest.raises(ShardingError, match="summing to num_hidden_layers=5"):
        layer_partition(5, 2, [2, 2])


def test_layer_partition_counts_the_lm_head_on_the_last_stage():
    """The busiest stage's work is least: the last stage's layers plus the head against the
    others' layers; ties go to the smaller spread, then to fewer layers last."""
    assert layer_partition(30, 2, head_layers=0.0) == [15, 15]
    assert layer_partition(31, 2, head_layers=0.0) == [16, 15]
    assert layer_partition(30, 2, head_layers=4.1) == [17, 13]  # 17 against 17.1
    assert layer_partition(30, 3, head_layers=4.1) == [12, 11, 7]  # 12, 11, 11.1
    assert layer_partition(4, 2, head_layers=10.0) == [3, 1]  # every stage keeps a layer
    assert layer_partition(30, 2, [15, 15], head_layers=4.1) == [15, 15]  # an explicit partition stands
