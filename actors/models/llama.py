"""One pipeline stage of a Llama-family decoder (Llama 2/3, Mistral, Qwen2), tensor-parallel.

Per decoder layer, on each TP rank:
    h  = RMSNorm(x)
    a  = o_proj(attn(rope(qkv_proj(h))))        qkv column-parallel, o_proj row-parallel: all-reduce 1
    h2 = RMSNorm(x + a)
    m  = down_proj(silu(gate(h2)) * up(h2))     gate_up column-parallel, down row-parallel: all-reduce 2
    x' = x + a + m
The first stage owns the vocab-parallel embedding, the last the final norm and LM head;
between stages the hidden state (residual added in) travels over the PP edge.
The model knows nothing about Ray: a worker builds it from the `ModelShape` and its
ParallelContext.
"""

import torch
from torch import nn

from actors.attention import AttentionMetadata, PagedAttention
from actors.comm import ParallelContext
from actors.layers import (
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from actors.model_shape import ModelShape
from actors.rotary import RotaryEmbedding, apply_rotary
from actors.sharding import RankShard, rank_shards

# checkpoint projection -> (fused parameter, shard id)
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def checkpoint_names(shape: ModelShape) -> set[str]:
    """Every checkpoint tensor the whole model loads (Hugging Face names): what a checkpoint
    must hold, known before any model is built. tests/test_loader.py checks it against the
    names a built model asks its checkpoint for."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    if not shape.tie_word_embeddings:
        names.add("lm_head.weight")
    for i in range(shape.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        names |= {f"model.layers.{i}.input_layernorm.weight", f"model.layers.{i}.post_attention_layernorm.weight"}
        names |= {f"{attn}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names |= {f"{mlp}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")}
        if shape.attention_bias:
            names |= {f"{attn}.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")}
        if shape.o_proj_bias:
            names.add(f"{attn}.o_proj.bias")
        if shape.mlp_bias:
            names |= {f"{mlp}.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj")}
    return names


class LlamaAttention(nn.Module):
    def __init__(self, shape: ModelShape, ctx: ParallelContext, shard: RankShard, dtype: torch.dtype):
        super().__init__()
        heads, kv_heads, head_dim = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
        mine = shard.heads
        self.q_size, self.kv_size = mine.num_heads * head_dim, mine.num_kv_heads * head_dim
        self.qkv_proj = QKVParallelLinear(
            shape.hidden_size, head_dim, heads, kv_heads, mine, bias=shape.attention_bias, tp=ctx.tp, dtype=dtype
        )
        # o_proj's input rows follow the query heads
        self.o_proj = RowParallelLinear(heads * head_dim, shape.hidden_size, bias=shape.o_proj_bias, tp=ctx.tp,
                                        dtype=dtype, span=mine.heads.scaled(head_dim))
        self.attn = PagedAttention(mine.num_heads, mine.num_kv_heads, head_dim, mine.groups)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        d = self.attn.head_dim
        q, k = apply_rotary(q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), rope)
        return self.o_proj(self.attn(q, k, v.unflatten(-1, (-1, d)), meta))


class LlamaMLP(nn.Module):
    def __init__(self, shape: ModelShape, ctx: ParallelContext, shard: RankShard, dtype: torch.dtype):
        super().__init__()
        hidden, inter, bias, mine = shape.hidden_size, shape.intermediate_size, shape.mlp_bias, shard.intermediate
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias, tp=ctx.tp, dtype=dtype, span=mine)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias, tp=ctx.tp, dtype=dtype, span=mine)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, shape: ModelShape, ctx: ParallelContext, shard: RankShard, dtype: torch.dtype):
        super().__init__()
        self.self_attn = LlamaAttention(shape, ctx, shard, dtype)
        self.mlp = LlamaMLP(shape, ctx, shard, dtype)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps, dtype)

    def forward(self, x, residual, rope, meta):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaStage(nn.Module):
    """The layers `layers` (global indices) of the decoder, plus embedding / head by stage.

    Parameter names follow the checkpoint's (`model.layers.{i}...` with the global i), with
    q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj` (`fused_projections`).
    This rank's heads and MLP columns come from actors.sharding.rank_shards: as even as
    possible over the TP group, or weighted by `tensor_split` (one weight per TP rank).
    """

    fused_projections = FUSED_PROJECTIONS

    def __init__(self, shape: ModelShape, ctx: ParallelContext, layers: range, dtype: torch.dtype,
                 max_positions: int | None = None, tensor_split: tuple[float, ...] | None = None):
        super().__init__()
        self.shape, self.ctx, self.layer_range = shape, ctx, layers
        self.shard = rank_shards(shape, ctx.tp_size, tensor_split)[ctx.tp_rank]
        hidden, vocab = shape.hidden_size, shape.vocab_size
        self.rotary = RotaryEmbedding(shape.head_dim, max_positions or shape.max_position_embeddings, shape.rope)
        self.model = nn.Module()
        if ctx.is_first_stage:
            self.model.embed_tokens = VocabParallelEmbedding(vocab, hidden, tp=ctx.tp, dtype=dtype)
        self.model.layers = nn.ModuleDict({str(i): LlamaDecoderLayer(shape, ctx, self.shard, dtype) for i in layers})
        if ctx.is_last_stage:
            self.model.norm = RMSNorm(hidden, shape.rms_norm_eps, dtype)
            tied = self.model.embed_tokens if shape.tie_word_embeddings and ctx.is_first_stage else None
            self.lm_head = ParallelLMHead(vocab, hidden, tp=ctx.tp, dtype=dtype, tied_to=tied)

    def forward(self, input_ids_or_hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Token ids [T] on the first stage, hidden states [T, hidden] on the others.
        Returns the hidden state after this stage's layers (final-normed on the last stage)."""
        x = self.model.embed_tokens(input_ids_or_hidden) if self.ctx.is_first_stage else input_ids_or_hidden
        rope = self.rotary(positions, x.dtype)
        residual = None
        for layer in self.model.layers.values():
            x, residual = layer(x, residual, rope, meta)
        if self.ctx.is_last_stage:
            return self.model.norm(x, residual)[0]
        return x + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[rows, vocab] float logits on TP rank 0 of the last stage, None elsewhere."""
        logits = self.lm_head(hidden)
        return logits.float() if logits is not None else None

    def checkpoint_target(self, name: str) -> str | None:
        """The checkpoint tensor name this rank loads `name` as (usually `name` itself),
        or None when this rank does not hold it: another stage's layer, rotary buffers,
        or the copy of a tied head. Fused q/k/v and gate/up are the loader's business."""
        if name.startswith("model.layers."):
            in_stage = int(name.split(".")[2]) in self.layer_range
            return name if in_stage and "rotary_emb" not in name else None
        tied = self.shape.tie_word_embeddings
        if name == "model.embed_tokens.weight":
            # Tied weights: a last stage without the embedding loads its head from it.
            if tied and self.ctx.is_last_stage and not self.ctx.is_first_stage:
                return "lm_head.weight"
            return name if self.ctx.is_first_stage else None
        if name == "lm_head.weight" and tied:
            return None  # some tied checkpoints store a copy; the embedding is the source
        if name in ("model.norm.weight", "lm_head.weight"):
            return name if self.ctx.is_last_stage else None
        return name
