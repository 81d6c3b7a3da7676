"""Prometheus metrics through Ray's metrics system, from every replica and every rank.

Each Ray node's metrics agent serves what the processes on that node record; a
Prometheus that scrapes every node's `metrics_export_port` sees them all. Ray prefixes
each name with `ray_`, counters get `_total`, histograms `_bucket` / `_sum` / `_count`.
The exported names (what dashboards and PromQL use):

Engine, one series set per replica (labels `model_name`, `replica`: Serve's replica id):
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

Outside a Ray process the Ray metric objects record nothing, so the engine calls them
unconditionally; where Ray is not installed at all (the engine in one process on a
one-GPU machine) stand-ins take their place.

The same series, under the same names, are also kept in each engine's own Prometheus
registry and served by the HTTP server's `/metrics` (`render_prometheus`), for whoever
scrapes the server rather than Ray's agents; the per-rank ones there come from the
workers' latest `RankStats`, read at scrape time. Each metric is defined once, below
(rank metrics in `actors.rank_metrics.RANK_METRICS`), and records into both.
"""

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from actors.rank_metrics import PREFIX, RANK_LABELS, RANK_METRICS, Counter, Gauge, Histogram, rank_labels
from actors.step_io import RankStats

RAY_PREFIX = "ray_"  # what Ray's exporter adds; /metrics uses the same names
# No `_created` series beside each counter and histogram: Ray exports none, and /metrics
# serves the same catalogue.
prometheus_client.disable_created_metrics()

_LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
_TOKEN_BUCKETS = [1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768]


class _Metric:
    """One metric, recorded through Ray (for its metrics agents) and into an engine's
    Prometheus registry (for the HTTP server's /metrics)."""

    def __init__(self, kind: str, name: str, description: str, tags: tuple[str, ...],
                 registry: prometheus_client.CollectorRegistry, buckets: list[float] | None = None):
        if kind == "histogram":
            self.ray = Histogram(PREFIX + name, description=description, boundaries=buckets, tag_keys=tags)
            self.local = prometheus_client.Histogram(RAY_PREFIX + PREFIX + name, description, tags,
                                                     registry=registry, buckets=buckets)
        else:
            ray_kind, local_kind = (Counter, prometheus_client.Counter) if kind == "counter" else (Gauge, prometheus_client.Gauge)
            self.ray = ray_kind(PREFIX + name, description=description, tag_keys=tags)
            self.local = local_kind(RAY_PREFIX + PREFIX + name, description, tags, registry=registry)

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.ray.inc(value, tags=tags)
        self.local.labels(**tags).inc(value)

    def set(self, value: float, tags: dict[str, str]) -> None:
        self.ray.set(value, tags=tags)
        self.local.labels(**tags).set(value)

    def observe(self, value: float, tags: dict[str, str]) -> None:
        self.ray.observe(value, tags=tags)
        self.local.labels(**tags).observe(value)


class EngineMetrics:
    """What one replica's engine records; every series carries `model_name` and `replica`."""

    def __init__(self, model_name: str, replica: str = ""):
        tags = ("model_name", "replica")
        self.model_name = model_name
        self._tags = {"model_name": model_name, "replica": replica}
        self.registry = prometheus_client.CollectorRegistry(auto_describe=True)

        def h(name: str, description: str, buckets: list[float]) -> _Metric:
            return _Metric("histogram", name, description, tags, self.registry, buckets)

        def counter(name: str, description: str, labels: tuple[str, ...] = ()) -> _Metric:
            return _Metric("counter", name, description, tags + labels, self.registry)

        def gauge(name: str, description: str) -> _Metric:
            return _Metric("gauge", name, description, tags, self.registry)

        self.ttft = h("time_to_first_token_seconds", "Request arrival to its first token", _LATENCY_BUCKETS)
        self.itl = h("inter_token_latency_seconds", "Time between two tokens of one completion", _LATENCY_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "Request arrival to its last token", _LATENCY_BUCKETS)
        self.queue = h("request_queue_time_seconds", "Request arrival to its first scheduled step", _LATENCY_BUCKETS)
        self.prompt_len = h("request_prompt_tokens", "Prompt tokens per finished request", _TOKEN_BUCKETS)
        self.gen_len = h("request_generation_tokens", "Generated tokens per finished request", _TOKEN_BUCKETS)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = counter("generation_tokens", "Tokens sampled")
        self.finished = counter("requests_finished", "Finished requests by finish reason", ("finish_reason",))
        self.rejected = counter("requests_rejected", "Requests refused before queueing", ("reason",))
        self.preemptions = counter("preemptions", "Sequences preempted for KV blocks")
        self.cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.restarts = counter("replica_restarts", "Worker rebuilds after a failure")
        self.resumed_requests = counter("requests_resumed", "Requests resumed on new workers (after a failure or a "
                                        "re-layout)", ("cause",))
        self.resume_wait = h("resume_wait_seconds", "A request's interruption (worker failure or re-layout) to its "
                             "next token", _LATENCY_BUCKETS)
        self.running = gauge("requests_running", "Sequences in the running batch")
        self.waiting = gauge("requests_waiting", "Sequences waiting to be scheduled")
        self.kv_usage = gauge("kv_cache_usage_ratio", "Used share of the KV blocks")
        self.stage_busy_seconds = counter("stage_busy_seconds", "Time a pipeline stage worked on steps", ("stage",))
        self.stage_bubble_seconds = counter("stage_bubble_seconds", "Time a pipeline stage idled while the engine had "
                                            "work", ("stage",))

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
        self.running.set(running, self._tags)
        self.waiting.set(waiting, self._tags)
        self.kv_usage.set(kv_usage, self._tags)
        for key, counter, total in (("preemptions", self.preemptions, preemptions),
                                    ("queries", self.cache_queries, cache_queries),
                                    ("hits", self.cache_hits, cache_hits)):
            # a rebuilt engine restarts its totals at zero
            self._inc(counter, total - self._seen[key] if total >= self._seen[key] else total)
            self._seen[key] = total

    def _observe(self, histogram: _Metric, value: float) -> None:
        histogram.observe(value, self._tags)

    def _inc(self, counter: _Metric, value: float, **labels: str) -> None:
        if value > 0:
            counter.inc(value, {**self._tags, **labels})


def render_prometheus(metrics: EngineMetrics, ranks: list[RankStats]) -> bytes:
    """Prometheus text format: the engine's series, then each rank's from its `RankStats`."""
    families = []
    for m in RANK_METRICS:
        family = (CounterMetricFamily if m.kind == "counter" else GaugeMetricFamily)(
            RAY_PREFIX + PREFIX + m.name, m.description, labels=list(RANK_LABELS))
        for stats in ranks:
            family.add_metric(list(rank_labels(metrics.model_name, stats).values()), getattr(stats, m.field))
        families.append(family)
    ranks_registry = prometheus_client.CollectorRegistry(auto_describe=False)
    ranks_registry.register(_Families(families))
    return prometheus_client.generate_latest(metrics.registry) + prometheus_client.generate_latest(ranks_registry)


class _Families:
    """A prometheus_client collector of ready-made metric families."""

    def __init__(self, families: list):
        self.families = families

    def collect(self):
        return self.families
