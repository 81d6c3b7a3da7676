"""`tensorfleet bench --compare-hf CONFIG`: the user's model against Hugging Face `generate`
on the same checkpoint, in the same dtype, on this machine, in one run.

    tensorfleet bench --compare-hf my-model.yaml --num-requests 48 --out compare.json

Two measurements, each side by side:
- batch-1 decode: one greedy request alone (the workload's first prompt, cut to
  DECODE_PROMPT_LEN tokens, then --decode-tokens new ones, EOS ignored), the median of
  --repeats runs after a warm-up; decode tokens/s = (tokens - 1) / (last - first token
  time), against HF `generate` and against the read-bandwidth bound measured here
  (copy bandwidth / weight bytes read per token, deploy/bench/decode.py);
- mixed workload: the seeded workload all at once, tensorfleet's continuous batching against
  HF static batching at each of --hf-batch-sizes (deploy/bench/hf.py), the best one counted;
  each tensorfleet rank's all-reduce share of its forward time over that run.

tensorfleet runs the engine the config describes (its tp, pp, device and engine limits);
`dtype: auto` is resolved once (cluster/config.py) and both sides use the result. The
engine runs first and is shut down before HF loads, so they never share the CPU.
"""

import asyncio
from collections.abc import Callable

import torch

from actors.checkpoint import open_checkpoint
from cluster.config import TensorfleetConfig, resolve_device, resolve_dtype
from deploy.bench.decode import decode_rate, engine_decode_runs, first_mismatch, hf_decode_runs
from deploy.bench.hf import static_batches
from deploy.bench.loadgen import bench_engine
from deploy.bench.report import machine
from deploy.bench.workload import Workload

DECODE_PROMPT_LEN = 32
DEFAULT_HF_BATCH_SIZES = (8, 16, 32)


