"""Loading checkpoints: sharded files, dtypes, and bad checkpoints that say what is wrong."""


import pytest
import torch
from safetensors.torch import load_file, save_file

from actors.checkpoint import load_checkpoint
from actors.comm import ParallelContext, PipelineEdges, TPGroup
from actors.loader import CheckpointError
from actors.model_shape import UnsupportedModelError
from actors.models.llama import LlamaStage, checkpoint_names
from actors.sharding import ShardingError
from tests.threaded_tp import stage_prompt_logits
from tests.tiny_models import (
    build_hf_model,
    hf_prompt_logits,
    llama_config,
    max_rel_error,
    mistral_config,
    qwen2_config,
    random_prompts,
    save_tiny,
    tiny_shape,
)


def single_rank_logits(cfg, path, prompts, dtype=torch.float32):
    model = LlamaStage(tiny_shape(cfg), ParallelContext.single(), range(cfg.num_hidden_layers), dtype)
    load_checkpoint(model, path)
    return stage_prompt_logits(model, prompts)


def test_sharded_checkpoint_with_index(tmp_path):
    cfg = llama_config()
    hf = save_tiny(cfg, tmp_path)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    prompts = random_prompts(cfg.vocab_size, [9, 14])
    got = single_rank_logits(cfg, tmp_path, prompts)
    for g, w in zip(got, hf_prompt_logits(hf, prompts)):
        assert torch.allclose(g, w, rtol=0, atol=1e-4 * float(w.abs().max()))


def test_bfloat16_error_is_no_worse_than_hugging_faces(tmp_path):
    """bf16 logits differ from fp32 by rounding; ours must not drift further than HF's own bf16."""
    cfg = llama_config()
    hf = save_tiny(cfg, tmp_path)
    prompts = random_prompts(cfg.vocab_size, [12, 30])
    fp32 = hf_prompt_logits(hf, prompts)
    ours = single_rank_logits(cfg, tmp_path, prompts, torch.bfloat16)
    theirs = hf_prompt_logits(hf.to(torch.bfloat16), prompts)
    assert max_rel_error(ours, fp32) <= 1.25 * max_rel_error(theirs, fp32)


def test_missing_tensor_is_named(tmp_path):
    cfg = llama_config()
    save_tiny(cfg, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.3.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.3\.mlp\.up_proj\.weight"):
        load_checkpoint(LlamaStage(tiny_shape(cfg), ParallelContext.single(), range(5), torch.float32), tmp_path)


def test_wrong_shape_names_tensor_and_shapes(tmp_path):
    save_tiny(llama_config(), tmp_path)
    wrong = llama_config(intermediate_size=96)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.\w+_proj\.weight.*expected shape \((96, 64|64, 96)\), got \((128, 64|64, 128)\)"):
        load_checkpoint(LlamaStage(tiny_shape(wrong), ParallelContext.single(), range(5), torch.float32), tmp_path)


def test_no_weights_in_directory(tmp_path):
    llama_config().save_pretrained(tmp_path)  # config.json only: enough to plan, not to serve
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(LlamaStage(tiny_shape(llama_config()), ParallelContext.single(), range(5), torch.float32), tmp_path)


def test_unsupported_architecture():
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        tiny_shape(llama_config(architectures=["GPT2LMHeadModel"]))


def test_sliding_window_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="sliding_window=128"):
        tiny_shape(mistral_config(sliding_window=128))


def test_tp_above_the_head_count_says_what_works():
    tp9 = TPGroup(size=9, rank=0)  # fails before any collective is needed
    ctx = ParallelContext(9, 1, 0, tp9, PipelineEdges(None, None, tp9.stats))
    with pytest.raises(ShardingError, match=r"tensor_parallel_size=9 exceeds num_attention_heads=8.* from 1 to 8"):
        LlamaStage(tiny_shape(llama_config()), ctx, range(5), torch.float32)


def test_llama_with_attention_and_mlp_bias(tmp_path):
    """HF Llama's attention_bias puts a bias on q, k, v and o_proj; mlp_bias on the MLP."""
    cfg = llama_config(attention_bias=True, mlp_bias=True)
    hf = save_tiny(cfg, tmp_path)
    prompts = random_prompts(cfg.vocab_size, [11])
    assert max_rel_error(single_rank_logits(cfg, tmp_path, prompts), hf_prompt_logits(hf, prompts)) < 1e-4


@pytest.mark.parametrize("cfg", [llama_config(attention_bias=True, mlp_bias=True), qwen2_config(), mistral_config()],
                         ids=["llama-biases", "qwen2-tied", "mistral"])
def test_checkpoint_names_are_what_hugging_face_saves(cfg):
    """What a checkpoint must hold (checked before any worker starts) is exactly what
    transformers saves for the same config, a tied head aside."""
    saved = set(build_hf_model(cfg).state_dict()) - ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    assert checkpoint_names(tiny_shape(cfg)) == saved
