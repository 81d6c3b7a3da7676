"""The default model: a tiny Llama that tensorfleet trains itself, offline, on first start.

`make serve` with no argument must work on a fresh machine with no internet, so the default
model is never downloaded: it is built from text every Python install ships, the standard
library's own sources (`os.path.dirname(os.__file__)`). A byte-level BPE tokenizer is
trained on them, then a ~5M-parameter `LlamaForCausalLM` for a fixed wall-clock budget on
CPU. The result writes Python-looking code: enough for a demo, nothing more.

Its shapes shard at tensor_parallel_size 2 and pipeline_parallel_size 2 (4 heads, 2 KV
heads, 4 layers, intermediate 688 = 4 * 172), so the parallel paths can serve it too.

    python -m deploy.default_model [--out DIR] [--seconds S]
"""

import argparse
import ast
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
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_HELD_OUT_EVERY = 20  # every 20th file is held out to measure the loss on
# No trailing space: byte-level BPE attaches a space to the word after it, so a prompt that
# ends in one ("def ") starts from a token the model has rarely seen.
SAMPLE_PROMPT = "def"


@dataclass(frozen=True)
class BuildSpec:
    """What to build; the defaults finish in under two minutes on a busy 2-core CPU.

    Batches are small on purpose: with about a minute of CPU, many noisy updates teach the
    model more than a few precise ones. One thread by default: a second helps only on an idle
    machine, while on a busy one OpenMP threads that wait at every barrier for a descheduled
    sibling made each step ~20x slower (measured on 2 cores shared with a test run).
    """

    train_seconds: float = 75.0
    corpus_chars: int = 3_000_000  # ~850k tokens: all of them feed the bigram start
    vocab_size: int = 4096
    seq_len: int = 64
    batch_size: int = 4
    lr: float = 2e-3
    seed: int = 0
    threads: int = 1


@dataclass(frozen=True)
class BuildResult:
    path: Path
    steps: int
    # Held-out loss of the random model, after the bigram start, and after training.
    initial_loss: float
    bigram_loss: float
    final_loss: float
    seconds: float
    sample: str  # greedy continuation of SAMPLE_PROMPT


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
    threads = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        docs = stdlib_corpus(spec.corpus_chars, spec.seed)
        tokenizer = train_tokenizer(docs, spec.vocab_size)
        log(f"tokenizer: {len(tokenizer)} tokens from {len(docs)} stdlib files ({time.monotonic() - start:.1f} s)")
        # Each file is framed <|bos|> code <|eos|> (the post-processor adds the bos); the
        # files are concatenated into two streams that windows are cut from.
        encoded = tokenizer.backend_tokenizer.encode_batch(docs)
        train_list: list[int] = []
        held_list: list[int] = []
        for i, enc in enumerate(encoded):
            (held_list if i % _HELD_OUT_EVERY == 0 else train_list).extend([*enc.ids, tokenizer.eos_token_id])
        train_ids, held_ids = torch.tensor(train_list), torch.tensor(held_list)
        gen = torch.Generator().manual_seed(spec.seed)
        held_out = windows(held_ids, 32, spec.seq_len, gen)

        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(llama_config(tokenizer))
        initial = eval_loss(model, held_out)
        bigram_init(model, train_ids)
        bigram = eval_loss(model, held_out)
        log(f"held-out loss {initial:.3f} at random init, {bigram:.3f} from bigram counts")
        steps = train(model, train_ids, spec, gen, log)
        final = eval_loss(model, held_out)
        sample = greedy(model, tokenizer, SAMPLE_PROMPT)
    finally:
        torch.set_num_threads(threads)
    log(f"final held-out loss {final:.3f} after {steps} steps; greedy sample:\n{sample}")

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
        result = BuildResult(out, steps, initial, bigram, final, time.monotonic() - start, sample)
        (tmp / "README.md").write_text(_readme(result, spec))
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


def stdlib_corpus(max_chars: int, seed: int) -> list[str]:
    """The standard library's code, without comments and docstrings, up to max_chars.

    Files come in a seeded shuffle of the sorted list. `ast.unparse` also rewrites each file
    in one canonical layout and quoting style: such code is far easier to learn in a minute
    than English prose and eight styles of formatting, and code is what the demo should write.
    """
    root = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in root.rglob("*.py") if not _SKIPPED_DIRS & set(p.relative_to(root).parts))
    random.Random(seed).shuffle(files)
    docs: list[str] = []
    size = 0
    for f in files:
        if size >= max_chars:
            break
        try:
            code = _code_only(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError, RecursionError):
            continue  # unreadable, or syntax this interpreter does not parse
        docs.append(code[: max_chars - size])
        size += len(docs[-1])
    if len(docs) < 2:
        raise RuntimeError(f"too few parseable .py files under {root} to train the default model on")
    return docs


