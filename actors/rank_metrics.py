"""What one worker (one GPU) exports through Ray's metrics system, labelled with its place
in the TP x PP mesh. Ray prefixes `ray_`; the names are listed in `cluster.metrics`, beside
the engine's, since dashboards read them together (and its `/metrics` rendering reads
`RANK_METRICS` too).

    ray_tensorfleet_worker_forward_seconds_total     model compute incl. all-reduces,
                                                     excl. waiting for the previous stage
    ray_tensorfleet_worker_all_reduce_seconds_total  in TP all-reduces
    ray_tensorfleet_worker_weight_memory_bytes       gauge
    ray_tensorfleet_worker_kv_cache_memory_bytes     gauge
    ray_tensorfleet_worker_peak_memory_bytes         gauge: CUDA peak allocated, or peak RSS on CPU

Where Ray is not installed (the engine in one process on a one-GPU machine) `Unexported`
stands in for Ray's metric classes, here and in `cluster.metrics`.
"""

from dataclasses import dataclass

from actors.step_io import RankStats


class Unexported:
    """Ray's Counter, Gauge and Histogram where Ray is not installed: records nothing."""

    def __init__(self, name: str, **options):
        self.name = name

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


try:
    from ray.util.metrics import Counter, Gauge, Histogram
except ImportError:
    Counter = Gauge = Histogram = Unexported

PREFIX = "tensorfleet_"
RANK_LABELS = ("model_name", "stage", "tp_rank")


@dataclass(frozen=True)
class RankMetric:
    kind: str  # counter (a running total) or gauge
    name: str  # without Ray's `ray_` and the project's prefix
    description: str
    field: str  # the RankStats field it exports


RANK_METRICS = (
    RankMetric("counter", "worker_forward_seconds", "Model compute time, all-reduces included, waits for the previous stage excluded", "forward_s"),
    RankMetric("counter", "worker_all_reduce_seconds", "Time in tensor-parallel all-reduces", "all_reduce_s"),
    RankMetric("gauge", "worker_weight_memory_bytes", "Weights held by this rank", "weight_bytes"),
    RankMetric("gauge", "worker_kv_cache_memory_bytes", "KV cache held by this rank", "kv_cache_bytes"),
    RankMetric("gauge", "worker_peak_memory_bytes", "Peak device memory (CUDA) or RSS (CPU)", "peak_memory_bytes"),
)


def rank_labels(model_name: str, stats: RankStats) -> dict[str, str]:
    return {"model_name": model_name, "stage": str(stats.stage), "tp_rank": str(stats.tp_rank)}


class RankMetrics:
    def __init__(self, model_name: str, stage: int, tp_rank: int):
        self.model_name = model_name
        self._metrics = [(m, (Counter if m.kind == "counter" else Gauge)(PREFIX + m.name, description=m.description,
                                                                         tag_keys=RANK_LABELS)) for m in RANK_METRICS]
        self._seen = {m.field: 0.0 for m in RANK_METRICS if m.kind == "counter"}

    def record(self, stats: RankStats) -> None:
        """Export a rank's running totals (cheap enough for every step)."""
        tags = rank_labels(self.model_name, stats)
        for m, metric in self._metrics:
            value = getattr(stats, m.field)
            if m.kind == "gauge":
                metric.set(value, tags=tags)
            elif value > self._seen[m.field]:
                metric.inc(value - self._seen[m.field], tags=tags)
                self._seen[m.field] = value
