"""GGUF reading against independent references: gguf-py's own dequantization, and
transformers' GGUF loader (config and dequantized, un-permuted weights) on the real
SmolLM2 file and on tiny models written the way llama.cpp converts them."""

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize
from transformers import AutoModelForCausalLM, LlamaConfig

from actors.gguf_file import GGUFError, GGUFFile
from actors.gguf_llama import gguf_name, hf_name, hf_tensors, llama_hf_config
from actors.loader import ReadStats
from tests.tiny_gguf import write_gguf, write_llama_gguf
from tests.tiny_models import build_hf_model, llama_config, qwen2_config

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)  # bit-exact comparison


def reference(path: Path, name: str) -> torch.Tensor:
    """The whole tensor dequantized by gguf-py, in torch order."""
    t = next(t for t in GGUFReader(path).tensors if t.name == name)
    return torch.from_numpy(np.array(gguf_dequantize(t.data, t.tensor_type), dtype=np.float32))


# --- every supported type: slices equal gguf-py's dequantization of the whole tensor ---

@pytest.fixture(scope="module")
def typed_file(tmp_path_factory) -> Path:
    g = np.random.default_rng(0)
    tensors = {}
    for kind in TYPES:
        tensors[f"m.{kind}"] = g.normal(0, 2, (6, 160)).astype(np.float32)  # 5 blocks of 32 per row
        tensors[f"v.{kind}"] = g.normal(0, 2, (96,)).astype(np.float32)
    return write_gguf(tmp_path_factory.mktemp("types") / "types.gguf", tensors)


MATRIX_SLICES = [np.s_[:], np.s_[2:5], np.s_[5:6], np.s_[:, 32:96], np.s_[:, 5:70], np.s_[:, 100:160],
                 np.s_[1:4, 31:33], np.s_[:, 64:64]]


@pytest.mark.parametrize("kind", TYPES)
def test_slices_equal_gguf_dequantize(typed_file, kind):
    f = GGUFFile(typed_file)
    m, v = f.tensor(f"m.{kind}"), f.tensor(f"v.{kind}")
    assert m.shape == (6, 160) and v.shape == (96,) and m.qtype == QType[kind]
    want_m, want_v = reference(typed_file, f"m.{kind}"), reference(typed_file, f"v.{kind}")
    for index in MATRIX_SLICES:
        assert torch.equal(bits(m[index]), bits(want_m[index])), index
    for index in (np.s_[:], np.s_[10:70], np.s_[64:96]):
        assert torch.equal(bits(v[index]), bits(want_v[index])), index


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0", "F16"])
def test_slices_read_only_their_covering_blocks(tmp_path, kind):
    path = write_gguf(tmp_path / "big.gguf", {f"w.{kind}": np.random.default_rng(1).normal(size=(64, 256)).astype(np.float32)})
    block, size = GGML_QUANT_SIZES[QType[kind]]
    row_bytes = 256 // block * size
    stats = ReadStats()
    w = GGUFFile(path, stats).tensor(f"w.{kind}")

    def read(index) -> int:
        before = stats.bytes_read
        w[index]
        return stats.bytes_read - before

    assert read(np.s_[:]) == 64 * row_bytes
    assert read(np.s_[:, :128]) == 64 * row_bytes // 2  # a column half reads half the bytes
    assert read(np.s_[16:32]) == 16 * row_bytes
    first, stop = 40 // block, -(-100 // block)  # blocks covering columns [40, 100)
    assert read(np.s_[:, 40:100]) == 64 * (stop - first) * size
    assert stats.largest_read == 64 * row_bytes


# --- the real SmolLM2 file against transformers' loader ---

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, smollm2_reference):
    return GGUFFile(smollm2_gguf), smollm2_reference


def test_header_equals_gguf_readers(smollm2_gguf):
    """Our one-pass header parser against gguf-py's reader: every key, value and tensor record."""
    ours, theirs = GGUFFile(smollm2_gguf), GGUFReader(smollm2_gguf)
    want = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata == want
    assert ours.names == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours._tensors[t.name]
        assert (info.qtype, info.offset, info.n_bytes) == (t.tensor_type, t.data_offset, t.n_bytes), t.name
        assert info.shape == tuple(int(n) for n in reversed(t.shape)), t.name
    assert all(gguf_name(hf_name(n)) == n for n in ours.names)


def test_smollm2_tensors_equal_transformers(smollm2):
    f, hf = smollm2
    f.check_supported()
    state = hf.state_dict()
    seen = set()
    for name, tensor in hf_tensors(f):
        assert tensor.shape == tuple(state[name].shape), name
        assert torch.equal(tensor[:], state[name]), name
        seen.add(name)
    assert seen == set(state) - {"lm_head.weight"}  # tied: the head is the embedding


