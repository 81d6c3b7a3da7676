"""The layout of one model replica: layers per stage, heads per rank, memory per GPU.

`make_plan` turns (model shape, parallel + engine config, dtype, cluster) into a `Plan`, or
a `PlanError` whose message names the YAML field to change. Rank (stage, tp_rank) sits at
`mesh[stage][tp_rank]` of `arange(pp * tp).reshape(pp, tp)`.

Weights per rank, in parameters (times the dtype's bytes), from actors/sharding.py's split
(even, uneven such as 5 + 4 of 9 heads, or weighted by parallel.tensor_split):
  per layer on the rank's stage (h = query heads on the rank, k = KV heads on the rank,
  d = head_dim, H = hidden_size, i = the rank's intermediate columns, tp = tensor_parallel_size):
    qkv_proj      (h + 2k) * d * H        (+ (h + 2k) * d with q/k/v bias, e.g. Qwen2)
    o_proj        h * d * H               (+ H, replicated, with an o_proj bias)
    gate_up_proj  2 * i * H
    down_proj     i * H
    2 RMSNorms    2 * H                   (replicated on every rank)
  first stage:  embedding  padded_vocab(V, tp) / tp * H
  last stage:   final norm H + LM head padded_vocab(V, tp) / tp * H; with tied embeddings
                and pp == 1 the head is the embedding (counted once); with pp > 1 the last
                stage holds its own copy.
Layers per stage: `parallel.layer_partition`, or balanced by `lm_head_layers`: the last
stage also runs the LM head, so it gets fewer layers (SmolLM2-135M at pp=2: [17, 13]).
KV cache per block per rank: 2 (K, V) * layers_on_stage * k * d * block_size * dtype bytes
(it follows the rank's KV heads, so it differs between ranks of an uneven split).
Every rank gets the same number of blocks (block tables are global), so a sized
num_kv_blocks is the minimum over ranks of
  floor((gpu_memory * gpu_memory_utilization - weights - activation_reserve) / block_bytes),
capped at what max_num_seqs sequences of max_model_len can use. The replica allocates
exactly this count, so `tensorfleet plan` and `tensorfleet serve` report the same cache.

Replicas: serve.num_replicas (or serve.autoscaling.max_replicas) copies of this layout,
each stage a node-local group of tp GPUs, must fit the cluster together:
replicas * pp <= nodes * floor(gpus_per_node / tp) stage slots.
"""

import math
from dataclasses import dataclass

import torch

from actors.model_shape import ModelShape
from actors.sharding import (
    HeadShard,
    RankShard,
    ShardingError,
    Span,
    check_tp,
    layer_partition,
    padded_vocab_size,
    rank_shards,
    stage_layers,
)
from cluster.config import EngineConfig, ParallelConfig, ServeConfig

GiB = 1 << 30
LOGITS_BYTES = 4  # logits and sampling are float32 whatever the model dtype


class PlanError(ValueError):
    """A layout that cannot run; the message names the YAML field and what would work."""


@dataclass(frozen=True)
class ClusterSpec:
    """The GPUs one replica may use: `nodes` nodes of `gpus_per_node` GPUs each."""

    nodes: int
    gpus_per_node: int
    gpu_memory_bytes: int  # per GPU, total (gpu_memory_utilization is applied to it)


