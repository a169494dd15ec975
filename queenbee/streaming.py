"""Answers as clients read them: server-sent events in the shapes the APIs stream them, data-only (chat)
or named (Responses, Messages), and whole JSON bodies; both encoded by pydantic-core, the fastest here."""

from __future__ import annotations

from typing import Any, Final

import pydantic_core
from starlette.responses import JSONResponse

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
