"""Prometheus metrics of one server: request outcomes and latencies, plus the engine's own state.

Data flow:
  1. `ServerMetrics(engine_snapshot)` owns a private `CollectorRegistry` (never the process-wide
     default), so two servers in one process — as in the tests — keep separate, correct numbers.
  2. The servicer records what it sees on the wire: a finished request (`observe_finished`: counter
     by finish reason, token counters, TTFT / end-to-end / queue-time histograms), each streamed
     delta (`observe_tokens`: inter-token latency), each rejection (`observe_rejected`, by code).
  3. What only the engine knows (running / waiting / late requests, the oldest wait, KV pages per instance
     (used and held by the prefix cache), the DoP each prefill and decode batch ran at, scale-downs,
     scale-ups, migrations, preemptions, prefix-cache lookups, hits and hit rate, compiles) is
     read at scrape time: `EngineCollector` calls `engine_snapshot()` and turns the returned
     `EngineSnapshot` (`loong_jax.engine.snapshot`, the engine's one description of its state) into
     metric families, so nothing is copied between scrapes.
  4. `start_http(host, port)` serves `/metrics` from a background thread; `stop_http()` ends it.
"""

from __future__ import annotations

import threading
from typing import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import start_http_server

from loong_jax.engine.snapshot import EngineSnapshot

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0,
                   60.0, 120.0, 300.0)
INTER_TOKEN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.0, 2.5, 5.0)
DOP_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


def _dop_histogram(name: str, documentation: str, counts: Mapping[int, int]) -> HistogramMetricFamily:
    buckets = [(str(float(bound)), sum(n for dop, n in counts.items() if dop <= bound))
               for bound in DOP_BUCKETS]  # cumulative, as Prometheus buckets are
    buckets.append(("+Inf", sum(counts.values())))
    return HistogramMetricFamily(name, documentation, buckets=buckets,
                                 sum_value=float(sum(dop * n for dop, n in counts.items())))


