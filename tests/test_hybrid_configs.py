"""The example configs under deploy/configs/ for real model shapes: each passes
`tensorfleet plan` on the hardware its header names (the `# check:` line, run here as
written), and the planner's memory per GPU matches a count made by hand below: weights
exactly, the activation reserve within 1%, the KV cache within one block."""

import math
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

import deploy.cli.plan
from cluster.plan import Plan
from cluster.plan_report import format_plan
from deploy.cli.main import main
from tests.test_plan import table_rows

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
GiB = 2**30
BF16 = 2
FP32 = 4
BLOCK = 16  # engine.block_size, the default in every example


@dataclass(frozen=True)
class Llama:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int = 128256
    head_dim: int = 128

    @property
    def layer_params(self) -> int:
        """q and o (hidden x hidden), k and v (kv_heads * 128 x hidden), gate/up/down."""
        kv = self.kv_heads * self.head_dim
        return 2 * self.hidden**2 + 2 * kv * self.hidden + 3 * self.hidden * self.inter

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden


LLAMA_3_8B = Llama(hidden=4096, inter=14336, layers=32, heads=32, kv_heads=8)
LLAMA_3_70B = Llama(hidden=8192, inter=28672, layers=80, heads=64, kv_heads=8)
LLAMA_31_405B = Llama(hidden=16384, inter=53248, layers=126, heads=128, kv_heads=8)


