"""The engine core process: the device, the backbone, the resident adapters with their leases, the batcher —
``LocalEngineClient`` — served to API workers over a ZeroMQ ROUTER socket. It binds only once the engine is
loaded (a worker's "connected" means "ready"); on SIGTERM it finishes what it was asked and exits 0.

Run by the supervisor: ``python -m ptserve.server.engine_core.core_proc ADDRESS`` with the settings in
``PTSERVE_SETTINGS_JSON``."""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time

import zmq
import zmq.asyncio

from ptserve.adapters_store.ids import AdapterId
from ptserve.client.wire.errors import APIError
from ptserve.server.api.state import ServerState
from ptserve.server.engine_core import messages as m
from ptserve.server.engine_core.client import VersionChanged
from ptserve.server.engine_core.local_stream import LocalTokenStream
from ptserve.server.settings import Settings

log = logging.getLogger(__name__)
SETTINGS_ENV = "PTSERVE_SETTINGS_JSON"
EXIT_START_FAILED = 3


class CoreServer:
    def __init__(self, state: ServerState, address: str):
        self.state, self.address = state, address
        self.ctx = zmq.asyncio.Context()
        self.sock: zmq.asyncio.Socket | None = None
        self.handlers: set[asyncio.Task] = set()
        self.streams: dict[tuple[bytes, int], LocalTokenStream] = {}  # generations running, by worker and id
        self.opening: dict[tuple[bytes, int], list[m.Cancel]] = {}  # generations being accepted: early Cancels

    async def serve(self, stop: asyncio.Event) -> None:
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # a ROUTER drops what exceeds its high-water mark: never a token
        if self.address.startswith("ipc://"):  # a core killed before left its socket file behind
            try:
                os.unlink(self.address.removeprefix("ipc://"))
            except FileNotFoundError:
                pass
        self.sock.bind(self.address)
        log.info("engine core serving API workers at %s", self.address)
        loop = asyncio.get_running_loop()
        reader = loop.create_task(self._read())
        await stop.wait()
        drain_until = time.monotonic() + self.state.settings.drain_timeout_s
        while (self.handlers or not self.state.idle) and time.monotonic() < drain_until:
            await asyncio.sleep(0.02)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        self.sock.close(linger=0)
        self.ctx.term()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            identity, payload = await self.sock.recv_multipart()
            try:
                envelope = m.decoder.decode(payload)
            except Exception:
                log.error("undecodable message from an API worker")
                continue
            task = loop.create_task(self._handle(identity, envelope))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def _handle(self, identity: bytes, envelope: m.Envelope) -> None:
        body = envelope.body
        try:
            if isinstance(body, m.GenerateRequest):
                reply = await self._generate(identity, envelope.id, body)
            else:
                reply = await self._answer(identity, envelope.id, body)
        except VersionChanged as exc:
            reply = m.VersionMismatch(exc.adapter, exc.asked, exc.current)
        except APIError as exc:
            reply = m.Failed(exc.status, exc.type, exc.message, dict(exc.headers))
        except Exception:
            log.exception("engine core request failed")
            reply = m.Failed(500, "internal_error", "internal server error")
        if reply is not None:
            await self._send(identity, envelope.id, reply)

    async def _send(self, identity: bytes, rid: int, reply) -> None:
        await self.sock.send_multipart([identity, m.encoder.encode(m.Envelope(rid, reply))])

    async def _generate(self, identity: bytes, rid: int, body: m.GenerateRequest) -> m.Finished:
        """``Accepted``, then a ``Tokens`` message per engine step; returns the ``Finished`` that ends it. A
        ``Cancel`` under the same id (``_answer``) reaches the stream while it runs."""
        params = [m.sampling_params(p) for p in body.params]
        key = (identity, rid)
        self.opening[key] = []  # a Cancel that arrives while the adapter is leased waits here
        try:
            stream = await self.state.client.generate(AdapterId.parse(body.adapter), body.version, body.prompts,
                                                      params, body.tenant)
        finally:
            early = self.opening.pop(key)
        self.streams[key] = stream
        for cancel in early:
            stream.cancel(cancel.choices)
        try:
            await self._send(identity, rid, m.Accepted())
            async for msg in stream:
                if isinstance(msg, m.Finished):
                    return msg
                await self._send(identity, rid, msg)
            raise AssertionError("a token stream ended without Finished")
        finally:
            self.streams.pop(key, None)
            await stream.aclose()

    async def _answer(self, identity: bytes, rid: int, body):
        client = self.state.client
        if isinstance(body, m.Cancel):
            stream = self.streams.get((identity, rid))
            if stream is not None:
                stream.cancel(body.choices)
            elif (identity, rid) in self.opening:
                self.opening[(identity, rid)].append(body)
            return None
        if isinstance(body, m.EncodeRequest):
            adapter_id = None if body.adapter is None else AdapterId.parse(body.adapter)
            out = await client.encode(adapter_id, body.version, [tuple(t) for t in body.token_ids], body.output,
                                      body.tenant, body.timeout_s)
            data = out.outputs.contiguous().numpy().astype("<f4").tobytes()
            return m.Encoded(out.adapter, out.version, list(out.labels), out.outputs.shape[0], data)
        if isinstance(body, m.MetaRequest):
            meta = await client.adapter_meta(AdapterId.parse(body.adapter))
            g = meta.generation
            room = None if g is None else m.Room(g.room, g.prefix_cap, g.vocab_size, sorted(g.eos_ids))
            return m.Meta(meta.id, meta.version, meta.task, list(meta.labels), meta.num_virtual_tokens, room)
        if isinstance(body, m.AdapterChanged):
            await self.state.adapters.on_change(AdapterId.parse(body.adapter), body.version)
            return None
        if isinstance(body, m.HealthRequest):
            return m.Health(await client.health())
        if isinstance(body, m.CheckRoom):
            client.check_room(body.tenant, body.rows)
            return m.Done()
        raise ValueError(f"unexpected message {type(body).__name__}")


async def run_core(settings: Settings, address: str) -> int:
    state = ServerState(settings, mode="core")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await state.start()
    if state.load_error or state.client is None:
        log.error("engine core did not start: %s", state.load_error or "no engine")
        await state.stop()
        return EXIT_START_FAILED
    try:
        await CoreServer(state, address).serve(stop)
    finally:
        await state.stop()
    log.info("engine core stopped")
    return 0


def main() -> None:
    from ptserve.server.logs import configure_logging

    from ptserve.server.engine_core.supervisor import exit_with_parent

    exit_with_parent()
    settings = Settings.model_validate_json(os.environ[SETTINGS_ENV])
    configure_logging(settings.log_level, settings.log_format)
    sys.exit(asyncio.run(run_core(settings, sys.argv[1])))


if __name__ == "__main__":
    main()
