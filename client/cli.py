"""The ``ptserve`` command. This module (in ``ptserve-client``, torch-free) owns the commands that only talk to a
server: ``adapters upload|list|show|download|delete``, ``classify``, ``generate`` (streams to the terminal) and
``keys create|list|revoke``. With the server distribution installed, ``ptserve.server.cli`` adds ``serve``,
``train`` and ``adapters import-thudm`` (and ``download --peft`` converts with it); without it they say what to
install.

Human tables by default, ``--json`` for scripts. Every error prints one line on stderr,
``error: <status> <type>: <message>`` (the server's own type and message), and exits 1 (2 for bad arguments
or files).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.table import Table

from ptserve.client.errors import APIConnectionError, APIError, PtserveClientError
from ptserve.client.sdk import Client

ServerOpt = typer.Option(
    None,
    "--server",
    "-s",
    envvar="PTSERVE_URL",
    help="Server URL [PTSERVE_URL; default http://127.0.0.1:8000].",
)
KeyOpt = typer.Option(None, "--api-key", envvar="PTSERVE_API_KEY", help="API key [PTSERVE_API_KEY].")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")

adapters_app = typer.Typer(
    help="Upload, list, show, download, delete and import adapters.", no_args_is_help=True
)
keys_app = typer.Typer(
    help="Create, list and revoke tenant API keys (admin key needed).", no_args_is_help=True
)


app = typer.Typer(help="ptserve: serve many tenants' P-Tuning v2 prefixes on one frozen backbone.",
                  no_args_is_help=True)
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")

SERVER_DIST = "ptserve"  # the distribution with the server, the trainer and the torch-based converters


def main() -> None:
    """Entry point of the ``ptserve`` script: the client commands, plus the server's where it is installed."""
    add_server_commands()
    app()


