"""How a forwarded call's answer is shown to its client: the `Presenter` interface, and OpenAI's own.

The relay loop (queenbee/forwarding.py) is the same for every API; a presenter turns its chat chunks and
chat responses into what the client's API sends (queenbee/api/ has the Responses and Messages ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from protocol import Usage
from queenbee.errors import QueenError
from queenbee.streaming import SSE_DONE, sse_event

if TYPE_CHECKING:
    from queenbee.forwarding import ForwardedCall


class Presenter(Protocol):
    """How one call's answer is shown to its client: the SSE events of a stream, or the JSON body.

    Streams get the chat chunks with the queen's identity fields (`ForwardedCall.chunk`), whole answers
    the chat response with them (`ForwardedCall.completion`); errors come as QueenErrors.
    """

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        """The SSE events for one chat chunk."""
        ...

    def text(self, index: int, text: str) -> list[bytes]:
        """The SSE events for new text of one choice (a worker's Delta: `ForwardedCall.deltas`)."""
        ...

    async def done(self, usage: Usage) -> list[bytes]:
        """The SSE events that end a stream that succeeded, with its checked usage."""
        ...

    def failed(self, error: QueenError) -> list[bytes]:
        """The SSE events that end a stream with an error."""
        ...

    def cut(self) -> list[bytes]:
        """The SSE events that end a stream whose client fell behind."""
        ...

    async def whole(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The JSON body of a whole answer."""
        ...


@dataclass
class ChatPresenter:
    """OpenAI's own endpoints: chunks and responses as they are, errors in OpenAI's shape, then [DONE]."""

    call: ForwardedCall

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        """The chunk itself."""
        return [sse_event(chunk)]

    def text(self, index: int, text: str) -> list[bytes]:
        """The chunk the text stands for, written without building it."""
        return [self.call.deltas.event(index, text, self.call.fingerprint)]

    async def done(self, usage: Usage) -> list[bytes]:
        """The usage chunk if the client asked for it, then [DONE]."""
        if self.call.include_usage:
            return [sse_event(self.call.usage_chunk(usage)), SSE_DONE]
        return [SSE_DONE]

    def failed(self, error: QueenError) -> list[bytes]:
        """OpenAI's error object as an event, then [DONE]."""
        return [sse_event(error.body()), SSE_DONE]

    def cut(self) -> list[bytes]:
        """[DONE]."""
        return [SSE_DONE]

    async def whole(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The response itself."""
        return completion
