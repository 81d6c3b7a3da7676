"""The YAML schema (cluster/config.py): clear errors naming the field, defaults, paths."""

import json
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from cluster import config as config_module
from cluster.config import (
    ConfigError,
    EngineConfig,
    ParallelConfig,
    TensorfleetConfig,
    cpu_has_native_bf16,
    load_config,
    resolve_dtype,
)

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}


def write_yaml(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(tmp_path: Path, text: str) -> str:
    path = write_yaml(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value), "the message names the file"
    return str(e.value)


def test_defaults_and_relative_model_path(tmp_path):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    cfg = load_config(write_yaml(tmp_path, "model: models/tiny\n"))
    assert cfg.model == str(tmp_path / "models" / "tiny")
    assert cfg.served_model_name == "tiny"
    assert cfg.dtype == "auto"
    assert cfg.parallel == ParallelConfig()
    assert cfg.parallel.tensor_parallel_size == 1 and cfg.parallel.pipeline_parallel_size == 1
    assert cfg.parallel.layer_partition is None and cfg.parallel.device == "auto"
    e = cfg.engine
    assert (e.max_model_len, e.max_num_seqs, e.max_num_batched_tokens, e.block_size) == (
        2048, 64, 4096, 16)
    assert e.num_kv_blocks is None and e.gpu_memory_utilization == 0.9
    assert e.enable_prefix_caching and e.step_deadline_s == 30
    s = cfg.serve
    assert (s.host, s.port, s.api_key, s.max_waiting_requests, s.max_body_bytes) == (
        "127.0.0.1", 8000, None, 256, 1048576)


def test_relative_path_is_against_yaml_dir_not_cwd(tmp_path, monkeypatch):
    sub = tmp_path / "deploy"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write_yaml(sub, "model: ../m\nserved_model_name: mine\n"))
    assert cfg.model == str(tmp_path / "m")
    assert cfg.served_model_name == "mine"


def test_absolute_path_kept_and_full_config(tmp_path):
    cfg = load_config(write_yaml(tmp_path, """
model: /opt/models/llama
dtype: bfloat16
parallel:
  tensor_parallel_size: 2
  pipeline_parallel_size: 3
  layer_partition: [10, 9, 9]
  device: cuda
engine:
  max_model_len: 4096
  num_kv_blocks: 100
  gpu_memory_utilization: 1
serve:
  port: 0
  api_key: secret
"""))
    assert cfg.model == "/opt/models/llama"
    assert cfg.parallel.layer_partition == [10, 9, 9]
    assert cfg.engine.num_kv_blocks == 100 and cfg.engine.gpu_memory_utilization == 1.0
    assert cfg.serve.effective_api_key() == "secret"


def test_unknown_key_names_field_path(tmp_path):
    msg = config_error(tmp_path, "model: m\nparallel:\n  tensor_paralel_size: 2\n")
    assert "parallel.tensor_paralel_size: Extra inputs are not permitted" in msg
    msg = config_error(tmp_path, "model: m\nmax_model_len: 10\n")
    assert "max_model_len: Extra inputs are not permitted" in msg


def test_wrong_types_are_not_coerced(tmp_path):
    msg = config_error(tmp_path, "model: m\nengine:\n  max_model_len: '2048'\n")
    assert "engine.max_model_len:" in msg
    msg = config_error(tmp_path, "model: m\nparallel:\n  tensor_parallel_size: true\n")
    assert "parallel.tensor_parallel_size:" in msg
    msg = config_error(tmp_path, "model: m\ndtype: fp8\n")
    assert "dtype:" in msg and "bfloat16" in msg
    msg = config_error(tmp_path, "model: m\nengine:\n  enable_prefix_caching: 'yes'\n")
    assert "engine.enable_prefix_caching:" in msg


def test_negative_tp_and_several_errors_at_once(tmp_path):
    msg = config_error(tmp_path, """
model: m
parallel: {tensor_parallel_size: -2}
engine: {gpu_memory_utilization: 1.5, block_size: 0}
""")
    assert "parallel.tensor_parallel_size: Input should be greater than 0" in msg
    assert "engine.gpu_memory_utilization: Input should be less than or equal to 1" in msg
    assert "engine.block_size: Input should be greater than 0" in msg


def test_layer_partition_entries_are_positive(tmp_path):
    msg = config_error(tmp_path, "model: m\nparallel:\n  pipeline_parallel_size: 2\n"
                                 "  layer_partition: [3, 0]\n")
    assert "parallel.layer_partition[1]: Input should be greater than 0" in msg


def test_tensor_split_one_positive_weight_per_tp_rank(tmp_path):
    ok = tmp_path / "ok.yaml"
    ok.write_text("model: m\nparallel:\n  tensor_parallel_size: 2\n  tensor_split: [24, 16.5]\n")
    assert load_config(ok).parallel.tensor_split == [24.0, 16.5]
    msg = config_error(tmp_path, "model: m\nparallel:\n  tensor_parallel_size: 2\n  tensor_split: [2, 1, 1]\n")
    assert "parallel.tensor_split: tensor_split=[2, 1, 1] has 3 weight(s) but tensor_parallel_size=2" in msg
    assert "one weight per TP rank" in msg
    msg = config_error(tmp_path, "model: m\nparallel:\n  tensor_parallel_size: 2\n  tensor_split: [1, 0]\n")
    assert "parallel.tensor_split: tensor_split=[1, 0]: every weight must be a positive number" in msg
    msg = config_error(tmp_path, "model: m\nparallel:\n  tensor_split: ['big', 1]\n")
    assert "parallel.tensor_split[0]:" in msg


def test_missing_model_bad_yaml_and_missing_file(tmp_path):
    assert "model: Field required" in config_error(tmp_path, "dtype: auto\n")
    assert "mapping" in config_error(tmp_path, "- model\n")
    assert "not valid YAML" in config_error(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_frozen():
    cfg = TensorfleetConfig(model="/m")
    with pytest.raises(ValidationError, match="frozen_instance"):
        cfg.engine = EngineConfig(max_model_len=1)  # type: ignore[misc]
    assert cfg.served_model_name == "m"


def test_api_key_from_env(monkeypatch):
    monkeypatch.setenv("TENSORFLEET_API_KEY", "from-env")
    assert TensorfleetConfig(model="/m").serve.effective_api_key() == "from-env"


def write_model(tmp_path: Path, **overrides) -> Path:
    path = tmp_path / "model"
    path.mkdir(exist_ok=True)
    (path / "config.json").write_text(json.dumps({**LLAMA, **overrides}))
    return path


def _cpuinfo(tmp_path: Path, flags: str) -> Path:
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: Test CPU\nflags\t\t: fpu sse2 avx2 {flags}\n\n")
    return path


@pytest.mark.parametrize("flags, native", [("avx512f avx512_bf16", True), ("amx_tile amx_bf16", True),
                                           ("avx512f avx512_vnni", False), ("", False)])
def test_cpu_has_native_bf16_reads_the_flags(tmp_path, flags, native):
    assert cpu_has_native_bf16(_cpuinfo(tmp_path, flags)) is native
    assert cpu_has_native_bf16(tmp_path / "missing") is False


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_resolve_dtype_auto_on_cpu_follows_bf16_support(monkeypatch, native, expected):
    monkeypatch.setattr(config_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_dtype("auto", "cpu") == expected
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32  # what the parity tests ask for
    assert resolve_dtype("float16", "cpu") == torch.float16