def add_server_commands() -> None:
    if importlib.util.find_spec("ptserve.server") is not None:
        import ptserve.server.cli  # noqa: F401  (registers serve, train, adapters import-thudm on `app`)
        return
    for name in ("serve", "train"):
        app.command(name, help=f"Needs the server distribution (pip install {SERVER_DIST}).",
                    context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_needs_server)
    adapters_app.command("import-thudm", help=f"Needs the server distribution (pip install {SERVER_DIST}).",
                         context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(_needs_server)


@app.command()
def version() -> None:
    """Print the versions of ptserve-client and, where installed, of the ptserve server."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    for dist in ("ptserve-client", SERVER_DIST):
        try:
            typer.echo(f"{dist} {dist_version(dist)}")
        except PackageNotFoundError:
            typer.echo(f"{dist} not installed")


def _needs_server(ctx: typer.Context) -> None:
    fail(f"'{ctx.info_name}' runs the model: it needs the server distribution (pip install {SERVER_DIST}); "
         "this is ptserve-client, which only talks to a server", 2)


# --- plumbing -----------------------------------------------------------------------------------------------
def _out() -> Console:
    return Console(soft_wrap=True)


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1):
    _err().print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


@contextmanager
def _client(server: str | None, api_key: str | None) -> Iterator[Client]:
    """A client whose errors end the command with one clear line."""
    try:
        with Client(server, api_key) as c:
            yield c
    except APIError as exc:
        hint = {401: " (pass --api-key or set PTSERVE_API_KEY)", 403: " (this key may not do that)"}.get(
            exc.status, ""
        )
        fail(f"{exc.status} {exc.type}: {exc.message}{hint}".replace("[", r"\["))
    except APIConnectionError as exc:
        fail(f"cannot reach the server: {exc}".replace("[", r"\["))
    except PtserveClientError as exc:
        fail(str(exc).replace("[", r"\["))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc).replace("[", r"\["), 2)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _adapter_table(infos) -> Table:
    table = Table("id", "version", "task", "virtual tokens", "labels", "bytes", "created")
    for i in infos:
        table.add_row(
            i.id,
            str(i.version),
            i.task,
            str(i.num_virtual_tokens),
            ", ".join(i.labels),
            f"{i.bytes:,}",
            i.created_at,
        )
    return table


def _labels(labels: str | None) -> list[str] | None:
    if labels is None:
        return None
    if labels.strip().startswith("["):
        return json.loads(labels)
    return [x.strip() for x in labels.split(",") if x.strip()]


# --- adapters -----------------------------------------------------------------------------------------------
@adapters_app.command("upload")
def adapters_upload(
    adapter: str = typer.Argument(..., help="Adapter id, tenant/name."),
    source: Path = typer.Argument(..., help="A blob file, a PEFT folder, or a `ptserve train --out` folder."),
    labels: Optional[str] = typer.Option(
        None, help="Labels of a PEFT classifier, 'a,b,c' (default: its labels.json)."
    ),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Upload a new version of an adapter."""
    with _client(server, api_key) as c:
        info = c.upload(adapter, source, _labels(labels))
    if as_json:
        return _print_json(info.raw)
    _out().print(_adapter_table([info]))
    for note in info.notes:
        _err().print(f"[yellow]note:[/] {note}", highlight=False)


@adapters_app.command("list")
def adapters_list(
    tenant: Optional[str] = typer.Option(None, help="Only this tenant's adapters."),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List adapters (a tenant key sees its own)."""
    with _client(server, api_key) as c:
        infos = list(c.iter_adapters(tenant))
    if as_json:
        return _print_json([i.raw for i in infos])
    _out().print(_adapter_table(infos) if infos else "no adapters")


@adapters_app.command("show")
def adapters_show(
    adapter: str = typer.Argument(..., help="Adapter id, tenant/name."),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Show one adapter's current version."""
    with _client(server, api_key) as c:
        info = c.get_adapter(adapter)
    if as_json:
        return _print_json(info.raw)
    table = Table("field", "value", show_header=False)
    for key, value in info.raw.items():
        table.add_row(key, ", ".join(value) if isinstance(value, list) else str(value))
    _out().print(table)


@adapters_app.command("download")
def adapters_download(
    adapter: str = typer.Argument(..., help="Adapter id, tenant/name."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the ptserve blob to this file."),
    peft: Optional[Path] = typer.Option(
        None, "--peft", help="Write a PEFT folder (PEFT loads it) to this folder."
    ),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Download an adapter as a ptserve blob and/or export it as a PEFT folder."""
    if out is None and peft is None:
        fail("say where: --out FILE (ptserve blob) and/or --peft DIR (PEFT folder)", 2)
    with _client(server, api_key) as c:
        blob = c.download_adapter(adapter)
        written = {}
        if out is not None:
            out.write_bytes(blob)
            written["blob"] = str(out)
        if peft is not None:
            try:
                from ptserve.adapters_store.peft_folder import blob_to_peft_folder
            except ImportError:
                fail(f"--peft converts with torch: it needs the server distribution (pip install {SERVER_DIST}); "
                     "--out FILE saves the blob without it", 2)
            written["peft"] = str(blob_to_peft_folder(blob, peft))
    if as_json:
        return _print_json({"adapter": adapter, "bytes": len(blob), **written})
    for kind, path in written.items():
        _out().print(f"{adapter} -> {path} ({kind})", highlight=False)


@adapters_app.command("delete")
def adapters_delete(
    adapter: str = typer.Argument(..., help="Adapter id, tenant/name."),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Delete an adapter (every version)."""
    with _client(server, api_key) as c:
        c.delete_adapter(adapter)
    if as_json:
        return _print_json({"deleted": adapter})
    _out().print(f"deleted {adapter}", highlight=False)


# --- inference ----------------------------------------------------------------------------------------------
@app.command("classify")
def classify(
    adapter: str = typer.Argument(..., help="Adapter id, tenant/name."),
    texts: Optional[List[str]] = typer.Argument(None, help="Texts to classify."),
    file: Optional[Path] = typer.Option(
        None, "--file", "-f", help="Read texts from a file, one a line ('-' = stdin)."
    ),
    logits: bool = typer.Option(False, "--logits", help="Return the logits too."),
    truncate: bool = typer.Option(False, help="Cut inputs that are too long instead of failing."),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Classify texts with a classification adapter."""
    inputs = list(texts or [])
    if file is not None:
        lines = (
            sys.stdin.read().splitlines()
            if str(file) == "-"
            else file.read_text(encoding="utf-8").splitlines()
        )
        inputs += [line for line in lines if line.strip()]
    if not inputs:
        fail("no texts: pass them as arguments or with --file", 2)
    with _client(server, api_key) as c:
        result = c.classify(adapter, inputs, return_logits=logits, truncate=truncate)
    if as_json:
        return _print_json(result.raw)
    table = Table(
        "text", "label", "score", *(["logits"] if logits else []), title=f"{result.adapter} v{result.version}"
    )
    for text, p in zip(inputs, result.predictions):
        extra = [", ".join(f"{x:.3f}" for x in p.logits)] if logits and p.logits else []
        table.add_row(text, p.label, f"{p.score:.3f}", *extra)
    _out().print(table)


@app.command("generate")
def generate(
    adapter: str = typer.Argument(..., help="Adapter id, tenant/name."),
    prompt: str = typer.Argument(..., help="The prompt."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Tokens to generate at most."),
    temperature: Optional[float] = typer.Option(None, help="0 = greedy."),
    top_p: Optional[float] = typer.Option(None),
    top_k: Optional[int] = typer.Option(None),
    seed: Optional[int] = typer.Option(None, help="Same seed, same text."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as it is generated."),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Generate text with a generation adapter (streams to the terminal)."""
    params = dict(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=list(stop) if stop else None,
    )
    with _client(server, api_key) as c:
        if not stream or as_json:
            result = c.generate(adapter, prompt, **params)
            if as_json:
                return _print_json(result.raw)
            sys.stdout.write(result.text + "\n")
            _err().print(
                f"[dim]finish_reason={result.finish_reason} usage={result.usage}[/]", highlight=False
            )
            return
        finish = None
        for event in c.generate_stream(adapter, prompt, **params):
            if event.text:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            finish = event.finish_reason or finish
        sys.stdout.write("\n")
        _err().print(f"[dim]finish_reason={finish}[/]", highlight=False)


# --- keys ---------------------------------------------------------------------------------------------------
@keys_app.command("create")
def keys_create(
    tenant: str = typer.Argument(..., help="Tenant the key belongs to."),
    name: Optional[str] = typer.Option(None, help="A note for humans, e.g. where the key is used."),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Create a tenant key; it is shown once (the server keeps only its hash)."""
    with _client(server, api_key) as c:
        created = c.create_key(tenant, name=name)
    if as_json:
        return _print_json(created.raw)
    _out().print(created.key, highlight=False)
    _err().print(f"[dim]key for tenant {tenant}; store it now, it is not shown again[/]", highlight=False)


@keys_app.command("list")
def keys_list(
    tenant: str = typer.Argument(..., help="Tenant whose keys to list."),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """List a tenant's keys (ids and metadata, never the secrets)."""
    with _client(server, api_key) as c:
        keys = c.list_keys(tenant)
    if as_json:
        return _print_json([k.raw for k in keys])
    columns = sorted({name for k in keys for name in k.raw}) or ["id"]
    table = Table(*columns, title=f"keys of {tenant}")
    for k in keys:
        table.add_row(*(str(k.raw.get(col, "")) for col in columns))
    _out().print(table if keys else f"tenant {tenant} has no keys")


@keys_app.command("revoke")
def keys_revoke(
    tenant: str = typer.Argument(..., help="Tenant of the key."),
    key_id: str = typer.Argument(..., help="Key id as `keys list` shows it."),
    server: Optional[str] = ServerOpt,
    api_key: Optional[str] = KeyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Revoke a tenant key: it stops working at once."""
    with _client(server, api_key) as c:
        c.revoke_key(tenant, key_id)
    if as_json:
        return _print_json({"revoked": key_id, "tenant": tenant})
    _out().print(f"revoked key {key_id} of tenant {tenant}", highlight=False)
