"""The ``ptserve`` command line (typer). ``ptserve serve`` runs the server; flags mirror ``PTSERVE_*`` settings."""
from __future__ import annotations

import ipaddress
import logging
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
    import uvicorn

    from server.api.app import create_app

    flags = dict(host=host, port=port, store=store, backbone=backbone, device=device, dtype=dtype, threads=threads)
    settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    if not settings.admin_key and not _is_loopback(settings.host) and not insecure:
        typer.echo(
            f"refusing to bind {settings.host} without PTSERVE_ADMIN_KEY: anyone could manage adapters. "
            "Set an admin key, bind 127.0.0.1, or pass --insecure.", err=True,
        )
        raise typer.Exit(2)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level,
                timeout_graceful_shutdown=30)


@app.command()
def version() -> None:
    """Print the ptserve version."""
    from server.api.state import _version

    typer.echo(_version())


if __name__ == "__main__":
    app()
