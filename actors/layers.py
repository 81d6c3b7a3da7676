"""Megatron-style tensor-parallel layers for inference.

Notation: X is [tokens, in], A is the [in, out] weight (stored as nn.Linear does, [out, in]),
p = tensor_parallel_size, i = this rank. A rank's share of a split dimension is a `Span`
from actors/sharding.py: even by default, uneven or weighted where the model passes one
(9 heads over 2 ranks: 5 + 4). Each parameter owns a
`weight_loader(param, source, shard_id=None)` that copies this rank's slice out of a
checkpoint tensor; `source` is a full tensor or a lazy slice of a safetensors or GGUF
tensor (anything with `.shape` and `t[a:b]` / `t[:, a:b]` slicing), so a rank reads only
the rows or columns it owns.
"""

from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from actors.comm import TPGroup, gather_from_tp_region, reduce_from_tp_region
from actors.sharding import HeadShard, Span, even_span, padded_vocab_size


class WeightShapeError(ValueError):
    """A checkpoint tensor does not have the shape the model config implies."""


def check_shape(source: Any, expected: Sequence[int]) -> None:
    if tuple(source.shape) != tuple(expected):
        raise WeightShapeError(f"expected shape {tuple(expected)}, got {tuple(source.shape)}")


def make_param(shape: Sequence[int], dtype: torch.dtype, loader: Callable) -> nn.Parameter:
    param = nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)
    param.weight_loader = loader
    return param


def load_rows(param: torch.Tensor, source: Any, start: int, stop: int, dst_start: int = 0) -> None:
    """param[dst_start : dst_start + (stop - start)] = source[start:stop] (reads only those rows)."""
    param.data[dst_start : dst_start + stop - start].copy_(source[start:stop])


