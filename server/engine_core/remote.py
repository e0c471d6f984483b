"""An API worker's client of the engine core process: one DEALER socket, requests matched to replies by id.

The core binds its socket only once it is ready, so "connected" means "ready". The socket's monitor tells when
the connection drops (the core died): every request in flight fails at once with 503 ``engine_unavailable``, and
so does every new one until the core is back (ZeroMQ reconnects by itself). Adapter metadata is cached per
adapter; a stale entry is harmless, since the core answers ``VersionMismatch`` and the caller fetches it again.
"""
from __future__ import annotations

import asyncio
import itertools
import logging

import msgspec
import torch
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from ptserve.adapters_store.ids import AdapterId
from ptserve.client.wire.errors import APIError, DeadlineExceeded, EngineUnavailable, error_class
from ptserve.server.engine_core import messages as m
from ptserve.server.engine_core.client import AdapterMeta, Encoded, GenerationRoom, VersionChanged
from ptserve.server.generation.sequence import SamplingParams

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 2.0
REPLY_GRACE_S = 1.0  # the core answers its own 504 at the deadline; this much later the worker gives up itself


class RemoteEngineClient:
    def __init__(self, address: str, request_timeout_s: float):
        self.address, self.request_timeout_s = address, request_timeout_s
        self.ctx = zmq.asyncio.Context()
        self._sock: zmq.asyncio.Socket | None = None
        self._pending: dict[int, asyncio.Future] = {}
        self._streams: dict[int, asyncio.Queue] = {}  # generations: every message under their id, in order
        self._ids = itertools.count(1)
        self._meta: dict[str, AdapterMeta] = {}
        self._tasks: list[asyncio.Task] = []
        self.connected = False
        self.ever_connected = False

    # --- lifecycle ------------------------------------------------------------------------------------------
    async def start(self) -> None:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a core that is not there: fail fast instead
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # token streams: never drop what the core sent
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        sock.connect(self.address)
        self._sock = sock
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(), name="ptserve-core-replies"),
                       loop.create_task(self._watch(monitor), name="ptserve-core-monitor")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(linger=0)
        self.ctx.term()

    async def _watch(self, monitor: zmq.asyncio.Socket) -> None:
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self.connected = self.ever_connected = True
                    log.info("engine core connected at %s", self.address)
                elif event == zmq.EVENT_DISCONNECTED:
                    self.connected = False
                    self._meta.clear()  # a restarted core reloads adapters from the store: ask again
                    self._fail_all(EngineUnavailable("the engine core went away; it is being restarted"))
                    log.warning("engine core disconnected: requests answer 503 until it is back")
        finally:
            monitor.close(linger=0)

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                envelope = m.decoder.decode(frames[-1].bytes)
            except msgspec.DecodeError:
                log.error("undecodable message from the engine core")
                continue
            stream = self._streams.get(envelope.id)
            if stream is not None:
                stream.put_nowait(envelope.body)
                continue
            future = self._pending.pop(envelope.id, None)
            if future is not None and not future.done():
                future.set_result(envelope.body)

    def _fail_all(self, exc: Exception) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)
        streams, self._streams = self._streams, {}
        for stream in streams.values():  # a stream mid-way ends with this error (its SSE error event)
            stream.put_nowait(exc)

    # --- calls ----------------------------------------------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.connected

    @property
    def idle(self) -> bool:
        return not self._pending and not self._streams

    async def _call(self, body, timeout_s: float):
        if not self.connected:
            raise EngineUnavailable()
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            self._sock.send(m.encoder.encode(m.Envelope(rid, body)), zmq.NOBLOCK)
        except zmq.Again:
            self._pending.pop(rid, None)
            raise EngineUnavailable() from None
        try:
            reply = await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"the engine core did not answer within {timeout_s:.1f} s") from None
        finally:
            self._pending.pop(rid, None)
        return _checked(reply)

    def _tell(self, body, rid: int = 0) -> None:
        if self.connected:
            try:
                self._sock.send(m.encoder.encode(m.Envelope(rid, body)), zmq.NOBLOCK)
            except zmq.Again:
                pass  # the core is going away; a restarted one reads the store afresh

    async def generate(
        self, adapter_id: AdapterId, version: int, prompts: list[list[int]], params: list[SamplingParams],
        tenant: str,
    ) -> RemoteTokenStream:
        if not self.connected:
            raise EngineUnavailable()
        rid, queue = next(self._ids), asyncio.Queue()
        payload = m.encoder.encode(m.Envelope(rid, m.GenerateRequest(
            str(adapter_id), version, prompts, [m.sampling_message(p) for p in params], tenant)))
        self._streams[rid] = queue
        try:
            self._sock.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            self._streams.pop(rid, None)
            raise EngineUnavailable() from None
        try:  # Accepted once the core leased the adapter and queued the choices (or why it did not)
            reply = await asyncio.wait_for(queue.get(), self.request_timeout_s)
            if isinstance(reply, m.VersionMismatch):
                self._meta.pop(reply.adapter, None)
                raise VersionChanged(reply.adapter, reply.asked, reply.current)
            _checked(reply)
        except BaseException as exc:
            self._end(rid, cancel=not isinstance(exc, (VersionChanged, APIError)))
            if isinstance(exc, asyncio.TimeoutError):
                raise DeadlineExceeded(f"the engine core did not answer within {self.request_timeout_s:.1f} s") \
                    from None
            raise
        return RemoteTokenStream(self, rid, queue)

    def _end(self, rid: int, cancel: bool) -> None:
        """Forget stream ``rid``; with ``cancel``, tell the core to stop generating it."""
        if self._streams.pop(rid, None) is not None and cancel:
            self._tell(m.Cancel(), rid)

    async def adapter_meta(self, adapter_id: AdapterId) -> AdapterMeta:
        key = str(adapter_id)
        meta = self._meta.get(key)
        if meta is None:
            r = await self._call(m.MetaRequest(key), self.request_timeout_s)
            g = r.generation
            room = None if g is None else GenerationRoom(g.room, g.prefix_cap, g.vocab_size, frozenset(g.eos_ids))
            meta = AdapterMeta(r.id, r.version, r.task, tuple(r.labels), r.num_virtual_tokens, room)
            self._meta[key] = meta
        return meta

    async def encode(
        self, adapter_id: AdapterId | None, version: int, token_ids: list[tuple[int, ...]], output: str,
        tenant: str, timeout_s: float,
    ) -> Encoded:
        key = None if adapter_id is None else str(adapter_id)
        body = m.EncodeRequest(key, version, [list(t) for t in token_ids], output, tenant, timeout_s)
        reply = await self._call(body, timeout_s + REPLY_GRACE_S)
        if isinstance(reply, m.VersionMismatch):
            self._meta.pop(reply.adapter, None)
            raise VersionChanged(reply.adapter, reply.asked, reply.current)
        outputs = torch.frombuffer(bytearray(reply.data), dtype=torch.float32).view(reply.rows, -1)
        return Encoded(reply.adapter, reply.version, outputs, tuple(reply.labels))

    def check_room(self, tenant: str, rows: int) -> None:
        pass  # the core checks at submit (asking first would cost a round trip per request)

    def adapter_changed(self, adapter_id: AdapterId, version: int | None = None) -> None:
        self._meta.pop(str(adapter_id), None)
        self._tell(m.AdapterChanged(str(adapter_id), version))

    async def health(self) -> dict:
        try:
            reply = await self._call(m.HealthRequest(), HEALTH_TIMEOUT_S)
        except DeadlineExceeded:
            raise EngineUnavailable("the engine core does not answer") from None
        return reply.facts


