"""One pipeline stage of a Llama-family decoder (Llama 2/3, Mistral, Qwen2), tensor-parallel.

Per decoder layer, on each TP rank:
    h  = RMSNorm(x)
    a  = o_proj(attn(rope(qkv_proj(h))))        qkv column-parallel, o_proj row-parallel: all-reduce 1
    h2 = RMSNorm(x + a)
    m  = down_proj(silu(gate(h2)) * up(h2))     gate_up column-parallel, down row-parallel: all-reduce 2
    x' = x + a + m
The first stage owns the vocab-parallel embedding, the last the final norm and LM head;
between stages the hidden state (residual added in) travels over the PP edge.
The model knows nothing about Ray: a worker builds it with its ParallelContext.
"""

from dataclasses import dataclass
from typing import Any

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
from actors.rotary import RotaryEmbedding, apply_rotary, rope_parameters
from actors.sharding import head_shard

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# checkpoint projection -> (fused parameter, shard id)
FUSED_PROJECTIONS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class UnsupportedModelError(ValueError):
    pass


def check_supported(hf_config: Any) -> str:
    """The architecture name, or a clear error for what this decoder cannot run."""
    archs = getattr(hf_config, "architectures", None) or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"config.json architectures={archs} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", arch == "MistralForCausalLM")
    if uses_window and window is not None and window < hf_config.max_position_embeddings:
        raise UnsupportedModelError(
            f"config.json sliding_window={window} < max_position_embeddings="
            f"{hf_config.max_position_embeddings}: sliding-window attention is not supported yet; "
            f"set sliding_window to null (exact for sequences up to {window} tokens)"
        )
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"config.json hidden_act={hf_config.hidden_act!r}: only 'silu' is supported")
    return arch


@dataclass(frozen=True)
class Biases:
    """Which projections carry a bias: Qwen2 has q/k/v bias only; HF Llama's
    attention_bias covers q/k/v and o_proj, its mlp_bias the MLP."""

    qkv: bool
    o: bool
    mlp: bool

    @classmethod
    def of(cls, cfg: Any, arch: str) -> "Biases":
        attention = getattr(cfg, "attention_bias", False)
        return cls(arch == "Qwen2ForCausalLM" or attention, attention and arch != "Qwen2ForCausalLM",
                   getattr(cfg, "mlp_bias", False))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: Any, ctx: ParallelContext, dtype: torch.dtype, head_dim: int, bias: Biases):
        super().__init__()
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        shard = head_shard(cfg.num_attention_heads, kv_heads, ctx.tp_size, ctx.tp_rank)
        self.q_size, self.kv_size = shard.num_heads * head_dim, shard.num_kv_heads * head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, head_dim, cfg.num_attention_heads, kv_heads, shard, bias=bias.qkv, tp=ctx.tp, dtype=dtype
        )
        self.o_proj = RowParallelLinear(cfg.num_attention_heads * head_dim, cfg.hidden_size, bias=bias.o, tp=ctx.tp, dtype=dtype)
        self.attn = PagedAttention(shard.num_heads, shard.num_kv_heads, head_dim)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.qkv_proj(h).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        d = self.attn.head_dim
        q, k = apply_rotary(q.unflatten(-1, (-1, d)), k.unflatten(-1, (-1, d)), rope)
        return self.o_proj(self.attn(q, k, v.unflatten(-1, (-1, d)), meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: Any, ctx: ParallelContext, dtype: torch.dtype, bias: bool):
        super().__init__()
        inter = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, [inter, inter], bias=bias, tp=ctx.tp, dtype=dtype)
        self.down_proj = RowParallelLinear(inter, cfg.hidden_size, bias=bias, tp=ctx.tp, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(h).chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: Any, ctx: ParallelContext, dtype: torch.dtype, head_dim: int, bias: Biases):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, ctx, dtype, head_dim, bias)
        self.mlp = LlamaMLP(cfg, ctx, dtype, bias.mlp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)

    def forward(self, x, residual, rope, meta):
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rope, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaStage(nn.Module):
    """The layers `layers` (global indices) of the decoder, plus embedding / head by stage.

    Parameter names follow the checkpoint's (`model.layers.{i}...` with the global i), with
    q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj` (`fused_projections`).
    """

    fused_projections = FUSED_PROJECTIONS

    def __init__(self, cfg: Any, ctx: ParallelContext, layers: range, dtype: torch.dtype, max_positions: int | None = None):
        super().__init__()
        arch = check_supported(cfg)
        self.cfg, self.ctx, self.layer_range = cfg, ctx, layers
        max_positions = max_positions or cfg.max_position_embeddings
        bias = Biases.of(cfg, arch)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.rotary = RotaryEmbedding(head_dim, max_positions, rope_parameters(cfg))
        self.model = nn.Module()
        if ctx.is_first_stage:
            self.model.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp=ctx.tp, dtype=dtype)
        self.model.layers = nn.ModuleDict(
            {str(i): LlamaDecoderLayer(cfg, ctx, dtype, head_dim, bias) for i in layers}
        )
        if ctx.is_last_stage:
            self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            tied = self.model.embed_tokens if cfg.tie_word_embeddings and ctx.is_first_stage else None
            self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp=ctx.tp, dtype=dtype, tied_to=tied)

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
        tied = self.cfg.tie_word_embeddings
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
