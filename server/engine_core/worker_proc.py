"""An API worker process: the HTTP app in ``worker`` mode on a listening socket its supervisor bound (``FD``),
talking to the engine core at ``ADDRESS``; SIGTERM drains it like a single-process server (``serving``).

Run by the supervisor: ``python -m ptserve.server.engine_core.worker_proc FD ADDRESS`` with the settings in
``PTSERVE_SETTINGS_JSON``."""
from __future__ import annotations

import os
import socket
import sys

from ptserve.server.settings import Settings

SETTINGS_ENV = "PTSERVE_SETTINGS_JSON"


def main() -> None:
    from ptserve.server.api.app import create_app
    from ptserve.server.logs import configure_logging
    from ptserve.server.serving import serve_app

    fd, address = int(sys.argv[1]), sys.argv[2]
    from ptserve.server.engine_core.supervisor import exit_with_parent

    exit_with_parent()
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings, mode="worker", engine_address=address)
    sock = socket.socket(fileno=fd)
    serve_app(app, app.state.ptserve, settings.host, settings.port, settings.log_level, settings.drain_timeout_s,
              sock=sock)


if __name__ == "__main__":
    main()
