"""How Prometheus sees ptserve: every metric is defined here. No label's values grow with tenants or adapters
(DESIGN decision 7): endpoints are route templates, statuses are classes.

The engine and batcher produce plain reports; this module turns them into counters and histograms.

**One process or many.** ``Metrics()`` in a single-process server keeps its metrics on a registry of its own and
reads scrape-time values (queue depth, adapter cache, generation slots, the process) when ``/metrics`` renders.
A server split into processes (an engine core and API workers) uses prometheus-client's multiprocess mode:
every process builds ``Metrics(multiprocess_dir=DIR)`` (or inherits ``PROMETHEUS_MULTIPROC_DIR=DIR``); each
writes its values to memory-mapped files there and any process's ``render()`` (``scrape(DIR)``) sums them.
Scrape-time values cannot be read across processes (``set_function`` does nothing in that mode), so each
process samples its own (``sample``, ``watch_*``) on a 1 s refresher thread and after every pass; counters from
elsewhere (the cache's) advance by their deltas. Gauges say how processes combine: ``mostrecent`` for values
one process owns (queue depth, cache, planner cost: a restarted engine core's newer value wins), ``livesum`` for
per-process values (requests in flight, process memory: a dead process's share goes once the supervisor calls
``mark_process_dead(pid)``), ``livemax`` for draining. The directory must be empty when the server starts
(``prepare_multiprocess_dir``).
"""
from __future__ import annotations

import math
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, PlatformCollector, ProcessCollector
from prometheus_client import multiprocess, values
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
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
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's own variable
REFRESH_S = 1.0  # how often a process of a multiprocess server samples its scrape-time values


def prepare_multiprocess_dir(path: str | Path) -> Path:
    """Make ``path`` an empty directory (the supervisor calls it once, before starting any process): files left
    by an earlier run would be summed into this one's."""
    path = Path(path)
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def mark_process_dead(pid: int, path: str | Path) -> None:
    """The supervisor, when a process of the server exited: its ``live*`` gauges (in flight, memory) stop
    counting. Its counters and histograms stay in the sums, as a restarted process's totals must."""
    multiprocess.mark_process_dead(pid, str(path))


