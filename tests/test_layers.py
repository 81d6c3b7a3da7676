"""Each parallel layer against a full-tensor reference on fresh random inputs, with its
dimension split evenly, unevenly and by weights. The TP ranks run as threads of this
process (tests/threaded_tp.py): an all-reduce sums their outputs, a gather concatenates
them on rank 0, as the real collectives do."""

import pytest
import torch
import torch.nn.functional as F

from actors.comm import TPGroup
from actors.gguf_file import GGUFFile, ReadStats
from actors.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from actors.sharding import Span, head_shards, intermediate_spans, spans, split_sizes
from tests.threaded_tp import run_ranks
from tests.tiny_gguf import write_llama_gguf
from tests.tiny_models import build_hf_model, smollm2_like_config

HIDDEN, TOKENS = 24, 5
# (tp, tensor_split): even, uneven (70 features over 3 ranks: 24 | 23 | 23), weighted
SPLITS = [(1, None), (2, None), (3, None), (3, (3, 1, 2)), (2, (2, 1))]
ids = [f"tp{tp}-{'x'.join(map(str, w)) if w else 'even'}" for tp, w in SPLITS]


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def rank_spans(total: int, tp: int, weights) -> list[Span | None]:
    """Spans the sharding would give; None (the layer's own even default) when unweighted."""
    return spans(split_sizes(total, tp, weights)) if weights else [None] * tp


@pytest.mark.parametrize("tp,weights", SPLITS, ids=ids)
def test_column_parallel(tp, weights):
    w, b, x = randn(70, HIDDEN, seed=1), randn(70, seed=2), randn(TOKENS, HIDDEN, seed=3)
    parts = rank_spans(70, tp, weights)

    def rank(group):
        layer = ColumnParallelLinear(HIDDEN, 70, bias=True, tp=group, dtype=torch.float32, span=parts[group.rank])
        layer.weight_loader(layer.weight, w)
        layer.weight_loader(layer.bias, b)
        return layer(x)

    torch.testing.assert_close(torch.cat(run_ranks(tp, rank), dim=-1), F.linear(x, w, b))


@pytest.mark.parametrize("tp,weights", SPLITS, ids=ids)
def test_merged_column_parallel(tp, weights):
    gate, up, x = randn(70, HIDDEN, seed=4), randn(70, HIDDEN, seed=5), randn(TOKENS, HIDDEN, seed=6)
    parts = rank_spans(70, tp, weights)

    def rank(group):
        layer = MergedColumnParallelLinear(HIDDEN, [70, 70], bias=False, tp=group, dtype=torch.float32,
                                           span=parts[group.rank])
        layer.weight_loader(layer.weight, gate, 0)
        layer.weight_loader(layer.weight, up, 1)
        return layer(x).chunk(2, dim=-1)  # [gate_i | up_i]

    outs = run_ranks(tp, rank)
    torch.testing.assert_close(torch.cat([g for g, _ in outs], dim=-1), F.linear(x, gate))
    torch.testing.assert_close(torch.cat([u for _, u in outs], dim=-1), F.linear(x, up))


@pytest.mark.parametrize("tp,weights", SPLITS + [(4, None), (5, None), (9, None)], ids=ids + ["tp4", "tp5", "tp9"])
def test_qkv_parallel_over_9_heads_and_3_kv_heads(tp, weights):
    d = 4
    q_w, k_w, v_w = randn(9 * d, HIDDEN, seed=7), randn(3 * d, HIDDEN, seed=8), randn(3 * d, HIDDEN, seed=9)
    q_b, k_b, v_b = randn(9 * d, seed=10), randn(3 * d, seed=11), randn(3 * d, seed=12)
    x = randn(TOKENS, HIDDEN, seed=13)
    shards = head_shards(9, 3, tp, weights)

    def rank(group):
        shard = shards[group.rank]
        layer = QKVParallelLinear(HIDDEN, d, 9, 3, shard, bias=True, tp=group, dtype=torch.float32)
        for name, w, b in (("q", q_w, q_b), ("k", k_w, k_b), ("v", v_w, v_b)):
            layer.weight_loader(layer.weight, w, name)
            layer.weight_loader(layer.bias, b, name)
        return layer(x).split([shard.num_heads * d, shard.num_kv_heads * d, shard.num_kv_heads * d], dim=-1)

    full_q = F.linear(x, q_w, q_b).unflatten(-1, (9, d))
    full_k = F.linear(x, k_w, k_b).unflatten(-1, (3, d))
    full_v = F.linear(x, v_w, v_b).unflatten(-1, (3, d))
    for shard, (q, k, v) in zip(shards, run_ranks(tp, rank)):
        heads, kv = shard.heads, shard.kv_heads
        torch.testing.assert_close(q.unflatten(-1, (-1, d)), full_q[:, heads.start : heads.stop])
        torch.testing.assert_close(k.unflatten(-1, (-1, d)), full_k[:, kv.start : kv.stop])
        torch.testing.assert_close(v.unflatten(-1, (-1, d)), full_v[:, kv.start : kv.stop])