def _code_only(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED) and ast.get_docstring(node, clean=False) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)  # comments are not in the tree, so they are gone too


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


@torch.no_grad()
def bigram_init(model: LlamaForCausalLM, ids: torch.Tensor, smoothing: float = 0.05) -> None:
    """Start embed_tokens and lm_head as a bigram model of `ids`, counted in a second.

    Gradient descent spends most of a one-minute budget climbing from unigram to bigram
    statistics; counting them is instant. The smoothed log P(next | token) matrix, rows
    centered (softmax ignores shifts), is factored to rank hidden_size: L ~ U S V^T. Token
    rows of the embedding get U sqrt(S) scaled to unit RMS (the final RMSNorm would rescale
    them anyway) and lm_head gets V sqrt(S) times the median row RMS, so while the layers
    add little, logits ~ bigram log-probabilities at a per-token temperature.
    """
    vocab, hidden = model.lm_head.weight.shape
    counts = torch.bincount(ids[:-1] * vocab + ids[1:], minlength=vocab * vocab).view(vocab, vocab)
    logp = (counts + smoothing).float().log()
    logp -= logp.mean(dim=1, keepdim=True)
    u, s, v = torch.svd_lowrank(logp, q=hidden, niter=2)
    emb = u * s.sqrt()
    rms = emb.pow(2).mean(dim=1, keepdim=True).sqrt()
    model.model.embed_tokens.weight.copy_(emb / rms)
    model.lm_head.weight.copy_(v * s.sqrt() * rms.median())


def train(model: LlamaForCausalLM, ids: torch.Tensor, spec: BuildSpec, gen: torch.Generator, log: Log) -> int:
    """AdamW on random windows of `ids` for `spec.train_seconds` of wall clock; returns the steps.

    The budget is time, not steps, so the schedule is too: linear warmup over the first 5%
    of the budget, then cosine decay to 10% of the peak rate at the deadline.
    """
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=0.1)
    start = last_log = time.monotonic()
    steps = 0
    while (frac := (time.monotonic() - start) / spec.train_seconds) < 1:
        warmup = min(1.0, frac / 0.05)
        for group in opt.param_groups:
            group["lr"] = spec.lr * warmup * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        batch = windows(ids, spec.batch_size, spec.seq_len, gen)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
        if (now := time.monotonic()) - last_log >= 5:
            log(f"step {steps:5d}  loss {loss.item():.3f}  {now - start:5.1f} s")
            last_log = now
    return steps


def windows(ids: torch.Tensor, n: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    if len(ids) <= seq_len:
        raise ValueError(f"a stream of {len(ids)} tokens is too short for seq_len={seq_len}; raise corpus_chars")
    starts = torch.randint(0, len(ids) - seq_len + 1, (n,), generator=gen)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def eval_loss(model: LlamaForCausalLM, batch: torch.Tensor) -> float:
    model.eval()
    return model(input_ids=batch, labels=batch).loss.item()


@torch.no_grad()
def greedy(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompt: str, tokens: int = 48) -> str:
    model.eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0], skip_special_tokens=True)


def _readme(result: BuildResult, spec: BuildSpec) -> str:
    return f"""# tensorfleet-tiny-py

A tiny Llama (~5M parameters, float32) that tensorfleet trained on this machine, on the
Python standard library's own code (comments and docstrings stripped), so `make serve` works
offline with no download. It writes Python-looking code; it is for demos and tests only.

- tokenizer: byte-level BPE, {spec.vocab_size} tokens, chat roles {", ".join(ROLES)}
- model: 4 layers, hidden 256, 4 attention heads, 2 KV heads, intermediate 688
- training: embeddings started from bigram counts, then {result.steps} AdamW steps of
  {spec.batch_size} x {spec.seq_len} tokens in {spec.train_seconds:.0f} s
- held-out loss: {result.initial_loss:.2f} at random init, {result.bigram_loss:.2f} from bigram counts, \
{result.final_loss:.2f} after training

Greedy continuation of `{SAMPLE_PROMPT}`:

```python
{result.sample}
```

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