def test_smollm2_tp3_rank_reads_its_heads_only(smollm2):
    f, hf = smollm2
    state = hf.state_dict()
    tensors = dict(hf_tensors(f))
    for proj, rows in (("q_proj", 192), ("k_proj", 64)):  # 9 heads / 3 KV heads of 64 rows
        name = f"model.layers.7.self_attn.{proj}.weight"
        for rank in range(3):
            before = f.stats.bytes_read
            got = tensors[name][rank * rows : (rank + 1) * rows]
            assert torch.equal(got, state[name][rank * rows : (rank + 1) * rows])
            assert f.stats.bytes_read - before == rows * 576 // 32 * 20  # Q4_1 rows of 18 blocks
    with pytest.raises(IndexError, match="whole heads"):
        tensors["model.layers.7.self_attn.q_proj.weight"][32:96]


def test_smollm2_config_matches_transformers(smollm2):
    f, hf = smollm2
    ours = llama_hf_config(f)
    assert ours["architectures"] == [type(hf).__name__] == ["LlamaForCausalLM"]
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert ours[key] == getattr(hf.config, key), key
    assert LlamaConfig(**ours).rope_parameters == hf.config.rope_parameters
    assert (ours["num_attention_heads"], ours["num_key_value_heads"], ours["vocab_size"]) == (9, 3, 49152)


# --- tiny models written like llama.cpp does: transformers loads them, we read them ---

TINY = {
    "llama": lambda: llama_config(),
    "qwen2": lambda: qwen2_config(),
    # head_dim != hidden / heads, tied embeddings
    "llama-wide-heads": lambda: llama_config(num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                                             tie_word_embeddings=True),
}


@pytest.mark.parametrize("model", TINY)
def test_tiny_f32_gguf_reproduces_hf_model(tmp_path, model):
    original = build_hf_model(TINY[model]())
    path = write_llama_gguf(original, tmp_path / "tiny.gguf", "F32")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).eval()
    ids = torch.randint(3, original.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = original(ids).logits, loaded(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()

    f = GGUFFile(path)
    state = original.state_dict()
    for name, tensor in hf_tensors(f):
        assert torch.equal(tensor[:], state[name]), name
    config = type(original.config)(**llama_hf_config(f))
    for key in ("num_key_value_heads", "attention_bias", "tie_word_embeddings", "vocab_size", "rope_parameters"):
        assert getattr(config, key, None) == getattr(original.config, key, None), key
    assert config.rms_norm_eps == pytest.approx(original.config.rms_norm_eps, rel=1e-6)  # stored as float32


def test_tiny_llama_biases_round_trip(tmp_path):
    """Q and K biases are reordered like their weights. (transformers' GGUF config has no
    attention_bias, so it silently drops Llama biases: the original model is the reference.)"""
    original = build_hf_model(llama_config(attention_bias=True, mlp_bias=True, num_key_value_heads=2))
    f = GGUFFile(write_llama_gguf(original, tmp_path / "bias.gguf", "F32"))
    config = llama_hf_config(f)
    assert config["attention_bias"] and config["mlp_bias"]
    state = original.state_dict()
    tensors = dict(hf_tensors(f))
    assert set(tensors) == set(state)
    for name, tensor in tensors.items():
        assert torch.equal(tensor[:], state[name]), name
    k_bias = tensors["model.layers.1.self_attn.k_proj.bias"]  # 2 KV heads of 8
    assert torch.equal(k_bias[8:16], state["model.layers.1.self_attn.k_proj.bias"][8:16])


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_tiny_quantized_tensors_equal_transformers(tmp_path, kind):
    original = build_hf_model(TINY["llama-wide-heads"]())
    path = write_llama_gguf(original, tmp_path / "tiny.gguf", kind)
    state = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name).state_dict()
    f = GGUFFile(path)
    assert llama_hf_config(f)["torch_dtype"] == {"BF16": "bfloat16"}.get(kind, "float16")
    for name, tensor in hf_tensors(f):
        assert torch.equal(tensor[:], state[name].float()), name
    heads = f.tensor("blk.0.attn_q.weight").shape[0] // 16
    q = dict(hf_tensors(f))["model.layers.0.self_attn.q_proj.weight"]
    for first in range(0, heads, 2):  # two heads at a time, as on a TP rank
        rows = np.s_[first * 16 : (first + 2) * 16]
        assert torch.equal(q[rows], state["model.layers.0.self_attn.q_proj.weight"][rows].float())


# --- errors name the file, the tensor, the type ---

def test_not_a_gguf_file(tmp_path):
    junk = tmp_path / "model.gguf"
    junk.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 8)
    with pytest.raises(GGUFError, match=rf"{junk} is not a GGUF file .*b'PK\\x03\\x04'"):
        GGUFFile(junk)
    wrong_version = tmp_path / "v9.gguf"
    wrong_version.write_bytes(b"GGUF" + (9).to_bytes(4, "little") + bytes(64))
    with pytest.raises(GGUFError, match=rf"{wrong_version} has version 9; supported versions"):
        GGUFFile(wrong_version)
    with pytest.raises(GGUFError, match="cannot be opened"):
        GGUFFile(tmp_path / "missing.gguf")