@pytest.mark.parametrize("tp,weights", SPLITS, ids=ids)
def test_row_parallel(tp, weights):
    w, b, x = randn(HIDDEN, 70, seed=14), randn(HIDDEN, seed=15), randn(TOKENS, 70, seed=16)
    parts = rank_spans(70, tp, weights)

    def rank(group):
        layer = RowParallelLinear(70, HIDDEN, bias=True, tp=group, dtype=torch.float32, span=parts[group.rank])
        layer.weight_loader(layer.weight, w)
        layer.bias.weight_loader(layer.bias, b)
        return layer(x[:, layer.span.start : layer.span.stop])  # the sharded input it receives

    for out in run_ranks(tp, rank):  # the all-reduce leaves every rank the full result
        torch.testing.assert_close(out, F.linear(x, w, b))


@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_vocab_parallel_embedding_and_lm_head(tp):
    vocab = 1001  # padded to a multiple of 64 x tp; the padding is never looked up or returned
    table, hidden = randn(vocab, HIDDEN, seed=17), randn(TOKENS, HIDDEN, seed=18)
    token_ids = torch.tensor([0, 1000, 517, 64, 999, 3])

    def rank(group):
        embed = VocabParallelEmbedding(vocab, HIDDEN, tp=group, dtype=torch.float32)
        embed.weight_loader(embed.weight, table)
        head = ParallelLMHead(vocab, HIDDEN, tp=group, dtype=torch.float32)
        head.weight_loader(head.weight, table)
        tied = ParallelLMHead(vocab, HIDDEN, tp=group, dtype=torch.float32, tied_to=embed)
        return embed(token_ids), head(hidden), tied(hidden)

    for r, (emb, logits, tied) in enumerate(run_ranks(tp, rank)):
        torch.testing.assert_close(emb, table[token_ids])
        if r == 0:
            torch.testing.assert_close(logits, hidden @ table.T)
            torch.testing.assert_close(tied, hidden @ table.T)
        else:
            assert logits is None and tied is None


@pytest.mark.parametrize("tp,weights", [(2, None), (3, None), (4, None), (2, (2, 1))], ids=str)
def test_row_parallel_down_proj_reads_whole_gguf_blocks(tmp_path, tp, weights):
    """down_proj's input columns split in blocks of 32: from a Q8_0 GGUF each rank reads
    only its own quant blocks, none twice, and gets exactly the dequantized columns."""
    hf = build_hf_model(smollm2_like_config())  # intermediate 192 = 6 blocks of 32
    stats = ReadStats()
    gguf = GGUFFile(write_llama_gguf(hf, tmp_path / "tiny.gguf", "Q8_0"), stats)
    down = gguf.tensor("blk.0.ffn_down.weight")  # [72, 192], 6 Q8_0 blocks of 34 bytes per row
    full = down[:]
    whole_bytes = stats.bytes_read
    assert whole_bytes == 72 * 6 * 34
    parts = intermediate_spans(192, tp, weights)
    read = []
    for rank, span in enumerate(parts):
        assert span.start % 32 == 0 and span.stop % 32 == 0
        layer = RowParallelLinear(192, 72, bias=False, tp=TPGroup(tp, rank), dtype=torch.float32, span=span)
        before = stats.bytes_read
        layer.weight_loader(layer.weight, down)
        read.append(stats.bytes_read - before)
        assert torch.equal(layer.weight, full[:, span.start : span.stop])
    assert sum(read) == whole_bytes  # every block read once, by one rank
    assert read == [72 * s.size // 32 * 34 for s in parts]

