"""Answers as clients read them: server-sent events in the shapes the APIs stream them, data-only (chat)
or named (Responses, Messages), and whole JSON bodies; both encoded by pydantic-core, the fastest here."""

from __future__ import annotations

import asyncio
from typing import Any, Final

import pydantic_core
from starlette.responses import JSONResponse, StreamingResponse
from starlette.types import Receive, Scope, Send

SSE_DONE: Final = b"data: [DONE]\n\n"
SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict[str, Any]) -> bytes:
    """One `data:` event carrying a JSON object (compact, UTF-8)."""
    return b"data: " + pydantic_core.to_json(payload) + b"\n\n"


def named_sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """One event with an `event:` name and a JSON `data:` line, as the Responses and Messages APIs send."""
    return b"event: " + name.encode() + b"\n" + sse_event(payload)


class JsonBody(JSONResponse):
    """A JSON response (compact, UTF-8) encoded by pydantic-core rather than the json module."""

    def render(self, content: Any) -> bytes:
        """The body's bytes."""
        return pydantic_core.to_json(content)


class StreamEnd(bytes):
    """The last bytes of a relayed stream: `RelayResponse` sends them with the end of the response, in one
    write instead of two."""


class RelayResponse(StreamingResponse):
    """An SSE response that ends when its client leaves, and that the queen can end from outside.

    A client that does not read leaves the response blocked in `send`; `abort` cancels the task that
    runs it, and the cancellation ends the response quietly instead of as an application error. A client
    that disconnects is noticed by one watcher task, which aborts the same way: Starlette's own response
    would run the stream and the watch in an anyio task group, a tenth of a short stream's CPU. However
    the response ends, its body iterator is closed then, so that its cleanup (recording a request whose
    client left) runs at once, not whenever the garbage collector finds it.
    """

    _task: asyncio.Task[Any] | None = None
    _aborted = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the stream, or stop at once when the client leaves or the queen aborts it."""
        self._task = asyncio.current_task()
        watcher = asyncio.get_running_loop().create_task(self._abort_on_disconnect(receive))
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            if not self._aborted:
                raise
            if self._task is not None:
                self._task.uncancel()
        finally:
            watcher.cancel()
            close = getattr(self.body_iterator, "aclose", None)
            if close is not None:
                await close()

    async def stream_response(self, send: Send) -> None:
        """The headers, then each piece the body iterator yields as it comes; a `StreamEnd` ends it."""
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for piece in self.body_iterator:
            if isinstance(piece, StreamEnd):
                await send({"type": "http.response.body", "body": bytes(piece), "more_body": False})
                return
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _abort_on_disconnect(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.abort()

    def abort(self) -> None:
        """End the response now (the client left or stopped reading)."""
        if self._task is not None and not self._aborted:
            self._aborted = True
            self._task.cancel()