def compare_with_hf(config: TensorfleetConfig, work: Workload, *, decode_tokens: int = 64, repeats: int = 3,
                    hf_batch_sizes: tuple[int, ...] = DEFAULT_HF_BATCH_SIZES, progress: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Both systems on `work` and on one batch-1 request; the report `format_report` prints."""
    from cluster.replica import build_engine

    device = resolve_device(config.parallel.device)
    dtype = resolve_dtype(config.dtype, device)
    config = config.model_copy(update={"dtype": str(dtype).removeprefix("torch.")})
    prompt = work.prompts[0][:DECODE_PROMPT_LEN]
    par = config.parallel
    log(f"tensorfleet tp={par.tensor_parallel_size} pp={par.pipeline_parallel_size}, {config.dtype}, {device} ...")
    engine = build_engine(config, log=lambda m: None)
    try:
        tf_decode, tf_mixed = asyncio.run(_tensorfleet(engine, work, prompt, decode_tokens, repeats, progress))
    finally:
        engine.shutdown()
    log(f"  batch-1 decode {decode_rate(tf_decode):.1f} tok/s, mixed {tf_mixed['output_tok_s']:.1f} output tok/s")

    log("HF generate ...")
    hf_decode, hf_by_size, bandwidth, weights = _hf(config, work, prompt, decode_tokens, repeats, hf_batch_sizes,
                                                    torch.device(device), log)
    best = max(hf_by_size, key=lambda bs: hf_by_size[bs]["output_tok_s"])
    bound = bandwidth / weights
    tf_rate, hf_rate = decode_rate(tf_decode), decode_rate(hf_decode)
    return {
        "machine": machine(), "model": config.model, "dtype": config.dtype, "device": device,
        "tp": par.tensor_parallel_size, "pp": par.pipeline_parallel_size, "torch_threads": torch.get_num_threads(),
        "workload": work.spec.to_json(),
        "decode": {"prompt_len": len(prompt), "new_tokens": decode_tokens, "repeats": repeats,
                   "weight_bytes_per_token": weights, "copy_bandwidth_gb_s": bandwidth / 1e9, "bound_tok_s": bound,
                   "tensorfleet_tok_s": tf_rate, "hf_tok_s": hf_rate, "vs_hf": tf_rate / hf_rate,
                   "tensorfleet_of_bound": tf_rate / bound, "hf_of_bound": hf_rate / bound,
                   "first_mismatch": first_mismatch(tf_decode[0][0], hf_decode[0][0])},
        "mixed": {"tensorfleet": tf_mixed, "hf_best": hf_by_size[best] | {"batch_size": best},
                  "hf_tok_s_by_batch_size": {bs: r["output_tok_s"] for bs, r in hf_by_size.items()},
                  "vs_hf": tf_mixed["output_tok_s"] / hf_by_size[best]["output_tok_s"]},
    }


async def _tensorfleet(engine, work: Workload, prompt: list[int], decode_tokens: int, repeats: int,
                       progress: bool) -> tuple[list[tuple[list[int], list[float]]], dict]:
    decode = await engine_decode_runs(engine, prompt, decode_tokens, repeats)
    return decode, await bench_engine(engine, work, progress=progress)


def _hf(config: TensorfleetConfig, work: Workload, prompt: list[int], decode_tokens: int, repeats: int,
        batch_sizes: tuple[int, ...], device: torch.device, log: Callable[[str], None]):
    from transformers import AutoModelForCausalLM, GgufConfig

    path, options = open_checkpoint(config.model).transformers_args()
    if "gguf_file" in options:  # dense weights in the dtype, as tensorfleet loads them (not packed GGUF blocks)
        options["quantization_config"] = GgufConfig(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(path, **options, dtype=getattr(torch, config.dtype)).to(device).eval()
    if {p.dtype for p in model.parameters()} != {getattr(torch, config.dtype)}:
        raise RuntimeError(f"HF loaded {config.model} with parameters of {({p.dtype for p in model.parameters()})}, "
                           f"not {config.dtype} alone: the comparison would not be in the same dtype")
    decode, bandwidth, weights = hf_decode_runs(model, prompt, decode_tokens, repeats, device)
    log(f"  batch-1 decode {decode_rate(decode):.1f} tok/s")
    return decode, static_batches(model, work, batch_sizes, device, log), bandwidth, weights


def format_report(r: dict) -> str:
    d, m = r["decode"], r["mixed"]
    tf, hf = m["tensorfleet"], m["hf_best"]
    same = "equal" if d["first_mismatch"] is None else f"differ from token {d['first_mismatch']}"
    lines = [
        f"{r['model']}: {r['dtype']}, {r['device']}, tensorfleet tp={r['tp']} pp={r['pp']}, "
        f"{r['torch_threads']} torch threads",
        f"read-bandwidth bound: {d['copy_bandwidth_gb_s']:.1f} GB/s / {d['weight_bytes_per_token'] / 1e9:.3f} GB "
        f"per token = {d['bound_tok_s']:.1f} tok/s",
        "| measure | tensorfleet | HF generate | ratio |", "| --- | --- | --- | --- |",
        f"| batch-1 decode tok/s | {d['tensorfleet_tok_s']:.1f} | {d['hf_tok_s']:.1f} | {d['vs_hf']:.2f}x |",
        f"| share of the bound | {d['tensorfleet_of_bound']:.0%} | {d['hf_of_bound']:.0%} | |",
        f"| mixed output tok/s (HF: static batch {hf['batch_size']}) | {tf['output_tok_s']:.1f} | "
        f"{hf['output_tok_s']:.1f} | {m['vs_hf']:.2f}x |",
        f"| mixed TTFT p50 s | {tf['ttft_s']['p50']:.2f} | {hf['ttft_s']['p50']:.2f} | |",
        f"batch-1 greedy tokens {same}; HF static batches: "
        + ", ".join(f"{bs}: {tok_s:.1f}" for bs, tok_s in m["hf_tok_s_by_batch_size"].items()) + " tok/s",
    ]
    for rank in tf.get("ranks", []):
        lines.append(f"rank (stage {rank['stage']}, tp {rank['tp_rank']}): all-reduce "
                     f"{100 * rank['all_reduce_share']:.1f}% of its forward time")
    return "\n".join(lines)
