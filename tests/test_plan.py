"""The planner (cluster/plan.py) and `tensorfleet plan` (deploy/cli.py).

Memory is checked against parameter counts written out by hand below, never against the
planner's own helpers.
"""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from actors.model_shape import ModelShape
from actors.sharding import Span
from cluster.config import EngineConfig, ParallelConfig
from cluster.plan import ClusterSpec, PlanError, lm_head_layers, make_plan
from deploy.cli.main import main
from deploy.cli.plan import parse_size

MODEL_CONFIGS = Path(__file__).resolve().parents[1] / "deploy" / "model_configs"
GiB = 2**30
LLAMA_8B = ModelShape.from_dir(MODEL_CONFIGS / "llama-3-8b")
LLAMA_70B = ModelShape.from_dir(MODEL_CONFIGS / "llama-3-70b")
H100 = ClusterSpec(nodes=1, gpus_per_node=8, gpu_memory_bytes=80 * GiB)


def plan(shape=LLAMA_8B, tp=1, pp=1, partition=None, cluster=H100, tensor_split=None, **engine):
    parallel = ParallelConfig(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                              layer_partition=partition, tensor_split=tensor_split)
    return make_plan(shape, parallel, EngineConfig(**engine), torch.bfloat16, cluster)


def plan_error(**kwargs) -> str:
    with pytest.raises(PlanError) as e:
        plan(**kwargs)
    return str(e.value)


# --- refusals -----------------------------------------------------------------------------


def test_tp_above_the_head_count_says_what_works():
    msg = plan_error(tp=33, cluster=ClusterSpec(1, 64, 80 * GiB))
    assert msg.startswith("parallel.tensor_parallel_size:")
    assert "tensor_parallel_size=33 exceeds num_attention_heads=32" in msg
    assert "from 1 to 32" in msg and "pipeline_parallel_size" in msg


def test_tp_that_divides_nothing_plans_by_hand():
    # Llama-3-8B at tp=3: 32 heads -> 11 | 11 | 10 over 8 KV heads (4 query heads each):
    # rank 0 KV 0-2, rank 1 KV 2-5, rank 2 KV 5-7; 14336 MLP columns = 448 blocks of 32 ->
    # 150 | 149 | 149 blocks = 4800 | 4768 | 4768 columns.
    p = plan(tp=3)
    heads = [(r.heads.heads, r.heads.kv_heads, r.heads.groups) for r in p.ranks]
    assert heads == [(Span(0, 11), Span(0, 3), (4, 4, 3)), (Span(11, 22), Span(2, 6), (1, 4, 4, 2)),
                     (Span(22, 32), Span(5, 8), (2, 4, 4))]
    assert [r.intermediate for r in p.ranks] == [Span(0, 4800), Span(4800, 9568), Span(9568, 14336)]
    vocab_shard = 128256 // 3 * 4096  # 128256 = 668 x 192: no padding at tp=3
    for r, (h, k, cols) in zip(p.ranks, [(11, 3, 4800), (11, 4, 4768), (10, 3, 4768)]):
        layer = (h + 2 * k) * 128 * 4096 + h * 128 * 4096 + 3 * cols * 4096 + 2 * 4096
        assert r.weight_bytes == 2 * (32 * layer + 2 * vocab_shard + 4096)
        assert r.kv_block_bytes == 2 * 32 * k * 128 * 16 * 2  # follows the rank's KV heads


def test_tp_larger_than_a_node_is_refused():
    two_gpu_nodes = ClusterSpec(nodes=4, gpus_per_node=2, gpu_memory_bytes=80 * GiB)
    msg = plan_error(tp=4, cluster=two_gpu_nodes)
    assert "tensor_parallel_size=4 exceeds the 2 GPUs per node" in msg
    assert "tensor_parallel_size <= 2" in msg and "pipeline_parallel_size" in msg


def test_layer_partition_and_pp_errors():
    msg = plan_error(pp=2, partition=[10, 11, 11])
    assert msg.startswith("parallel.layer_partition:") and "pipeline_parallel_size=2 entries" in msg
    msg = plan_error(pp=2, partition=[16, 15])
    assert msg.startswith("parallel.layer_partition:") and "num_hidden_layers=32" in msg
    small = dataclasses.replace(LLAMA_8B, num_hidden_layers=2)
    msg = plan_error(shape=small, pp=3, cluster=ClusterSpec(3, 1, 80 * GiB))
    assert msg.startswith("parallel.pipeline_parallel_size:") and "num_hidden_layers=2" in msg
    p = plan(pp=4, partition=[10, 9, 9, 4], cluster=ClusterSpec(4, 1, 80 * GiB))
    assert p.partition == (10, 9, 9, 4)
    assert [s.layers for s in p.stages] == [range(0, 10), range(10, 19), range(19, 28),
                                            range(28, 32)]


