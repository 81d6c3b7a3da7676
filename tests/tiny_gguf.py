"""Write a Hugging Face Llama or Qwen2 model to a GGUF file the way llama.cpp's
convert_hf_to_gguf.py does, so tests can build GGUF checkpoints of any shape; and
`write_gguf`, a file of any tensors, types and metadata (for files that are not models).

What the converter does, and this repeats: names from gguf-py's tensor name map; Llama
Q and K rows (weights and biases) reordered per head from rotate-half to interleaved pairs;
1-D tensors (norms, biases) kept F32; 2-D tensors quantized to `qtype`, falling back to F16
when a row is not a whole number of blocks; no `output.weight` when embeddings are tied.
The file carries no tokenizer: transformers loads the model from it without one.
"""

from pathlib import Path

import numpy as np
import torch
from gguf import (
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    get_tensor_name_map,
)
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import quantize

ARCHS = {"llama": MODEL_ARCH.LLAMA, "qwen2": MODEL_ARCH.QWEN2}
FILE_TYPES = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
              "Q8_0": LlamaFileType.MOSTLY_Q8_0, "Q4_0": LlamaFileType.MOSTLY_Q4_0, "Q4_1": LlamaFileType.MOSTLY_Q4_1,
              "Q5_0": LlamaFileType.MOSTLY_Q5_0}  # Q5_0: a type tensorfleet does not read


def llama_cpp_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: per head, HF row s*d/2 + i -> row 2i + s."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(hf_model, path: str | Path, qtype: str = "F32", drop: frozenset[str] = frozenset()) -> Path:
    """`drop`: Hugging Face names of tensors to leave out (an incomplete file)."""
    cfg = hf_model.config
    arch = cfg.model_type
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    writer = GGUFWriter(path, arch)
    writer.add_name(f"tiny {arch}")
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_id is not None:
        writer.add_eos_token_id(cfg.eos_token_id)
    writer.add_quantization_version(2)

    names = get_tensor_name_map(ARCHS[arch], cfg.num_hidden_layers)
    for name, w in hf_model.state_dict().items():
        if name in drop or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        if arch == "llama" and ".q_proj." in name:
            w = llama_cpp_permute(w, heads)
        elif arch == "llama" and ".k_proj." in name:
            w = llama_cpp_permute(w, kv_heads)
        data, raw_dtype = _encode(w.detach().float().numpy(), qtype)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data, raw_dtype=raw_dtype)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _encode(w: np.ndarray, qtype: str) -> tuple[np.ndarray, GGMLQuantizationType | None]:
    """The array to write and its raw GGML type (None: the writer infers F32 / F16)."""
    t = GGMLQuantizationType[qtype]
    if w.ndim == 1 or t == GGMLQuantizationType.F32:
        return w, None
    if t == GGMLQuantizationType.F16 or w.shape[-1] % GGML_QUANT_SIZES[t][0]:
        return w.astype(np.float16), None
    return quantize(w, t), t


def write_gguf(path: Path, tensors: dict[str, np.ndarray], arch: str = "llama", meta: dict | None = None) -> Path:
    """Tensors named `<anything>.<TYPE>` are stored as TYPE; other names as their numpy dtype."""
    writer = GGUFWriter(path, arch)
    for key, value in (meta or {}).items():
        {str: writer.add_string, int: writer.add_uint32, float: writer.add_float32}[type(value)](key, value)
    for name, data in tensors.items():
        kind = name.rsplit(".", 1)[-1]
        if kind in ("BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"):
            writer.add_tensor(name, quantize(data, GGMLQuantizationType[kind]), raw_dtype=GGMLQuantizationType[kind])
        else:
            writer.add_tensor(name, data.astype(np.float16) if kind == "F16" else data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
