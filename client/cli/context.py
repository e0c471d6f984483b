"""What every ``ptserve`` command shares (the server distribution's commands use it too): the connection
options ``--server``, ``--api-key`` and ``--json``, declared once and read into a ``Connection`` (the
command's context object), the one-line error exit and the output helpers.

The options are accepted before the subcommand (``ptserve --server URL adapters list``, read by the root
callback, with ``PTSERVE_URL`` / ``PTSERVE_API_KEY`` behind them) and after it (``ptserve adapters list
--server URL --json``, how they have always been given), where they win.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ptserve.client.errors import APIConnectionError, APIError, PtserveClientError
from ptserve.client.sdk import Client

SERVER_DIST = "ptserve"  # the distribution with the server, the trainer and the torch-based converters

# name, type, default, flags, environment variable (read by the root callback), help
_OPTIONS = (
    ("server", Optional[str], None, ("--server", "-s"), "PTSERVE_URL",
     "Server URL [PTSERVE_URL; default http://127.0.0.1:8000]."),
    ("api_key", Optional[str], None, ("--api-key",), "PTSERVE_API_KEY", "API key [PTSERVE_API_KEY]."),
    ("as_json", bool, False, ("--json",), None, "Print JSON for scripts instead of a table."),
)
_CTX = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)


def _parameters(read_env: bool) -> list[inspect.Parameter]:
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=typer.Option(
            default, *flags, envvar=env if read_env else None, help=help))
        for name, kind, default, flags, env, help in _OPTIONS
    ]


@dataclass(frozen=True)
class Connection:
    """``ctx.obj`` of the ``ptserve`` command: where the server is, the key, and whether to print JSON."""

    server: str | None = None
    api_key: str | None = None
    as_json: bool = False

    def overridden(self, server: str | None, api_key: str | None, as_json: bool) -> "Connection":
        """These options as given after the subcommand, over the root's."""
        return Connection(
            server if server is not None else self.server,
            api_key if api_key is not None else self.api_key,
            as_json or self.as_json,
        )

    @contextmanager
    def client(self) -> Iterator[Client]:
        """A client whose errors end the command with one clear line (exit 1; 2 for bad arguments or
        files)."""
        try:
            with Client(self.server, self.api_key) as c:
                yield c
        except APIError as exc:
            hint = {401: " (pass --api-key or set PTSERVE_API_KEY)", 403: " (this key may not do that)"}.get(
                exc.status, ""
            )
            fail(f"{exc.status} {exc.type}: {exc.message}{hint}")
        except APIConnectionError as exc:
            fail(f"cannot reach the server: {exc}")
        except PtserveClientError as exc:
            fail(str(exc))
        except (FileNotFoundError, ValueError) as exc:
            fail(str(exc), 2)


def root_callback(ctx: typer.Context, **options) -> None:
    """Serve many tenants' P-Tuning v2 prefixes on one frozen backbone."""
    ctx.obj = Connection(**options)


root_callback.__signature__ = inspect.Signature([_CTX, *_parameters(read_env=True)])


def connected(command: Callable) -> Callable:
    """A command that talks to a server: typer sees it with the connection options added, and it is called
    with ``conn``, the ``Connection`` they make (the root's, overridden by those given after the
    subcommand)."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "conn"]

    @functools.wraps(command)
    def run(ctx: typer.Context, *args, server=None, api_key=None, as_json=False, **kwargs):
        root = ctx.obj if isinstance(ctx.obj, Connection) else Connection()
        return command(*args, conn=root.overridden(server, api_key, as_json), **kwargs)

    run.__signature__ = inspect.Signature([_CTX, *own, *_parameters(read_env=False)])
    run.__annotations__ = {}  # the signature holds the evaluated annotations typer reads
    return run


# --- output -------------------------------------------------------------------------------------------------
def stdout() -> Console:
    return Console(soft_wrap=True)


def stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)


def fail(message: str, code: int = 1):
    """Print ``error: <message>`` on stderr (the message as is, never read as markup) and exit with
    ``code``."""
    stderr().print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def parse_labels(labels: str | None) -> list[str] | None:
    """``--labels``: a JSON list or ``a,b,c``."""
    if labels is None:
        return None
    if labels.strip().startswith("["):
        return json.loads(labels)
    return [x.strip() for x in labels.split(",") if x.strip()]
