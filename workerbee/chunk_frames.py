"""The frames that carry a request's streamed chunks: a `Delta` for a chunk of text alone, else a `Chunk`.

A Delta (protocol 6) stands for a chunk whose only choice holds new text and nothing else, with the
`system_fingerprint` of the request's chunks before it; the queen writes it out without decoding a
chunk object. So the first chunk of a request, and any whose fingerprint differs from the last one sent,
go as a whole Chunk.
"""

from __future__ import annotations

from typing import Any

from protocol import Chunk, Delta
from workerbee.decoding import TokenIds

_NOT_SENT = object()


def text_only(chunk: dict[str, Any]) -> tuple[int, str] | None:
    """The choice index and text of a chunk that carries only new text for one choice (in chat's or a
    text completion's shape, as workerbee/choices.py builds them): what a protocol Delta stands for."""
    choices = chunk.get("choices")
    if len(chunk) != 2 or "system_fingerprint" not in chunk or not isinstance(choices, list):
        return None
    if len(choices) != 1:
        return None
    choice = choices[0]
    if len(choice) != 4 or choice.get("logprobs") is not None or choice.get("finish_reason", 0) is not None:
        return None
    index = choice.get("index")
    delta = choice.get("delta")
    text = delta.get("content") if isinstance(delta, dict) and len(delta) == 1 else choice.get("text")
    if not isinstance(index, int) or not isinstance(text, str):
        return None
    return index, text


class StreamFrames:
    """The frames of one request's chunks, in order."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._fingerprint: object = _NOT_SENT

    def frame(self, chunk: dict[str, Any], tokens: int) -> Chunk | Delta:
        """The frame for the next chunk (`tokens`: a TokenIds when the ids of its tokens are known)."""
        ids = list(tokens.ids) if isinstance(tokens, TokenIds) else None
        text = text_only(chunk)
        if text is not None and chunk["system_fingerprint"] == self._fingerprint:
            index, content = text
            return Delta(request_id=self.request_id, index=index, text=content, tokens=tokens, token_ids=ids)
        self._fingerprint = chunk.get("system_fingerprint", _NOT_SENT)
        return Chunk(request_id=self.request_id, chunk=chunk, tokens=tokens, token_ids=ids)