def nodes_for(stages: int, tp: int, gpus_per_node: int) -> int:
    """Nodes that hold `stages` TP groups of `tp` GPUs, each group inside one node."""
    return math.ceil(stages / max(1, gpus_per_node // tp))


@dataclass(frozen=True)
class RankPlan:
    stage: int
    tp_rank: int
    heads: HeadShard  # the query and KV heads this rank holds
    intermediate: Span  # its columns of the MLP's intermediate dimension
    weight_bytes: int
    activation_bytes: int  # reserved for one step's activations (and logits on the last stage)
    kv_block_bytes: int  # one KV block of all this rank's layers
    kv_cache_bytes: int  # num_kv_blocks * kv_block_bytes

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.activation_bytes + self.kv_cache_bytes


@dataclass(frozen=True)
class StagePlan:
    stage: int
    layers: range  # global layer indices
    ranks: tuple[RankPlan, ...]  # indexed by tp_rank


@dataclass(frozen=True)
class Plan:
    shape: ModelShape
    dtype: torch.dtype
    tp: int
    pp: int
    tensor_split: tuple[float, ...] | None  # TP ranks' weights; None: as even as possible
    partition: tuple[int, ...]  # layers per stage
    stages: tuple[StagePlan, ...]
    cluster: ClusterSpec
    gpu_memory_utilization: float
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    num_kv_blocks_given: bool  # from engine.num_kv_blocks, else sized from memory
    gpus: int  # tp * pp, per replica
    nodes: int  # nodes one replica needs (a stage's TP group never straddles nodes)
    replicas: int  # the most replicas of this layout that run at once (serve.num_replicas or max_replicas)
    assumptions: tuple[str, ...]  # what the sizing assumed, in words

    def rank(self, stage: int, tp_rank: int) -> RankPlan:
        return self.stages[stage].ranks[tp_rank]

    @property
    def ranks(self) -> tuple[RankPlan, ...]:
        """All ranks in mesh order (global rank = stage * tp + tp_rank)."""
        return tuple(r for s in self.stages for r in s.ranks)

    @property
    def kv_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @property
    def budget_bytes(self) -> int:
        return int(self.cluster.gpu_memory_bytes * self.gpu_memory_utilization)


def layer_params(shape: ModelShape, shard: RankShard) -> int:
    """Parameters of one decoder layer on one rank (see the module docstring)."""
    hidden, d, heads = shape.hidden_size, shape.head_dim, shard.heads
    qkv_width = (heads.num_heads + 2 * heads.num_kv_heads) * d
    return (
        qkv_width * hidden + (qkv_width if shape.attention_bias else 0)
        + heads.num_heads * d * hidden + (hidden if shape.o_proj_bias else 0)
        + 3 * shard.intermediate.size * hidden
        + 2 * hidden
    )


def _rank_params(shape: ModelShape, tp: int, shard: RankShard, n_layers: int,
                 first: bool, last: bool, pp: int) -> int:
    """Parameters one rank holds (see the module docstring)."""
    hidden = shape.hidden_size
    vocab_shard = padded_vocab_size(shape.vocab_size, tp) // tp * hidden
    total = n_layers * layer_params(shape, shard)
    if first:
        total += vocab_shard
    if last:
        total += hidden + (0 if shape.tie_word_embeddings and pp == 1 else vocab_shard)
    return total


def lm_head_layers(shape: ModelShape) -> float:
    """The LM head's work on the last stage, in decoder layers. Each token that samples
    multiplies vocab x hidden weights, where a layer multiplies its own for every token:
    decode steps sample every token, prefill steps only each prompt's last, so the head
    counts half its weights' worth of layers. On SmolLM2-135M (49152 x 576 against 3.5M
    weights a layer: 4 layers) this is what one CPU thread measures on decode batches of
    12-24 sequences (4.3-4.9 layers)."""
    return shape.vocab_size * shape.hidden_size / layer_params(shape, rank_shards(shape, 1)[0]) / 2


def _activation_bytes(shape: ModelShape, engine: EngineConfig, tp: int, shard: RankShard,
                      last: bool, dtype_bytes: int) -> int:
    """Reserve for one step, max_num_batched_tokens tokens wide:
    residual + normed input + attention/MLP output (3 * H), the fused qkv output
    ((h + 2k) * d), gate_up output and act(gate) * up (3 * i), in the model dtype;
    on the last stage, max_num_seqs float32 logit rows: the rank's vocab shard, the gathered
    full row and one sampling workspace (softmax / top-p sort)."""
    heads = shard.heads
    qkv_width = (heads.num_heads + 2 * heads.num_kv_heads) * shape.head_dim
    width = 3 * shape.hidden_size + qkv_width + 3 * shard.intermediate.size
    reserve = engine.max_num_batched_tokens * width * dtype_bytes
    if last:
        vocab = padded_vocab_size(shape.vocab_size, tp)
        reserve += engine.max_num_seqs * (vocab // tp + 2 * vocab) * LOGITS_BYTES
    return reserve


def gib(n: int | float) -> str:
    return f"{n / GiB:.2f} GiB"


def _check_layout(shape: ModelShape, parallel: ParallelConfig, cluster: ClusterSpec) -> None:
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    try:
        check_tp(shape.num_attention_heads, tp)
    except ShardingError as e:
        raise PlanError(f"parallel.tensor_parallel_size: {e}") from None
    if tp > cluster.gpus_per_node:
        raise PlanError(
            f"parallel.tensor_parallel_size: tensor_parallel_size={tp} exceeds the "
            f"{cluster.gpus_per_node} GPUs per node; tensor parallelism stays inside a node: "
            f"use tensor_parallel_size <= {cluster.gpus_per_node} and raise pipeline_parallel_size"
        )
    layers = shape.num_hidden_layers
    if pp > layers:
        raise PlanError(
            f"parallel.pipeline_parallel_size: pipeline_parallel_size={pp} exceeds "
            f"num_hidden_layers={layers}; every stage needs at least one layer"
        )
    try:
        layer_partition(layers, pp, parallel.layer_partition)
    except ShardingError as e:
        raise PlanError(f"parallel.layer_partition: {e} (or null for a balanced split)") from None
    nodes = nodes_for(pp, tp, cluster.gpus_per_node)
    if nodes > cluster.nodes:
        total = cluster.nodes * cluster.gpus_per_node
        raise PlanError(
            f"parallel.pipeline_parallel_size: tensor_parallel_size={tp} x "
            f"pipeline_parallel_size={pp} needs {tp * pp} GPUs on {nodes} nodes "
            f"({cluster.gpus_per_node // tp} stage(s) of {tp} GPUs fit on a node of {cluster.gpus_per_node}), "
            f"but the cluster has {cluster.nodes} node(s), {total} GPUs; add nodes or lower "
            f"pipeline_parallel_size"
        )


def _check_replicas(parallel: ParallelConfig, serve: ServeConfig, cluster: ClusterSpec) -> None:
    tp, pp, replicas = parallel.tensor_parallel_size, parallel.pipeline_parallel_size, serve.max_replicas
    slots = cluster.nodes * (cluster.gpus_per_node // tp)
    if replicas * pp > slots:
        field = "serve.autoscaling.max_replicas" if serve.autoscaling is not None else "serve.num_replicas"
        fit = slots // pp
        raise PlanError(
            f"{field}: {replicas} replicas of tensor_parallel_size={tp} x pipeline_parallel_size={pp} "
            f"need {replicas * pp} node-local groups of {tp} GPUs ({replicas * tp * pp} GPUs), but the "
            f"cluster's {cluster.nodes} node(s) of {cluster.gpus_per_node} GPUs hold {slots}; "
            f"use at most {fit} replica(s) or add nodes"
        )


def make_plan(shape: ModelShape, parallel: ParallelConfig, engine: EngineConfig,
              dtype: torch.dtype, cluster: ClusterSpec, serve: ServeConfig | None = None) -> Plan:
    """Lay one replica of the model out on `cluster` and check that all of serve's replicas
    fit it (one replica without `serve`), or raise `PlanError` saying which field to change."""
    serve = serve or ServeConfig()
    _check_layout(shape, parallel, cluster)
    _check_replicas(parallel, serve, cluster)
    if engine.max_model_len > shape.max_position_embeddings:
        raise PlanError(
            f"engine.max_model_len: {engine.max_model_len} exceeds the model's "
            f"max_position_embeddings={shape.max_position_embeddings}; use at most that"
        )
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    partition = layer_partition(shape.num_hidden_layers, pp, parallel.layer_partition, lm_head_layers(shape))
    tensor_split = tuple(parallel.tensor_split) if parallel.tensor_split is not None else None
    shards = rank_shards(shape, tp, tensor_split)
    nbytes = dtype.itemsize
    budget = int(cluster.gpu_memory_bytes * engine.gpu_memory_utilization)
    budget_text = (f"gpu_memory_utilization={engine.gpu_memory_utilization} x "
                   f"{gib(cluster.gpu_memory_bytes)} = {gib(budget)}")

    # Per rank: (stage, tp_rank, shard, weights, activations, block bytes).
    draft = []
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        for t, shard in enumerate(shards):
            weights = _rank_params(shape, tp, shard, partition[s], first, last, pp) * nbytes
            act = _activation_bytes(shape, engine, tp, shard, last, nbytes)
            block = (2 * partition[s] * shard.heads.num_kv_heads * shape.head_dim
                     * engine.block_size * nbytes)
            if weights + act > budget:
                whole = rank_shards(shape, 1)[0]
                full = _rank_params(shape, 1, whole, shape.num_hidden_layers, True, True, 1)
                full *= nbytes
                raise PlanError(
                    f"parallel: the weights do not fit: stage {s} needs {gib(weights)} of "
                    f"weights plus a {gib(act)} activation reserve per GPU, but {budget_text}. "
                    f"The whole model is {gib(full)}, so it needs at least "
                    f"{math.ceil(full / budget)} GPUs of this size: raise "
                    f"parallel.tensor_parallel_size (up to {cluster.gpus_per_node} per node) or "
                    f"parallel.pipeline_parallel_size, or use GPUs with more memory"
                )
            draft.append((s, t, shard, weights, act, block))

    per_seq = math.ceil(engine.max_model_len / engine.block_size)
    max_useful = per_seq * engine.max_num_seqs
    room = [(budget - w - a) // b for (_, _, _, w, a, b) in draft]
    if engine.num_kv_blocks is not None:
        num_blocks = engine.num_kv_blocks
        if num_blocks > min(room):
            raise PlanError(
                f"engine.num_kv_blocks: {num_blocks} blocks do not fit next to the weights and "
                f"activations ({budget_text}); at most {min(room)} fit: lower it, or set null "
                f"to size the cache from free memory"
            )
        if num_blocks < per_seq:
            raise PlanError(
                f"engine.num_kv_blocks: {num_blocks} blocks of block_size={engine.block_size} "
                f"hold {num_blocks * engine.block_size} tokens, less than one sequence of "
                f"max_model_len={engine.max_model_len} ({per_seq} blocks); raise it or lower "
                f"engine.max_model_len"
            )
    else:
        num_blocks = min(min(room), max_useful)
        if num_blocks < per_seq:
            s, _, _, w, a, b = draft[room.index(num_blocks)]
            raise PlanError(
                f"engine.max_model_len: stage {s} has room for {max(num_blocks, 0)} KV blocks "
                f"({max(num_blocks, 0) * engine.block_size} tokens) after {gib(w)} of weights "
                f"and a {gib(a)} activation reserve ({budget_text}), but one sequence of "
                f"max_model_len={engine.max_model_len} needs {per_seq} blocks ({gib(per_seq * b)} "
                f"per GPU); lower engine.max_model_len or engine.max_num_batched_tokens, raise "
                f"engine.gpu_memory_utilization, or spread the model over more GPUs"
            )

    stages = tuple(
        StagePlan(s, stage_layers(partition, s), tuple(
            RankPlan(s, t, shard.heads, shard.intermediate, w, a, b, num_blocks * b)
            for (rs, t, shard, w, a, b) in draft if rs == s
        ))
        for s in range(pp)
    )
    assumptions = (
        "activation reserve per GPU: max_num_batched_tokens x (3 x hidden + qkv width + "
        "3 x the rank's intermediate columns) in the model dtype; the last stage adds max_num_seqs float32 "
        "logit rows x (padded_vocab/tp + 2 x padded_vocab)",
        f"the {gib(cluster.gpu_memory_bytes - budget)} per GPU outside gpu_memory_utilization "
        "is left for the CUDA context, NCCL buffers and allocator fragmentation",
        f"num_kv_blocks={num_blocks} given by engine.num_kv_blocks"
        if engine.num_kv_blocks is not None else
        f"num_kv_blocks={num_blocks}: min over GPUs of floor((budget - weights - reserve) / "
        f"bytes per block), at most max_num_seqs x ceil(max_model_len / block_size) = {max_useful}; "
        "every GPU gets the same count",
    )
    return Plan(
        shape=shape, dtype=dtype, tp=tp, pp=pp, tensor_split=tensor_split, partition=tuple(partition), stages=stages,
        cluster=cluster, gpu_memory_utilization=engine.gpu_memory_utilization,
        max_model_len=engine.max_model_len, block_size=engine.block_size,
        num_kv_blocks=num_blocks, num_kv_blocks_given=engine.num_kv_blocks is not None,
        gpus=tp * pp, nodes=nodes_for(pp, tp, cluster.gpus_per_node), replicas=serve.max_replicas,
        assumptions=assumptions,
    )
