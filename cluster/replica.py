"""Build one model replica from a user's config: check the layout, start the workers
(in this process for tp=pp=1 without Ray, else Ray actors), load the tokenizer, and hand
back a ready `Engine`.
"""

import functools
import os
from collections.abc import Callable
from dataclasses import replace

import torch
from transformers import AutoTokenizer

from actors.checkpoint import Checkpoint, open_checkpoint
from actors.worker import SamplerVocabulary, WorkerSpec
from cluster.config import TensorfleetConfig, resolve_device, resolve_dtype
from cluster.engine import Engine, EngineLimits
from cluster.executor import Executor, InProcessExecutor
from cluster.plan import ClusterSpec, Plan, make_plan

# On CPU the workers share RAM with everything else: the plan gives each worker this share
# of the machine's RAM, divided among the replica's workers as if all were on one host
# (simulated nodes are).
CPU_MEMORY_FRACTION = 0.25


def device_memory_bytes(device: str, world: int) -> int:
    """Memory one worker plans with: a GPU's total memory (gpu_memory_utilization applies
    on top), or its share of this machine's RAM on CPU."""
    if device == "cpu":
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return int(ram * CPU_MEMORY_FRACTION) // world
    return _gpu_memory_bytes()


@functools.cache  # asked once: a re-layout plans while the replica's workers hold every GPU
def _gpu_memory_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    import ray  # a driver without a GPU (a CPU head node): ask a GPU node

    probe = ray.remote(num_gpus=1)(lambda: torch.cuda.get_device_properties(0).total_memory)
    return ray.get(probe.remote(), timeout=120)


def cluster_spec(cfg: TensorfleetConfig, device: str) -> ClusterSpec:
    """The cluster the layout must fit: the connected Ray cluster's nodes (GPUs per node,
    real or logical), or this machine alone."""
    par = cfg.parallel
    world = par.tensor_parallel_size * par.pipeline_parallel_size
    memory = device_memory_bytes(device, world)
    if not _ray_connected():
        return ClusterSpec(1, world, memory)
    import ray

    gpus = [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if not any(gpus):  # a CPU-only cluster: one worker per logical CPU
        gpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return ClusterSpec(len(gpus), max(gpus), memory)


def plan_replica(cfg: TensorfleetConfig) -> tuple[Plan, WorkerSpec]:
    """Check the checkpoint (complete, readable) and the layout against the model and the
    cluster (the planner's clear errors, before any worker starts), and say what every
    worker needs to build its part."""
    checkpoint = open_checkpoint(cfg.model)
    checkpoint.check_complete()
    shape = checkpoint.shape
    device = resolve_device(cfg.parallel.device)
    dtype = resolve_dtype(cfg.dtype, device)
    par, eng = cfg.parallel, cfg.engine
    # the replicas must fit a Ray cluster; without one this process is the whole deployment,
    # one engine (benchmarks, verify), whatever serve.num_replicas says
    serve = cfg.serve if _ray_connected() else None
    plan = make_plan(shape, par, eng, dtype, cluster_spec(cfg, device), serve)
    spec = WorkerSpec(
        model_path=str(checkpoint.path.resolve()),
        shape=shape,
        model_name=cfg.served_model_name,
        tp=plan.tp,
        pp=plan.pp,
        layer_partition=list(plan.partition),
        tensor_split=plan.tensor_split,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        max_model_len=eng.max_model_len,
        block_size=eng.block_size,
        collective_timeout_s=eng.step_deadline_s,
        # CPU workers of a simulated cluster share this machine's cores
        cpu_threads=max(1, (os.cpu_count() or 1) // plan.gpus) if device == "cpu" else None,
    )
    return plan, spec


def load_tokenizer(checkpoint: Checkpoint, log: Callable[[str], None]):
    """The checkpoint's tokenizer and chat template, or None (the engine then takes token ids)."""
    path, options = checkpoint.transformers_args()
    try:
        return AutoTokenizer.from_pretrained(path, **options)
    except (OSError, ValueError, KeyError) as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        log(f"no tokenizer in {checkpoint.path} ({reason}); the engine will take token ids only")
        return None


def eos_token_ids(checkpoint: Checkpoint, tokenizer) -> tuple[int, ...]:
    """The checkpoint's EOS ids, else the tokenizer's."""
    if ids := checkpoint.eos_token_ids():
        return ids
    return (tokenizer.eos_token_id,) if tokenizer is not None and tokenizer.eos_token_id is not None else ()


def build_executor(cfg: TensorfleetConfig, plan: Plan, spec: WorkerSpec, log: Callable[[str], None]) -> Executor:
    """Start the workers and allocate the KV cache the plan sized."""
    if spec.tp * spec.pp == 1 and not _ray_connected():
        log("tp=1, pp=1 without Ray: running the worker in this process")
        return InProcessExecutor(spec, plan.num_kv_blocks)
    from cluster.ray_executor import RayExecutor

    return RayExecutor(spec, plan.num_kv_blocks, step_deadline_s=cfg.engine.step_deadline_s, log=log)


def _ray_connected() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def engine_limits(cfg: TensorfleetConfig) -> EngineLimits:
    eng = cfg.engine
    return EngineLimits(eng.max_model_len, eng.max_num_seqs, eng.max_num_batched_tokens, eng.block_size,
                        eng.enable_prefix_caching, cfg.serve.max_waiting_requests, eng.max_resumes)


def build_engine(cfg: TensorfleetConfig, log: Callable[[str], None] = print, replica: str = "") -> Engine:
    """`replica` names this replica among the model's (its metrics' `replica` label)."""
    plan, spec = plan_replica(cfg)
    checkpoint = open_checkpoint(spec.model_path)
    tokenizer = load_tokenizer(checkpoint, log)
    eos = eos_token_ids(checkpoint, tokenizer)
    spec = replace(spec, vocabulary=SamplerVocabulary.of(tokenizer, eos))  # the sampling rank's EOS and grammar vocabulary
    executor = build_executor(cfg, plan, spec, log)
    log(f"engine ready: {executor.num_kv_blocks} KV blocks of {cfg.engine.block_size} tokens")
    return Engine(executor, engine_limits(cfg), model_name=cfg.served_model_name, replica=replica,
                  vocab_size=plan.shape.vocab_size,
                  tokenizer=tokenizer,
                  eos_token_ids=eos,
                  rebuild=lambda: build_executor(cfg, plan, spec, log))
