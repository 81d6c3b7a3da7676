"""The default model: a tiny Llama that tensorfleet trains itself, offline, on first start.

`make serve` with no argument must work on a fresh machine with no internet, so the default
model is never downloaded: it is built from text every Python install ships, the standard
library's own sources (`os.path.dirname(os.__file__)`). A byte-level BPE tokenizer is
trained on them, then a ~5M-parameter `LlamaForCausalLM` for a fixed wall-clock budget on
CPU. The result writes Python-looking text: enough for a demo, nothing more.

Its shapes shard at tensor_parallel_size 2 and pipeline_parallel_size 2 (4 heads, 2 KV
heads, 4 layers, intermediate 688 = 4 * 172), so the parallel paths can serve it too.

    python -m deploy.default_model [--out DIR] [--seconds S]
"""

import argparse
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

Log = Callable[[str], None]

ENV_VAR = "TENSORFLEET_MODEL_DIR"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "models" / "tensorfleet-tiny-py"

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLES = ("system", "user", "assistant")
SPECIAL_TOKENS = [BOS, EOS, PAD, *(f"<|{role}|>" for role in ROLES)]
# Each turn is `<|role|>\ncontent<|eos|>\n`; the prompt ends on an open assistant turn, so
# generation stops at the model's own <|eos|>.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# Test suites and third-party packages are not "the standard library" a demo should echo, and
# codec tables (encodings/) and pydoc's help text (pydoc_data/) are data, not code: a model
# this small, trained this briefly, learns to recite whatever repeats most.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "encodings", "pydoc_data"}


@dataclass(frozen=True)
class BuildSpec:
    """What to build; the defaults finish in under two minutes on a 2-core CPU."""

    train_seconds: float = 75.0
    corpus_bytes: int = 4_000_000  # ~1.1M tokens; 75 s of training reads ~300k of them
    vocab_size: int = 4096
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0


@dataclass(frozen=True)
class BuildResult:
    path: Path
    steps: int
    initial_loss: float  # held-out loss before the first step
    final_loss: float  # held-out loss after the last one
    seconds: float
    sample: str  # greedy continuation of "def "


def default_model_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def ensure_default_model(path: Path | None = None, log: Log = print, spec: BuildSpec | None = None) -> Path:
    """Return the model directory, building the default model there if it holds none.

    `path` defaults to $TENSORFLEET_MODEL_DIR, else `<repo>/models/tensorfleet-tiny-py`. A
    directory that already has a `config.json` is returned untouched, so the override can
    point at any Hugging Face model directory.
    """
    path = Path(path) if path is not None else default_model_dir()
    if (path / "config.json").is_file():
        return path
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(
            f"{path} exists but holds no model (no config.json); remove it, or set {ENV_VAR} "
            "to another directory"
        )
    spec = spec or BuildSpec()
    log(f"building the default model in {path} (first start only, ~{spec.train_seconds:.0f} s of training)")
    return build_model(path, spec, log).path


def build_model(out: Path, spec: BuildSpec = BuildSpec(), log: Log = print) -> BuildResult:
    """Train tokenizer and model, save them to a temp dir, then rename it to `out`.

    The rename is atomic, so a reader never sees a half-built model; if another process
    finished `out` first, its model wins and ours is discarded.
    """
    start = time.monotonic()
    docs = stdlib_corpus(spec.corpus_bytes, spec.seed)
    tokenizer = train_tokenizer(docs, spec.vocab_size)
    log(f"tokenizer: {len(tokenizer)} tokens from {len(docs)} stdlib files ({time.monotonic() - start:.1f} s)")
    # Documents are framed <|bos|> text <|eos|> (the post-processor adds the bos) and
    # concatenated into one stream that training windows are cut from.
    encoded = tokenizer.backend_tokenizer.encode_batch(docs)
    stream = torch.tensor([t for e in encoded for t in [*e.ids, tokenizer.eos_token_id]])
    model = LlamaForCausalLM(llama_config(tokenizer))
    steps, initial, final = train(model, stream, spec, log)
    sample = greedy(model, tokenizer, "def ")
    log(f"final loss {final:.3f} (from {initial:.3f}) after {steps} steps; sample:\n{sample}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        model.generation_config = GenerationConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        model.save_pretrained(tmp)  # model.safetensors, float32
        tokenizer.save_pretrained(tmp)
        result = BuildResult(out, steps, initial, final, time.monotonic() - start, sample)
        (tmp / "README.md").write_text(_readme(result, spec, model))
        tmp.chmod(0o755)  # mkdtemp makes it private; the model is not a secret
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():
                raise
            log(f"{out} was built by another process meanwhile; keeping that one")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"default model ready in {out} ({result.seconds:.1f} s)")
    return result