class ParallelColumns(nn.Module):
    """Y = X [A^0_i | A^1_i | ...] + b_i: this rank's columns of one or more fused outputs.

    Logical output j (q, k, v; gate, up) has output_sizes[j] columns in the checkpoint, of
    which this rank holds `spans[j]`; its weight stacks those slices in order, so one matmul
    gives them all. No communication: the output stays sharded for a row-parallel layer.
    """

    def __init__(self, in_features: int, output_sizes: Sequence[int], spans: Sequence[Span], *,
                 bias: bool, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.output_sizes = list(output_sizes)
        self.spans = list(spans)
        self.offsets = list(accumulate((s.size for s in self.spans), initial=0))  # where each lands
        self.weight = make_param((self.offsets[-1], in_features), dtype, self.weight_loader)
        self.bias = make_param((self.offsets[-1],), dtype, self.weight_loader) if bias else None

    def load_output(self, param: nn.Parameter, source: Any, index: int) -> None:
        check_shape(source, (self.output_sizes[index], *param.shape[1:]))
        span = self.spans[index]
        load_rows(param, source, span.start, span.stop, self.offsets[index])

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(ParallelColumns):
    """Y = XA + b with A split by columns, A = [A_1 ... A_p], b = [b_1 ... b_p].

    Rank i holds A_i, the columns `span` of A (out/p of them by default), and b_i, and
    returns Y_i = X A_i + b_i; no communication.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPGroup, dtype: torch.dtype,
                 span: Span | None = None):
        span = span if span is not None else even_span(out_features, tp.size, tp.rank)
        super().__init__(in_features, [out_features], [span], bias=bias, tp=tp, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        self.load_output(param, source, 0)


class MergedColumnParallelLinear(ParallelColumns):
    """Several column-parallel outputs fused into one matmul: [A^0 | A^1 | ...].

    Each logical output (e.g. gate_proj and up_proj, shard_id 0 and 1) is split by columns
    on its own, so rank i holds [A^0_i | A^1_i] and one matmul gives both halves. `span` is
    the rank's share of every output (the MLP's intermediate columns); even by default.
    """

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool, tp: TPGroup, dtype: torch.dtype,
                 span: Span | None = None):
        spans = [span if span is not None else even_span(n, tp.size, tp.rank) for n in output_sizes]
        super().__init__(in_features, output_sizes, spans, bias=bias, tp=tp, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: int | None = None) -> None:
        if shard_id is None:
            raise WeightShapeError("a merged projection loads one logical output at a time")
        self.load_output(param, source, shard_id)


class QKVParallelLinear(ParallelColumns):
    """The fused Q, K, V projection, column-parallel over attention heads (GQA aware).

    Rank i computes Q for its query heads and K, V for the KV heads those queries read
    (actors.sharding.head_shards): head h is rows [h*d, (h+1)*d) of its projection, so the
    rank's heads [a, b) are rows [a*d, b*d). A KV head read by query heads of several ranks
    is computed on each of them. Output columns on a rank are [q heads | k heads | v heads].
    """

    SHARD_IDS: ClassVar[dict[str, int]] = {"q": 0, "k": 1, "v": 2}

    def __init__(self, hidden_size: int, head_dim: int, total_heads: int, total_kv_heads: int, shard: HeadShard, *,
                 bias: bool, tp: TPGroup, dtype: torch.dtype):
        q, kv = shard.heads.scaled(head_dim), shard.kv_heads.scaled(head_dim)
        sizes = [total_heads * head_dim, total_kv_heads * head_dim, total_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, [q, kv, kv], bias=bias, tp=tp, dtype=dtype)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: str | None = None) -> None:
        if shard_id not in self.SHARD_IDS:
            raise WeightShapeError("the fused QKV projection loads q, k and v one at a time")
        self.load_output(param, source, self.SHARD_IDS[shard_id])


class RowParallelLinear(nn.Module):
    """Y = XA + b with A split by rows, A = [A_1; ...; A_p], X = [X_1 ... X_p] by columns.

    Rank i holds A_i, the rows `span` of A (in/p of them by default; for o_proj the rows its
    query heads produce, for down_proj its intermediate columns), receives X_i (the sharded
    output of a column-parallel layer), computes X_i A_i, and the all-reduce sums them:
    Y = sum_i X_i A_i. The bias is added once, after the reduce. This is one of the two
    all-reduces of a decoder layer.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool, tp: TPGroup, dtype: torch.dtype,
                 span: Span | None = None):
        super().__init__()
        self.tp = tp
        self.in_features = in_features
        self.span = span if span is not None else even_span(in_features, tp.size, tp.rank)
        self.weight = make_param((out_features, self.span.size), dtype, self.weight_loader)
        self.bias = make_param((out_features,), dtype, self.load_full) if bias else None

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        check_shape(source, (param.shape[0], self.in_features))
        param.data.copy_(source[:, self.span.start : self.span.stop])

    @staticmethod
    def load_full(param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        check_shape(source, param.shape)
        param.data.copy_(source[:])

    def forward(self, x_shard: torch.Tensor) -> torch.Tensor:
        y = reduce_from_tp_region(F.linear(x_shard, self.weight), self.tp)
        return y + self.bias if self.bias is not None else y


class VocabParallelEmbedding(nn.Module):
    """Embedding with the (padded) vocabulary split by rows over the TP ranks.

    Rank i holds rows [i*V/p, (i+1)*V/p) of the padded table. It looks up the ids that fall
    in its range, writes zeros for the others, and the all-reduce sums the partial lookups:
    every id is owned by exactly one rank, so the sum is the full embedding.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, tp: TPGroup, dtype: torch.dtype):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.rows_per_rank = padded_vocab_size(vocab_size, tp.size) // tp.size
        self.vocab_start = tp.rank * self.rows_per_rank
        self.vocab_end = self.vocab_start + self.rows_per_rank
        self.weight = make_param((self.rows_per_rank, hidden_size), dtype, self.weight_loader)

    def weight_loader(self, param: nn.Parameter, source: Any, shard_id: Any = None) -> None:
        check_shape(source, (self.vocab_size, self.hidden_size))
        param.data.zero_()  # padded rows stay zero
        stop = min(self.vocab_end, self.vocab_size)
        if stop > self.vocab_start:
            load_rows(param, source, self.vocab_start, stop)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        outside = (token_ids < self.vocab_start) | (token_ids >= self.vocab_end)
        local_ids = (token_ids - self.vocab_start).masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(partial, self.tp)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits = H E^T with E split by vocabulary rows, as in the embedding.

    Rank i computes the logits of its vocabulary slice, H E_i^T; the slices are gathered on
    TP rank 0, where padding columns are cut so they can never be sampled. With tied
    embeddings on a one-stage replica the head shares the embedding's parameter.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, tp: TPGroup, dtype: torch.dtype, tied_to: VocabParallelEmbedding | None = None):
        super().__init__(vocab_size, hidden_size, tp=tp, dtype=dtype)
        if tied_to is not None:
            self.weight = tied_to.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on TP rank 0, None on the other ranks."""
        logits = gather_from_tp_region(F.linear(hidden, self.weight), self.tp)
        return logits[..., : self.vocab_size] if logits is not None else None


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32; replicated on every rank.

    `forward(x, residual)` fuses the residual add: it returns (norm(x + residual), x + residual).
    """

    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = make_param((hidden_size,), dtype, RowParallelLinear.load_full)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype), x
