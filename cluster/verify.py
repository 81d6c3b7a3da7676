"""`tensorfleet verify`: prove a sharded deployment computes the same model.

Runs the configured TP x PP layout on a few prompts and compares the logits at every
position with the Hugging Face transformers model in float32 in this process, loaded from
the same checkpoint (a GGUF file too: transformers dequantizes it the same way).
"""

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM

from actors.checkpoint import Checkpoint, open_checkpoint
from cluster.config import TensorfleetConfig
from cluster.replica import build_executor, load_tokenizer, plan_replica

PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Tensor parallelism splits each weight matrix across GPUs;",
]
TOLERANCE = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 2e-2}


@dataclass(frozen=True)
class VerifyResult:
    layout: str
    dtype: str
    errors: list[float]  # max relative error per prompt
    tolerance: float
    seconds: float

    @property
    def max_error(self) -> float:
        return max(self.errors)

    @property
    def ok(self) -> bool:
        return self.max_error <= self.tolerance


def verify_prompts(checkpoint: Checkpoint, vocab_size: int, log: Callable[[str], None]) -> list[list[int]]:
    tokenizer = load_tokenizer(checkpoint, log)
    if tokenizer is not None:
        return [tokenizer.encode(p) for p in PROMPTS]
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (9, 23, 31)]


def verify(cfg: TensorfleetConfig, log: Callable[[str], None] = print) -> VerifyResult:
    start = time.perf_counter()
    plan, spec = plan_replica(cfg)
    checkpoint = open_checkpoint(spec.model_path)
    path, options = checkpoint.transformers_args()
    reference = AutoModelForCausalLM.from_pretrained(path, **options, dtype=torch.float32).eval()
    prompts = verify_prompts(checkpoint, reference.config.vocab_size, log)
    executor = build_executor(cfg, plan, spec, log)
    try:
        got = executor.prompt_logits(prompts)
    finally:
        executor.shutdown()
    errors = []
    with torch.no_grad():
        for prompt, logits in zip(prompts, got):
            want = reference(torch.tensor([prompt])).logits[0]
            errors.append(float((logits.float() - want).abs().max() / want.abs().max()))
    layout = (f"tp={spec.tp} x pp={spec.pp}" + (f" layers {spec.layer_partition}" if spec.pp > 1 else "")
              + (f" tensor_split {list(spec.tensor_split)}" if spec.tensor_split is not None else ""))
    return VerifyResult(layout, spec.dtype, errors, TOLERANCE[spec.dtype], time.perf_counter() - start)


def format_result(r: VerifyResult) -> str:
    lines = [f"layout {r.layout}, {r.dtype}, tolerance {r.tolerance:g}"]
    lines += [f"  prompt {i}: max relative error {e:.3e}" for i, e in enumerate(r.errors)]
    lines.append(f"{'PASS' if r.ok else 'FAIL'} in {r.seconds:.1f}s")
    lines.append(f"max relative error: {r.max_error:.3e}")
    return "\n".join(lines)
