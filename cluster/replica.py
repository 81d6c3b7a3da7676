"""Build one model replica from a user's config: check the layout, start the workers
(in this process for tp=pp=1 without Ray, else Ray actors), load the tokenizer, and hand
back a ready `Engine`.
"""

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoTokenizer

from actors.worker import WorkerSpec
from cluster.config import ModelShape, TensorfleetConfig, resolve_device, resolve_dtype
from cluster.engine import Engine, EngineLimits
from cluster.executor import Executor, InProcessExecutor
from cluster.plan import ClusterSpec, make_plan


def cluster_spec(cfg: TensorfleetConfig, device: str) -> ClusterSpec:
    """The cluster the layout must fit: the connected Ray cluster's nodes (GPUs per node,
    real or logical), or this machine alone."""
    par = cfg.parallel
    memory = torch.cuda.get_device_properties(0).total_memory if device == "cuda" else _total_ram()
    if not _ray_connected():
        return ClusterSpec(1, par.tensor_parallel_size * par.pipeline_parallel_size, memory)
    import ray

    gpus = [int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    if not any(gpus):  # a CPU-only cluster: one worker per logical CPU
        gpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")]
    return ClusterSpec(len(gpus), max(gpus), memory)


def worker_spec(cfg: TensorfleetConfig) -> WorkerSpec:
    shape = ModelShape.from_dir(cfg.model)
    device = resolve_device(cfg.parallel.device)
    dtype = resolve_dtype(cfg.dtype, shape, device)
    par, eng = cfg.parallel, cfg.engine
    # Checks the layout (heads, KV heads, partition, TP within a node, ...) with the
    # planner's clear errors, before any worker starts.
    make_plan(shape, par, eng, dtype, cluster_spec(cfg, device))
    world = par.tensor_parallel_size * par.pipeline_parallel_size
    return WorkerSpec(
        model_dir=str(Path(cfg.model).resolve()),
        model_name=cfg.served_model_name,
        tp=par.tensor_parallel_size,
        pp=par.pipeline_parallel_size,
        layer_partition=par.layer_partition,
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        max_model_len=eng.max_model_len,
        block_size=eng.block_size,
        collective_timeout_s=eng.step_deadline_s,
        # CPU workers of a simulated cluster share this machine's cores
        cpu_threads=max(1, (os.cpu_count() or 1) // world) if device == "cpu" else None,
    )


def _total_ram() -> int:
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


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


def build_executor(cfg: TensorfleetConfig, spec: WorkerSpec, log: Callable[[str], None]) -> Executor:
    eng = cfg.engine
    max_blocks = math.ceil(eng.max_model_len / eng.block_size) * eng.max_num_seqs
    if spec.tp * spec.pp == 1 and not _ray_connected():
        log("tp=1, pp=1 without Ray: running the worker in this process")
        return InProcessExecutor(spec, eng.num_kv_blocks, memory_utilization=eng.gpu_memory_utilization,
                                 max_blocks=max_blocks)
    from cluster.ray_executor import RayExecutor

    return RayExecutor(spec, eng.num_kv_blocks, memory_utilization=eng.gpu_memory_utilization,
                       max_blocks=max_blocks, compiled=eng.executor == "compiled",
                       step_deadline_s=eng.step_deadline_s, log=log)


def _ray_connected() -> bool:
    try:
        import ray
    except ImportError:
        return False
    return ray.is_initialized()


def build_engine(cfg: TensorfleetConfig, log: Callable[[str], None] = print) -> Engine:
    spec = worker_spec(cfg)
    model_dir = Path(spec.model_dir)
    tokenizer = load_tokenizer(model_dir, log)
    executor = build_executor(cfg, spec, log)
    eng = cfg.engine
    limits = EngineLimits(eng.max_model_len, eng.max_num_seqs, eng.max_num_batched_tokens, eng.block_size,
                          eng.enable_prefix_caching, cfg.serve.max_waiting_requests)
    log(f"engine ready: {executor.num_kv_blocks} KV blocks of {eng.block_size} tokens")
    return Engine(executor, limits, model_name=cfg.served_model_name, tokenizer=tokenizer,
                  eos_token_ids=eos_token_ids(model_dir, tokenizer),
                  rebuild=lambda: build_executor(cfg, spec, log))
