"""JSON request bodies are read by ``untrusted_json``, not by ``json.loads``: every router uses ``JSONBodyRoute``.

So a body nested too deep, with a ``NaN``/``Infinity`` literal, a number that overflows, an endless integer or a
lone surrogate (``"\\ud800"``, which the tokenizer cannot encode) is refused before any route sees it — one place
for every route that takes text — and answers 422 ``invalid_request`` like any other body that is not valid JSON.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from fastapi import Request, Response
from fastapi.routing import APIRoute

from ptserve.adapters_store import untrusted_json
from ptserve.adapters_store.untrusted_json import JSONRejected


class UntrustedJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = untrusted_json.loads(await self.body())
            except JSONRejected as exc:
                # FastAPI turns a JSONDecodeError (and only that) into a RequestValidationError: our 422
                raise json.JSONDecodeError(f"the body {exc.message}", "", 0) from None
        return self._json


class JSONBodyRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def untrusted_json_handler(request: Request) -> Response:
            return await handler(UntrustedJSONRequest(request.scope, request.receive))

        return untrusted_json_handler
