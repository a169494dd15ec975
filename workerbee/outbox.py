"""The worker's outgoing frames: what is ready in the same turn of the event loop leaves as one message.

A batching engine's step hands every stream its token at once, so each request's task sends a chunk in
the same turn. Sent one by one they cost the queen a websocket message each (parsing, one validation
call, a wake-up); gathered, the frames travel as one `Batch` (protocol 5), in the order they were sent,
within the queen's frame limit. Nothing waits for more: the frames ready now leave at the next turn,
and what arrives while a message is being written leaves with the next one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from protocol import batch_messages


class Outbox:
    """One connection's sender: `send` returns once the frame's message was handed to the socket (or
    raises what the socket raised); frames never interleave or reorder."""

    def __init__(self, send_text: Callable[[str], Awaitable[None]], limit: Callable[[], int]) -> None:
        self._send_text = send_text
        self._limit = limit
        """The largest message the peer accepts now (it can change with a new Welcome)."""
        self._pending: list[str] = []
        self._sent: asyncio.Future[None] | None = None
        """Resolved when the frames now pending have been written."""
        self._writer: asyncio.Task[None] | None = None

    async def send(self, text: str) -> None:
        """Queue one encoded frame (at most `limit()` bytes) and wait until it has been written."""
        if self._sent is None:
            self._sent = asyncio.get_running_loop().create_future()
            # Nobody may be left to read a failure (every sender cancelled): read it here.
            self._sent.add_done_callback(lambda done: done.cancelled() or done.exception())
        sent = self._sent
        self._pending.append(text)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write())
        # Shielded: a sender that is cancelled must not cancel the others' frames.
        await asyncio.shield(sent)

    async def _write(self) -> None:
        try:
            while self._pending:
                texts, sent = self._pending, self._sent
                self._pending, self._sent = [], None
                assert sent is not None
                try:
                    for message in batch_messages(texts, self._limit()):
                        await self._send_text(message)
                except asyncio.CancelledError:
                    sent.cancel()
                    raise
                except Exception as exc:
                    if not sent.done():
                        sent.set_exception(exc)
                else:
                    if not sent.done():
                        sent.set_result(None)
        finally:
            self._writer = None
            if self._sent is not None and not self._sent.done():
                self._sent.set_exception(ConnectionError("the connection's sender stopped"))
                self._pending = []
