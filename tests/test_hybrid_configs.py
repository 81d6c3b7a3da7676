"""The example configs under deploy/configs/ for real model shapes: each passes
`tensorfleet plan` on the hardware its header names (the `# check:` line, run here as
written), and the planner's memory per GPU is within 5% of a count made by hand below."""

import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from deploy.cli.main import main
from tests.test_plan import table_rows

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "deploy" / "configs"
GiB = 2**30
BF16 = 2
FP32 = 4


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

    def weights(self) -> int:
        """The heaviest GPU: a stage's layers split tp ways, plus one vocab matrix (the
        embedding on the first stage, the LM head on the last; both when pp == 1)."""
        m = self.model
        stage_layers = m.layers // self.pp
        vocab_matrices = 2 if self.pp == 1 else 1
        return (stage_layers * m.layer_params + vocab_matrices * m.embedding) // self.tp * BF16

    def activations(self) -> int:
        """One step's reserve on the last stage: residual, normed input and an output
        (3 x hidden), the rank's q/k/v, gate/up/act (3 x inter / tp) per batched token in
        bf16; per sequence float32 logits (the rank's vocab shard, the gathered row, a
        sampling workspace)."""
        m = self.model
        qkv = (m.heads + 2 * m.kv_heads) * m.head_dim // self.tp
        per_token = (3 * m.hidden + qkv + 3 * m.inter // self.tp) * BF16
        per_seq = (m.vocab // self.tp + 2 * m.vocab) * FP32
        return self.max_num_batched_tokens * per_token + self.max_num_seqs * per_seq

    def kv_bytes_per_token(self) -> int:
        """K and V of the stage's layers for the rank's KV heads (at least one)."""
        m = self.model
        kv_heads = max(1, m.kv_heads // self.tp)
        return 2 * (m.layers // self.pp) * kv_heads * m.head_dim * BF16


EXAMPLES = {
    "llama-3-8b-tp1-24gb.yaml": Example(LLAMA_3_8B, 1, 1, 1, 24 * 10**9, 4096, 32),
    "llama-3-8b-tp2-24gb.yaml": Example(LLAMA_3_8B, 2, 1, 1, 24 * 10**9, 8192, 128),
    "llama-3-70b-tp4-80gb.yaml": Example(LLAMA_3_70B, 4, 1, 1, 80 * GiB, 8192, 128),
    "llama-3-70b-tp8-80gb.yaml": Example(LLAMA_3_70B, 8, 1, 1, 80 * GiB, 8192, 256),
    "llama-3-70b-tp4-pp2-24gb.yaml": Example(LLAMA_3_70B, 4, 2, 2, 24 * 10**9, 2048, 32),
    "llama-3.1-405b-tp8-pp2.yaml": Example(LLAMA_31_405B, 8, 2, 2, 80 * GiB, 4096, 64),
}


def test_hand_counts_match_the_published_sizes():
    """The per-model counts above add up to the models' known parameter totals."""
    def total(m: Llama) -> int:
        return m.layers * m.layer_params + 2 * m.embedding

    assert round(total(LLAMA_3_8B) / 1e9, 2) == 8.03
    assert round(total(LLAMA_3_70B) / 1e9, 1) == 70.6
    assert round(total(LLAMA_31_405B) / 1e9, 1) == 405.8


def test_every_example_config_is_checked():
    shipped = {p.name for p in CONFIGS.glob("*.yaml")} - {"default.yaml"}
    assert shipped == set(EXAMPLES)


def check_line(path: Path) -> list[str]:
    """The `# check: tensorfleet plan ...` line of the header, as argv for deploy.cli.main."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("# check: ")]
    assert len(lines) == 1, f"{path.name} needs one '# check: tensorfleet plan ...' line"
    argv = shlex.split(lines[0].removeprefix("# check: "))
    assert argv[:2] == ["tensorfleet", "plan"] and argv[2] == f"deploy/configs/{path.name}"
    return ["plan", str(REPO / argv[2]), *argv[3:]]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_config_plans_on_its_hardware(name, capsys):
    ex = EXAMPLES[name]
    argv = check_line(CONFIGS / name)
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert f"= {ex.tp * ex.pp} GPUs on {ex.nodes} node(s)" in out
    rows = table_rows(out)
    assert len(rows) == ex.tp * ex.pp

    budget = 0.9 * ex.gpu_memory  # gpu_memory_utilization 0.9
    kv_tokens = int(next(line for line in out.splitlines() if line.startswith("KV cache:"))
                    .split(" = ")[1].split()[0])
    assert kv_tokens >= 8192, "room for at least one full-length sequence"
    hand_weights, hand_act = ex.weights(), ex.activations()
    hand_kv = kv_tokens * ex.kv_bytes_per_token()
    heaviest = max(rows, key=lambda r: float(r["total"]))
    for key, hand in (("weights", hand_weights), ("total", hand_weights + hand_act + hand_kv)):
        planned = float(heaviest[key]) * GiB
        assert abs(planned - hand) <= 0.05 * hand, (
            f"{name}: {key} {planned / GiB:.2f} GiB planned vs {hand / GiB:.2f} GiB by hand")
    assert all(float(r["total"]) * GiB <= budget + 0.01 * GiB for r in rows)
    assert hand_weights + hand_act + hand_kv <= 1.01 * budget
