"""What the app holds while it runs: built in the lifespan, reached by routes through ``deps``."""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Literal

import torch

from ptserve.adapters_store.ids import AdapterId
from ptserve.adapters_store.keys import KeyStore, open_key_store
from ptserve.adapters_store.store import AdapterStore, open_store
from ptserve.adapters_store.validation import Limits
from ptserve.server.adapters import AdapterService
from ptserve.server.backbone import Backbone, load_backbone, load_frontend
from ptserve.server.batch_plan import BatchPolicy
from ptserve.server.auth import Authenticator
from ptserve.server.batcher import Batcher
from ptserve.server.calibrate import measure_pass_cost, warm_up
from ptserve.server.chat_template import ChatTemplate
from ptserve.server.cost_model import PassCost, from_setting
from ptserve.server.engine import Engine
from ptserve.server.engine_core.client import EngineClient
from ptserve.server.engine_core.local import LocalEngineClient, PassWatch
from ptserve.server.generation.engine import GenerationEngine, GenerationLimits
from ptserve.server.generation.runner import GenerationRunner
from ptserve.server.generation.scheduler import ADMISSION_POLICIES
from ptserve.server.hardware import ThreadsChoice, choose_threads, cpu_budget
from ptserve.server.limits import TenantLimiter
from ptserve.server.metrics import Metrics
from ptserve.server.settings import Settings

log = logging.getLogger(__name__)


Mode = Literal["inprocess", "worker", "core"]  # docs/design.md "Engine core and API workers (issue 12)"


@dataclass
class Frontend:
    """An API worker's stand-in for the engine: the backbone without weights (``load_frontend``), enough to
    validate uploads (``AdapterService``) and to tokenise."""

    backbone: Backbone

    @property
    def fp(self):
        return self.backbone.fingerprint


