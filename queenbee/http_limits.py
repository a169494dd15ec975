"""Limits at the queen's network edge: a deadline for request headers, the connection cap, the Host check.

uvicorn has no header timeout: a connection that sends nothing, or a header a byte at a time, is kept
for as long as its peer likes, and enough of them exhaust the queen's file descriptors. The protocol here
is uvicorn's httptools protocol (the one `uvicorn[standard]` installs) with a timer that starts when a
connection is made, and again when a response ends on a kept-alive connection, and that closes the
connection unless a request's headers are complete first. Data arriving does not reset it, so a peer
that drips bytes is closed as surely as one that is silent.

uvicorn's `limit_concurrency` answers HTTP requests beyond the cap with a plain-text 503; it lets
websocket upgrades through, so the protocol here refuses those beyond the cap with a 503 too.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import ClassVar

from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from queenbee.errors import InvalidRequest

log = logging.getLogger("queenbee.http")

_UPGRADE_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"content-type: text/plain; charset=utf-8\r\n"
    b"content-length: 19\r\n"
    b"connection: close\r\n"
    b"\r\n"
    b"Service Unavailable"
)


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, closing connections whose request headers do not arrive in time."""

    header_timeout: ClassVar[float] = 10.0
    """Seconds from connecting, or from the end of the previous response, to complete request headers."""

    _header_deadline: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, header_timeout: float) -> type[HeaderDeadlineProtocol]:
        """This protocol with its own header timeout: uvicorn takes a class and builds one per connection."""
        return type(cls.__name__, (cls,), {"header_timeout": header_timeout})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start serving a connection, and the clock for its first request's headers."""
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection, and its deadline."""
        self._disarm_header_deadline()
        super().connection_lost(exc)

    def on_headers_complete(self) -> None:
        """The headers are in: the request is the app's business now, and the deadline is off."""
        self._disarm_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        """A response ended: unless a pipelined request is already waiting, the next one's headers are due."""
        waiting = bool(self.pipeline)
        super().on_response_complete()
        if not waiting and not self.transport.is_closing():
            self._arm_header_deadline()

    def handle_websocket_upgrade(self) -> None:
        """Hand the connection to the websocket protocol, unless the queen is at its connection cap."""
        limit = self.limit_concurrency
        if limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit):
            self.logger.warning("Exceeded concurrency limit: websocket upgrade refused.")
            self.transport.write(_UPGRADE_REFUSED)
            self.transport.close()
            return
        super().handle_websocket_upgrade()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._headers_overdue)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_overdue(self) -> None:
        self._header_deadline = None
        if not self.transport.is_closing():
            log.debug("closing a connection that sent no complete headers in %g s", self.header_timeout)
            self.transport.close()


class HostPatternError(ValueError):
    """An --allowed-host pattern that cannot match: '*' is allowed only as '*' or a leading '*.'."""


def check_host_patterns(patterns: Sequence[str]) -> None:
    """Raise HostPatternError for a pattern TrustedHostMiddleware would reject (with an assert)."""
    for pattern in patterns:
        wildcard = pattern.startswith("*") and pattern != "*"
        if "*" in pattern[1:] or (wildcard and not pattern.startswith("*.")):
            raise HostPatternError(f"--allowed-host: {pattern!r}: a wildcard must look like '*.example.com'")


class _CheckedSend:
    """The real `send`, and whether the host check let the request through to the app."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.passed = False

    async def __call__(self, message: Message) -> None:
        # Only the check's own plain-text refusal arrives here; the queen answers in JSON instead.
        return None


class AllowedHosts:
    """Starlette's TrustedHostMiddleware, refusing other Host headers with OpenAI's error body.

    Covers websockets too: a refused upgrade gets the same 400 as an HTTP request.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        check_host_patterns(allowed_hosts)
        self.app = app
        self.check = TrustedHostMiddleware(self._through, allowed_hosts=allowed_hosts, www_redirect=False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on if its Host is allowed; answer 400 if not."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        checked = _CheckedSend(send)
        await self.check(scope, receive, checked)
        if not checked.passed:
            refusal = InvalidRequest("Invalid host header.", code="invalid_host")
            await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)

    async def _through(self, scope: Scope, receive: Receive, send: Send) -> None:
        assert isinstance(send, _CheckedSend)
        send.passed = True
        await self.app(scope, receive, send.send)
