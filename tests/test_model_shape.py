"""The model's shape (actors/model_shape.py), read once from config.json: defaults,
per-architecture rules, and models it refuses before any worker starts."""

import pytest

from actors.model_shape import ModelShape, ModelShapeError, UnsupportedModelError
from tests.test_config import LLAMA, write_model


def test_model_shape_from_dir_and_defaults(tmp_path):
    shape = ModelShape.from_dir(write_model(tmp_path))
    assert shape.architecture == "LlamaForCausalLM"
    assert shape.head_dim == 64 // 8 and shape.num_key_value_heads == 2
    assert not shape.tie_word_embeddings and not shape.attention_bias
    assert shape.max_position_embeddings == 512 and shape.torch_dtype == "bfloat16"
    assert shape.sliding_window is None

    shape = ModelShape.from_dict({k: v for k, v in LLAMA.items() if k != "num_key_value_heads"})
    assert shape.num_key_value_heads == 8, "no GQA without num_key_value_heads"


def test_qwen2_has_qkv_bias_and_no_window_unless_used():
    qwen = {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
            "use_sliding_window": False, "tie_word_embeddings": True}
    shape = ModelShape.from_dict(qwen)
    assert shape.attention_bias and not shape.o_proj_bias and shape.tie_word_embeddings
    assert shape.sliding_window is None
    mistral = ModelShape.from_dict({**LLAMA, "architectures": ["MistralForCausalLM"],
                                    "sliding_window": 4096})
    assert mistral.sliding_window == 4096 and not mistral.attention_bias


def test_model_shape_errors(tmp_path):
    with pytest.raises(ModelShapeError, match="config.json"):
        ModelShape.from_dir(tmp_path)
    with pytest.raises(UnsupportedModelError) as e:
        ModelShape.from_dir(write_model(tmp_path, architectures=["GPT2LMHeadModel"]))
    assert "GPT2LMHeadModel" in str(e.value)
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert arch in str(e.value)
    with pytest.raises(ModelShapeError, match="num_key_value_heads=3 does not divide num_attention_heads=8"):
        ModelShape.from_dict({**LLAMA, "num_key_value_heads": 3})


def test_rope_old_and_new_style_and_unsupported_model_features():
    old = ModelShape.from_dict({**LLAMA, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert old.rope == {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}
    new = ModelShape.from_dict({**LLAMA, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert new.rope == {"rope_theta": 1e4, "rope_type": "default"}
    with pytest.raises(UnsupportedModelError, match="'yarn'"):
        ModelShape.from_dict({**LLAMA, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu'"):
        ModelShape.from_dict({**LLAMA, "hidden_act": "gelu"})
    with pytest.raises(ModelShapeError, match="lacks hidden_size"):
        ModelShape.from_dict({k: v for k, v in LLAMA.items() if k != "hidden_size"})