@dataclass
class ServerState:
    settings: Settings
    # inprocess: engine and API in this process; worker: the API only, the engine in a core process at
    # ``engine_address``; core: the engine only (no HTTP), serving workers through ``core_proc``
    mode: Mode = "inprocess"
    engine_address: str | None = None
    client: EngineClient | None = None  # the engine as every inference route calls it (None until started)
    metrics: Metrics = field(default_factory=Metrics)
    backbone: Backbone | None = None
    engine: Engine | None = None
    store: AdapterStore | None = None
    adapters: AdapterService | None = None
    batcher: Batcher | None = None  # encoder backbones: passes of classification and embedding rows
    generator: GenerationRunner | None = None  # decoder backbones: continuous batching on its own thread
    chat: ChatTemplate | None = None  # decoder backbones: renders chat messages to prompts
    load_error: str | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    watcher: asyncio.Task | None = None
    keys: KeyStore | None = None
    auth: Authenticator | None = None
    limiter: TenantLimiter | None = None
    started_at: float = field(default_factory=time.time)  # the bare backbone's `created` in /v1/models
    draining: bool = False  # SIGTERM received: /readyz 503, new requests 503, in-flight ones finish
    inflight: int = 0  # requests inside the app (operations endpoints excluded)
    threads: ThreadsChoice | None = None  # torch intra-op threads and why
    pass_cost: PassCost | None = None  # encoder backbones: the planner's pass cost (measured or set)

    def __post_init__(self) -> None:
        s = self.settings
        try:
            self.keys = open_key_store(s.store)
        except ValueError as exc:  # the adapter store fails the same way in start(); /readyz reports it
            log.error("no key store: %s", exc)
        self.auth = Authenticator(s.admin_key, self.keys, s.key_cache_ttl_s)
        self.limiter = TenantLimiter(s.max_concurrent_per_tenant)

    @property
    def idle(self) -> bool:
        """No request in flight and nothing queued: a drain may end."""
        return (
            self.inflight == 0
            and (self.batcher is None or self.batcher.idle)
            and (self.client is None or self.client.idle)
        )

    async def start(self) -> None:
        """Load the backbone off the event loop, then open the store and start the batcher."""
        if self.mode == "worker":
            return await self._start_worker()
        s = self.settings
        try:
            self.threads = choose_threads(s.threads, cpu_budget())
            torch.set_num_threads(self.threads.threads)
            log.info("torch intra-op threads: %d (%s)", self.threads.threads, self.threads.reason)
            self.backbone = await asyncio.to_thread(load_backbone, s.backbone, s.device, s.dtype, s.allow_download)
            causal = self.backbone.family.causal
            admission = ADMISSION_POLICIES[s.admission]()
            self.engine = GenerationEngine(self.backbone, generation_limits(s), admission) if causal \
                else Engine(self.backbone)
            self.store = open_store(s.store)
            limits = Limits(max_bytes=s.max_adapter_bytes, max_virtual_tokens=s.max_virtual_tokens)
            self.adapters = AdapterService(self.store, self.engine, s.cache_bytes, limits)
            self.metrics.watch_cache(self.adapters.cache)
            if causal:
                self.chat = ChatTemplate(self.backbone.tokenizer, s.backbone, s.chat_template)
                self.generator = GenerationRunner(self.engine, on_step=self.metrics.observe_step)
                self.generator.start()
                self.metrics.watch_generation(self.generator)
                self.client = LocalEngineClient(self.adapters, None, self.engine, None, self.engine_facts,
                                                runner=self.generator, max_waiting=s.max_queue_rows)
            else:
                self.pass_cost = await asyncio.to_thread(self._prepare_encoder)
                log.info("batch planner: %s", self.pass_cost.describe())
                self.metrics.observe_pass_cost(self.pass_cost)
                policy = BatchPolicy(
                    max_batch_size=s.max_batch_size, max_batch_tokens=s.max_batch_tokens,
                    overhead_tokens=self.pass_cost.overhead_tokens,
                )
                watch = PassWatch(self.engine.run)
                self.batcher = Batcher(
                    watch, policy, s.max_wait_ms, on_pass=self.metrics.observe_pass,
                    max_queue_rows=s.max_queue_rows, max_queue_rows_per_tenant=s.max_queue_rows_per_tenant,
                )
                self.metrics.watch_batcher(self.batcher)  # ptserve_queue_depth, from the process that queues
                self.batcher.start()
                self.client = LocalEngineClient(self.adapters, self.batcher, self.engine, watch, self.engine_facts)
            await self.adapters.preload([AdapterId.parse(x) for x in s.preload])
            self.watcher = asyncio.get_running_loop().create_task(self.adapters.watch(), name="ptserve-watch")
            fp = self.backbone.fingerprint
            self.metrics.build.info({
                "version": _version(), "backbone": s.backbone, "model_type": fp.model_type,
                "device": str(self.backbone.device), "dtype": str(self.backbone.dtype).removeprefix("torch."),
                "dtype_reason": self.backbone.dtype_reason, "threads": str(self.threads.threads),
            })
            self.ready.set()
            log.info("ptserve ready: backbone %s, store %s", s.backbone, s.store)
        except Exception as exc:  # surfaced by /readyz and by every route that needs the engine
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("start-up failed")

    async def _start_worker(self) -> None:
        """An API worker: tokenizer and geometry of the backbone, the store (uploads, listings, the change feed)
        and a client of the engine core process; no weights, no batcher."""
        from ptserve.server.engine_core.remote import RemoteEngineClient

        s = self.settings
        try:
            self.backbone = await asyncio.to_thread(load_frontend, s.backbone, s.device, s.dtype, s.allow_download)
            if self.backbone.family.causal:  # the text of generations is made here (engine_core.streams)
                self.chat = ChatTemplate(self.backbone.tokenizer, s.backbone, s.chat_template)
            self.store = open_store(s.store)
            limits = Limits(max_bytes=s.max_adapter_bytes, max_virtual_tokens=s.max_virtual_tokens)
            self.adapters = AdapterService(self.store, Frontend(self.backbone), 0, limits)
            self.client = RemoteEngineClient(self.engine_address, s.request_timeout_s)
            await self.client.start()
            self.adapters.listeners.append(self.client.adapter_changed)
            self.watcher = asyncio.get_running_loop().create_task(self.adapters.watch(), name="ptserve-watch")
            self.ready.set()
            log.info("ptserve API worker ready: backbone %s, engine core at %s", s.backbone, self.engine_address)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.exception("start-up failed")

    def engine_facts(self) -> dict:
        """The engine's side of ``/readyz``."""
        facts = {
            "device": str(self.backbone.device), "dtype": str(self.backbone.dtype).removeprefix("torch."),
            "dtype_reason": self.backbone.dtype_reason, "threads": self.threads.threads,
        }
        if self.pass_cost is not None:
            facts["batch_overhead_tokens"] = self.pass_cost.overhead_tokens
            facts["batch_overhead_source"] = self.pass_cost.source
        return facts

    def _prepare_encoder(self) -> PassCost:
        """Before any request runs: compile the encoder when asked (warmed up here, so no request waits for the
        compiler), then the planner's pass cost: the setting when given, else measured on the loaded backbone."""
        s = self.settings
        if s.compile:
            started = time.perf_counter()
            self.backbone.model = torch.compile(self.backbone.model, dynamic=True)
            warm_up(self.engine, s.max_batch_size, s.max_batch_tokens)
            log.info("encoder compiled (torch.compile, dynamic shapes) in %.1f s", time.perf_counter() - started)
        if s.batch_overhead_tokens != "auto":
            return from_setting(s.batch_overhead_tokens)
        return measure_pass_cost(self.engine, s.max_batch_size, s.max_batch_tokens)

    async def stop(self) -> None:
        if self.client is not None and hasattr(self.client, "close"):
            await self.client.close()
        if self.watcher:
            self.watcher.cancel()
            await asyncio.gather(self.watcher, return_exceptions=True)
        if self.batcher:
            await self.batcher.stop()
        if self.generator:
            await asyncio.to_thread(self.generator.stop)
        if self.store:
            await self.store.close()
        if self.keys:
            await self.keys.close()


def generation_limits(s: Settings) -> GenerationLimits:
    return GenerationLimits(max_running=s.max_running, max_seq_tokens=s.max_seq_tokens,
                            max_batch_tokens=s.max_batch_tokens, prefix_cap=s.max_virtual_tokens)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ptserve")
    except PackageNotFoundError:
        return "dev"
