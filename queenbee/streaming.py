"""Server-sent events in the shapes the APIs stream them: data-only (chat) or named (Responses, Messages)."""

from __future__ import annotations

import json
from typing import Any, Final

SSE_DONE: Final = b"data: [DONE]\n\n"
SSE_HEADERS: Final = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse_event(payload: dict[str, Any]) -> bytes:
    """One `data:` event carrying a JSON object."""
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def named_sse_event(name: str, payload: dict[str, Any]) -> bytes:
    """One event with an `event:` name and a JSON `data:` line, as the Responses and Messages APIs send."""
    return b"event: " + name.encode() + b"\n" + sse_event(payload)
