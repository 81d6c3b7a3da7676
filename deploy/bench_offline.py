"""`tensorfleet bench --offline`: the engine driven directly, side by side with Hugging Face.

1. Throughput: a fixed, seeded mixed workload (64 requests, prompts of 32-512 tokens,
   outputs of 16-256) on a ~125M-parameter Llama (12 layers, hidden 768, 4 KV heads,
   float32, random weights), through tensorfleet tp=1 (continuous batching) and through
   Hugging Face `generate` with static batches (prompts sorted by length, left-padded,
   each batch decoding to its longest output; the best batch size wins). Output tokens/s
   of each, and the ratio, measured in the same run.
2. Control overhead: the round trip of an empty step through a tp=2 x pp=2 replica on a
   simulated 2x2 Ray cluster, plain actor calls against a Ray Compiled Graph.
"""

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from actors.step_io import StepInput
from cluster.config import TensorfleetConfig
from cluster.engine import Engine
from cluster.replica import build_engine
from cluster.sampling_params import SamplingParams

BENCH_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                   architectures=["LlamaForCausalLM"], tie_word_embeddings=False)


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)


def mixed_workload(n: int = 64, seed: int = 0, vocab: int = 32000) -> Workload:
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(32, 513, (n,), generator=g).tolist()
    output_lens = torch.randint(16, 257, (n,), generator=g).tolist()
    prompts = [torch.randint(10, vocab, (m,), generator=g).tolist() for m in prompt_lens]
    return Workload(prompts, output_lens)


def save_bench_model(path: Path) -> LlamaForCausalLM:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**BENCH_MODEL)).eval()
    model.save_pretrained(path)
    return model


def config_for(path: Path, tp: int = 1, pp: int = 1, executor: str = "plain") -> TensorfleetConfig:
    return TensorfleetConfig.model_validate({
        "model": str(path), "dtype": "float32",
        "parallel": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "device": "cpu"},
        "engine": {"max_model_len": 1024, "max_num_seqs": 64, "max_num_batched_tokens": 2048,
                   "block_size": 16, "num_kv_blocks": 4096, "executor": executor},
    })


def run_engine(engine: Engine, work: Workload) -> float:
    """Seconds to finish the whole workload with continuous batching."""
    start = time.perf_counter()
    for i, (p, n) in enumerate(zip(work.prompts, work.output_lens)):
        engine.add_request(str(i), p, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
    while engine.scheduler.has_work():
        engine.step()
    return time.perf_counter() - start


def run_hf_static(model: LlamaForCausalLM, work: Workload, batch_size: int) -> float:
    order = sorted(range(len(work.prompts)), key=lambda i: len(work.prompts[i]))
    start = time.perf_counter()
    with torch.inference_mode():
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            width = max(len(work.prompts[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for row, i in enumerate(idx):  # left padding, as generate expects
                ids[row, width - len(work.prompts[i]):] = torch.tensor(work.prompts[i])
                mask[row, width - len(work.prompts[i]):] = 1
            n = max(work.output_lens[i] for i in idx)
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)
    return time.perf_counter() - start


def control_overhead_us(path: Path, executor: str, steps: int = 300) -> float:
    """Median round trip of an empty step through every worker of a tp=2 x pp=2 replica."""
    engine = build_engine(config_for(path, 2, 2, executor), log=lambda m: None)
    try:
        times = []
        for i in range(steps):
            start = time.perf_counter()
            engine.executor.execute(StepInput(i, []))
            times.append(time.perf_counter() - start)
        return statistics.median(times[20:]) * 1e6
    finally:
        engine.executor.shutdown()


def main(batch_sizes: tuple[int, ...] = (16, 32, 64), requests: int = 64) -> None:
    work = mixed_workload(requests)
    torch.set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama-125m"
        hf = save_bench_model(path)
        params = sum(p.numel() for p in hf.parameters())
        print(f"model: Llama {params / 1e6:.0f}M params, fp32, {torch.get_num_threads()} threads; "
              f"workload: {len(work.prompts)} requests, {work.output_tokens} output tokens")
        engine = build_engine(config_for(path), log=lambda m: None)
        tf_s = run_engine(engine, work)
        tf_tps = work.output_tokens / tf_s
        print(f"tensorfleet tp=1 (continuous batching): {tf_s:.1f}s, {tf_tps:.1f} output tok/s")
        best = 0.0
        for bs in batch_sizes:
            hf_s = run_hf_static(hf, work, bs)
            tps = work.output_tokens / hf_s
            best = max(best, tps)
            print(f"HF generate static batch {bs}: {hf_s:.1f}s, {tps:.1f} output tok/s")
        print(f"ratio tensorfleet / best HF: {tf_tps / best:.2f}x")
        del engine

        from cluster.local_cluster import start_local_cluster

        cluster = start_local_cluster(2, 2)
        try:
            plain = control_overhead_us(path, "plain")
            compiled = control_overhead_us(path, "compiled")
        finally:
            cluster.shutdown()
        print(f"per-step control overhead, tp=2 x pp=2 (empty step, median): plain {plain:.0f} us, "
              f"compiled graph {compiled:.0f} us ({plain / compiled:.1f}x)")


if __name__ == "__main__":
    main()
