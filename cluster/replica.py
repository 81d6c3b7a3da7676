"""Build one model replica from a user's config: check the layout, start the workers
(in this process for tp=pp=1 without Ray, else Ray actors), load the tokenizer, and hand
back a ready `Engine`.
"""

import functools
import json
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoTokenizer

from actors.model_shape import ModelShape
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
    """Check the layout against the model and the cluster (the planner's clear errors,
    before any worker starts), and say what every worker needs to build its part."""
    shape = ModelShape.from_dir(cfg.model)
    device = resolve_device(cfg.parallel.device)
    dtype = resolve_dtype(cfg.dtype, shape, device)
    par, eng = cfg.parallel, cfg.engine
    plan = make_plan(shape, par, eng, dtype, cluster_spec(cfg, device))
    spec = WorkerSpec(
        model_dir=str(Path(cfg.model).resolve()),
        shape=shape,
        model_name=cfg.served_model_name,
        tp=plan.tp,
        pp=plan.pp,
        layer_partition=list(plan.partition),
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        max_model_len=eng.max_model_len,
        block_size=eng.block_size,
        collective_timeout_s=eng.step_deadline_s,
        # CPU workers of a simulated cluster share this machine's cores
        cpu_threads=max(1, (os.cpu_count() or 1) // plan.gpus) if device == "cpu" else None,
    )
    return plan, spec


def eos_token_ids(model_dir: Path, tokenizer) -> tuple[int, ...]:
    """EOS ids from generation_config.json, else config.json, else the tokenizer."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.exists():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return tuple(eos) if isinstance(eos, list) else (eos,)
    return (tokenizer.eos_token_id,) if tokenizer is not None and tokenizer.eos_token_id is not None else ()


def load_tokenizer(model_dir: Path, log: Callable[[str], None]):
    try:
        return AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0]
        log(f"no tokenizer in {model_dir} ({reason}); the engine will take token ids only")
        return None


def build_executor(cfg: TensorfleetConfig, plan: Plan, spec: WorkerSpec, log: Callable[[str], None]) -> Executor:
    """Start the workers and allocate the KV cache the plan sized."""
    if spec.tp * spec.pp == 1 and not _ray_connected():
        log("tp=1, pp=1 without Ray: running the worker in this process")
        return InProcessExecutor(spec, plan.num_kv_blocks)
    from cluster.ray_executor import RayExecutor

    eng = cfg.engine
    return RayExecutor(spec, plan.num_kv_blocks, compiled=eng.executor == "compiled",
                       step_deadline_s=eng.step_deadline_s, log=log)


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


def build_engine(cfg: TensorfleetConfig, log: Callable[[str], None] = print) -> Engine:
    plan, spec = plan_replica(cfg)
    model_dir = Path(spec.model_dir)
    tokenizer = load_tokenizer(model_dir, log)
    eos = eos_token_ids(model_dir, tokenizer)
    spec = replace(spec, vocabulary=SamplerVocabulary.of(tokenizer, eos))
    executor = build_executor(cfg, plan, spec, log)
    log(f"engine ready: {executor.num_kv_blocks} KV blocks of {cfg.engine.block_size} tokens")
    return Engine(executor, engine_limits(cfg), model_name=cfg.served_model_name, vocab_size=plan.shape.vocab_size,
                  tokenizer=tokenizer,
                  eos_token_ids=eos,
                  rebuild=lambda: build_executor(cfg, plan, spec, log))
