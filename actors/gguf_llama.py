"""A Llama-family GGUF file seen as a Hugging Face checkpoint: its config.json and its tensors.

Supported `general.architecture`s: `llama` (LlamaForCausalLM) and `qwen2` (Qwen2ForCausalLM,
q/k/v biases). Tensor names map one to one (`blk.N.attn_q.weight` ->
`model.layers.N.self_attn.q_proj.weight`, ...). Values differ in one place only:

llama.cpp's converter reorders the rows of each Llama Q and K head (weight and bias) from
Hugging Face's rotate-half layout to interleaved pairs. For a head of d rows,
    GGUF row 2i + s  =  HF row s*d/2 + i        (i < d/2, s in {0, 1})
so the rows of head h stay within head h. `hf_tensors` wraps Q and K so that a slice of
whole heads [a*d, b*d) reads exactly those GGUF rows and undoes the reorder; a rank reads
its heads only. Qwen2 is converted without the reorder (llama.cpp runs it with neox rope).
"""

import re
from collections.abc import Iterator
from typing import Any

import torch

from actors.gguf_file import GGUFFile, GGUFTensor, slice_bounds

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_REORDERED = {"llama"}  # architectures whose Q/K rows llama.cpp interleaves

GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def architecture(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise gguf.error(f"has general.architecture={arch!r}; tensorfleet serves GGUF files of "
                         f"architecture {' or '.join(ARCHITECTURES)} (Llama 2/3, Mistral, Qwen2, SmolLM and "
                         "their fine-tunes): serve one of those, or this model's Hugging Face checkpoint if "
                         "its architecture is supported")
    return arch


def required(gguf: GGUFFile, key: str) -> Any:
    if key not in gguf.metadata:
        raise gguf.error(f"lacks metadata key {key}; re-convert it with a current llama.cpp")
    return gguf.metadata[key]


def llama_hf_config(gguf: GGUFFile) -> dict[str, Any]:
    """The config.json a Hugging Face checkpoint of the same model would have."""
    arch = architecture(gguf)
    md = gguf.metadata

    def key(name: str) -> Any:
        return required(gguf, f"{arch}.{name}")

    heads, hidden = key("attention.head_count"), key("embedding_length")
    head_dim = md.get(f"{arch}.attention.key_length") or md.get(f"{arch}.rope.dimension_count") or hidden // heads
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": md.get(f"{arch}.attention.head_count_kv", heads),
        "head_dim": head_dim,
        "vocab_size": md.get(f"{arch}.vocab_size") or len(required(gguf, "tokenizer.ggml.tokens")),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"),
        "rope_theta": md.get(f"{arch}.rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length"),
        "tie_word_embeddings": "output.weight" not in gguf,
        "torch_dtype": _float_dtype(gguf),
        "hidden_act": "silu",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in gguf
        config["mlp_bias"] = "blk.0.ffn_up.bias" in gguf
    else:
        config["use_sliding_window"] = False
    if rope_scaling := _rope_scaling(gguf, arch):
        config["rope_scaling"] = rope_scaling
    for token in ("bos", "eos"):
        if (token_id := md.get(f"tokenizer.ggml.{token}_token_id")) is not None:
            config[f"{token}_token_id"] = token_id
    return config


def _rope_scaling(gguf: GGUFFile, arch: str) -> dict[str, Any] | None:
    md = gguf.metadata
    if "rope_freqs.weight" in gguf:
        raise gguf.error("stores Llama-3 rope scaling as a rope_freqs tensor, which tensorfleet does not "
                         "read yet; serve the model's Hugging Face safetensors checkpoint instead")
    kind = md.get(f"{arch}.rope.scaling.type", "linear" if f"{arch}.rope.scale_linear" in md else "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise gguf.error(f"declares {arch}.rope.scaling.type={kind!r}; tensorfleet supports linear rope scaling only")
    factor = md.get(f"{arch}.rope.scaling.factor", md.get(f"{arch}.rope.scale_linear"))
    return {"rope_type": "linear", "factor": factor}


def _float_dtype(gguf: GGUFFile) -> str:
    """The embedding's dtype when it is a float type; float16 for a quantized file, whose
    block scales are f16."""
    return {"F32": "float32", "BF16": "bfloat16"}.get(gguf.tensor("token_embd.weight").qtype.name, "float16")


def hf_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    base, _, kind = gguf_name.rpartition(".")
    if base in GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{GLOBAL_NAMES[base]}.{kind}"
    m = LAYER_TENSOR.fullmatch(gguf_name)
    if m and m[2] in LAYER_NAMES:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.{m[3]}"
    return None


def gguf_name(hf: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight` (the inverse of hf_name)."""
    base, _, kind = hf.rpartition(".")
    for gguf_base, hf_base in GLOBAL_NAMES.items():
        if base == hf_base:
            return f"{gguf_base}.{kind}"
    _, _, layer, module = base.split(".", 3)
    return f"blk.{layer}.{next(g for g, h in LAYER_NAMES.items() if h == module)}.{kind}"


class RopeRowsRestored:
    """A Llama Q or K tensor whose row slices come back in Hugging Face order (see the
    module docstring). Slices must cover whole heads: rows [a*d, b*d)."""

    def __init__(self, tensor: GGUFTensor, heads: int):
        self.tensor, self.shape = tensor, tensor.shape
        self.head_dim = tensor.shape[0] // heads

    def __getitem__(self, index: Any) -> torch.Tensor:
        start, stop = slice_bounds(index, self.shape)[0]
        d = self.head_dim
        if start % d or stop % d:
            raise IndexError(f"{self.tensor.name}: rows [{start}, {stop}) are not whole heads of {d} rows; "
                             "slice Q and K by heads")
        rows = self.tensor[index]  # GGUF rows [h, i, s] -> HF rows [h, s, i]
        return rows.unflatten(0, (-1, d // 2, 2)).transpose(1, 2).flatten(0, 2)


def hf_tensors(gguf: GGUFFile) -> Iterator[tuple[str, GGUFTensor | RopeRowsRestored]]:
    """(Hugging Face name, lazy tensor) for every tensor of the file, Q/K rows restored."""
    arch = architecture(gguf)
    heads = required(gguf, f"{arch}.attention.head_count")
    kv_heads = gguf.metadata.get(f"{arch}.attention.head_count_kv", heads)
    for name in gguf.names:
        target = hf_name(name)
        if target is None:
            raise gguf.error(f"has tensor {name!r}, which has no place in a Hugging Face {ARCHITECTURES[arch]}")
        tensor = gguf.tensor(name)
        if arch in ROPE_REORDERED and ".attn_q." in name:
            yield target, RopeRowsRestored(tensor, heads)
        elif arch in ROPE_REORDERED and ".attn_k." in name:
            yield target, RopeRowsRestored(tensor, kv_heads)
        else:
            yield target, tensor
