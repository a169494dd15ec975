"""A `Delta` frame as the client reads it: the chunk it stands for, as an object or straight as SSE bytes.

A Delta (protocol 6) is new text for one choice and nothing else. The OpenAI chunk it stands for is
fixed but for the choice's index, the text and the stream's fingerprint, so the event is written from
bytes made once per call: the text is the only thing encoded per chunk, and no chunk object is built.
`chunk` gives the same chunk as an object, for presenters that translate chat chunks (Responses,
Messages); tests hold the two to each other.
"""

from __future__ import annotations

from typing import Any, Final

import pydantic_core

_NO_LOGPROBS_NOR_FINISH: Final = b',"logprobs":null,"finish_reason":null}]'


class DeltaChunks:
    """The chunks of one call's Delta frames: chat's `delta.content` or a text completion's `text`."""

    def __init__(
        self, *, request_id: str, chunk_object: str, created: int, model: str, chat: bool, include_usage: bool
    ) -> None:
        self._identity: dict[str, Any] = {
            "id": request_id,
            "object": chunk_object,
            "created": created,
            "model": model,
        }
        self._chat = chat
        self._include_usage = include_usage
        head = pydantic_core.to_json(self._identity)[:-1]  # the object, still open
        self._head = b"data: " + head + b',"choices":[{"index":'
        self._text_key = b',"delta":{"content":' if chat else b',"text":'
        self._text_end = b"}" + _NO_LOGPROBS_NOR_FINISH if chat else _NO_LOGPROBS_NOR_FINISH
        self._tail_for: str | None = None
        self._tail = self._make_tail(None)

    def chunk(self, index: int, text: str, fingerprint: str | None) -> dict[str, Any]:
        """The chunk a Delta stands for, as an object."""
        choice: dict[str, Any] = {"index": index}
        if self._chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = None
        chunk: dict[str, Any] = {**self._identity, "choices": [choice]}
        if fingerprint is not None:
            chunk["system_fingerprint"] = fingerprint
        if self._include_usage:
            chunk["usage"] = None
        return chunk

    def event(self, index: int, text: str, fingerprint: str | None) -> bytes:
        """The `data:` event of that chunk, compact JSON as `sse_event` writes it."""
        if fingerprint != self._tail_for:
            self._tail = self._make_tail(fingerprint)
            self._tail_for = fingerprint
        parts = (self._head, str(index).encode(), self._text_key, pydantic_core.to_json(text), self._text_end)
        return b"".join(parts) + self._tail

    def _make_tail(self, fingerprint: str | None) -> bytes:
        tail = b""
        if fingerprint is not None:
            tail += b',"system_fingerprint":' + pydantic_core.to_json(fingerprint)
        if self._include_usage:
            tail += b',"usage":null'
        return tail + b"}\n\n"