def stdlib_corpus(max_bytes: int, seed: int) -> list[str]:
    """Standard-library sources, in a seeded shuffle of the sorted file list, up to max_bytes."""
    root = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in root.rglob("*.py") if not _SKIPPED_DIRS & set(p.relative_to(root).parts))
    random.Random(seed).shuffle(files)
    docs: list[str] = []
    size = 0
    for f in files:
        if size >= max_bytes:
            break
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        docs.append(text[: max_bytes - size])
        size += len(docs[-1])
    if not docs:
        raise RuntimeError(f"no readable .py files under {root} to train the default model on")
    return docs


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (no unknown tokens: any string round-trips) with bos/eos and chat markers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )


def llama_config(tokenizer: PreTrainedTokenizerFast) -> LlamaConfig:
    # hidden 256 = 4 heads * 64; TP 2 splits 4 query heads and 2 KV heads evenly, PP 2
    # gives each stage 2 layers, intermediate 688 splits by 2 and by 4.
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def train(model: LlamaForCausalLM, stream: torch.Tensor, spec: BuildSpec, log: Log) -> tuple[int, float, float]:
    """AdamW on random windows for `spec.train_seconds` of wall clock; returns (steps, initial, final).

    The budget is time, not steps, so the schedule is too: linear warmup over the first 5%
    of the budget, then cosine decay to 10% of the peak rate at the deadline. The losses
    are measured on a fixed batch from the held-out last 5% of the stream.
    """
    split = int(len(stream) * 0.95)
    if split - spec.seq_len < 1 or len(stream) - split - spec.seq_len < 1:
        raise ValueError(f"corpus of {len(stream)} tokens is too small for seq_len={spec.seq_len}")
    gen = torch.Generator().manual_seed(spec.seed)
    torch.manual_seed(spec.seed)

    def windows(lo: int, hi: int, n: int) -> torch.Tensor:
        starts = torch.randint(lo, hi - spec.seq_len + 1, (n,), generator=gen)
        return torch.stack([stream[s : s + spec.seq_len] for s in starts.tolist()])

    held_out = windows(split, len(stream), spec.batch_size)

    @torch.no_grad()
    def eval_loss() -> float:
        model.eval()
        loss = model(input_ids=held_out, labels=held_out).loss.item()
        model.train()
        return loss

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        initial = eval_loss()
        opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
        start = last_log = time.monotonic()
        steps = 0
        while (frac := (time.monotonic() - start) / spec.train_seconds) < 1:
            warmup = min(1.0, frac / 0.05)
            for group in opt.param_groups:
                group["lr"] = spec.lr * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
            batch = windows(0, split, spec.batch_size)
            loss = model(input_ids=batch, labels=batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            if (now := time.monotonic()) - last_log >= 5:
                log(f"step {steps:4d}  loss {loss.item():.3f}  {now - start:5.1f} s")
                last_log = now
        return steps, initial, eval_loss()
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def greedy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, tokens: int = 48) -> str:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _readme(result: BuildResult, spec: BuildSpec, model: LlamaForCausalLM) -> str:
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return f"""# tensorfleet-tiny-py

A tiny Llama ({params:.1f}M parameters, float32) trained by tensorfleet on this machine, on
the Python standard library's own sources, so `make serve` works offline with no download.
It writes Python-looking text and is meant for demos and tests, not for answers.

- tokenizer: byte-level BPE, {spec.vocab_size} tokens, trained on {spec.corpus_bytes:,} bytes of stdlib `.py` files
- model: 4 layers, hidden 256, 4 attention heads, 2 KV heads, intermediate 688
- training: {result.steps} steps of {spec.batch_size} x {spec.seq_len} tokens in {spec.train_seconds:.0f} s;
  held-out loss {result.initial_loss:.3f} -> {result.final_loss:.3f}

Rebuild with `python -m deploy.default_model --out DIR [--seconds S]`.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None, help=f"model directory (default: ${ENV_VAR} or {DEFAULT_DIR})")
    parser.add_argument("--seconds", type=float, default=BuildSpec.train_seconds, help="training budget")
    args = parser.parse_args(argv)
    print(ensure_default_model(args.out, spec=BuildSpec(train_seconds=args.seconds)))


if __name__ == "__main__":
    main()
