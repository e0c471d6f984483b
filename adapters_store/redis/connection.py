"""One Redis connection recipe for everything ptserve keeps in Redis (adapters and tenant keys): the store URL's
options, the client built from them, and how an outage is told apart from a bug — the one place Redis errors
are mapped to ``StoreUnavailable`` (503)."""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ptserve.adapters_store.errors import StoreUnavailable

DEFAULTS = {"prefix": "ptserve", "timeout_s": 1.0, "gc_grace_s": 60.0, "health_check_interval": 10.0}
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # no glob specials and no braces (they'd break hash tags)

# What a Redis outage looks like from here (ConnectionError covers BusyLoadingError and MaxConnectionsError);
# the read-only/OOM/cluster-down answers (and the MISCONF ones, by prefix) come from a server that cannot take
# the command now.
UNAVAILABLE = (
    rex.ConnectionError, rex.TimeoutError, rex.ReadOnlyError, rex.OutOfMemoryError, rex.ClusterDownError,
    rex.TryAgainError, OSError,
)
_UNAVAILABLE_REPLIES = ("MISCONF", "NOREPLICAS", "MASTERDOWN", "LOADING")


@dataclass(frozen=True)
class RedisOptions:
    """A store URL read once: ptserve's options (query ``?prefix=&timeout_s=&gc_grace_s=&health_check_interval=``
    or kwargs, kwargs winning) apart from what redis-py is given."""

    url: str  # every option written out, so it round-trips through ``open_store``
    redis_url: str  # what redis-py connects to: the URL without ptserve's options
    redacted_url: str  # for messages: no credentials, no query
    prefix: str
    timeout_s: float
    gc_grace_s: float
    health_check_interval: float

    @classmethod
    def parse(cls, url: str, **options) -> "RedisOptions":
        if unknown := set(options) - set(DEFAULTS):
            raise TypeError(f"unknown RedisStore options {sorted(unknown)}")
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        given = dict((k, v) for k, v in query if k in DEFAULTS)
        given.update((k, v) for k, v in options.items() if v is not None)
        opts = {k: type(d)(given.get(k, d)) for k, d in DEFAULTS.items()}
        if not _PREFIX_RE.fullmatch(opts["prefix"]):
            raise ValueError(f"store key prefix {opts['prefix']!r} must match {_PREFIX_RE.pattern}")
        if opts["timeout_s"] <= 0 or opts["gc_grace_s"] < 0 or opts["health_check_interval"] <= 0:
            raise ValueError(f"store options must be positive: {opts}")
        rest = [(k, v) for k, v in query if k not in DEFAULTS]
        return cls(
            url=parts._replace(query=urlencode(rest + list(opts.items()))).geturl(),
            redis_url=parts._replace(query=urlencode(rest)).geturl(),
            redacted_url=parts._replace(netloc=parts.netloc.rpartition("@")[2], query="").geturl(),
            **opts,
        )


def connect(options: RedisOptions) -> redis.asyncio.Redis:
    """The client (a connection pool). One immediate retry on a connection error, none on a timeout: after Redis
    restarts, every pooled connection to the old process fails on first use and is replaced by the retry (no 503
    for it), while a dead server still answers 503 at once (connection refused, twice) and a hung one within the
    timeout. A retried publish whose reply was lost can only cost a skipped version number."""
    return redis.asyncio.Redis.from_url(
        options.redis_url, socket_timeout=options.timeout_s, socket_connect_timeout=options.timeout_s,
        health_check_interval=options.health_check_interval,
        retry=Retry(NoBackoff(), 1, supported_errors=(rex.ConnectionError,)), decode_responses=False,
    )


def is_outage(e: BaseException) -> bool:
    """A Redis that cannot take the command now (503), as opposed to a bug of ours (any other ResponseError)."""
    if isinstance(e, rex.ResponseError) and not isinstance(e, UNAVAILABLE):
        return str(e).startswith(_UNAVAILABLE_REPLIES)
    return isinstance(e, UNAVAILABLE)


def translated(fn):
    """Surface every Redis outage in the coroutine method ``fn`` as ``StoreUnavailable`` (naming
    ``self.where``)."""

    @functools.wraps(fn)
    async def wrapper(self, *args, **kwargs):
        try:
            return await fn(self, *args, **kwargs)
        except (*UNAVAILABLE, rex.ResponseError) as e:
            if not is_outage(e):
                raise
            raise StoreUnavailable(f"{self.where}: {type(e).__name__}: {e}") from e

    return wrapper
