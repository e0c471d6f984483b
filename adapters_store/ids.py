"""Adapter ids: ``tenant/name``, checked so an id can never name a path outside its tenant's space.

The syntax is defined in ``ptserve.client.wire.ids``, shared with the client; this module is the store's
import path for it.
"""
from __future__ import annotations

from ptserve.client.wire.ids import NAME_RE, TENANT_RE, AdapterId, check_tenant  # noqa: F401
