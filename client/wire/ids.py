"""Adapter ids (``tenant/name``) and tenant names: the syntax the server enforces, so that an id can never
name a path outside its tenant's space. (The client checks only the ``tenant/name`` shape and leaves the
rest to the server, whose 400 ``invalid_adapter_id`` names the rule.)"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ptserve.client.wire.errors import InvalidAdapterId

TENANT_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")  # always fullmatch: "$" also matches before a final "\n"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True, order=True)
class AdapterId:
    tenant: str
    name: str

    def __str__(self) -> str:
        return f"{self.tenant}/{self.name}"

    @classmethod
    def parse(cls, text: str) -> "AdapterId":
        tenant, sep, name = text.partition("/")
        if not sep:
            raise InvalidAdapterId(f"adapter id {text!r} must be 'tenant/name'")
        return cls.of(tenant, name)

    @classmethod
    def of(cls, tenant: str, name: str) -> "AdapterId":
        if not TENANT_RE.fullmatch(tenant):
            raise InvalidAdapterId(
                f"tenant {tenant!r} must match {TENANT_RE.pattern} (lowercase letters, digits, '_' and '-')"
            )
        if not NAME_RE.fullmatch(name) or ".." in name:
            raise InvalidAdapterId(
                f"adapter name {name!r} must match {NAME_RE.pattern} and contain no '..'"
            )
        return cls(tenant, name)


def check_tenant(tenant: str) -> str:
    if not TENANT_RE.fullmatch(tenant):
        raise InvalidAdapterId(f"tenant {tenant!r} must match {TENANT_RE.pattern}")
    return tenant
