"""The sans-IO core driven by hand, without a network: which effects ``exchange`` asks for after each answer
or failure (backoff and ``Retry-After``, the resend-after-cut-short rule, typed errors), and that ``Client``
and ``AsyncClient`` are the same methods with the same signatures and docstrings."""

from __future__ import annotations

import inspect

import httpx
import pytest

from ptserve.client import AsyncClient, Client, calls
from ptserve.client._core import Effect, RetryPolicy, drive, exchange, result
from ptserve.client.errors import APIConnectionError, NotFoundError, RateLimitError
from ptserve.client.wire.errors import AdapterNotFound, QueueFull

POLICY = RetryPolicy(max_retries=3, backoff=0.5, max_backoff=8.0, max_retry_after=60.0)
BASE = "http://ptserve.test"


def request(call):
    return httpx.Request(call.method, BASE + call.path, **call.request_kwargs())


def answer(status: int, body: bytes = b"{}", **headers) -> httpx.Response:
    return httpx.Response(status, headers=headers, content=body, request=httpx.Request("GET", BASE))


def start(call, stream: bool = False):
    steps = exchange(call, POLICY, request, BASE, stream)
    return steps, next(steps)


def test_a_2xx_answer_is_the_result_at_once():
    steps, effect = start(calls.health())
    assert effect.op == "send" and effect.args[0].url == f"{BASE}/healthz" and effect.args[1] is False
    ok = answer(200, b'{"status": "ok"}')
    with pytest.raises(StopIteration) as done:
        steps.send(ok)
    assert done.value.value is ok


def test_429_closes_waits_retry_after_and_resends_the_same_request():
    steps, first = start(calls.classify("acme/a", ["x"]))
    refused = answer(429, b'{"error": {"type": "queue_full", "message": "busy"}}', **{"Retry-After": "2"})
    assert steps.send(refused) == Effect("close", (refused,))
    assert steps.send(None) == Effect("sleep", (2.0,))
    again = steps.send(None)
    assert again.op == "send" and again.args[0].content == first.args[0].content


def test_backoff_without_retry_after_doubles_and_stops_after_max_retries():
    steps, _ = start(calls.list_adapters())
    waits = []
    for _attempt in range(POLICY.max_retries):
        unavailable = answer(503)
        assert steps.send(unavailable).op == "close"
        sleep = steps.send(None)
        waits.append(sleep.args[0])
        assert steps.send(None).op == "send"
    ratios = [w / (0.5 * 2**i) for i, w in enumerate(waits)]  # backoff * 2**attempt, ±20% jitter
    assert all(0.8 - 1e-9 <= r <= 1.2 + 1e-9 for r in ratios), waits
    last = answer(503, b'{"error": {"type": "draining", "message": "bye"}}')
    assert steps.send(last) == Effect("read", (last,))
    assert steps.send(last.content) == Effect("close", (last,))
    with pytest.raises(Exception) as err:
        steps.send(None)
    assert err.value.status == 503 and err.value.type == "draining" and err.value.message == "bye"


def test_a_retry_after_past_the_limit_is_raised_at_once_typed():
    steps, _ = start(calls.health())
    far = answer(429, b'{"error": {"type": "queue_full", "message": "later"}}', **{"Retry-After": "3600"})
    assert steps.send(far).op == "read"
    assert steps.send(far.content).op == "close"
    with pytest.raises(QueueFull) as err:
        steps.send(None)
    assert isinstance(err.value, RateLimitError) and err.value.retry_after == 3600


def test_other_errors_are_read_and_raised_as_the_wire_class():
    steps, _ = start(calls.get_adapter("acme/gone"))
    missing = answer(404, b'{"error": {"type": "adapter_not_found", "message": "no acme/gone"}}')
    assert steps.send(missing).op == "read"
    assert steps.send(missing.content).op == "close"
    with pytest.raises(AdapterNotFound) as err:
        steps.send(None)
    assert isinstance(err.value, NotFoundError) and str(err.value) == "404 adapter_not_found: no acme/gone"


@pytest.mark.parametrize(
    ("call", "failure", "resent"),
    [
        (calls.create_key("acme"), httpx.ConnectError("refused"), True),  # never reached the server
        (calls.create_key("acme"), httpx.RemoteProtocolError("cut short"), False),  # a key may have been made
        (calls.classify("acme/a", ["x"]), httpx.RemoteProtocolError("cut short"), True),  # inference: again
        (calls.generate("acme/a", "hi"), httpx.ReadTimeout("slow"), True),
        (calls.get_adapter("acme/a"), httpx.ReadError("reset"), True),  # idempotent
        (calls.ready(), httpx.ConnectError("refused"), False),  # retry=False: readiness is its answer
    ],
)
def test_transport_failures_are_resent_only_when_safe(call, failure, resent):
    steps, _ = start(call)
    if resent:
        assert steps.throw(failure).op == "sleep"
        assert steps.send(None).op == "send"
    else:
        with pytest.raises(APIConnectionError, match=type(failure).__name__):
            steps.throw(failure)


def test_drive_runs_a_blocking_executor_to_the_end():
    performed = []
    script = iter([answer(503, **{"Retry-After": "0"}), answer(200, b'{"status": "ok"}')])

    def perform(effect):
        performed.append(effect.op)
        return next(script) if effect.op == "send" else None

    response = result(drive(exchange(calls.health(), POLICY, request, BASE, False), perform))
    assert response.json() == {"status": "ok"} and performed == ["send", "close", "sleep", "send"]


async def test_drive_awaits_what_an_async_executor_returns():
    async def perform(effect):
        if effect.op == "send":
            raise httpx.ConnectError("refused")
        return None

    with pytest.raises(APIConnectionError, match="ConnectError"):
        once = RetryPolicy(max_retries=1, backoff=0.0)
        await drive(exchange(calls.health(), once, request, BASE, False), perform)


def public(cls) -> dict:
    return {name: getattr(cls, name) for name in dir(cls) if not name.startswith("_")}


def test_both_clients_are_the_same_methods():
    sync, aio = public(Client), public(AsyncClient)
    assert set(sync) - {"close"} == set(aio) - {"aclose"}
    for name, method in sync.items():
        if not callable(method) or name == "close":
            continue
        twin = aio[name]
        assert inspect.signature(method) == inspect.signature(twin), name
        assert method.__doc__ and method.__doc__ == twin.__doc__, name
        streams = name in ("generate_stream", "completions_stream", "iter_adapters")
        assert inspect.iscoroutinefunction(twin) != streams, name  # one answer: awaited; streams: iterated
