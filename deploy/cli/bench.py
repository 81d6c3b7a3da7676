"""`tensorfleet bench`: load-test a running server, or an engine built in this process."""

import argparse
import asyncio
import json
import math
from pathlib import Path

from actors.checkpoint import open_checkpoint
from cluster.config import ConfigError, TensorfleetConfig, load_config
from cluster.replica import build_engine
from deploy.bench.compare_hf import DEFAULT_HF_BATCH_SIZES, compare_with_hf, format_report
from deploy.bench.loadgen import bench_engine, bench_online
from deploy.bench.stats import format_shares, format_stages, format_summary
from deploy.bench.workload import MIXED, WorkloadSpec, length_range, make_workload
from deploy.cli.cluster_args import add_cluster_args, ray_session_of

# Fits any byte-level vocabulary; pass the model's size for realistic prompts.
DEFAULT_ONLINE_VOCAB = 256


def add_bench(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="load-test a running server (OpenAI API) or, with --offline, an engine in this process",
        description="Send a seeded synthetic workload (random token-id prompts, exact output lengths) "
                    "and report request throughput, output tokens/s, TTFT, inter-token latency and "
                    "end-to-end latency (mean, p50, p90, p99). Writes JSON with --out.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--offline", metavar="CONFIG", help="build the engine of this YAML config here, no HTTP")
    target.add_argument("--compare-hf", metavar="CONFIG",
                        help="this config's engine here against Hugging Face generate on the same checkpoint and "
                             "dtype: batch-1 decode (and the read-bandwidth bound), the workload vs static batching")
    p.add_argument("--model", help="model name to send (default: the server's)")
    p.add_argument("--api-key", help="bearer token for the server")
    p.add_argument("--num-requests", type=int, default=MIXED.num_requests)
    p.add_argument("--prompt-len", type=length_range, default=MIXED.prompt_len, metavar="MIN:MAX",
                   help="prompt tokens, uniform (default %(default)s)")
    p.add_argument("--output-len", type=length_range, default=MIXED.output_len, metavar="MIN:MAX",
                   help="output tokens, uniform, EOS ignored (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int,
                   help=f"prompt ids are drawn below this (default: the model's offline, "
                        f"{DEFAULT_ONLINE_VOCAB} online)")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="requests/s, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    p.add_argument("--out", type=Path, help="write the results here as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--decode-tokens", type=int, default=64, help="--compare-hf: new tokens of the batch-1 decode")
    p.add_argument("--repeats", type=int, default=3, help="--compare-hf: batch-1 decode runs per side (median)")
    p.add_argument("--hf-batch-sizes", type=batch_sizes, default=",".join(map(str, DEFAULT_HF_BATCH_SIZES)), metavar="N,N,...",
                   help="--compare-hf: HF static batch sizes to try; the best counts (default %(default)s)")
    add_cluster_args(p)
    p.set_defaults(run=run_bench)


def batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(b) for b in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return sizes


def run_bench(args: argparse.Namespace) -> int:
    if args.compare_hf:
        return _compare_hf(args)
    options = dict(request_rate=args.request_rate, max_concurrency=args.max_concurrency,
                   progress=not args.no_progress)
    try:
        if args.url:
            spec = _spec(args, args.vocab_size or DEFAULT_ONLINE_VOCAB)
            summary = asyncio.run(bench_online(args.url, make_workload(spec), model=args.model,
                                               api_key=args.api_key, **options))
        else:
            spec, summary = _bench_offline(args, options)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(format_summary(summary))
    if summary.get("ranks"):
        print("all-reduce share of each rank's forward time:\n" + format_shares(summary["ranks"]))
    if summary.get("stages"):
        print("pipeline stages, while the engine had work:\n" + format_stages(summary["stages"]))
    if args.out:
        rate = args.request_rate if math.isfinite(args.request_rate) else "inf"  # JSON has no Infinity
        _write_json(args.out, {"target": args.url or args.offline, "workload": spec.to_json(), "request_rate": rate,
                               "max_concurrency": args.max_concurrency, **summary})
    return 0 if summary["failed"] == 0 else 1


def _spec(args: argparse.Namespace, vocab_size: int) -> WorkloadSpec:
    return WorkloadSpec(args.num_requests, args.prompt_len, args.output_len, args.seed, vocab_size)


def _offline_setup(args: argparse.Namespace, path: str) -> tuple[TensorfleetConfig, WorkloadSpec]:
    """The config at `path`, the workload for its model, and the cluster it will run on."""
    config = load_config(path)
    spec = _spec(args, args.vocab_size or open_checkpoint(config.model).shape.vocab_size)
    _simulate_if_needed(args, config)
    return config, spec


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str))
    print(f"wrote {path}")


def _bench_offline(args: argparse.Namespace, options: dict) -> tuple[WorkloadSpec, dict]:
    config, spec = _offline_setup(args, args.offline)
    with ray_session_of(args):
        engine = build_engine(config, log=lambda m: print(m, flush=True))
        try:
            return spec, asyncio.run(bench_engine(engine, make_workload(spec), **options))
        finally:
            engine.shutdown()


def _compare_hf(args: argparse.Namespace) -> int:
    config, spec = _offline_setup(args, args.compare_hf)
    work = make_workload(spec)
    try:
        with ray_session_of(args):
            report = compare_with_hf(config, work, decode_tokens=args.decode_tokens, repeats=args.repeats,
                                     hf_batch_sizes=args.hf_batch_sizes, progress=not args.no_progress,
                                     log=lambda m: print(m, flush=True))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    print(format_report(report))
    if args.out:
        _write_json(args.out, report)
    return 0 if report["mixed"]["tensorfleet"]["failed"] == 0 else 1


def _simulate_if_needed(args: argparse.Namespace, config: TensorfleetConfig) -> None:
    """A multi-rank config with no cluster named runs on a simulated one-node cluster, sized
    for all of serve's replicas (the plan checks they fit; the benchmark drives one)."""
    par = config.parallel
    if par.tensor_parallel_size * par.pipeline_parallel_size > 1 and not (args.simulate or args.address):
        args.simulate = f"1x{par.tensor_parallel_size * par.pipeline_parallel_size * config.serve.max_replicas}"
