"""``ptserve keys create|list|revoke``: tenant API keys (the admin key is needed)."""

from __future__ import annotations

from typing import Optional

import typer
from rich.table import Table

from ptserve.client.cli.context import Connection, connected, print_json, stderr, stdout

keys_app = typer.Typer(
    help="Create, list and revoke tenant API keys (admin key needed).", no_args_is_help=True
)


@keys_app.command("create")
@connected
def keys_create(
    conn: Connection,
    tenant: str = typer.Argument(..., help="Tenant the key belongs to."),
    name: Optional[str] = typer.Option(None, help="A note for humans, e.g. where the key is used."),
) -> None:
    """Create a tenant key; it is shown once (the server keeps only its hash)."""
    with conn.client() as c:
        created = c.create_key(tenant, name=name)
    if conn.as_json:
        return print_json(created.raw)
    stdout().print(created.key, highlight=False)
    stderr().print(f"[dim]key for tenant {tenant}; store it now, it is not shown again[/]", highlight=False)


@keys_app.command("list")
@connected
def keys_list(conn: Connection, tenant: str = typer.Argument(..., help="Tenant whose keys to list.")) -> None:
    """List a tenant's keys (ids and metadata, never the secrets)."""
    with conn.client() as c:
        keys = c.list_keys(tenant)
    if conn.as_json:
        return print_json([k.raw for k in keys])
    columns = sorted({name for k in keys for name in k.raw}) or ["id"]
    table = Table(*columns, title=f"keys of {tenant}")
    for k in keys:
        table.add_row(*(str(k.raw.get(col, "")) for col in columns))
    stdout().print(table if keys else f"tenant {tenant} has no keys")


@keys_app.command("revoke")
@connected
def keys_revoke(
    conn: Connection,
    tenant: str = typer.Argument(..., help="Tenant of the key."),
    key_id: str = typer.Argument(..., help="Key id as `keys list` shows it."),
) -> None:
    """Revoke a tenant key: it stops working at once."""
    with conn.client() as c:
        c.revoke_key(tenant, key_id)
    if conn.as_json:
        return print_json({"revoked": key_id, "tenant": tenant})
    stdout().print(f"revoked key {key_id} of tenant {tenant}", highlight=False)