def _checked(reply):
    """``reply``, or the API error it carries (raised as the class the core raised), or the exception queued for
    it (the core went away)."""
    if isinstance(reply, BaseException):
        raise reply
    if isinstance(reply, m.Failed):
        raise error_class(reply.status, reply.type).answered(reply.status, reply.type, reply.message, reply.headers)
    return reply


class RemoteTokenStream:
    """A generation's messages from the engine core (``client.TokenStream``): ``Tokens`` per step, then
    ``Finished``; the error it ends with when the core failed it or went away (503 ``engine_unavailable``)."""

    def __init__(self, client: RemoteEngineClient, rid: int, queue: asyncio.Queue):
        self._client, self._rid, self._queue = client, rid, queue
        self._ended = False

    def __aiter__(self) -> "RemoteTokenStream":
        return self

    async def __anext__(self) -> m.Tokens | m.Finished:
        if self._ended:
            raise StopAsyncIteration
        reply = await self._queue.get()
        if isinstance(reply, m.Tokens):
            return reply
        self._ended = True
        self._client._end(self._rid, cancel=False)
        return _checked(reply)  # Finished, or raises

    def cancel(self, choices: list[int]) -> None:
        if not self._ended:
            self._client._tell(m.Cancel(list(choices)), self._rid)

    async def aclose(self) -> None:
        if not self._ended:
            self._ended = True
            self._client._end(self._rid, cancel=True)
