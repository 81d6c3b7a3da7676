"""What structured outputs cost: the grammar library alone, and the engine's decode step
with and without constrained sequences in the batch.

    python -m deploy.bench.grammar --model MODEL        # a Hugging Face folder or a GGUF file
    python -m deploy.bench.grammar --model MODEL --library-only

1. Library: for the model's tokenizer, compile a JSON schema (a person record: strings,
   an integer, an enum, an array, a nested object with a pattern) and walk a matching
   document token by token, computing the mask of allowed tokens before each; compile
   time and mask time per token (median over rounds). llguidance is what tensorfleet uses;
   xgrammar is measured beside it when it is installed (the comparison behind the choice).
2. Engine: the model in this process (tp=1, no Ray), a batch of --batch decoding
   sequences, of which 0, a quarter or all are held to a JSON schema of an open-ended
   array of such records. Per decode step: its time, the time the sampling rank's mask
   thread worked (it runs beside the forward pass), and the time sampling waited for it
   (what constrained sequences cost the whole batch). Rounds interleave the mixes.
"""

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from actors import grammar
from actors.sampling_params import SamplingParams

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["street", "city", "zip"], "additionalProperties": False},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "email", "tags", "address", "role"],
    "additionalProperties": False,
}
DOCUMENT = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "tags": ["math", "poetry", "engines"],
            "address": {"street": "12 St James's Square", "city": "London", "zip": "12345"}, "role": "admin"}


def load_tokenizer(model: Path):
    from transformers import AutoTokenizer

    if model.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(model.parent, gguf_file=model.name)
    return AutoTokenizer.from_pretrained(model)


def _median_rows(rows: list[tuple[float, ...]]) -> list[float]:
    return [statistics.median(column) for column in zip(*rows)]


