"""Running the app under uvicorn with a graceful drain: the first SIGTERM (or SIGINT) turns ``/readyz`` and every
new request into 503, lets in-flight and queued requests finish (at most ``drain_timeout_s``), then hands over
to uvicorn's own shutdown, and the process exits 0. A second signal exits at once."""
from __future__ import annotations

import logging
import socket
import time

import uvicorn

from ptserve.server.api.state import ServerState
from ptserve.server.http_protocol import ConnectionLimits, GuardedHttpToolsProtocol

log = logging.getLogger(__name__)
AFTER_DRAIN_S = 5.0  # uvicorn's own graceful window once the drain ended (idle connections, stragglers)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app_state: ServerState, drain_timeout_s: float):
        super().__init__(config)
        self.app_state, self.drain_timeout_s = app_state, drain_timeout_s
        self.drain_started: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame) -> None:
        # Runs as a signal handler: set flags only. Not recording the signal keeps uvicorn from re-raising it
        # after shutdown, which would end the process with -SIGTERM instead of 0.
        if self.drain_started is None and not self.should_exit:
            self.drain_started = time.monotonic()
            self.app_state.draining = True
            return
        self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_started is not None and not self.should_exit:
            waited = time.monotonic() - self.drain_started
            if not self._drain_logged:
                self._drain_logged = True
                log.info("draining: %d requests in flight, %d rows queued (at most %.0f s)",
                         self.app_state.inflight, self.app_state.batcher.depth if self.app_state.batcher else 0,
                         self.drain_timeout_s)
            if self.app_state.idle or waited >= self.drain_timeout_s:
                if not self.app_state.idle:
                    log.warning("drain timeout after %.1f s with %d requests in flight", waited,
                                self.app_state.inflight)
                else:
                    log.info("drained in %.2f s", waited)
                self.should_exit = True
        return await super().on_tick(counter)


def serve_app(app, state: ServerState, host: str, port: int, log_level: str, drain_timeout_s: float,
              sock: socket.socket | None = None) -> None:
    """Serve until drained; ``sock``: a listening socket bound by a supervisor (shared by its API workers)."""
    s = state.settings
    limits = ConnectionLimits(head_bytes=s.max_header_bytes, head_timeout_s=s.header_timeout_s,
                              body_timeout_s=s.body_timeout_s)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, log_config=None, access_log=False,  # ptserve logs requests
        timeout_graceful_shutdown=AFTER_DRAIN_S, timeout_keep_alive=s.keep_alive_timeout_s,
        http=GuardedHttpToolsProtocol.factory(limits),  # bounds a request head's size and time, a body's silence
    )
    DrainingServer(config, state, drain_timeout_s).run(sockets=[sock] if sock is not None else None)
