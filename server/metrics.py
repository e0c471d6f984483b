"""How Prometheus sees ptserve: every metric is defined here, on a registry owned by the app.

The engine and batcher produce plain reports; this module turns them into counters and histograms. No label's
values grow with tenants or adapters (DESIGN decision 7): endpoints are route templates, statuses are classes.
"""
from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ptserve.adapters_store.cache import AdapterCache
from ptserve.server.batcher import PassReport
from ptserve.server.cost_model import PassCost

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
RATIO_BUCKETS = (1.0, 1.05, 1.1, 1.25, 1.5, 2, 3, 5)
CONTENT_TYPE = CONTENT_TYPE_LATEST
# error types (ptserve.server.limits, ptserve.server.auth) counted as refusals; a closed set, so the label stays bounded
REJECTION_REASONS = ("queue_full", "tenant_concurrency_limit", "deadline_exceeded", "draining", "unauthorized",
                     "forbidden")
STORE_ERROR_KINDS = ("store_unavailable", "store_integrity_error")


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "ptserve_requests", "HTTP requests by endpoint and status class.", ["endpoint", "status_class"], registry=r
        )
        self.request_latency = Histogram(
            "ptserve_request_duration_seconds", "End-to-end HTTP latency.", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_wait = Histogram(
            "ptserve_queue_wait_seconds", "Time a row waited in the batcher queue.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.inference = Histogram(
            "ptserve_inference_duration_seconds", "Duration of one forward pass.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram("ptserve_batch_size", "Rows per forward pass.", buckets=BATCH_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "ptserve_batch_tokens", "Padded (virtual + real) tokens per forward pass.",
            buckets=(64, 256, 1024, 4096, 16384, 65536), registry=r,
        )
        self.padding_ratio = Histogram(
            "ptserve_batch_padding_ratio", "Computed tokens / real tokens per forward pass.",
            buckets=RATIO_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("ptserve_queue_depth", "Rows waiting in the batcher queue.", registry=r)
        self.uploads = Counter("ptserve_adapter_uploads", "Adapter uploads by result.", ["result"], registry=r)
        self.build = Info("ptserve_build", "Server build and backbone.", registry=r)
        # the batch planner's pass cost (encoder backbones), measured at start-up unless set (NaN = not measured)
        self.batch_overhead = Gauge(
            "ptserve_batch_overhead_tokens", "The planner's fixed cost of one forward pass, in padded tokens.",
            registry=r,
        )
        self.pass_fixed = Gauge(
            "ptserve_batch_pass_fixed_seconds", "Fitted fixed cost of one forward pass (NaN unless measured).",
            registry=r,
        )
        self.pass_token = Gauge(
            "ptserve_batch_pass_token_seconds", "Fitted cost of one padded token in a pass (NaN unless measured).",
            registry=r,
        )
        for gauge in (self.batch_overhead, self.pass_fixed, self.pass_token):
            gauge.set(math.nan)  # decoder backbones plan no passes
        # generation (decoder backbones)
        self.time_to_first_token = Histogram(
            "ptserve_time_to_first_token_seconds", "Request arrival to its first generated token.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.inter_token_latency = Histogram(
            "ptserve_inter_token_latency_seconds", "Time between consecutive tokens of one request.",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("ptserve_prompt_tokens", "Prompt tokens of generation requests.", registry=r)
        self.generated_tokens = Counter("ptserve_generated_tokens", "Tokens generated.", registry=r)
        self.generation_step = Histogram(
            "ptserve_generation_step_duration_seconds", "Duration of one engine step (prefill and/or decode).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.generation_batch = Histogram(
            "ptserve_generation_batch_size", "Sequences running after an engine step.", buckets=BATCH_BUCKETS,
            registry=r,
        )
        # embeddings (encoder backbones)
        self.embedding_inputs = Counter("ptserve_embedding_inputs", "Texts embedded by /v1/embeddings.", registry=r)
        self.embedding_tokens = Counter(
            "ptserve_embedding_tokens", "Input tokens of /v1/embeddings requests (their usage.prompt_tokens).",
            registry=r,
        )
        self.rejections = Counter(
            "ptserve_requests_rejected", "Requests refused (overload, deadline, draining, auth) by reason.", ["reason"],
            registry=r,
        )
        self.store_errors = Counter(
            "ptserve_store_errors", "Store failures met on the request path, by kind.", ["kind"], registry=r
        )
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        for kind in STORE_ERROR_KINDS:
            self.store_errors.labels(kind)
        self.inflight = Gauge("ptserve_requests_in_flight", "HTTP requests being served (operations excluded).",
                              registry=r)
        self.draining = Gauge("ptserve_draining", "1 while the server drains before exiting.", registry=r)
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu, fds
        PlatformCollector(registry=r)

    def observe_error(self, error_type: str) -> None:
        """A typed error left the app: count refusals and store failures (other types are in requests_total)."""
        if error_type in REJECTION_REASONS:
            self.rejections.labels(error_type).inc()
        elif error_type in STORE_ERROR_KINDS:
            self.store_errors.labels(error_type).inc()

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, f"{status // 100}xx").inc()
        self.request_latency.labels(endpoint).observe(seconds)

    def observe_pass(self, report: PassReport) -> None:
        self.batch_size.observe(report.rows)
        self.inference.observe(report.run_s)
        for w in report.queue_wait_s:
            self.queue_wait.observe(w)
        stats = report.stats
        if stats is not None and stats.real_tokens:
            self.batch_tokens.observe(stats.computed_tokens)
            self.padding_ratio.observe(stats.computed_tokens / stats.real_tokens)

    def observe_pass_cost(self, cost: PassCost) -> None:
        self.batch_overhead.set(cost.overhead_tokens)
        self.pass_fixed.set(cost.fixed_s)
        self.pass_token.set(cost.per_token_s)

    def observe_embeddings(self, inputs: int, tokens: int) -> None:
        self.embedding_inputs.inc(inputs)
        self.embedding_tokens.inc(tokens)

    def watch_cache(self, cache: AdapterCache) -> None:
        self.registry.register(_CacheCollector(cache))

    def observe_step(self, report) -> None:
        """One generation engine step (``ptserve.server.generation.runner.StepReport``; called from the engine thread)."""
        self.generation_step.observe(report.seconds)
        self.generation_batch.observe(report.rows)

    def watch_generation(self, runner) -> None:
        running = Gauge("ptserve_running_requests", "Generation requests decoding now.", registry=self.registry)
        waiting = Gauge("ptserve_waiting_requests", "Generation requests waiting for a slot.", registry=self.registry)
        running.set_function(lambda: runner.running)
        waiting.set_function(lambda: runner.waiting)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CacheCollector(Collector):
    """Reads the adapter cache's own counters at scrape time (the cache stays free of Prometheus)."""

    def __init__(self, cache: AdapterCache):
        self.cache = cache

    def collect(self):
        s = self.cache.stats
        for name, help_text, value in (
            ("hits", "Adapter cache hits.", s.hits),
            ("misses", "Adapter cache misses.", s.misses),
            ("loads", "Adapter loads from the store.", s.loads),
            ("evictions", "Adapters evicted from the cache.", s.evictions),
        ):
            yield CounterMetricFamily(f"ptserve_adapter_cache_{name}", help_text, value=value)
        yield GaugeMetricFamily(
            "ptserve_adapter_cache_resident_bytes", "Bytes of resident adapters.", value=self.cache.used_bytes
        )
        yield GaugeMetricFamily("ptserve_adapter_cache_resident_adapters", "Resident adapters.", value=len(self.cache))
        yield GaugeMetricFamily("ptserve_adapter_cache_capacity_bytes", "Adapter cache budget.", value=self.cache.capacity)
