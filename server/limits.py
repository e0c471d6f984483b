"""Overload answers: the typed errors for a full queue, a busy tenant, a missed deadline and a draining server,
and the per-tenant concurrency limiter. Torch- and FastAPI-free (the batcher raises these too)."""
from __future__ import annotations

import math
from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from ptserve.adapters_store.errors import PtserveError


class Overloaded(PtserveError):
    """429: try again after ``retry_after`` seconds (sent as ``Retry-After``)."""

    status, type = 429, "overloaded"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = max(1, min(60, math.ceil(retry_after)))
        self.headers = {"Retry-After": str(self.retry_after)}


class QueueFull(Overloaded):
    type = "queue_full"


class TenantBusy(Overloaded):
    type = "tenant_concurrency_limit"


class DeadlineExceeded(PtserveError):
    status, type = 504, "deadline_exceeded"


class Draining(PtserveError):
    status, type = 503, "draining"

    def __init__(self, message: str = "the server is shutting down; retry on another replica"):
        super().__init__(message)
        self.headers = {"Retry-After": "1", "Connection": "close"}


class TenantLimiter:
    """At most ``limit`` requests of one tenant in flight at once (0 = no limit)."""

    def __init__(self, limit: int):
        self.limit = limit
        self._inflight: defaultdict[str, int] = defaultdict(int)

    def inflight(self, tenant: str) -> int:
        return self._inflight.get(tenant, 0)

    @contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        if self.limit and self._inflight[tenant] >= self.limit:
            raise TenantBusy(
                f"tenant {tenant} already has {self.limit} requests in flight (the per-tenant limit); retry later"
            )
        self._inflight[tenant] += 1
        try:
            yield
        finally:
            self._inflight[tenant] -= 1
            if not self._inflight[tenant]:
                del self._inflight[tenant]