def test_not_enough_nodes():
    msg = plan_error(tp=8, pp=2, cluster=ClusterSpec(1, 8, 80 * GiB))
    assert msg.startswith("parallel.pipeline_parallel_size:")
    assert "16 GPUs on 2 nodes" in msg and "1 node(s)" in msg
    # tp=4 packs two stages on an 8-GPU node.
    assert plan(tp=4, pp=2, cluster=ClusterSpec(1, 8, 80 * GiB)).nodes == 1


def test_max_model_len_above_the_model():
    msg = plan_error(max_model_len=8193)
    assert msg.startswith("engine.max_model_len:") and "max_position_embeddings=8192" in msg


def test_weights_that_do_not_fit():
    msg = plan_error(shape=LLAMA_70B, cluster=ClusterSpec(1, 8, 24 * GiB))
    assert "weights do not fit" in msg and "tensor_parallel_size" in msg


def test_no_room_for_one_sequence():
    roomy = plan(max_model_len=8192).rank(0, 0)
    one_seq = 8192 // 16 * roomy.kv_block_bytes
    # Budget = weights + activations + half a sequence of KV cache.
    memory = int((roomy.weight_bytes + roomy.activation_bytes + one_seq // 2) / 0.9) + 1
    msg = plan_error(max_model_len=8192, cluster=ClusterSpec(1, 8, memory))
    assert msg.startswith("engine.max_model_len:") and "needs 512 blocks" in msg


def test_num_kv_blocks_given():
    p = plan(num_kv_blocks=1000)
    assert p.num_kv_blocks == 1000 and p.num_kv_blocks_given
    assert p.rank(0, 0).kv_cache_bytes == 1000 * p.rank(0, 0).kv_block_bytes
    msg = plan_error(num_kv_blocks=10**6)
    assert msg.startswith("engine.num_kv_blocks:")
    room = int(re.search(r"at most (\d+) fit", msg)[1])
    r = plan(num_kv_blocks=room).rank(0, 0)
    assert r.total_bytes <= int(80 * GiB * 0.9) < r.total_bytes + r.kv_block_bytes
    assert plan_error(num_kv_blocks=room + 1).startswith("engine.num_kv_blocks:")
    msg = plan_error(num_kv_blocks=127)  # 2048 / 16 = 128 blocks per sequence
    assert msg.startswith("engine.num_kv_blocks:")


def test_sized_kv_cache_is_capped_at_what_the_sequences_can_use():
    p = plan(max_num_seqs=4, max_model_len=1024)
    assert p.num_kv_blocks == 4 * 1024 // 16
    assert plan(max_num_seqs=8, max_model_len=1024).num_kv_blocks == 2 * p.num_kv_blocks


# --- accounting ---------------------------------------------------------------------------


def test_sized_kv_cache_fills_the_budget_on_the_tightest_gpu():
    # enough sequences that memory, not max_num_seqs x max_model_len, bounds the cache
    p = plan(shape=LLAMA_70B, tp=8, pp=2, cluster=ClusterSpec(2, 8, 80 * GiB),
             max_num_seqs=512, max_model_len=8192)
    budget = int(80 * GiB * 0.9)
    used = [r.weight_bytes + r.activation_bytes for r in p.ranks]
    assert all(u + p.num_kv_blocks * r.kv_block_bytes <= budget for u, r in zip(used, p.ranks))
    assert any(u + (p.num_kv_blocks + 1) * r.kv_block_bytes > budget
               for u, r in zip(used, p.ranks))
    # K and V x 40 layers x 1 KV head x head_dim 128 x 16 tokens x 2 bytes.
    assert p.rank(1, 7).kv_block_bytes == 2 * 40 * 1 * 128 * 16 * 2
    assert [r.heads.kv_head_start for r in p.stages[0].ranks] == list(range(8))


def test_activation_reserve_and_kv_blocks_by_hand():
    # Llama-3-8B at tp=3 x pp=2 (16 layers a stage, set: the balanced default counts the LM
    # head as layers and gives stage 0 more) on 6 GiB GPUs, so memory, not
    # max_num_seqs x max_model_len, bounds the cache; defaults: 4096 batched tokens, 64
    # sequences, blocks of 16, 0.9 of the memory. Ranks hold (query heads, KV heads, MLP
    # columns) 11, 3, 4800 | 11, 4, 4768 | 10, 3, 4768 (see the tp=3 test above).
    p = plan(tp=3, pp=2, partition=[16, 16], cluster=ClusterSpec(2, 8, 6 * GiB))
    budget = int(6 * GiB * 0.9)
    vocab_slice = 128256 // 3  # rows of the embedding / LM head per rank (no padding at tp=3)
    rooms = []
    for r in p.ranks:
        h, k, cols = [(11, 3, 4800), (11, 4, 4768), (10, 3, 4768)][r.tp_rank]
        last = r.stage == 1
        # per batched token in bf16: residual, normed input, an output (3 x 4096), the fused
        # q/k/v output, gate and up and act(gate) * up (3 x the rank's columns)
        activations = 4096 * (3 * 4096 + (h + 2 * k) * 128 + 3 * cols) * 2
        if last:  # float32 logits of 64 sequences: the rank's slice, the gathered row, a workspace
            activations += 64 * (vocab_slice + 2 * 128256) * 4
        assert r.activation_bytes == activations
        layer = (h + 2 * k) * 128 * 4096 + h * 128 * 4096 + 3 * cols * 4096 + 2 * 4096
        weights = 2 * (16 * layer + vocab_slice * 4096 + (4096 if last else 0))
        assert r.weight_bytes == weights
        block = 2 * 16 * k * 128 * 16 * 2  # K and V, 16 layers, the rank's KV heads, 16 tokens, bf16
        assert r.kv_block_bytes == block
        rooms.append((budget - weights - activations) // block)
    assert rooms == [7258, 5401, 7380, 7063, 5255, 7185]
    assert p.num_kv_blocks == min(rooms) == 5255 < 64 * 2048 // 16  # the last stage's rank with 4 KV heads
    assert p.kv_tokens == 5255 * 16


def test_tied_embeddings_and_qkv_bias_counted_by_hand():
    # Qwen2-like: H=64, 8 heads (d=8), 2 KV heads, I=128, 4 layers, vocab 1000 tied.
    qwen = ModelShape.from_dict({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 1000, "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "max_position_embeddings": 4096,
        "tie_word_embeddings": True, "torch_dtype": "bfloat16"})
    # tp=2: 4 query heads + 1 KV head per rank; qkv width (4 + 2) * 8 = 48, plus its bias.
    layer = 48 * 64 + 48 + 4 * 8 * 64 + 3 * 64 * 64 + 2 * 64
    vocab_shard = 1024 // 2 * 64  # 1000 padded to a multiple of 64 * 2
    small = ClusterSpec(2, 2, 1 * GiB)
    one_stage = plan(shape=qwen, tp=2, cluster=small, max_num_batched_tokens=64)
    assert one_stage.rank(0, 1).weight_bytes == 2 * (4 * layer + vocab_shard + 64)
    two_stages = plan(shape=qwen, tp=2, pp=2, cluster=small, max_num_batched_tokens=64)
    assert two_stages.rank(0, 0).weight_bytes == 2 * (2 * layer + vocab_shard)
    assert two_stages.rank(1, 0).weight_bytes == 2 * (2 * layer + vocab_shard + 64)


# --- tensorfleet plan ---------------------------------------------------------------------


def write_config(tmp_path: Path, model: Path, tp: int, pp: int = 1, tensor_split: list[int] | None = None) -> Path:
    path = tmp_path / "tensorfleet.yaml"
    path.write_text(f"model: {model}\nparallel:\n  tensor_parallel_size: {tp}\n"
                    f"  pipeline_parallel_size: {pp}\n"
                    + (f"  tensor_split: {tensor_split}\n" if tensor_split is not None else ""))
    return path


def table_rows(out: str) -> list[dict[str, str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["stage"])
    header = lines[start].split()
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(dict(zip(header, line.split())))
    return rows


def test_llama_3_70b_params_by_hand():
    # One layer: q and o 8192 x 8192, k and v 1024 x 8192 (8 KV heads x 128), MLP 3 x 8192 x
    # 28672, two norms; plus the embedding and the LM head (128256 x 8192) and a final norm.
    layer = 2 * 8192 * 8192 + 2 * 1024 * 8192 + 3 * 8192 * 28672 + 2 * 8192
    total = 80 * layer + 2 * 128256 * 8192 + 8192
    assert total == 70_553_706_496
    p = plan(shape=LLAMA_70B, cluster=ClusterSpec(1, 8, 200 * GiB))
    assert p.rank(0, 0).weight_bytes == 2 * total


def test_cli_70b_tp4(tmp_path, capsys):
    # tp=4: 16 query heads, 2 KV heads, 28672 / 4 = 7168 MLP columns per rank.
    layer = (16 + 2 * 2) * 128 * 8192 + 16 * 128 * 8192 + 3 * 7168 * 8192 + 2 * 8192
    vocab_shard = 128256 // 4 * 8192  # 128256 = 501 x 256: no padding at tp=4
    per_rank = 80 * layer + 2 * vocab_shard + 8192
    assert per_rank == 17_639_415_808  # ~ 70.55e9 / 4
    config = write_config(tmp_path, MODEL_CONFIGS / "llama-3-70b", tp=4)
    assert main(["plan", str(config)]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert len(rows) == 4
    assert [r["q_heads"] for r in rows] == ["0-15", "16-31", "32-47", "48-63"]
    assert [r["kv_heads"] for r in rows] == ["0-1", "2-3", "4-5", "6-7"]
    assert {r["weights"] for r in rows} == {f"{2 * per_rank / GiB:.2f}"} == {"32.86"}
    assert "4 GPUs on 1 node(s)" in out
    p = plan(shape=LLAMA_70B, tp=4)
    assert all(r.weight_bytes == 2 * per_rank for r in p.ranks)


def test_cli_70b_tp8_pp2(tmp_path, capsys):
    # tp=8: 8 query heads and 1 KV head per rank, 3584 MLP columns; 40 layers per stage.
    layer = (8 + 2 * 1) * 128 * 8192 + 8 * 128 * 8192 + 3 * 3584 * 8192 + 2 * 8192
    vocab_shard = 128512 // 8 * 8192  # 128256 padded up to a multiple of 64 x 8 = 512
    first = 40 * layer + vocab_shard
    last = 40 * layer + vocab_shard + 8192
    config = write_config(tmp_path, MODEL_CONFIGS / "llama-3-70b", tp=8, pp=2)
    assert main(["plan", str(config), "--gpus-per-node", "8", "--gpu-memory", "80GiB"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert len(rows) == 16
    assert {r["layers"] for r in rows[:8]} == {"0-39"} and {r["layers"] for r in rows[8:]} == {
        "40-79"}
    assert {r["weights"] for r in rows[:8]} == {f"{2 * first / GiB:.2f}"}
    assert {r["weights"] for r in rows[8:]} == {f"{2 * last / GiB:.2f}"}
    assert "16 GPUs on 2 node(s)" in out
    p = plan(shape=LLAMA_70B, tp=8, pp=2, cluster=ClusterSpec(2, 8, 80 * GiB))
    assert p.rank(0, 3).weight_bytes == 2 * first and p.rank(1, 5).weight_bytes == 2 * last


SMOLLM2_135M = {  # SmolLM2-135M's config.json, the shape of the default served model
    "architectures": ["LlamaForCausalLM"], "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
    "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}


@pytest.fixture
def smollm2_dir(tmp_path) -> Path:
    path = tmp_path / "smollm2-135m"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(SMOLLM2_135M))
    return path


def smollm2_layer(heads: int, kv_heads: int, cols: int) -> int:
    """Parameters of one SmolLM2 layer on a rank (head_dim 64, hidden 576)."""
    return (heads + 2 * kv_heads) * 64 * 576 + heads * 64 * 576 + 3 * cols * 576 + 2 * 576


def test_smollm2_pipeline_gives_the_last_stage_fewer_layers(smollm2_dir):
    """Its LM head (49152 x 576) weighs about 8 layers and runs for sampled tokens only:
    counted as 4 layers, the balanced split is 17 | 13."""
    shape = ModelShape.from_dir(smollm2_dir)
    assert lm_head_layers(shape) == pytest.approx(4.0, abs=0.01)
    p = plan(shape=shape, tp=1, pp=2, max_model_len=2048)
    assert [s.layers for s in p.stages] == [range(17), range(17, 30)]
    assert [s.layers for s in plan(shape=shape, pp=2, partition=[15, 15], max_model_len=2048).stages] == [
        range(15), range(15, 30)]


def test_cli_smollm2_tp2_uneven_heads(tmp_path, smollm2_dir, capsys):
    # 9 heads -> 5 | 4; KV heads 0-1 | 1-2 (KV head 1 serves query heads 3-5 on both ranks);
    # 1536 MLP columns = 48 blocks of 32 -> 768 | 768. Tied embedding, vocab 49152 / 2 rows.
    per_rank = [30 * smollm2_layer(h, 2, 768) + 49152 // 2 * 576 + 576 for h in (5, 4)]
    assert per_rank == [69_486_912, 67_275_072]
    assert main(["plan", str(write_config(tmp_path, smollm2_dir, tp=2))]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [(r["q_heads"], r["kv_heads"], r["mlp_cols"]) for r in rows] == [
        ("0-4", "0-1", "0-767"), ("5-8", "1-2", "768-1535")]
    assert [r["weights"] for r in rows] == [f"{2 * n / GiB:.2f}" for n in per_rank]
    assert ("TP split (as even as possible): rank 0 does 1.25x the attention work of rank 1 "
            "(5 vs 4 query heads); MLP even (768 columns per rank)") in out
    assert "rank 0 holds 1.04x the weights of rank 1" in out  # 1844352 / 1770624 per layer
    p = plan(shape=ModelShape.from_dict(SMOLLM2_135M), tp=2)
    assert [r.weight_bytes for r in p.ranks] == [2 * n for n in per_rank]
    assert {r.kv_block_bytes for r in p.ranks} == {2 * 30 * 2 * 64 * 16 * 2}  # 2 KV heads on each


def test_cli_smollm2_weighted_split(tmp_path, smollm2_dir, capsys):
    # tensor_split [2, 1]: heads 6 | 3 (KV 0-1 | 2), MLP 32 | 16 blocks = 1024 | 512 columns.
    per_rank = [30 * smollm2_layer(6, 2, 1024), 30 * smollm2_layer(3, 1, 512)]
    per_rank = [n + 49152 // 2 * 576 + 576 for n in per_rank]
    assert main(["plan", str(write_config(tmp_path, smollm2_dir, tp=2, tensor_split=[2, 1]))]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert [(r["q_heads"], r["kv_heads"], r["mlp_cols"]) for r in rows] == [
        ("0-5", "0-1", "0-1023"), ("6-8", "2", "1024-1535")]
    assert [r["weights"] for r in rows] == [f"{2 * n / GiB:.2f}" for n in per_rank]
    assert ("TP split (tensor_split [2, 1]): rank 0 does 2.00x the attention work of rank 1 (6 vs 3 query heads); "
            "rank 0 does 2.00x the MLP work of rank 1 (1024 vs 512 columns)") in out
    p = plan(shape=ModelShape.from_dict(SMOLLM2_135M), tp=2, tensor_split=[2, 1])
    assert [r.weight_bytes for r in p.ranks] == [2 * n for n in per_rank]
    # the KV cache follows the KV heads: rank 1 holds one, so half the bytes per block
    assert [r.kv_block_bytes for r in p.ranks] == [2 * 30 * k * 64 * 16 * 2 for k in (2, 1)]
    assert "stage 0: 0.12 / 0.23 MiB" in out


def test_cli_tensor_split_refusals_name_the_field(tmp_path, smollm2_dir, capsys):
    assert main(["plan", str(write_config(tmp_path, smollm2_dir, tp=2, tensor_split=[2, 1, 1]))]) == 2
    err = capsys.readouterr().err
    assert "parallel.tensor_split:" in err and "3 weight(s) but tensor_parallel_size=2" in err
    assert main(["plan", str(write_config(tmp_path, smollm2_dir, tp=2, tensor_split=[2, 0]))]) == 2
    err = capsys.readouterr().err
    assert "parallel.tensor_split:" in err and "every weight must be a positive number" in err
    assert main(["plan", str(write_config(tmp_path, smollm2_dir, tp=10))]) == 2
    err = capsys.readouterr().err
    assert "tensor_parallel_size=10 exceeds num_attention_heads=9" in err and "from 1 to 9" in err


def test_cli_exit_2_when_it_does_not_fit(tmp_path, capsys):
    config = write_config(tmp_path, MODEL_CONFIGS / "llama-3-70b", tp=1)
    assert main(["plan", str(config), "--gpu-memory", "24GiB"]) == 2
    err = capsys.readouterr().err
    assert "weights do not fit" in err and "24.00 GiB" in err
    config = write_config(tmp_path, MODEL_CONFIGS / "llama-3-70b", tp=4)
    assert main(["plan", str(config), "--gpus-per-node", "2"]) == 2
    assert "exceeds the 2 GPUs per node" in capsys.readouterr().err


def test_cli_exit_2_on_config_errors(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {MODEL_CONFIGS / 'llama-3-8b'}\nengine:\n  max_model_lenght: 10\n")
    assert main(["plan", str(bad)]) == 2
    assert "engine.max_model_lenght" in capsys.readouterr().err
    empty = tmp_path / "empty-model"
    empty.mkdir()
    assert main(["plan", str(write_config(tmp_path, empty, tp=1))]) == 2
    assert "config.json" in capsys.readouterr().err


def test_parse_size():
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("40G") == 40 * GiB
    assert parse_size("24GB") == 24 * 10**9
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("4096") == 4096
    for bad in ("", "GiB", "80XB", "-1G", "0"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_size(bad)
