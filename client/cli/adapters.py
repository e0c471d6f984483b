"""``ptserve adapters upload|list|show|download|delete``: adapters on a server (``import-thudm``, which runs
torch, comes with the server distribution)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ptserve.client.cli.context import (
    SERVER_DIST,
    Connection,
    connected,
    fail,
    parse_labels,
    print_json,
    stderr,
    stdout,
)

adapters_app = typer.Typer(
    help="Upload, list, show, download, delete and import adapters.", no_args_is_help=True
)
ADAPTER = typer.Argument(..., help="Adapter id, tenant/name.")


def adapter_table(infos) -> Table:
    table = Table("id", "version", "task", "virtual tokens", "labels", "bytes", "created")
    for i in infos:
        labels, size = ", ".join(i.labels), f"{i.bytes:,}"
        table.add_row(i.id, str(i.version), i.task, str(i.num_virtual_tokens), labels, size, i.created_at)
    return table


@adapters_app.command("upload")
@connected
def adapters_upload(
    conn: Connection,
    adapter: str = ADAPTER,
    source: Path = typer.Argument(..., help="A blob file, a PEFT folder, or a `ptserve train --out` folder."),
    labels: Optional[str] = typer.Option(
        None, help="Labels of a PEFT classifier, 'a,b,c' (default: its labels.json)."
    ),
) -> None:
    """Upload a new version of an adapter."""
    with conn.client() as c:
        info = c.upload(adapter, source, parse_labels(labels))
    if conn.as_json:
        return print_json(info.raw)
    stdout().print(adapter_table([info]))
    for note in info.notes:
        stderr().print(f"[yellow]note:[/] {note}", highlight=False)


@adapters_app.command("list")
@connected
def adapters_list(
    conn: Connection, tenant: Optional[str] = typer.Option(None, help="Only this tenant's adapters.")
) -> None:
    """List adapters (a tenant key sees its own)."""
    with conn.client() as c:
        infos = list(c.iter_adapters(tenant))
    if conn.as_json:
        return print_json([i.raw for i in infos])
    stdout().print(adapter_table(infos) if infos else "no adapters")


@adapters_app.command("show")
@connected
def adapters_show(conn: Connection, adapter: str = ADAPTER) -> None:
    """Show one adapter's current version."""
    with conn.client() as c:
        info = c.get_adapter(adapter)
    if conn.as_json:
        return print_json(info.raw)
    table = Table("field", "value", show_header=False)
    for key, value in info.raw.items():
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    stdout().print(table)


@adapters_app.command("download")
@connected
def adapters_download(
    conn: Connection,
    adapter: str = ADAPTER,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the ptserve blob to this file."),
    peft: Optional[Path] = typer.Option(
        None, "--peft", help="Write a PEFT folder (PEFT loads it) to this folder."
    ),
) -> None:
    """Download an adapter as a ptserve blob and/or export it as a PEFT folder."""
    if out is None and peft is None:
        fail("say where: --out FILE (ptserve blob) and/or --peft DIR (PEFT folder)", 2)
    with conn.client() as c:
        blob = c.download_adapter(adapter)
        written = {}
        if out is not None:
            out.write_bytes(blob)
            written["blob"] = str(out)
        if peft is not None:
            try:
                from ptserve.adapters_store.peft_folder import blob_to_peft_folder
            except ImportError:
                fail("--peft converts with torch: it needs the server distribution "
                     f"(pip install {SERVER_DIST}); --out FILE saves the blob without it", 2)
            try:
                written["peft"] = str(blob_to_peft_folder(blob, peft))
            except ValueError as exc:  # NoPeftEquivalent: a head PEFT does not have (the blob is still saved)
                fail(f"--peft: {exc}", 2)
    if conn.as_json:
        return print_json({"adapter": adapter, "bytes": len(blob), **written})
    for kind, path in written.items():
        stdout().print(f"{adapter} -> {path} ({kind})", highlight=False)


@adapters_app.command("delete")
@connected
def adapters_delete(conn: Connection, adapter: str = ADAPTER) -> None:
    """Delete an adapter (every version)."""
    with conn.client() as c:
        c.delete_adapter(adapter)
    if conn.as_json:
        return print_json({"deleted": adapter})
    stdout().print(f"deleted {adapter}", highlight=False)
