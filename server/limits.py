"""The per-tenant concurrency limiter, and the overload answers the batcher and the routes raise: a full
queue, a busy tenant, a missed deadline, a draining server (defined with every API error in
``ptserve.client.wire.errors``). Torch- and FastAPI-free."""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Iterator

from ptserve.client.wire.errors import DeadlineExceeded, Draining, Overloaded, QueueFull, TenantBusy  # noqa: F401


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
