"""The forwarding endpoints served straight from a table, in front of the Starlette application.

Starlette's router, its two middleware layers and its exception wrappers cost a forwarded request about
a fifth of the queen's CPU (py-spy under `bench.queen_speed`), while a POST to a forwarding endpoint
needs none of them: its path is exact and its errors map through the same handlers. So the requests in
the table go straight to their handler, and everything else (other methods on those paths, every other
route, websockets, the lifespan) to the Starlette app as before, with the same answers.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import State
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from queenbee.errors import QueenError
from queenbee.http_limits import AllowedHosts

log = logging.getLogger("queenbee.app")

ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


class DirectRoutes:
    """An ASGI app: POSTs to the paths in `routes` go to their handler, the rest to `app`; with
    `allowed_hosts`, a request for another Host header reaches neither."""

    def __init__(
        self,
        app: Starlette,
        routes: Mapping[str, Callable[..., Any]],
        *,
        allowed_hosts: Sequence[str] = (),
        queen_error: ErrorHandler,
        http_error: ErrorHandler,
        unexpected_error: ErrorHandler,
    ) -> None:
        self.app = app
        self._routes = dict(routes)
        self._queen_error = queen_error
        self._http_error = http_error
        self._unexpected_error = unexpected_error
        self._entry: Callable[[Scope, Receive, Send], Awaitable[None]] = self._dispatch
        if allowed_hosts:
            self._entry = AllowedHosts(self._dispatch, allowed_hosts)

    @property
    def state(self) -> State:
        """The Starlette app's state (operators' tools and tests read the hive there)."""
        return self.app.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Serve one connection's scope."""
        await self._entry(scope, receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            handler = self._routes.get(scope["path"])
            if handler is not None:
                scope["app"] = self.app
                await self._serve(handler, scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, handler: Callable[..., Any], scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            response: Response = await handler(request)
            await response(scope, receive, tracked)
        except Exception as exc:
            if started:
                # Mid-answer: nothing can be sent any more; uvicorn logs it and closes the connection.
                raise
            await (await self._error_response(request, exc))(scope, receive, send)

    async def _error_response(self, request: Request, exc: Exception) -> Response:
        handle: Callable[[Request, Any], Awaitable[Response]]
        if isinstance(exc, QueenError):
            handle = self._queen_error
        elif isinstance(exc, HTTPException):
            handle = self._http_error
        else:
            handle = self._unexpected_error
        return await handle(request, exc)
