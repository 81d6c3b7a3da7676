"""What one worker (one GPU) exports through Ray's metrics system, labelled with its place
in the TP x PP mesh. Ray prefixes `ray_`; the names are listed in `cluster.metrics`, beside
the engine's, since dashboards read them together.

    ray_tensorfleet_worker_forward_seconds_total     model compute incl. all-reduces,
                                                     excl. waiting for the previous stage
    ray_tensorfleet_worker_all_reduce_seconds_total  in TP all-reduces
    ray_tensorfleet_worker_weight_memory_bytes       gauge
    ray_tensorfleet_worker_kv_cache_memory_bytes     gauge
    ray_tensorfleet_worker_peak_memory_bytes         gauge: CUDA peak allocated, or peak RSS on CPU
"""

from ray.util.metrics import Counter, Gauge

from actors.step_io import RankStats

PREFIX = "tensorfleet_"


class RankMetrics:
    def __init__(self, model_name: str, stage: int, tp_rank: int):
        tags = ("model_name", "stage", "tp_rank")
        self._tags = {"model_name": model_name, "stage": str(stage), "tp_rank": str(tp_rank)}
        self.forward_seconds = Counter(PREFIX + "worker_forward_seconds", tag_keys=tags,
                                       description="Model compute time, all-reduces included, waits for the previous stage excluded")
        self.all_reduce_seconds = Counter(PREFIX + "worker_all_reduce_seconds", tag_keys=tags,
                                          description="Time in tensor-parallel all-reduces")
        self.weight_bytes = Gauge(PREFIX + "worker_weight_memory_bytes", description="Weights held by this rank", tag_keys=tags)
        self.kv_bytes = Gauge(PREFIX + "worker_kv_cache_memory_bytes", description="KV cache held by this rank", tag_keys=tags)
        self.peak_bytes = Gauge(PREFIX + "worker_peak_memory_bytes", description="Peak device memory (CUDA) or RSS (CPU)", tag_keys=tags)
        self._seen_forward = self._seen_all_reduce = 0.0

    def record(self, stats: RankStats) -> None:
        """Export a rank's running totals (cheap enough for every step)."""
        for counter, total, seen in ((self.forward_seconds, stats.forward_s, self._seen_forward),
                                     (self.all_reduce_seconds, stats.all_reduce_s, self._seen_all_reduce)):
            if total > seen:
                counter.inc(total - seen, tags=self._tags)
        self._seen_forward, self._seen_all_reduce = stats.forward_s, stats.all_reduce_s
        self.weight_bytes.set(stats.weight_bytes, tags=self._tags)
        self.kv_bytes.set(stats.kv_cache_bytes, tags=self._tags)
        self.peak_bytes.set(stats.peak_memory_bytes, tags=self._tags)
