"""What a benchmark run measured: one record per request, summarized the way vLLM's serving
benchmark does (request throughput, output tokens/s, TTFT, inter-token latency, time per
output token, end-to-end latency; mean, p50, p90, p99), plus each rank's all-reduce share
and each pipeline stage's busy share.

Times are `time.perf_counter()` seconds. A record's chunk times are when each piece of
output arrived: one token per chunk from the engine, possibly several per server-sent event
over HTTP (text held back by the detokenizer), so ITL is measured between chunks, as vLLM's.
"""

from dataclasses import dataclass, field

from actors.worker import RankStats
from cluster.in_flight import StageTimes

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    prompt_len: int
    output_len: int  # tokens asked for
    start: float = 0.0  # when the request was sent (or, for static batching, the run began)
    chunk_times: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float | None:
        """Decode time per output token after the first."""
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"mean": sum(values) / len(values), **{f"p{q}": percentile(values, q) for q in PERCENTILES}}


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    done = [r for r in records if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "requests": len(records),
        "completed": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "duration_s": duration_s,
        "prompt_tokens": sum(r.prompt_len for r in done),
        "cached_prompt_tokens": sum(r.cached_tokens for r in done),
        "requests_with_cache_hits": sum(r.cached_tokens > 0 for r in done),
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s,
        "output_tok_s": output_tokens / duration_s,
        "ttft_s": distribution([r.ttft for r in done]),
        "itl_s": distribution([t for r in done for t in r.itls]),
        "tpot_s": distribution([t for r in done if (t := r.tpot) is not None]),
        "e2e_s": distribution([r.e2e for r in done]),
    }


def format_summary(s: dict) -> str:
    lines = [
        f"requests: {s['completed']} completed, {s['failed']} failed in {s['duration_s']:.1f} s",
        f"throughput: {s['request_throughput']:.2f} requests/s, {s['output_tok_s']:.1f} output tokens/s "
        f"({s['output_tokens']} output, {s['prompt_tokens']} prompt tokens)",
    ]
    lines += [f"  error: {e}" for e in s["errors"]]
    for key, name in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("tpot_s", "TPOT"), ("e2e_s", "E2E")):
        if d := s[key]:
            lines.append(f"{name:>5} ms: mean {d['mean'] * 1e3:8.1f}  "
                         + "  ".join(f"p{q} {d[f'p{q}'] * 1e3:8.1f}" for q in PERCENTILES))
    return "\n".join(lines)


def all_reduce_shares(before: list[RankStats], after: list[RankStats]) -> list[dict]:
    """Per rank, over the run between two `Executor.rank_stats()` snapshots: forward time,
    all-reduce time and the all-reduce share of the forward (all-reduces included in it)."""
    rows = []
    for b, a in zip(before, after):
        forward, reduce = a.forward_s - b.forward_s, a.all_reduce_s - b.all_reduce_s
        rows.append({"stage": a.stage, "tp_rank": a.tp_rank, "steps": a.steps - b.steps,
                     "all_reduces": a.all_reduces - b.all_reduces, "forward_s": forward,
                     "all_reduce_s": reduce, "p2p_s": a.p2p_s - b.p2p_s,
                     "all_reduce_share": reduce / forward if forward > 0 else 0.0})
    return rows


def format_shares(rows: list[dict]) -> str:
    return "\n".join(
        f"  rank (stage {r['stage']}, tp {r['tp_rank']}): forward {r['forward_s']:.1f} s, "
        f"{r['all_reduces']} all-reduces {r['all_reduce_s']:.2f} s = {100 * r['all_reduce_share']:.1f}% of the forward"
        for r in rows
    )


def stage_shares(before: StageTimes, after: StageTimes) -> list[dict]:
    """Per pipeline stage, over the run between two `Engine.stage_times()` snapshots: busy
    and bubble seconds, and the busy share of the time the engine had work."""
    active = after.active_s - before.active_s
    return [{"stage": stage, "busy_s": a - b, "bubble_s": max(0.0, active - (a - b)),
             "busy_share": (a - b) / active if active > 0 else 0.0}
            for stage, (b, a) in enumerate(zip(before.busy_s, after.busy_s))]


def format_stages(rows: list[dict]) -> str:
    return "\n".join(f"  stage {r['stage']}: busy {r['busy_s']:.1f} s, bubble {r['bubble_s']:.1f} s = "
                     f"{100 * r['busy_share']:.1f}% busy" for r in rows)
