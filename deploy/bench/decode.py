"""Batch-1 decode speed against Hugging Face `generate` and the memory-bandwidth bound.

    python -m deploy.bench.decode                                   # CPU: the 125M Llama, fp32
    python -m deploy.bench.decode --size 1b --device cuda --dtype bfloat16

At batch 1 each decode step reads every weight once (a short context's KV cache is small
beside them), so no implementation beats

    bound (tokens/s) = copy bandwidth / weight bytes read per token

where the copy bandwidth is measured here (one large tensor copied on the device: bytes
read + written per second) and the weights read per token are all parameters but the
input embedding, of which one row is read. tensorfleet runs its engine in this process
(`InProcessExecutor`: no Ray, so this also runs where Ray is not installed) with one
request; Hugging Face runs `generate` on the same checkpoint. Both get the same prompt,
decode greedily with EOS ignored, and are timed per token:
decode tokens/s = (tokens - 1) / (time of last token - time of first), median of --repeats.
"""

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from deploy.bench.hf import StepClock, greedy_generate
from deploy.bench.workload import BENCH_MODEL, FIRST_PROMPT_ID, save_bench_model

# Model shapes, random weights: the CPU benchmark Llama, and a TinyLlama-1.1B-shaped one.
SIZES = {
    "125m": {},
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=2048),
}
BLOCK_SIZE = 16


def copy_bandwidth(device: torch.device, nbytes: int, repeats: int = 10) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes`."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - start)


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one batch-1 decode step reads: all but the input embedding (unless
    the LM head shares it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if model.config.tie_word_embeddings:
        return total
    embed = model.get_input_embeddings().weight
    return total - embed.numel() * embed.element_size()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_tok_s(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0])


def tensorfleet_runs(path: Path, prompt: list[int], new_tokens: int, device: str, dtype: str,
                     repeats: int) -> list[tuple[list[int], list[float]]]:
    """Greedy tokens and the time of each, `repeats` times, from one engine built in this
    process (after a warm-up run)."""
    from cluster.config import TensorfleetConfig
    from cluster.replica import build_engine

    max_len = len(prompt) + new_tokens
    config = TensorfleetConfig.model_validate({
        "model": str(path), "dtype": dtype, "parallel": {"device": device},
        "engine": {"max_model_len": max_len, "max_num_seqs": 1, "block_size": BLOCK_SIZE,
                   "num_kv_blocks": -(-max_len // BLOCK_SIZE)},
    })
    engine = build_engine(config, log=lambda m: None)
    try:
        return asyncio.run(engine_decode_runs(engine, prompt, new_tokens, repeats))
    finally:
        engine.shutdown()


async def engine_decode_runs(engine, prompt: list[int], new_tokens: int,
                             repeats: int) -> list[tuple[list[int], list[float]]]:
    """`repeats` timed greedy requests on `engine`, one at a time, after a warm-up one."""
    await timed_generate(engine, "decode-warm-up", prompt, new_tokens)
    return [await timed_generate(engine, f"decode-{i}", prompt, new_tokens) for i in range(repeats)]


async def timed_generate(engine, request_id: str, prompt: list[int], new_tokens: int) -> tuple[list[int], list[float]]:
    """One greedy request (EOS ignored) on an engine: its tokens and the time each arrived."""
    from actors.sampling_params import SamplingParams

    tokens, times = [], []
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    async for out in engine.generate(request_id, prompt, params):
        for delta in out.deltas:
            tokens += delta.token_ids
            times += [time.perf_counter()] * len(delta.token_ids)
    return tokens, times


def hf_run(model, prompt: list[int], new_tokens: int, device: torch.device) -> tuple[list[int], list[float]]:
    clock = StepClock()
    tokens = greedy_generate(model, [prompt], new_tokens, device, clock)[0].tolist()
    return tokens, clock.times


def hf_decode_runs(model, prompt: list[int], new_tokens: int, repeats: int,
                   device: torch.device) -> tuple[list[tuple[list[int], list[float]]], float, int]:
    """HF's timed batch-1 runs after a warm-up, with what bounds them on this machine: the
    copy bandwidth (bytes/s, median of 3) and the weight bytes read per token."""
    weights = weight_bytes_per_token(model)
    bandwidth = statistics.median(copy_bandwidth(device, max(weights, 1 << 26)) for _ in range(3))
    hf_run(model, prompt, 4, device)  # warm-up
    return [hf_run(model, prompt, new_tokens, device) for _ in range(repeats)], bandwidth, weights


def decode_rate(runs: list[tuple[list[int], list[float]]]) -> float:
    """The median decode tokens/s of timed runs."""
    return statistics.median(decode_tok_s(times) for _, times in runs)


def run(path: Path, *, device: str, dtype: str, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    dev = torch.device(device)
    prompt = [FIRST_PROMPT_ID + i % 1000 for i in range(prompt_len)]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).to(dev).eval()
    hf, bandwidth, weights = hf_decode_runs(model, prompt, new_tokens, repeats, dev)
    del model
    tf = tensorfleet_runs(path, prompt, new_tokens, device, dtype, repeats)
    bound = bandwidth / weights
    systems = {}
    for name, runs in (("tensorfleet tp=1", tf), ("HF generate", hf)):
        tok_s = decode_rate(runs)
        systems[name] = {"decode_tok_s": tok_s, "ms_per_token": 1e3 / tok_s, "share_of_bound": tok_s / bound}
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "dtype": dtype,
            "torch_threads": torch.get_num_threads(), "weight_bytes_per_token": weights,
            "copy_bandwidth_gb_s": bandwidth / 1e9, "bound_tok_s": bound, "prompt_len": prompt_len,
            "new_tokens": new_tokens, "systems": systems,
            "tokens_match": tf[0][0] == hf[0][0], "first_mismatch": first_mismatch(tf[0][0], hf[0][0])}


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def format_report(r: dict) -> str:
    lines = [f"{r['device']}, {r['dtype']}: weights read per token {r['weight_bytes_per_token'] / 1e9:.3f} GB, "
             f"copy bandwidth {r['copy_bandwidth_gb_s']:.1f} GB/s -> bound {r['bound_tok_s']:.1f} tok/s",
             "| system | decode tok/s | ms/token | of the bound |", "| --- | --- | --- | --- |"]
    for name, s in r["systems"].items():
        lines.append(f"| {name} | {s['decode_tok_s']:.1f} | {s['ms_per_token']:.2f} | {s['share_of_bound']:.0%} |")
    tf, hf = (s["decode_tok_s"] for s in r["systems"].values())
    match = "equal" if r["tokens_match"] else f"differ from token {r['first_mismatch']}"
    lines.append(f"tensorfleet / HF: {tf / hf:.2f}x; greedy tokens {match}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=SIZES, default="125m", help="model shape (random weights)")
    p.add_argument("--layers", type=int, help="override the shape's decoder layers (shorter runs)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, help="write the report here as JSON")
    args = p.parse_args(argv)
    shape = SIZES[args.size] | ({"num_hidden_layers": args.layers} if args.layers else {})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"llama-{args.size}"
        save_bench_model(path, args.dtype, **shape)
        report = run(path, device=args.device, dtype=args.dtype, prompt_len=args.prompt_len,
                     new_tokens=args.new_tokens, repeats=args.repeats)
    report["model"] = {**BENCH_MODEL, **shape}
    print(format_report(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
