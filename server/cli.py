"""The ``ptserve`` command line (typer). ``ptserve serve`` runs the server; flags mirror ``PTSERVE_*`` settings."""
from __future__ import annotations

import ipaddress
from typing import Optional

import typer

from server.settings import Settings

app = typer.Typer(help="ptserve: serve many tenants' P-Tuning v2 prefixes on one frozen backbone.",
                  no_args_is_help=True)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@app.command()
def serve(
    host: Optional[str] = typer.Option(None, help="Bind address [PTSERVE_HOST]."),
    port: Optional[int] = typer.Option(None, help="Bind port [PTSERVE_PORT]."),
    store: Optional[str] = typer.Option(None, help="file://PATH or redis://HOST:PORT/DB [PTSERVE_STORE]."),
    backbone: Optional[str] = typer.Option(None, help="'minilm', a model folder or hub id [PTSERVE_BACKBONE]."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda [PTSERVE_DEVICE]."),
    dtype: Optional[str] = typer.Option(None, help="auto, float32, float16 or bfloat16 [PTSERVE_DTYPE]."),
    threads: Optional[int] = typer.Option(None, help="torch threads on cpu, 0 = default [PTSERVE_THREADS]."),
    insecure: bool = typer.Option(False, help="Allow a non-loopback bind without PTSERVE_ADMIN_KEY."),
) -> None:
    """Run the HTTP server (settings not given as flags come from PTSERVE_* variables)."""
    from server.api.app import create_app
    from server.logs import configure_logging
    from server.serving import serve_app

    flags = dict(host=host, port=port, store=store, backbone=backbone, device=device, dtype=dtype, threads=threads)
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    if not settings.admin_key and not _is_loopback(settings.host) and not insecure:
        typer.echo(
            f"refusing to bind {settings.host} without PTSERVE_ADMIN_KEY: anyone could manage adapters. "
            "Set an admin key, bind 127.0.0.1, or pass --insecure.", err=True,
        )
        raise typer.Exit(2)
    configure_logging(settings.log_level, settings.log_format)
    fastapi_app = create_app(settings)
    # One worker per process (a replica); run more replicas on the same store to scale (docs/design.md).
    serve_app(fastapi_app, fastapi_app.state.ptserve, settings.host, settings.port, settings.log_level,
              settings.drain_timeout_s)


@app.command()
def version() -> None:
    """Print the ptserve version."""
    from server.api.state import _version

    typer.echo(_version())


# Client commands (adapters, classify, generate, keys) and the trainer register themselves; their heavy imports
# (torch, the SDK) happen inside the commands, so `ptserve serve` starts as before.
from client.cli import register as _register_client  # noqa: E402
from server.training.cli import register as _register_training  # noqa: E402

_register_client(app)
_register_training(app)


if __name__ == "__main__":
    app()
