"""Building a replica from a config (cluster/replica.py): the plan is what builds it."""

import asyncio

import yaml

from cluster.config import load_config
from cluster.replica import build_engine
from deploy.cli.main import main


def test_plan_and_serve_agree_on_the_kv_cache(tiny_llama_dir, tmp_path, capsys):
    """`tensorfleet plan` and the engine `tensorfleet serve` builds size the same KV cache:
    a budget small enough that memory, not max_num_seqs x max_model_len, bounds it."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": str(tiny_llama_dir[0]), "dtype": "float32", "parallel": {"device": "cpu"},
        "engine": {"max_model_len": 256, "max_num_batched_tokens": 64, "block_size": 16,
                   "gpu_memory_utilization": 0.003},
    }))
    engine = build_engine(load_config(config), log=lambda _: None)
    served = asyncio.run(engine.stats()).kv_blocks
    engine.shutdown()
    assert 64 < served < 64 * 256 // 16, "the budget, not the sequence cap, must bound the cache"
    assert main(["plan", str(config), "--nodes", "1", "--gpus-per-node", "1"]) == 0
    planned = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("KV cache:"))
    assert planned.startswith(f"KV cache: {served} blocks (sized from memory)")
