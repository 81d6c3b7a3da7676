"""The default model builds offline, loads back with plain transformers, and has learned something.

The build here is the real one on a small budget (a few seconds of training on a small
corpus); `python -m deploy.default_model` runs the full one.
"""

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy.default_model import (
    BOS,
    ENV_VAR,
    SAMPLE_PROMPT,
    BuildResult,
    BuildSpec,
    build_model,
    default_model_dir,
    ensure_default_model,
)

QUICK = BuildSpec(train_seconds=4, corpus_chars=300_000, vocab_size=1024, seq_len=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> BuildResult:
    return build_model(tmp_path_factory.mktemp("models") / "tiny", QUICK, log=lambda _: None)


def test_build_writes_a_complete_model_dir_atomically(built: BuildResult) -> None:
    names = {p.name for p in built.path.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= names
    assert [p.name for p in built.path.parent.iterdir()] == [built.path.name]  # no temp dir left behind


def test_training_reduced_the_held_out_loss(built: BuildResult) -> None:
    assert built.steps > 0
    assert built.final_loss < built.bigram_loss < built.initial_loss


def test_config_shards_at_tp2_pp2(built: BuildResult) -> None:
    model = AutoModelForCausalLM.from_pretrained(built.path)
    cfg = model.config
    assert cfg.model_type == "llama" and model.dtype == torch.float32
    for size in (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers):
        assert size % 2 == 0
    assert cfg.intermediate_size % 4 == 0 and cfg.hidden_size % cfg.num_attention_heads == 0
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    assert not cfg.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_saved_model_reproduces_the_build_sample(built: BuildResult) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.path)
    model = AutoModelForCausalLM.from_pretrained(built.path)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=48, do_sample=False)
    assert tokenizer.decode(out[0], skip_special_tokens=True) == built.sample


def test_tokenizer_round_trips_any_text(built: BuildResult) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.path)
    text = "def f(x):\n    return {'ä': x ** 2}  # ✓ tabs\tand  spaces\n"
    ids = tokenizer(text).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_chat_template(built: BuildResult) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built.path)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == f"{BOS}<|system|>\nBe brief.<|eos|>\n<|user|>\nhi<|eos|>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    ids = ids["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's, not a second from the tokenizer
    assert ids[-2:] == tokenizer.encode("<|assistant|>\n", add_special_tokens=False)


def test_ensure_returns_an_existing_model_untouched(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert ensure_default_model(tmp_path, log=pytest.fail) == tmp_path


def test_ensure_refuses_a_directory_that_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=ENV_VAR):
        ensure_default_model(tmp_path, log=pytest.fail)


def test_env_var_overrides_the_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert default_model_dir().parts[-2:] == ("models", "tensorfleet-tiny-py")
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    assert default_model_dir() == tmp_path
