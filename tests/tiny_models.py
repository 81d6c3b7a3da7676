"""Tiny Llama-family checkpoints built from a config with a fixed seed (never downloaded).

The init is scaled (initializer_range=0.2) so logits are far from uniform: greedy tokens
vary and top-2 margins sit well above float noise, which exact-token tests need.
"""

from pathlib import Path

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from actors.checkpoint import open_checkpoint
from actors.model_shape import ModelShape
from actors.worker import SamplerVocabulary, WorkerSpec

COMMON = dict(hidden_size=64, intermediate_size=128, max_position_embeddings=512, initializer_range=0.2, rms_norm_eps=1e-5)


def llama_config(**overrides) -> LlamaConfig:
    args = dict(COMMON, vocab_size=1000, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4,
                architectures=["LlamaForCausalLM"], tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**{**args, **overrides})


def qwen2_config(**overrides) -> Qwen2Config:
    """Bias on q/k/v, tied embeddings, a vocabulary not divisible by 4, 2 KV heads."""
    args = dict(COMMON, vocab_size=1001, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True, use_sliding_window=False)
    return Qwen2Config(**{**args, **overrides})


def mistral_config(**overrides) -> MistralConfig:
    args = dict(COMMON, vocab_size=768, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                architectures=["MistralForCausalLM"], sliding_window=None, head_dim=16)
    return MistralConfig(**{**args, **overrides})


def smollm2_like_config(**overrides) -> LlamaConfig:
    """SmolLM2-135M's head layout (9 heads, 3 KV heads, tied embeddings) at head_dim 8, with
    an intermediate size of 6 GGUF blocks of 32: no tp > 1 splits its heads evenly."""
    args = dict(COMMON, hidden_size=72, intermediate_size=192, vocab_size=1000, num_hidden_layers=3,
                num_attention_heads=9, num_key_value_heads=3, architectures=["LlamaForCausalLM"],
                tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaConfig(**{**args, **overrides})


MODEL_CLASSES = {"LlamaForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM,
                 "MistralForCausalLM": MistralForCausalLM}


def build_hf_model(config, seed: int = 0):
    torch.manual_seed(seed)
    model = MODEL_CLASSES[config.architectures[0]](config).eval()
    with torch.no_grad():  # non-trivial norm weights and biases, so their sharding matters
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def save_tiny(config, directory: Path, seed: int = 0):
    model = build_hf_model(config, seed)
    model.save_pretrained(directory, safe_serialization=True)
    return model


def worker_spec(path: Path, tp: int = 1, pp: int = 1, partition: list[int] | None = None, *,
                max_model_len: int = 256, block_size: int = 8, dtype: str = "float32",
                tensor_split: tuple[float, ...] | None = None, tokenizer=None) -> WorkerSpec:
    """What a CPU worker of the checkpoint at `path` (a folder or a .gguf file) needs, as a
    replica would say it (with a tokenizer: its EOS and, for grammars, its vocabulary)."""
    checkpoint = open_checkpoint(path)
    vocabulary = SamplerVocabulary.of(tokenizer, [tokenizer.eos_token_id]) if tokenizer is not None else SamplerVocabulary()
    return WorkerSpec(str(checkpoint.path), checkpoint.shape, tp, pp, partition, dtype, "cpu",
                      max_model_len=max_model_len, block_size=block_size, tensor_split=tensor_split,
                      vocabulary=vocabulary)


def tiny_shape(config) -> ModelShape:
    """A Hugging Face config object as the shape a worker builds from."""
    return ModelShape.from_dict(config.to_dict())


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


def hf_prompt_logits(model, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float() for p in prompts]


def max_rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).abs().max() / w.abs().max()) for g, w in zip(got, want))


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face greedy generate for one prompt alone, never stopping early at EOS."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()
