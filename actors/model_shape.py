"""The one owner of a checkpoint's shape: everything the planner, the layers and the loader
need to know about the model, read once from its config (Hugging Face config.json, or the
metadata of a GGUF file turned into the same keys) and handed to every worker.

Defaults follow Hugging Face: head_dim = hidden_size / num_attention_heads, no GQA without
num_key_value_heads. Biases: Qwen2 always has q/k/v biases and no o_proj bias (its
config.json does not say so); Llama's `attention_bias: true` biases q/k/v and o_proj, its
`mlp_bias` the MLP. A model this decoder cannot run exactly (a sliding window shorter than
its context, another activation, an unknown rope scaling) is refused here, before any
worker starts.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# Hugging Face's defaults when config.json leaves max_position_embeddings out.
_DEFAULT_MAX_POSITIONS = {"LlamaForCausalLM": 2048, "MistralForCausalLM": 4096 * 32, "Qwen2ForCausalLM": 32768}


class ModelShapeError(ValueError):
    """The model's config is missing or malformed; the message names the file."""


class UnsupportedModelError(ModelShapeError):
    """A well-formed model this decoder cannot serve exactly; the message says why."""


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str  # the checkpoint's dtype, what `dtype: auto` serves on GPUs
    attention_bias: bool  # q/k/v projections have a bias
    o_proj_bias: bool  # the attention output projection has a bias
    mlp_bias: bool
    rms_norm_eps: float
    rope: dict[str, Any] = field(hash=False)  # rope_theta, rope_type and its scaling keys
    sliding_window: int | None = None  # only when at least the whole context (so exact)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "ModelShape":
        path = Path(path)
        if not path.is_dir():
            raise ModelShapeError(f"model: {path} is not a directory (expected a Hugging Face model folder)")
        config = path / "config.json"
        try:
            data = json.loads(config.read_text())
        except FileNotFoundError:
            raise ModelShapeError(
                f"model: {config} does not exist; the model folder needs the Hugging Face "
                "config.json (weights are only needed to serve, not to plan), or name a .gguf file"
            ) from None
        except json.JSONDecodeError as e:
            raise ModelShapeError(f"model: {config} is not valid JSON: {e}") from None
        return cls.from_dict(data, source=str(config))

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelShape":
        archs = list(cfg.get("architectures") or ())
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"model: {source} has architectures {archs}; tensorfleet supports "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            vocab, inter = int(cfg["vocab_size"]), int(cfg["intermediate_size"])
            layers = int(cfg["num_hidden_layers"])
        except KeyError as e:
            raise ModelShapeError(f"model: {source} lacks {e.args[0]}") from None
        if not cfg.get("head_dim") and hidden % heads:
            raise ModelShapeError(
                f"model: {source}: num_attention_heads={heads} does not divide hidden_size={hidden} "
                "and no head_dim is given"
            )
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelShapeError(
                f"model: {source}: num_key_value_heads={kv_heads} does not divide "
                f"num_attention_heads={heads}; grouped-query attention needs whole groups"
            )
        is_qwen2 = arch == "Qwen2ForCausalLM"
        attention_bias = bool(cfg.get("attention_bias", False))
        max_positions = int(cfg.get("max_position_embeddings") or _DEFAULT_MAX_POSITIONS[arch])
        shape = cls(
            architecture=arch,
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=max_positions,
            # transformers >= 4.56 writes "dtype"; older checkpoints "torch_dtype".
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            attention_bias=is_qwen2 or attention_bias,
            o_proj_bias=not is_qwen2 and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope=_rope_parameters(cfg),
            sliding_window=_sliding_window(cfg, arch),
        )
        shape._check_servable(cfg, source)
        return shape

    def _check_servable(self, cfg: dict[str, Any], source: str) -> None:
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            raise UnsupportedModelError(
                f"model: {source} has sliding_window={self.sliding_window} < max_position_embeddings="
                f"{self.max_position_embeddings}: sliding-window attention is not supported yet; "
                f"set sliding_window to null (exact for sequences up to {self.sliding_window} tokens)"
            )
        if (act := cfg.get("hidden_act", "silu")) != "silu":
            raise UnsupportedModelError(f"model: {source} has hidden_act={act!r}: only 'silu' is supported")
        if (rope_type := self.rope["rope_type"]) not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModelError(
                f"model: {source} has rope type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )


def _rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """Old style (`rope_theta` + `rope_scaling`) or new (`rope_parameters`), one dict."""
    rope = dict(cfg.get("rope_parameters") or {})
    if not rope:
        rope = {"rope_theta": cfg.get("rope_theta", 10000.0), **(cfg.get("rope_scaling") or {})}
    rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
    return rope


def _sliding_window(cfg: dict[str, Any], arch: str) -> int | None:
    """The window in tokens when the model uses one: Mistral v0.1, Qwen2 only with
    use_sliding_window."""
    window = cfg.get("sliding_window")
    uses_window = cfg.get("use_sliding_window", arch == "MistralForCausalLM")
    return int(window) if window and uses_window else None