@dataclass(frozen=True)
class Example:
    """A shipped config and what it should come to, counted by hand."""

    model: Llama
    tp: int
    pp: int
    nodes: int
    gpu_memory: int  # bytes per GPU named in the header
    max_num_batched_tokens: int
    max_num_seqs: int
    max_model_len: int

    @property
    def vocab_rows(self) -> int:
        """The vocabulary padded to a multiple of 64 x tp rows, so each rank holds an equal slice."""
        multiple = 64 * self.tp
        return math.ceil(self.model.vocab / multiple) * multiple

    def is_last(self, stage: int) -> bool:
        return stage == self.pp - 1

    def weights(self, stage: int) -> int:
        """One GPU of `stage`: its layers split tp ways plus both RMSNorms of each layer (every
        rank holds them whole); the embedding's slice on the first stage; the LM head's slice
        and the final norm on the last (Llama-3 does not tie them)."""
        m = self.model
        per_layer = m.layer_params // self.tp + 2 * m.hidden
        vocab_slice = self.vocab_rows // self.tp * m.hidden
        params = m.layers // self.pp * per_layer
        params += vocab_slice if stage == 0 else 0
        params += vocab_slice + m.hidden if self.is_last(stage) else 0
        return params * BF16

    def activations(self, stage: int) -> int:
        """One step's reserve: residual, normed input and an output (3 x hidden), the rank's
        q/k/v, gate/up/act (3 x inter / tp) per batched token in bf16; on the last stage,
        per sequence float32 logits (the rank's vocab slice, the gathered row, a sampling
        workspace)."""
        m = self.model
        qkv = (m.heads + 2 * m.kv_heads) * m.head_dim // self.tp
        per_token = (3 * m.hidden + qkv + 3 * m.inter // self.tp) * BF16
        per_seq = (self.vocab_rows // self.tp + 2 * self.vocab_rows) * FP32
        return self.max_num_batched_tokens * per_token + (self.max_num_seqs * per_seq if self.is_last(stage) else 0)

    def kv_block_bytes(self) -> int:
        """K and V of a stage's layers for the rank's KV heads, block_size tokens."""
        m = self.model
        return 2 * (m.layers // self.pp) * (m.kv_heads // self.tp) * m.head_dim * BLOCK * BF16

    def kv_blocks(self) -> int:
        """What is left of gpu_memory_utilization (0.9) on the tightest GPU, in whole blocks;
        at most what max_num_seqs sequences of max_model_len can use."""
        budget = int(0.9 * self.gpu_memory)
        room = min((budget - self.weights(s) - self.activations(s)) // self.kv_block_bytes() for s in range(self.pp))
        return min(room, self.max_num_seqs * math.ceil(self.max_model_len / BLOCK))


EXAMPLES = {
    "llama-3-8b-tp1-24gb.yaml": Example(LLAMA_3_8B, 1, 1, 1, 24 * 10**9, 4096, 32, 8192),
    "llama-3-8b-tp2-24gb.yaml": Example(LLAMA_3_8B, 2, 1, 1, 24 * 10**9, 8192, 128, 8192),
    "llama-3-70b-tp4-80gb.yaml": Example(LLAMA_3_70B, 4, 1, 1, 80 * GiB, 8192, 128, 8192),
    "llama-3-70b-tp8-80gb.yaml": Example(LLAMA_3_70B, 8, 1, 1, 80 * GiB, 8192, 256, 8192),
    "llama-3-70b-tp4-pp2-24gb.yaml": Example(LLAMA_3_70B, 4, 2, 2, 24 * 10**9, 2048, 32, 8192),
    "llama-3.1-405b-tp8-pp2.yaml": Example(LLAMA_31_405B, 8, 2, 2, 80 * GiB, 4096, 64, 32768),
}


def test_hand_counts_match_the_published_sizes():
    """The per-model counts above add up to the models' known parameter totals."""
    def total(m: Llama) -> int:
        return m.layers * m.layer_params + 2 * m.embedding

    assert round(total(LLAMA_3_8B) / 1e9, 2) == 8.03
    assert round(total(LLAMA_3_70B) / 1e9, 1) == 70.6
    assert round(total(LLAMA_31_405B) / 1e9, 1) == 405.8


def test_every_example_config_is_checked():
    # default.yaml and the two-replica demo serve the default model on a simulated cluster
    # (tests/test_default_model.py, tests/test_replicas.py); the rest are hardware layouts
    shipped = {p.name for p in CONFIGS.glob("*.yaml")} - {"default.yaml", "smollm2-2-replicas.yaml"}
    assert shipped == set(EXAMPLES)


def check_line(path: Path) -> list[str]:
    """The `# check: tensorfleet plan ...` line of the header, as argv for deploy.cli.main."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("# check: ")]
    assert len(lines) == 1, f"{path.name} needs one '# check: tensorfleet plan ...' line"
    argv = shlex.split(lines[0].removeprefix("# check: "))
    assert argv[:2] == ["tensorfleet", "plan"] and argv[2] == f"deploy/configs/{path.name}"
    return ["plan", str(REPO / argv[2]), *argv[3:]]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_plans_on_its_hardware(name, capsys, monkeypatch):
    ex = EXAMPLES[name]
    argv = check_line(CONFIGS / name)
    printed: list[Plan] = []  # the plan behind the table, whose GiB are rounded to 0.01

    def format_and_keep(plan: Plan) -> str:
        printed.append(plan)
        return format_plan(plan)

    monkeypatch.setattr(deploy.cli.plan, "format_plan", format_and_keep)
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"= {ex.tp * ex.pp} GPUs on {ex.nodes} node(s)" in out
    rows = table_rows(out)
    assert len(rows) == ex.tp * ex.pp
    kv_tokens = int(next(line for line in out.splitlines() if line.startswith("KV cache:"))
                    .split(" = ")[1].split()[0])
    assert kv_tokens >= ex.max_model_len, "room for at least one full-length sequence"
    for row in rows:
        stage = int(row["stage"])
        assert row["weights"] == f"{ex.weights(stage) / GiB:.2f}", f"{name}: stage {stage}"

    [plan] = printed
    assert plan.kv_tokens == kv_tokens
    for rank in plan.ranks:
        hand = ex.activations(rank.stage)
        assert rank.weight_bytes == ex.weights(rank.stage)
        assert abs(rank.activation_bytes - hand) <= 0.01 * hand, (
            f"{name}: stage {rank.stage} reserves {rank.activation_bytes / GiB:.3f} GiB of activations, "
            f"{hand / GiB:.3f} GiB by hand")
        assert rank.kv_block_bytes == ex.kv_block_bytes()
    blocks = ex.kv_blocks()
    assert blocks < ex.max_num_seqs * math.ceil(ex.max_model_len / BLOCK), "memory, not max_num_seqs, bounds the cache"
    assert abs(plan.num_kv_blocks - blocks) <= 1, f"{name}: {plan.num_kv_blocks} KV blocks planned, {blocks} by hand"
    budget = 0.9 * ex.gpu_memory
    assert all(r.total_bytes <= budget for r in plan.ranks)
