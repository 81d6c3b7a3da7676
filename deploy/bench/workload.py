"""The benchmark workload and model, defined once for every system the benchmarks drive.

A workload is a seeded list of requests: random prompt token ids of uniformly drawn
lengths, each with the exact number of tokens it must generate (EOS ignored), so every
system does the same work. Arrival times are a separate, seeded choice of the load
generator (all at once, or a Poisson process at a given rate).

The benchmark model is a ~125M-parameter Llama built from a config with random weights
(nothing downloaded): what the numbers in README.md were measured on.
"""

import argparse
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import LlamaConfig, LlamaForCausalLM

BENCH_MODEL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                   num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=1024,
                   architectures=["LlamaForCausalLM"], tie_word_embeddings=False)
# Below this id sit the special tokens of most vocabularies (BOS, EOS, pad, unk, ...).
FIRST_PROMPT_ID = 10


@dataclass(frozen=True)
class WorkloadSpec:
    """How to draw a workload: lengths uniform in [min, max], both ends included."""

    num_requests: int = 64
    prompt_len: tuple[int, int] = (32, 512)
    output_len: tuple[int, int] = (16, 256)
    seed: int = 0
    vocab_size: int = BENCH_MODEL["vocab_size"]

    def __post_init__(self):
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be at least 1, got {self.num_requests}")
        for name, (lo, hi) in (("prompt_len", self.prompt_len), ("output_len", self.output_len)):
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} must be a range 1 <= min <= max, got {lo}..{hi}")
        if self.vocab_size <= FIRST_PROMPT_ID:
            raise ValueError(f"vocab_size must exceed {FIRST_PROMPT_ID}, got {self.vocab_size}")

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "WorkloadSpec":
        return cls(**{**data, "prompt_len": tuple(data["prompt_len"]), "output_len": tuple(data["output_len"])})


# The mixed workload of the engine benchmarks: 64 requests, prompts 32-512, outputs 16-256.
MIXED = WorkloadSpec()


@dataclass(frozen=True)
class Workload:
    spec: WorkloadSpec
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.output_lens)

    @property
    def max_total_len(self) -> int:
        return max(len(p) + n for p, n in zip(self.prompts, self.output_lens))


def make_workload(spec: WorkloadSpec) -> Workload:
    rng = random.Random(spec.seed)
    prompt_lens = [rng.randint(*spec.prompt_len) for _ in range(spec.num_requests)]
    output_lens = [rng.randint(*spec.output_len) for _ in range(spec.num_requests)]
    prompts = [[rng.randrange(FIRST_PROMPT_ID, spec.vocab_size) for _ in range(n)] for n in prompt_lens]
    return Workload(spec, prompts, output_lens)


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Seconds after the start at which each request is sent: all at 0 for an infinite
    rate, else a Poisson process (exponential gaps) of `request_rate` requests/s."""
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, got {request_rate}")
    rng = random.Random(seed + 1)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(request_rate)
    return offsets


def save_bench_model(path: Path, dtype: str = "float32", **overrides) -> LlamaForCausalLM:
    """The benchmark Llama (fixed seed, random weights), saved as a Hugging Face checkpoint
    in `dtype` (a torch dtype's name)."""
    import torch

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**BENCH_MODEL, **overrides})).to(getattr(torch, dtype)).eval()
    model.save_pretrained(path)
    return model


def length_range(text: str) -> tuple[int, int]:
    """'32:512' -> (32, 512); '64' -> (64, 64)."""
    try:
        lo, _, hi = text.partition(":")
        return int(lo), int(hi or lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX or N, got {text!r}") from None