def scrape(path: str | Path) -> bytes:
    """The text exposition of every process writing under ``path``: counters and histograms summed, gauges
    combined by their mode."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(path))
    return generate_latest(registry)


def _enable_multiprocess(path: str | Path) -> str:
    """Switch this process's prometheus-client values to memory-mapped files under ``path`` (values are chosen
    when a metric is built, from the environment at import: set both, so children inherit it too)."""
    path = str(Path(path).resolve())
    if not os.path.isdir(path):
        raise ValueError(f"metrics directory {path} does not exist (prepare_multiprocess_dir makes it)")
    current = os.environ.get(MULTIPROC_ENV)
    if current and os.path.realpath(current) != path:
        raise ValueError(f"this process already writes metrics to {current}")
    os.environ[MULTIPROC_ENV] = path
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    return path


class _BuildInfo:
    """``ptserve_build_info{...} 1``: prometheus-client's Info has no multiprocess form, so there it is a gauge
    of the same name and exposition (its labels are known only when the backbone has loaded)."""

    def __init__(self, registry: CollectorRegistry, multiproc: bool):
        self._registry, self._multiproc, self._gauge = registry, multiproc, None
        self._info = None if multiproc else Info("ptserve_build", "Server build and backbone.", registry=registry)

    def info(self, labels: dict[str, str]) -> None:
        if self._info is not None:
            return self._info.info(labels)
        if self._gauge is None:
            self._gauge = Gauge("ptserve_build_info", "Server build and backbone.", sorted(labels),
                                registry=self._registry, multiprocess_mode="mostrecent")
        self._gauge.labels(**labels).set(1)


class Metrics:
    def __init__(self, multiprocess_dir: str | Path | None = None) -> None:
        """``multiprocess_dir`` (or ``PROMETHEUS_MULTIPROC_DIR`` in the environment): this process is one of
        several writing metrics there, and ``render`` shows them all."""
        given = multiprocess_dir if multiprocess_dir is not None else os.environ.get(MULTIPROC_ENV)
        self.multiprocess_dir = _enable_multiprocess(given) if given else None
        mp = self.multiprocess_dir is not None
        r = self.registry = CollectorRegistry()  # in multiprocess mode: this process's metrics, never rendered
        self._samplers: list[Callable[[], None]] = []  # scrape-time values, read in the process that owns them
        self._lock = threading.Lock()
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
        self.queue_depth = self._gauge("ptserve_queue_depth", "Rows waiting in the batcher queue.", "mostrecent")
        self.uploads = Counter("ptserve_adapter_uploads", "Adapter uploads by result.", ["result"], registry=r)
        self.build = _BuildInfo(r, mp)
        # the batch planner's pass cost (encoder backbones), measured at start-up unless set (NaN = not measured;
        # a multiprocess server shows them once the engine core has set them)
        self.batch_overhead = self._gauge(
            "ptserve_batch_overhead_tokens", "The planner's fixed cost of one forward pass, in padded tokens.",
            "mostrecent")
        self.pass_fixed = self._gauge(
            "ptserve_batch_pass_fixed_seconds", "Fitted fixed cost of one forward pass (NaN unless measured).",
            "mostrecent")
        self.pass_token = self._gauge(
            "ptserve_batch_pass_token_seconds", "Fitted cost of one padded token in a pass (NaN unless measured).",
            "mostrecent")
        if not mp:  # (every process would write its NaN, newer than the engine core's measurement)
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
        self.inflight = self._gauge("ptserve_requests_in_flight", "HTTP requests being served (operations excluded).",
                                    "livesum")
        self.draining = self._gauge("ptserve_draining", "1 while the server drains before exiting.", "livemax")
        if mp:
            self._process_metrics()
            self._stop = threading.Event()
            self._refresher = threading.Thread(target=self._refresh_loop, name="ptserve-metrics", daemon=True)
            self._refresher.start()
        else:
            ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu, fds
            PlatformCollector(registry=r)

    def _gauge(self, name: str, documentation: str, mode: str, labels=()) -> Gauge:
        return Gauge(name, documentation, labels, registry=self.registry, multiprocess_mode=mode)

    # --- scrape-time values ------------------------------------------------------------------------------------
    def sample(self, gauge: Gauge, read: Callable[[], float]) -> None:
        """``gauge`` shows ``read()``: read at each render in a single process; in a multiprocess server by the
        process that calls this (the one that owns the value), every ``REFRESH_S`` and after every pass."""
        self._samplers.append(lambda: gauge.set(read()))

    def refresh(self) -> None:
        """Read this process's scrape-time values now."""
        with self._lock:
            for read in self._samplers:
                read()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                self.refresh()
            except Exception:  # a sampler that fails must not end the refresher (nor the process)
                pass

    def close(self) -> None:
        """Stop the refresher (multiprocess mode), after one last refresh."""
        if self.multiprocess_dir is not None and not self._stop.is_set():
            self._stop.set()
            self._refresher.join(timeout=5)
            self.refresh()

    def _process_metrics(self) -> None:
        """process_* for every process of the server: memory and fds summed over live processes, CPU seconds
        summed over all (prometheus-client's ProcessCollector is read here and written to the shared files)."""
        rss = self._gauge("process_resident_memory_bytes", "Resident memory of the server's processes.", "livesum")
        vms = self._gauge("process_virtual_memory_bytes", "Virtual memory of the server's processes.", "livesum")
        fds = self._gauge("process_open_fds", "Open file descriptors of the server's processes.", "livesum")
        cpu = Counter("process_cpu_seconds", "CPU time (user + system) of the server's processes.",
                      registry=self.registry)
        reader, seen = ProcessCollector(registry=None), {"cpu": 0.0}
        targets = {"process_resident_memory_bytes": rss, "process_virtual_memory_bytes": vms,
                   "process_open_fds": fds}

        def read() -> None:
            for family in reader.collect():
                for s in family.samples:
                    if s.name in targets:
                        targets[s.name].set(s.value)
                    elif s.name == "process_cpu_seconds_total" and s.value > seen["cpu"]:
                        cpu.inc(s.value - seen["cpu"])
                        seen["cpu"] = s.value

        self._samplers.append(read)
        read()

    # --- what the engine and the routes report -----------------------------------------------------------------
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
        if self.multiprocess_dir is not None:
            self.refresh()

    def observe_pass_cost(self, cost: PassCost) -> None:
        self.batch_overhead.set(cost.overhead_tokens)
        self.pass_fixed.set(cost.fixed_s)
        self.pass_token.set(cost.per_token_s)

    def observe_embeddings(self, inputs: int, tokens: int) -> None:
        self.embedding_inputs.inc(inputs)
        self.embedding_tokens.inc(tokens)

    def watch_batcher(self, batcher) -> None:
        """``ptserve_queue_depth`` from the batcher (``ptserve.server.batcher.Batcher``) of this process."""
        self.sample(self.queue_depth, lambda: batcher.depth)

    def watch_cache(self, cache: AdapterCache) -> None:
        if self.multiprocess_dir is None:
            self.registry.register(_CacheCollector(cache))
            return
        counters = {name: Counter(f"ptserve_adapter_cache_{name}", help_text, registry=self.registry)
                    for name, help_text in _CACHE_COUNTERS}
        seen = dict.fromkeys(counters, 0)
        resident = self._gauge("ptserve_adapter_cache_resident_bytes", "Bytes of resident adapters.", "mostrecent")
        adapters = self._gauge("ptserve_adapter_cache_resident_adapters", "Resident adapters.", "mostrecent")
        capacity = self._gauge("ptserve_adapter_cache_capacity_bytes", "Adapter cache budget.", "mostrecent")

        def read() -> None:
            for name, counter in counters.items():
                value = getattr(cache.stats, name)
                if value > seen[name]:
                    counter.inc(value - seen[name])
                    seen[name] = value
            resident.set(cache.used_bytes)
            adapters.set(len(cache))
            capacity.set(cache.capacity)

        self._samplers.append(read)

    def observe_step(self, report) -> None:
        """One generation engine step (``ptserve.server.generation.runner.StepReport``; called from the engine thread)."""
        self.generation_step.observe(report.seconds)
        self.generation_batch.observe(report.rows)
        if self.multiprocess_dir is not None:  # running / waiting as this step left them, for every scrape
            self.refresh()

    def watch_generation(self, runner) -> None:
        running = self._gauge("ptserve_running_requests", "Generation requests decoding now.", "mostrecent")
        waiting = self._gauge("ptserve_waiting_requests", "Generation requests waiting for a slot.", "mostrecent")
        self.sample(running, lambda: runner.running)
        self.sample(waiting, lambda: runner.waiting)

    def render(self) -> bytes:
        self.refresh()
        if self.multiprocess_dir is not None:
            return scrape(self.multiprocess_dir)
        return generate_latest(self.registry)


_CACHE_COUNTERS = (("hits", "Adapter cache hits."), ("misses", "Adapter cache misses."),
                   ("loads", "Adapter loads from the store."), ("evictions", "Adapters evicted from the cache."))


class _CacheCollector(Collector):
    """Reads the adapter cache's own counters at scrape time (the cache stays free of Prometheus)."""

    def __init__(self, cache: AdapterCache):
        self.cache = cache

    def collect(self):
        s = self.cache.stats
        for name, help_text in _CACHE_COUNTERS:
            yield CounterMetricFamily(f"ptserve_adapter_cache_{name}", help_text, value=getattr(s, name))
        yield GaugeMetricFamily(
            "ptserve_adapter_cache_resident_bytes", "Bytes of resident adapters.", value=self.cache.used_bytes
        )
        yield GaugeMetricFamily("ptserve_adapter_cache_resident_adapters", "Resident adapters.", value=len(self.cache))
        yield GaugeMetricFamily("ptserve_adapter_cache_capacity_bytes", "Adapter cache budget.", value=self.cache.capacity)