def library_timings(tokenizer, rounds: int) -> dict[str, list[float]]:
    """library -> [compile s, masks for the document s, per-token p50 s, p90 s, max s]."""
    vocab = len(tokenizer)
    ids = tokenizer.encode(json.dumps(DOCUMENT), add_special_tokens=False)
    llg = grammar.GrammarVocabulary(grammar.tokenizer_json(tokenizer), vocab, (tokenizer.eos_token_id,))

    def llguidance_walk() -> tuple[float, list[float]]:
        start = time.perf_counter()
        matcher = llg.matcher(grammar.json_schema_grammar(PERSON, "bench"))
        compile_s, bitmask, masks = time.perf_counter() - start, llg.bitmask(1), []
        for t in ids:
            start = time.perf_counter()
            llg.fill_bitmasks([(matcher, 0)], bitmask)
            masks.append(time.perf_counter() - start)
            assert matcher.consume_token(t), "the document does not follow the schema"
        return compile_s, masks

    walks = {"llguidance": llguidance_walk}
    try:
        import xgrammar
    except ImportError:
        xgrammar = None
    if xgrammar is not None:
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
        compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

        def xgrammar_walk() -> tuple[float, list[float]]:
            start = time.perf_counter()
            matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(PERSON), any_whitespace=False))
            compile_s, bitmask, masks = time.perf_counter() - start, xgrammar.allocate_token_bitmask(1, vocab), []
            for t in ids:
                start = time.perf_counter()
                matcher.fill_next_token_bitmask(bitmask, 0)
                masks.append(time.perf_counter() - start)
                assert matcher.accept_token(t)
            return compile_s, masks

        walks["xgrammar"] = xgrammar_walk
    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in walks}
    for _ in range(rounds):
        for name, walk in walks.items():
            compile_s, masks = walk()
            masks.sort()
            rows[name].append((compile_s, sum(masks), masks[len(masks) // 2], masks[int(len(masks) * 0.9)], masks[-1]))
    return {name: _median_rows(r) for name, r in rows.items()} | {"tokens": [len(ids)]}


def engine_timings(model: Path, batch: int, new_tokens: int, rounds: int) -> dict[int, list[float]]:
    """constrained sequences -> [decode step s, mask thread s per step, wait for masks s per step]."""
    from cluster.config import TensorfleetConfig
    from cluster.replica import build_engine

    config = TensorfleetConfig.model_validate({
        "model": str(model), "dtype": "float32", "parallel": {"device": "cpu"},
        "engine": {"max_model_len": 512, "max_num_seqs": batch, "max_num_batched_tokens": 4096, "block_size": 16},
    })
    engine = build_engine(config, log=lambda m: None)
    worker = engine.executor.worker
    tokenizer = engine.tokenizer
    prompt = tokenizer.encode("List the people of the company as JSON records:")
    records = grammar.json_schema_grammar({"type": "array", "items": PERSON}, "bench")
    clock = {"mask": 0.0, "wait": 0.0}
    masks_of = worker.sequences._masks
    start_masks = worker.sequences.start_masks

    def timed_masks(*args):
        start = time.perf_counter()
        try:
            return masks_of(*args)
        finally:
            clock["mask"] += time.perf_counter() - start

    def timed_start(sampled):
        future = start_masks(sampled)
        if future is not None:
            result = future.result

            def timed_result():
                start = time.perf_counter()
                try:
                    return result()
                finally:
                    clock["wait"] += time.perf_counter() - start

            future.result = timed_result
        return future

    worker.sequences._masks = timed_masks
    worker.sequences.start_masks = timed_start

    async def one_mix(constrained: int) -> list[tuple[float, float, float]]:
        for i in range(batch):
            engine.add_request(f"r{i}", prompt, SamplingParams(
                max_tokens=new_tokens, temperature=0.8, seed=i, ignore_eos=True,
                grammar=records if i < constrained else None))
        steps = []
        while engine.scheduler.has_work():
            decoding = all(s.num_computed >= len(s.prompt_ids) for s in engine.scheduler.running)
            full = len(engine.scheduler.running) == batch
            clock["mask"] = clock["wait"] = 0.0
            start = time.perf_counter()
            await engine.step()
            if decoding and full:
                steps.append((time.perf_counter() - start, clock["mask"], clock["wait"]))
        return steps

    mixes = sorted({0, batch // 4, batch})
    rows: dict[int, list[tuple[float, ...]]] = {k: [] for k in mixes}
    asyncio.run(one_mix(0))  # warm-up
    for _ in range(rounds):
        for k in mixes:
            rows[k].extend(asyncio.run(one_mix(k)))
    engine.shutdown()
    return {k: _median_rows(r) for k, r in rows.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--library-only", action="store_true")
    args = parser.parse_args(argv)
    import torch

    tokenizer = load_tokenizer(args.model)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; tokenizer of {args.model.name}: "
          f"{len(tokenizer)} tokens")
    lib = library_timings(tokenizer, args.rounds)
    tokens = lib.pop("tokens")[0]
    print(f"\nJSON schema, a {tokens}-token document (medians of {args.rounds} rounds):")
    for name, (compile_s, total, p50, p90, worst) in lib.items():
        print(f"  {name:11} compile {compile_s * 1e3:6.1f} ms   masks {total * 1e3:6.2f} ms in all   per token "
              f"p50 {p50 * 1e6:5.0f} us  p90 {p90 * 1e6:5.0f} us  max {worst * 1e6:6.0f} us")
    if args.library_only:
        return
    steps = engine_timings(args.model, args.batch, args.new_tokens, args.rounds)
    print(f"\nDecode steps of {args.batch} sequences, {args.rounds} rounds (medians per step):")
    base = steps[0][0]
    for k, (step, mask, wait) in steps.items():
        print(f"  {k:3} constrained: step {step * 1e3:7.1f} ms ({step / base:.3f}x)   mask thread {mask * 1e3:6.2f} ms"
              f"   sampling waited {wait * 1e3:6.2f} ms")


if __name__ == "__main__":
    main()