class EngineCollector:
    """Turns an `EngineSnapshot`, taken at scrape time, into metric families."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]):
        self._snapshot = snapshot

    def collect(self):
        snap = self._snapshot()
        yield GaugeMetricFamily("loong_jax_requests_running", "Requests admitted and not finished.",
                                value=snap.running)
        yield GaugeMetricFamily("loong_jax_requests_waiting", "Requests waiting for their first schedule.",
                                value=snap.waiting)
        yield GaugeMetricFamily("loong_jax_oldest_waiting_seconds",
                                "Seconds the longest-waiting request has waited (0 when none waits).",
                                value=snap.oldest_waiting_seconds)
        yield GaugeMetricFamily("loong_jax_requests_late",
                                "Waiting requests the scheduler holds behind every timely one: over the overload "
                                "work limit or past their latency target (ESP only).", value=snap.late)
        used = GaugeMetricFamily("loong_jax_kv_pages_used", "KV pages in use, per instance.",
                                 labels=["instance"])
        total = GaugeMetricFamily("loong_jax_kv_pages_total", "KV pages, per instance.", labels=["instance"])
        cached = GaugeMetricFamily("loong_jax_kv_pages_cached",
                                   "KV pages the prefix cache holds (in use or idle), per instance.",
                                   labels=["instance"])
        usage = GaugeMetricFamily("loong_jax_kv_usage_ratio", "Fraction of KV pages in use, per instance.",
                                  labels=["instance"])
        for instance, (n_used, n_total) in enumerate(zip(snap.kv_pages_used, snap.kv_pages_total)):
            used.add_metric([str(instance)], n_used)
            total.add_metric([str(instance)], n_total)
            usage.add_metric([str(instance)], n_used / n_total if n_total else 0.0)
        for instance, n_cached in enumerate(snap.kv_pages_cached):
            cached.add_metric([str(instance)], n_cached)
        yield cached
        yield used
        yield total
        yield usage
        yield _dop_histogram("loong_jax_prefill_dop", "Degree of parallelism of each prefill batch.",
                             snap.prefill_dop_counts)
        yield _dop_histogram("loong_jax_decode_dop", "Degree of parallelism of each decode batch.",
                             snap.decode_dop_counts)
        for name, value, documentation in (
                ("loong_jax_scale_downs", snap.scale_downs, "Prefills after which instances left the group."),
                ("loong_jax_scale_ups", snap.scale_ups, "Decode requests that moved to a new master."),
                ("loong_jax_migrations", snap.migrations, "KV migrations between instances."),
                ("loong_jax_preemptions", snap.preemptions, "Requests preempted (recompute)."),
                ("loong_jax_prefix_cache_queries", snap.prefix_cache_queries,
                 "Prefills of waiting requests that looked their prompt up in the prefix cache."),
                ("loong_jax_prefix_cache_hits", snap.prefix_cache_hits, "Prefills that reused cached KV pages."),
                ("loong_jax_prefix_cache_query_tokens", snap.prefix_cache_query_tokens,
                 "Prompt tokens of the prefills that looked the prefix cache up."),
                ("loong_jax_prefix_cache_hit_tokens", snap.prefix_cache_hit_tokens,
                 "Prompt tokens whose KV came from the prefix cache (not computed)."),
                ("loong_jax_compiles", snap.compiles, "Programs compiled."),
                ("loong_jax_compile_seconds", snap.compile_seconds, "Seconds spent compiling programs.")):
            yield CounterMetricFamily(name, documentation, value=value)
        yield GaugeMetricFamily("loong_jax_programs_ready", "Compiled programs ready to run.",
                                value=snap.programs_ready)
        yield GaugeMetricFamily("loong_jax_prefix_cache_hit_rate",
                                "Share of queried prompt tokens whose KV came from the prefix cache.",
                                value=snap.prefix_cache_hit_rate)


class ServerMetrics:
    """Every metric of one server, in its own registry."""

    def __init__(self, engine_snapshot: Callable[[], EngineSnapshot] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests_finished = Counter(
            "loong_jax_requests_finished", "Requests finished, by finish reason (stop, length, abort, "
            "cancelled, error).", ["finish_reason"], registry=registry)
        self.requests_rejected = Counter(
            "loong_jax_requests_rejected", "Calls refused before reaching the engine, by gRPC status code.",
            ["code"], registry=registry)
        self.prompt_tokens = Counter("loong_jax_prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=registry)
        self.generation_tokens = Counter("loong_jax_generation_tokens", "Tokens generated and streamed.",
                                         registry=registry)
        self.time_to_first_token = Histogram(
            "loong_jax_time_to_first_token_seconds", "Arrival to first token.", buckets=LATENCY_BUCKETS,
            registry=registry)
        self.inter_token_latency = Histogram(
            "loong_jax_inter_token_latency_seconds", "Time between consecutive tokens of a stream.",
            buckets=INTER_TOKEN_BUCKETS, registry=registry)
        self.e2e_latency = Histogram(
            "loong_jax_e2e_request_latency_seconds", "Arrival to finish.", buckets=LATENCY_BUCKETS,
            registry=registry)
        self.queue_time = Histogram(
            "loong_jax_queue_time_seconds", "Arrival to first scheduled.", buckets=LATENCY_BUCKETS,
            registry=registry)
        self.open_streams = Gauge("loong_jax_open_streams", "Generate calls currently streaming.",
                                  registry=registry)
        if engine_snapshot is not None:
            registry.register(EngineCollector(engine_snapshot))
        self._http_server = None
        self._http_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ recording
    def observe_rejected(self, code_name: str) -> None:
        self.requests_rejected.labels(code=code_name).inc()

    def observe_tokens(self, n_tokens: int, seconds_since_previous: float | None) -> None:
        """A delta of n tokens arrived `seconds_since_previous` after the stream's previous one."""
        self.generation_tokens.inc(n_tokens)
        if seconds_since_previous is not None and n_tokens > 0:
            per_token = seconds_since_previous / n_tokens
            for _ in range(n_tokens):
                self.inter_token_latency.observe(per_token)

    def observe_finished(self, finish_reason: str, prompt_tokens: int, queue_s: float | None,
                         time_to_first_token_s: float | None, e2e_s: float | None) -> None:
        self.requests_finished.labels(finish_reason=finish_reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        for histogram, seconds in ((self.queue_time, queue_s), (self.time_to_first_token, time_to_first_token_s),
                                   (self.e2e_latency, e2e_s)):
            if seconds is not None:
                histogram.observe(max(seconds, 0.0))

    # ------------------------------------------------------------------ exposition
    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def start_http(self, host: str, port: int) -> int:
        """Serves /metrics on (host, port); port 0 picks a free one. Returns the bound port."""
        if self._http_server is not None:
            raise RuntimeError("the metrics endpoint is already running")
        self._http_server, self._http_thread = start_http_server(port, addr=host, registry=self.registry)
        return self._http_server.server_address[1]

    def stop_http(self) -> None:
        if self._http_server is not None:
            self._http_server.shutdown()
            self._http_server.server_close()
            self._http_thread.join(timeout=5)
            self._http_server = self._http_thread = None
