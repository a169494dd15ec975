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


class RelayResponse(StreamingResponse):
    """An SSE response that the queen can end from outside, when its client stops reading.

    A client that does not read leaves the response blocked in `send`; `abort` cancels the task that
    runs it, and the cancellation ends the response quietly instead of as an application error.
    """

    _task: asyncio.Task[Any] | None = None
    _aborted = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the stream, or stop at once when aborted."""
        self._task = asyncio.current_task()
        try:
            await super().__call__(scope, receive, send)
        except asyncio.CancelledError:
            if not self._aborted:
                raise
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()

    def abort(self) -> None:
        """End the response now (the client stopped reading)."""
        if self._task is not None and not self._aborted:
            self._aborted = True
            self._task.cancel()
