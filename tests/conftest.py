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
