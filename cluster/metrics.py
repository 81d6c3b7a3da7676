"""Prometheus metrics through Ray's metrics system, from every replica and every rank.

Each Ray node's metrics agent serves what the processes on that node record; a
Prometheus that scrapes every node's `metrics_export_port` sees them all. Ray prefixes
each name with `ray_`, counters get `_total`, histograms `_bucket` / `_sum` / `_count`.
The exported names (what dashboards and PromQL use):

Engine, one series set per replica (label `model_name`):
    ray_tensorfleet_time_to_first_token_seconds     histogram  arrival -> first token
    ray_tensorfleet_inter_token_latency_seconds     histogram  between tokens of one completion
    ray_tensorfleet_e2e_request_latency_seconds     histogram  arrival -> last token
    ray_tensorfleet_request_queue_time_seconds      histogram  arrival -> first scheduled
    ray_tensorfleet_request_prompt_tokens           histogram  per finished request
    ray_tensorfleet_request_generation_tokens       histogram  per finished request
    ray_tensorfleet_prompt_tokens_total             counter    prompt tokens prefilled
    ray_tensorfleet_generation_tokens_total         counter    tokens sampled
    ray_tensorfleet_requests_finished_total         counter    label finish_reason:
                                                               stop | length | abort | error
    ray_tensorfleet_requests_rejected_total         counter    label reason: overloaded
    ray_tensorfleet_preemptions_total               counter
    ray_tensorfleet_prefix_cache_queries_total      counter    prompt tokens looked up
    ray_tensorfleet_prefix_cache_hits_total         counter    of those, found in the cache
    ray_tensorfleet_replica_restarts_total          counter    workers rebuilt after a failure
    ray_tensorfleet_requests_resumed_total          counter    label cause: failure | relayout;
                                                               requests moved onto new workers
    ray_tensorfleet_resume_wait_seconds             histogram  interruption -> the request's next token
    ray_tensorfleet_requests_running                gauge
    ray_tensorfleet_requests_waiting                gauge
    ray_tensorfleet_kv_cache_usage_ratio            gauge      used / all KV blocks
    ray_tensorfleet_stage_busy_seconds_total        counter    label stage: time the stage worked on steps
    ray_tensorfleet_stage_bubble_seconds_total      counter    label stage: time it idled while the engine
                                                               had work (cluster/in_flight.py)

so the busy share of each pipeline stage is
    rate(ray_tensorfleet_stage_busy_seconds_total[1m])
      / (rate(ray_tensorfleet_stage_busy_seconds_total[1m]) + rate(ray_tensorfleet_stage_bubble_seconds_total[1m]))

Per rank (labels `model_name`, `stage`, `tp_rank`; recorded by `actors.rank_metrics`):
    ray_tensorfleet_worker_forward_seconds_total    counter    model compute incl. all-reduces,
                                                               excl. waiting for the previous stage
    ray_tensorfleet_worker_all_reduce_seconds_total counter    in TP all-reduces
    ray_tensorfleet_worker_weight_memory_bytes      gauge
    ray_tensorfleet_worker_kv_cache_memory_bytes    gauge
    ray_tensorfleet_worker_peak_memory_bytes        gauge      CUDA peak allocated, or peak RSS on CPU

so the all-reduce share of a rank is
    rate(ray_tensorfleet_worker_all_reduce_seconds_total[1m])
      / rate(ray_tensorfleet_worker_forward_seconds_total[1m])

Outside a Ray process the metric objects record nothing, so the engine calls them
unconditionally; where Ray is not installed at all (the engine in one process on a
one-GPU machine) `_Unexported` stands in for them.
"""

class _Unexported:
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
    Counter = Gauge = Histogram = _Unexported

PREFIX = "tensorfleet_"

_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
_TOKEN_BUCKETS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


def _histogram(name: str, description: str, buckets: list[float], tags: tuple[str, ...]) -> Histogram:
    return Histogram(PREFIX + name, description=description, boundaries=buckets, tag_keys=tags)


