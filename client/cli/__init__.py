"""The ``ptserve`` command. This package (in ``ptserve-client``, torch-free) owns the commands that only talk
to a server: ``adapters upload|list|show|download|delete`` (``adapters``), ``classify`` and ``generate``
(``infer``), ``keys create|list|revoke`` (``keys``); ``context`` holds what they share (the connection
options, read once into the context object, and the output helpers). With the server distribution installed,
``ptserve.server.cli`` adds ``serve``, ``train`` and ``adapters import-thudm``; without it they say what to
install.

Human tables by default, ``--json`` for scripts. Every error prints one line on stderr,
``error: <status> <type>: <message>`` (the server's own type and message), and exits 1 (2 for bad arguments
or files).
"""

from __future__ import annotations

import importlib.util

import typer

from ptserve.client.cli.adapters import adapters_app
from ptserve.client.cli.context import SERVER_DIST, fail, root_callback
from ptserve.client.cli.infer import classify, generate
from ptserve.client.cli.keys import keys_app

app = typer.Typer(help="ptserve: serve many tenants' P-Tuning v2 prefixes on one frozen backbone.",
                  no_args_is_help=True)
app.callback()(root_callback)
app.add_typer(adapters_app, name="adapters")
app.add_typer(keys_app, name="keys")
app.command("classify")(classify)
app.command("generate")(generate)


def main() -> None:
    """Entry point of the ``ptserve`` script: the client commands, plus the server's where it is installed."""
    add_server_commands()
    app()


def add_server_commands() -> None:
    if importlib.util.find_spec("ptserve.server") is not None:
        import ptserve.server.cli  # noqa: F401  (registers serve, train, adapters import-thudm on `app`)
        return
    anything = {"allow_extra_args": True, "ignore_unknown_options": True}
    for group, name in ((app, "serve"), (app, "train"), (adapters_app, "import-thudm")):
        group.command(name, help=f"Needs the server distribution (pip install {SERVER_DIST}).",
                      context_settings=anything)(_needs_server)


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
