"""The sampler on one batch of full-vocabulary logits: what each kind of row costs.

    python -m deploy.bench.sampler                       # 64 rows x 49,152 (SmolLM2's vocabulary)
    python -m deploy.bench.sampler --rows 8 256 --vocab 128256 --rounds 9 --threads 1

Cases, each a whole batch of one kind: greedy; sampled (unseeded) with temperature, top-k,
top-p and min-p different in every row; seeded (the one per-row loop left: a generator per
row and step); seeded with presence, frequency and repetition penalties over a 512-token
history and 20 biased tokens. Rounds interleave the cases; the median per call and per
row is printed, and the seeded rows' cost over the unseeded ones.
"""

import argparse
import statistics
import time

import torch

from actors.logits_processors import SampleRow
from actors.sampler import Sampler
from actors.sampling_params import SamplingParams


def cases(rows: int, vocab: int) -> dict[str, list[SampleRow]]:
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, vocab, (rows, 512), generator=g).tolist()

    def varied(i: int, **extra) -> SamplingParams:
        return SamplingParams(temperature=0.5 + (i % 7) / 10, top_k=0 if i % 3 else 40 + i, top_p=0.8 + (i % 5) / 30,
                              min_p=0.0 if i % 2 else 0.05, **extra)

    penalties = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.1,
                 "logit_bias": tuple((t, 1.0) for t in range(20))}
    return {
        "greedy": [SampleRow(SamplingParams(temperature=0.0), 0) for _ in range(rows)],
        "sampled": [SampleRow(varied(i), 0) for i in range(rows)],
        "seeded": [SampleRow(varied(i, seed=i), 7) for i in range(rows)],
        "seeded + penalties": [SampleRow(varied(i, seed=i, **penalties), 256, history[i]) for i in range(rows)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[64])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=5, help="calls per case and round")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sampler = Sampler(torch.device("cpu"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, vocab {args.vocab}")
    for rows in args.rows:
        logits = torch.randn(rows, args.vocab, generator=torch.Generator().manual_seed(1)) * 3
        batches = cases(rows, args.vocab)
        times: dict[str, list[float]] = {name: [] for name in batches}
        for _ in range(args.rounds):
            for name, batch in batches.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    sampler(logits, batch)
                times[name].append((time.perf_counter() - start) / args.calls)
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"\n{rows} rows:")
        for name, t in median.items():
            print(f"  {name:20} {t * 1e3:8.2f} ms per call  {t / rows * 1e6:8.1f} us per row")
        print(f"  seeded rows cost {median['seeded'] / median['sampled']:.2f}x unseeded ones "
              f"(+{(median['seeded'] - median['sampled']) / rows * 1e6:.1f} us per row)")


if __name__ == "__main__":
    main()
