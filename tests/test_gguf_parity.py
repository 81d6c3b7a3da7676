"""The real model, SmolLM2-135M-Instruct from its Q4_1 GGUF file: sharded logits equal
transformers loading the same file (float32), and each rank reads only its share of it."""

from fractions import Fraction

import pytest
import torch

from actors.gguf_file import GGUFFile
from actors.sharding import layer_partition, stage_layers
from tests.mp_harness import run_layout
from tests.tiny_models import max_rel_error, worker_spec

# (tp, pp, tensor_split): 9 heads and 3 KV heads split three ways, or unevenly (5 | 4 at
# tp=2, 3 | 2 | 2 | 2 at tp=4, 6 | 3 weighted), 30 layers over two stages
LAYOUTS = [(1, 1, None), (3, 1, None), (1, 2, None), (3, 2, None),
           (2, 1, None), (4, 1, None), (2, 2, None), (2, 1, (2, 1))]
TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


@pytest.fixture(scope="module")
def prompts(smollm2_tokenizer) -> list[list[int]]:
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    text = smollm2_tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return [smollm2_tokenizer.encode(t) for t in [*TEXTS, text]]


@pytest.fixture(scope="module")
def reference_logits(smollm2_reference, prompts) -> list[torch.Tensor]:
    with torch.no_grad():
        return [smollm2_reference(torch.tensor([p])).logits[0] for p in prompts]


@pytest.fixture(scope="module")
def layouts(smollm2_gguf, prompts):
    """Each layout run once, as separate processes: (logits, per-rank reports)."""
    runs = {}

    def run(tp: int, pp: int, tensor_split: tuple[float, ...] | None = None):
        if (tp, pp, tensor_split) not in runs:
            spec = worker_spec(smollm2_gguf, tp, pp, max_model_len=256, tensor_split=tensor_split)
            runs[tp, pp, tensor_split] = run_layout(spec, prompts, timeout_s=300)
        return runs[tp, pp, tensor_split]

    return run


@pytest.mark.parametrize("tp,pp,tensor_split", LAYOUTS, ids=lambda v: str(v))
def test_logits_equal_transformers_on_the_same_file(layouts, reference_logits, tp, pp, tensor_split):
    got, reports = layouts(tp, pp, tensor_split)
    err = max_rel_error(got, reference_logits)
    seconds = ", ".join(f"{r['seconds']:.1f}" for r in reports.values())
    print(f"\nSmolLM2 Q4_1 tp={tp} pp={pp} tensor_split={tensor_split}: max relative error {err:.2e}; "
          f"load seconds per rank {seconds}")
    assert err < 1e-4
    for g, w in zip(got, reference_logits):
        assert torch.equal(g.argmax(-1), w.argmax(-1))


@pytest.mark.parametrize("tp,pp", [(3, 1), (3, 2)], ids=lambda v: str(v))
def test_each_rank_reads_its_share_of_the_file(layouts, smollm2_gguf, tp, pp):
    """A rank reads 1/tp of every matrix its stage holds (whole quant blocks: the splits fall
    on block boundaries here) and all of its stage's norms, nothing else: exactly."""
    _, reports = layouts(tp, pp)
    f = GGUFFile(smollm2_gguf)
    info = f._tensors
    file_bytes = sum(t.n_bytes for t in info.values())
    partition = layer_partition(30, pp, None)
    for (stage, tp_rank), rep in sorted(reports.items()):
        layers = stage_layers(partition, stage)
        names = [n for n in f.names if n.startswith("blk.") and int(n.split(".")[1]) in layers]
        if stage == 0:
            names.append("token_embd.weight")
        if stage == pp - 1:  # the tied head reads the embedding's vocab rows again on a later stage
            names += ["output_norm.weight"] + (["token_embd.weight"] if pp > 1 else [])
        share = sum(info[n].n_bytes // tp if len(info[n].shape) == 2 else info[n].n_bytes for n in names)
        largest_matrix = max(info[n].n_bytes for n in names)
        print(f"stage {stage} rank {tp_rank}: read {rep['bytes_read'] / 2**20:.2f} MiB of the file's "
              f"{file_bytes / 2**20:.2f} MiB of tensors ({rep['bytes_read'] / file_bytes:.1%}) in {rep['seconds']:.1f}s")
        assert rep["bytes_read"] == share
        assert rep["largest_read"] <= largest_matrix / tp  # never a whole matrix
    total = sum(rep["bytes_read"] for rep in reports.values())
    norms = sum(t.n_bytes for t in info.values() if len(t.shape) == 1)
    # all ranks together: every matrix once, every norm once per TP rank, and the tied
    # embedding a second time when the head sits on another stage
    assert total == file_bytes + (tp - 1) * norms + (info["token_embd.weight"].n_bytes if pp > 1 else 0)


def test_uneven_tp2_ranks_read_their_heads_and_columns(layouts, smollm2_gguf):
    """tp=2: rank 0 holds query heads 0-4 and KV heads 0-1, rank 1 query heads 5-8 and KV
    heads 1-2 (KV head 1 is read by both); MLP and vocabulary split in halves. Every split
    falls on whole quant blocks (head_dim 64 = 2 blocks of 32, 768 of 1536 columns), so a
    rank reads exactly these fractions of each tensor's bytes."""
    _, reports = layouts(2, 1)
    info = GGUFFile(smollm2_gguf)._tensors
    third, ninth, half = Fraction(1, 3), Fraction(1, 9), Fraction(1, 2)  # of rows, or of columns (o, down)
    share = {"attn_q": (5 * ninth, 4 * ninth), "attn_output": (5 * ninth, 4 * ninth),
             "attn_k": (2 * third, 2 * third), "attn_v": (2 * third, 2 * third),
             "ffn_gate": (half, half), "ffn_up": (half, half), "ffn_down": (half, half), "token_embd": (half, half)}
    for (_, tp_rank), rep in sorted(reports.items()):
        want = 0
        for name, t in info.items():
            part = t.n_bytes * (share[name.split(".")[-2]][tp_rank] if len(t.shape) == 2 else 1)  # norms: all
            assert part.denominator == 1, name  # whole quant blocks
            want += int(part)
        print(f"rank {tp_rank}: read {rep['bytes_read'] / 2**20:.2f} MiB")
        assert rep["bytes_read"] == want
