"""Sharded forward passes in separate processes match Hugging Face transformers (float32)."""

import pytest
import torch

from actors.worker import WorkerSpec
from tests.mp_harness import run_layout
from tests.tiny_models import (
    hf_prompt_logits,
    llama_config,
    max_rel_error,
    mistral_config,
    qwen2_config,
    random_prompts,
    save_tiny,
    smollm2_like_config,
    worker_spec,
)

CONFIGS = {
    "llama": llama_config,  # 8 heads, 4 KV heads
    "qwen2": qwen2_config,
    "mistral": mistral_config,
    "smollm2": smollm2_like_config,  # 9 heads, 3 KV heads: no tp > 1 divides them
    "gqa12x3": lambda: llama_config(hidden_size=96, num_attention_heads=12, num_key_value_heads=3),
    "qwen2x10": lambda: qwen2_config(hidden_size=80, num_attention_heads=10, num_key_value_heads=2),
}
# (model, tp, pp, layer_partition, tensor_split)
LAYOUTS = [
    ("llama", 1, 1, None, None),
    ("llama", 2, 1, None, None),
    ("llama", 4, 1, None, None),
    ("qwen2", 4, 1, None, None),  # 2 KV heads on 4 ranks: each KV head replicated twice
    ("mistral", 2, 1, None, None),
    ("llama", 1, 2, [4, 1], None),
    ("llama", 2, 2, [2, 3], None),
    # uneven splits: query heads per rank, (query heads per KV head) on the rank
    ("smollm2", 2, 1, None, None),  # 5 (3, 2) | 4 (1, 3)
    ("smollm2", 4, 1, None, None),  # 3 (3) | 2 (2) | 2 (1, 1) | 2 (2)
    ("smollm2", 2, 2, [2, 1], None),
    ("smollm2", 2, 1, None, (2, 1)),  # 6 (3, 3) | 3 (3); MLP 128 | 64 columns
    ("llama", 3, 1, None, None),  # 3 (2, 1) | 3 (1, 2) | 2 (2); MLP 64 | 32 | 32
    ("gqa12x3", 4, 1, None, None),  # 3 KV heads on 4 ranks: 3 (3) | 3 (1, 2) | 3 (2, 1) | 3 (3)
    ("qwen2x10", 3, 1, None, None),  # q/k/v biases: 4 (4) | 3 (1, 2) | 3 (3)
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, make in CONFIGS.items():
        path = tmp_path_factory.mktemp(name)
        model = save_tiny(make(), path)
        prompts = random_prompts(model.config.vocab_size, [7, 19, 33])
        out[name] = (path, model, prompts, hf_prompt_logits(model, prompts))
    return out


def spec_for(path, tp, pp, partition, tensor_split=None) -> WorkerSpec:
    return worker_spec(path, tp, pp, partition, max_model_len=128, tensor_split=tensor_split)


@pytest.mark.parametrize("name,tp,pp,partition,tensor_split", LAYOUTS, ids=lambda v: str(v))
def test_logits_match_hugging_face(checkpoints, name, tp, pp, partition, tensor_split):
    path, model, prompts, want = checkpoints[name]
    got, reports = run_layout(spec_for(path, tp, pp, partition, tensor_split), prompts)
    err = max_rel_error(got, want)
    print(f"{name} tp={tp} pp={pp} partition={partition} tensor_split={tensor_split}: max relative error {err:.2e}")
    assert err < 1e-4
    # the same greedy choice at every position
    for g, w in zip(got, want):
        assert torch.equal(g.argmax(-1), w.argmax(-1))

    layers = partition or [model.config.num_hidden_layers]
    for (stage, tp_rank), rep in reports.items():
        # two all-reduces per layer (o_proj, down_proj), one for the vocab-parallel embedding
        expected = 2 * layers[stage] + (1 if stage == 0 else 0) if tp > 1 else 0
        assert rep["all_reduces_per_forward"] == expected, (stage, tp_rank, rep)
        assert rep["gathers"] == (1 if tp > 1 and stage == pp - 1 else 0)


def test_per_rank_memory_and_bytes_read(checkpoints):
    """Each of 4 ranks holds ~1/4 of the weights and reads only its own slices."""
    path, model, prompts, _ = checkpoints["llama"]
    _, reports = run_layout(spec_for(path, 4, 1, None), prompts[:1])
    total = sum(p.numel() * 4 for p in model.parameters())
    replicated = sum(p.numel() * 4 for n, p in model.named_parameters() if "norm" in n)
    largest_full = max(p.numel() * 4 for p in model.parameters())
    # vocab 1000 padded to 1024: 256 rows per rank, the last rank holds 232 real + 24 padding
    padding = {0: 0, 1: 0, 2: 0, 3: 24 * 64 * 4 * 2}  # bytes, embedding + LM head
    for (_, tp_rank), rep in reports.items():
        share = (total - replicated) / 4 + replicated + (1024 - 1000) * 64 * 4 * 2 / 4
        print(f"rank {tp_rank}: {rep['weight_bytes']} weight bytes of {total} in all")
        assert rep["weight_bytes"] == pytest.approx(share, rel=1e-9)
        # reads exactly its own slices (padding is never read), never another rank's matrix
        assert rep["bytes_read"] == rep["weight_bytes"] - padding[tp_rank]
        assert rep["largest_read"] <= 256 * 64 * 4 < largest_full  # a quarter of the largest matrix


def test_weighted_split_holds_and_reads_its_share(checkpoints):
    """tensor_split [2, 1] on the SmolLM2-like model, counted by hand (hidden 72, head_dim 8,
    9 heads over 3 KV heads, intermediate 192 = 6 blocks of 32, vocab 1000 tied)."""
    path, _, prompts, _ = checkpoints["smollm2"]
    _, reports = run_layout(spec_for(path, 2, 1, None, (2, 1)), prompts[:1])
    # rank 0: query heads 0-5 over KV heads 0-1, MLP columns 0-127 (4 blocks)
    # rank 1: query heads 6-8 over KV head 2, MLP columns 128-191 (2 blocks)
    layer = {0: (6 + 2 * 2) * 8 * 72 + 6 * 8 * 72 + 3 * 128 * 72 + 2 * 72,
             1: (3 + 2 * 1) * 8 * 72 + 3 * 8 * 72 + 3 * 64 * 72 + 2 * 72}
    vocab_rows = 1024 // 2  # 1000 padded to a multiple of 64 x 2; the LM head is the embedding
    for (_, tp_rank), rep in reports.items():
        params = 3 * layer[tp_rank] + vocab_rows * 72 + 72  # 3 layers, embedding shard, final norm
        assert rep["weight_bytes"] == 4 * params
        padding = 24 * 72 * 4 if tp_rank == 1 else 0  # rows 1000-1023 are never read
        assert rep["bytes_read"] == rep["weight_bytes"] - padding

