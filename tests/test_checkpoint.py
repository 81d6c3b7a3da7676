"""What `model:` may name (actors/checkpoint.py): a Hugging Face folder, a .gguf file or a
folder holding one. Tiny GGUFs shard like safetensors (logits against the model they were
written from); bad files are refused by `tensorfleet plan` and `tensorfleet serve` before
Ray or any worker starts, exit code 2, with a message naming the file and what to do."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

import deploy.cli.serve
from actors.checkpoint import GGUFCheckpoint, HFCheckpoint, open_checkpoint
from actors.loader import CheckpointError
from actors.model_shape import ModelShape
from cluster.config import load_config
from deploy.cli.main import main
from tests.mp_harness import run_layout
from tests.tiny_gguf import write_gguf, write_llama_gguf
from tests.tiny_models import (
    build_hf_model,
    hf_prompt_logits,
    llama_config,
    max_rel_error,
    qwen2_config,
    random_prompts,
    worker_spec,
)


def tiny_llama_gguf(path: Path, qtype: str = "F32", **drop) -> Path:
    return write_llama_gguf(build_hf_model(llama_config()), path, qtype, **drop)


# --- what a path names ---

def test_a_file_a_folder_holding_one_or_a_hugging_face_folder(tmp_path, tiny_llama_dir):
    gguf = tiny_llama_gguf(tmp_path / "tiny.gguf")
    for named in (gguf, tmp_path):
        checkpoint = open_checkpoint(named)
        assert isinstance(checkpoint, GGUFCheckpoint) and checkpoint.path == gguf
        assert checkpoint.shape.num_hidden_layers == 5 and checkpoint.eos_token_ids() == (2,)
        assert checkpoint.transformers_args() == (str(tmp_path), {"gguf_file": "tiny.gguf"})
    hf = open_checkpoint(tiny_llama_dir[0])
    assert isinstance(hf, HFCheckpoint) and hf.transformers_args() == (str(tiny_llama_dir[0]), {})
    assert hf.shape == ModelShape.from_dir(tiny_llama_dir[0])

    tiny_llama_gguf(tmp_path / "other.gguf")
    with pytest.raises(CheckpointError, match=rf"{tmp_path} holds 2 GGUF files \(other.gguf, tiny.gguf\); name one"):
        open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist; name a Hugging Face model folder, a .gguf file"):
        open_checkpoint(tmp_path / "nothing")


def test_served_name_of_a_gguf_is_its_file_name(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: models/SmolLM2-135M-Instruct.Q4_1.gguf\n")
    assert load_config(config).served_model_name == "SmolLM2-135M-Instruct.Q4_1"


@pytest.mark.parametrize("model,qtype", [("llama", "Q8_0"), ("qwen2", "F16")])
def test_tiny_gguf_sharded_logits_equal_the_model_it_was_written_from(tmp_path, model, qtype):
    """tp=2: Llama with one KV head (replicated on both ranks: whole-head rope row slices),
    Qwen2 with q/k/v biases; the reference is transformers loading the same file."""
    cfg = llama_config(num_key_value_heads=1) if model == "llama" else qwen2_config()
    path = write_llama_gguf(build_hf_model(cfg), tmp_path / f"{model}.gguf", qtype)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    prompts = random_prompts(cfg.vocab_size, [9, 21])
    got, _ = run_layout(worker_spec(path, 2, 1, max_model_len=64), prompts)
    assert max_rel_error(got, hf_prompt_logits(reference, prompts)) < 1e-4


# --- bad files: `tensorfleet plan` and `tensorfleet serve` refuse them before Ray starts ---

def truncated(tmp_path: Path) -> Path:
    whole = tiny_llama_gguf(tmp_path / "whole.gguf").read_bytes()
    (short := tmp_path / "model.gguf").write_bytes(whole[: len(whole) - 5000])
    return short


def corrupt(tmp_path: Path) -> Path:
    data = bytearray(tiny_llama_gguf(tmp_path / "model.gguf").read_bytes())
    data[24:32] = (2**40).to_bytes(8, "little")  # the first key's length: a terabyte
    (path := tmp_path / "model.gguf").write_bytes(bytes(data))
    return path


def unsupported_type(tmp_path: Path) -> Path:
    return tiny_llama_gguf(tmp_path / "model.gguf", "Q5_0")


def not_llama(tmp_path: Path) -> Path:
    return write_gguf(tmp_path / "model.gguf", {"token_embd.weight": np.ones((8, 4), np.float32)}, arch="phi3")


def missing_tensor(tmp_path: Path) -> Path:
    return tiny_llama_gguf(tmp_path / "model.gguf", drop={"model.layers.3.mlp.down_proj.weight"})


BAD_FILES = {
    truncated: r"is truncated or corrupt \(.*\); download it again",
    corrupt: r"is truncated or corrupt \(.*\); download it again",
    unsupported_type: r"has 37 unsupported tensor\(s\): tensor 'token_embd.weight' of type Q5_0, .* and 33 more; "
                      r"tensorfleet reads F32, F16, BF16, Q8_0, Q4_0, Q4_1 \(1-D and 2-D tensors\): use a file "
                      r"quantized to one of those",
    not_llama: r"has general.architecture='phi3'; tensorfleet serves GGUF files of architecture llama or qwen2 .*: "
               r"serve one of those",
    missing_tensor: r"lacks 1 tensor\(s\) the model needs: blk.3.ffn_down.weight; the file is incomplete: "
                    r"download it again, or convert the model again with llama.cpp",
}


def config_for(path: Path) -> Path:
    config = path.parent / "serve.yaml"
    config.write_text(yaml.safe_dump({"model": str(path), "parallel": {"device": "cpu"}}))
    return config


@pytest.mark.parametrize("make", BAD_FILES, ids=lambda f: f.__name__)
def test_bad_gguf_is_refused_before_any_worker_starts(tmp_path, capsys, monkeypatch, make):
    def no_ray(*_):
        raise AssertionError("Ray must not start for a bad checkpoint")

    monkeypatch.setattr(deploy.cli.serve, "ray_session_of", no_ray)
    path = make(tmp_path)
    for command in ("plan", "serve"):
        assert main([command, str(config_for(path))]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"tensorfleet {command}: GGUF file {path} "), err
        assert len(err.splitlines()) == 1 and re.search(BAD_FILES[make], err), err


def test_the_cli_refuses_a_bad_file_as_a_user_sees_it(tmp_path):
    """The real `tensorfleet serve` process: exit 2 and one line on stderr, no Ray started."""
    path = missing_tensor(tmp_path)
    cli = os.path.join(os.path.dirname(sys.executable), "tensorfleet")
    done = subprocess.run([cli, "serve", str(config_for(path))], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == (f"tensorfleet serve: GGUF file {path} lacks 1 tensor(s) the model needs: "
                                   "blk.3.ffn_down.weight; the file is incomplete: download it again, or convert "
                                   "the model again with llama.cpp")
    assert done.stdout == ""
