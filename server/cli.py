"""The ``ptserve`` command line (typer). ``ptserve serve`` runs the server; flags mirror ``PTSERVE_*`` settings."""
from __future__ import annotations

import inspect
import ipaddress
from typing import Optional

import typer
from pydantic import ValidationError

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


def serve(insecure: bool = False, **flags: Optional[str]) -> None:
    """Run the HTTP server. Every PTSERVE_* setting but the admin key is also a flag (--max-batch-size 32 =
    PTSERVE_MAX_BATCH_SIZE=32); flags win over the environment."""
    from server.api.app import create_app
    from server.logs import configure_logging
    from server.serving import serve_app

    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        typer.echo(f"invalid setting: {exc}", err=True)
        raise typer.Exit(2) from None
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


ENV_ONLY = {"admin_key"}  # secrets stay out of the command line, where `ps` would show them


def _settings_flags() -> inspect.Signature:
    """``serve``'s signature: one ``--flag`` per Settings field (DESIGN decision 6: the same names everywhere).
    Values arrive as text and are validated by the Settings class itself, exactly like environment variables."""
    params = [inspect.Parameter("insecure", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--insecure", help="Allow a non-loopback bind without PTSERVE_ADMIN_KEY."))]
    for name, field in Settings.model_fields.items():
        if name in ENV_ONLY:
            continue
        flag = "--" + name.replace("_", "-")
        option = typer.Option(None, flag, help=f"{field.description} [PTSERVE_{name.upper()}]", show_default=False)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str], default=option))
    return inspect.Signature(params, return_annotation=None)


serve.__signature__ = _settings_flags()
app.command()(serve)


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