class EngineMetrics:
    """What one replica's engine records; every series carries `model_name`."""

    def __init__(self, model_name: str):
        tags = ("model_name",)
        self._tags = {"model_name": model_name}
        h = _histogram
        self.ttft = h("time_to_first_token_seconds", "Request arrival to its first token", _LATENCY_BUCKETS, tags)
        self.itl = h("inter_token_latency_seconds", "Time between two tokens of one completion", _LATENCY_BUCKETS, tags)
        self.e2e = h("e2e_request_latency_seconds", "Request arrival to its last token", _LATENCY_BUCKETS, tags)
        self.queue = h("request_queue_time_seconds", "Request arrival to its first scheduled step", _LATENCY_BUCKETS, tags)
        self.prompt_len = h("request_prompt_tokens", "Prompt tokens per finished request", _TOKEN_BUCKETS, tags)
        self.gen_len = h("request_generation_tokens", "Generated tokens per finished request", _TOKEN_BUCKETS, tags)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", description="Prompt tokens prefilled", tag_keys=tags)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", description="Tokens sampled", tag_keys=tags)
        self.finished = Counter(PREFIX + "requests_finished", description="Finished requests by finish reason",
                                tag_keys=tags + ("finish_reason",))
        self.rejected = Counter(PREFIX + "requests_rejected", description="Requests refused before queueing",
                                tag_keys=tags + ("reason",))
        self.preemptions = Counter(PREFIX + "preemptions", description="Sequences preempted for KV blocks", tag_keys=tags)
        self.cache_queries = Counter(PREFIX + "prefix_cache_queries", description="Prompt tokens looked up in the prefix cache", tag_keys=tags)
        self.cache_hits = Counter(PREFIX + "prefix_cache_hits", description="Prompt tokens found in the prefix cache", tag_keys=tags)
        self.restarts = Counter(PREFIX + "replica_restarts", description="Worker rebuilds after a failure", tag_keys=tags)
        self.resumed_requests = Counter(PREFIX + "requests_resumed", tag_keys=tags + ("cause",),
                                        description="Requests resumed on new workers (after a failure or a re-layout)")
        self.resume_wait = h("resume_wait_seconds", "A request's interruption (worker failure or re-layout) to its "
                             "next token", _LATENCY_BUCKETS, tags)
        self.running = Gauge(PREFIX + "requests_running", description="Sequences in the running batch", tag_keys=tags)
        self.waiting = Gauge(PREFIX + "requests_waiting", description="Sequences waiting to be scheduled", tag_keys=tags)
        self.kv_usage = Gauge(PREFIX + "kv_cache_usage_ratio", description="Used share of the KV blocks", tag_keys=tags)
        self.stage_busy_seconds = Counter(PREFIX + "stage_busy_seconds", tag_keys=tags + ("stage",),
                                          description="Time a pipeline stage worked on steps")
        self.stage_bubble_seconds = Counter(PREFIX + "stage_bubble_seconds", tag_keys=tags + ("stage",),
                                            description="Time a pipeline stage idled while the engine had work")

        # scheduler and prefix-cache totals already exported, to export only what is new
        self._seen = {"preemptions": 0, "queries": 0, "hits": 0}

    def first_token(self, arrival: float, admitted_at: float, prompt_tokens: int, now: float) -> None:
        self._observe(self.ttft, now - arrival)
        self._observe(self.queue, admitted_at - arrival)
        self._inc(self.prompt_tokens, prompt_tokens)

    def next_token(self, since_previous: float) -> None:
        self._observe(self.itl, since_previous)

    def tokens_sampled(self, n: int) -> None:
        self._inc(self.generation_tokens, n)

    def request_finished(self, arrival: float, now: float, prompt_tokens: int, generated_tokens: int,
                         finish_reasons: list[str]) -> None:
        """One finished request; `finish_reasons` has one entry per completion (n of them)."""
        self._observe(self.e2e, now - arrival)
        self._observe(self.prompt_len, prompt_tokens)
        self._observe(self.gen_len, generated_tokens)
        for reason in finish_reasons:
            self._inc(self.finished, 1, finish_reason=reason)

    def completion_ended(self, reason: str) -> None:
        """A completion that ended without finishing (abort, error)."""
        self._inc(self.finished, 1, finish_reason=reason)

    def rejected_request(self, reason: str) -> None:
        self._inc(self.rejected, 1, reason=reason)

    def replica_restarted(self) -> None:
        self._inc(self.restarts, 1)

    def requests_resumed(self, n: int, cause: str) -> None:
        """`n` requests moved onto new workers; cause: failure | relayout."""
        self._inc(self.resumed_requests, n, cause=cause)

    def resume_waited(self, wait: float) -> None:
        """An interrupted request produced its next token `wait` seconds after the interruption."""
        self._observe(self.resume_wait, wait)

    def stage_busy(self, stage: int, seconds: float) -> None:
        self._inc(self.stage_busy_seconds, seconds, stage=str(stage))

    def stage_bubble(self, stage: int, seconds: float) -> None:
        self._inc(self.stage_bubble_seconds, seconds, stage=str(stage))

    def scheduler_state(self, running: int, waiting: int, kv_usage: float,
                        preemptions: int, cache_queries: int, cache_hits: int) -> None:
        """Gauges now, and counters from the scheduler's and block manager's running totals."""
        self.running.set(running, tags=self._tags)
        self.waiting.set(waiting, tags=self._tags)
        self.kv_usage.set(kv_usage, tags=self._tags)
        for key, counter, total in (("preemptions", self.preemptions, preemptions),
                                    ("queries", self.cache_queries, cache_queries),
                                    ("hits", self.cache_hits, cache_hits)):
            # a rebuilt engine restarts its totals at zero
            self._inc(counter, total - self._seen[key] if total >= self._seen[key] else total)
            self._seen[key] = total

    def _observe(self, histogram: Histogram, value: float) -> None:
        histogram.observe(value, tags=self._tags)

    def _inc(self, counter: Counter, value: float, **labels: str) -> None:
        if value > 0:
            counter.inc(value, tags={**self._tags, **labels})