@pytest.mark.parametrize("cut", ["header", "tensor infos", "tensor data"])
def test_truncated_file(tmp_path, typed_file, cut):
    reader = GGUFReader(typed_file)
    end = {"header": 40, "tensor infos": reader.tensors[-1].field.offset + 5,
           "tensor data": reader.tensors[-1].data_offset + 8}[cut]
    short = tmp_path / "short.gguf"
    short.write_bytes(typed_file.read_bytes()[:end])
    with pytest.raises(GGUFError, match=rf"{short} is truncated or corrupt \(.*\); download it again"):
        GGUFFile(short)


def test_truncated_real_file(tmp_path, smollm2_gguf):
    short = tmp_path / "smol.gguf"
    with smollm2_gguf.open("rb") as src:
        short.write_bytes(src.read(1 << 20))  # ends inside the tokenizer's token list
    with pytest.raises(GGUFError, match=rf"{short} is truncated or corrupt"):
        GGUFFile(short)


def test_unsupported_types_and_missing_tensor(tmp_path):
    data = np.random.default_rng(3).normal(size=(4, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "odd.gguf", {"ok.F32": data, "a.Q5_0": data, "b.F64": data.astype(np.float64),
                                               "c.I8": data.astype(np.int8)})
    f = GGUFFile(path)
    assert torch.equal(f.tensor("ok.F32")[:], torch.from_numpy(data))
    with pytest.raises(GGUFError, match=rf"{path} has a tensor 'a.Q5_0' of type Q5_0; tensorfleet reads F32, F16, "
                                        r"BF16, Q8_0, Q4_0, Q4_1 \(1-D and 2-D tensors\): use a file quantized to one"):
        f.tensor("a.Q5_0")
    with pytest.raises(GGUFError, match=rf"{path} has 3 unsupported tensor\(s\): tensor 'a.Q5_0' of type Q5_0, "
                                        r"tensor 'b.F64' of type F64, tensor 'c.I8' of type I8; tensorfleet reads"):
        f.check_supported()
    with pytest.raises(GGUFError, match=rf"{path} has no tensor 'blk.0.attn_q.weight'"):
        f.tensor("blk.0.attn_q.weight")


def test_unsupported_architecture_and_rope_scaling(tmp_path):
    embd = {"token_embd.weight": np.ones((8, 4), np.float32)}
    gpt2 = write_gguf(tmp_path / "gpt2.gguf", embd, arch="gpt2")
    with pytest.raises(GGUFError, match=rf"{gpt2} has general.architecture='gpt2'; .*llama or qwen2"):
        llama_hf_config(GGUFFile(gpt2))
    with pytest.raises(GGUFError, match="'gpt2'"):
        next(hf_tensors(GGUFFile(gpt2)))

    meta = {"llama.attention.head_count": 2, "llama.embedding_length": 4, "llama.feed_forward_length": 8,
            "llama.block_count": 1, "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.context_length": 64,
            "llama.vocab_size": 8, "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    linear = GGUFFile(write_gguf(tmp_path / "linear.gguf", embd, meta=meta))
    assert llama_hf_config(linear)["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    yarn = write_gguf(tmp_path / "yarn.gguf", embd, meta={**meta, "llama.rope.scaling.type": "yarn"})
    with pytest.raises(GGUFError, match=rf"{yarn} declares llama.rope.scaling.type='yarn'"):
        llama_hf_config(GGUFFile(yarn))
    llama3 = write_gguf(tmp_path / "llama3.gguf", {**embd, "rope_freqs.weight": np.ones(2, np.float32)}, meta=meta)
    with pytest.raises(GGUFError, match="rope_freqs tensor"):
        llama_hf_config(GGUFFile(llama3))
