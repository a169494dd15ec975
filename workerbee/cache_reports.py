"""Telling the queen what the worker's caches hold: a `CacheSummary` per model whenever it changes.

The decoding threads bump a model's cache version whenever a slot's prefixes change; `CacheReports`
turns each change into a summary frame. The connection sends pending summaries before every Result,
so the queen knows where a conversation's prefix is before its client can send the next turn, and a
task sends the rest (evictions, cancellations) as they happen, and everything again every `refresh`
seconds, so that the queen's entries, which expire, stay alive while they are true.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Protocol, runtime_checkable

from protocol import CacheSummary, encode, encoded_size
from workerbee.prefix_cache import Block

REFRESH_SECONDS = 60.0
"""Seconds between summaries of a model whose cache did not change (the queen's entries expire)."""


@runtime_checkable
class CacheReporter(Protocol):
    """An engine that can say which prompt prefixes its caches hold (LlamaEngine)."""

    def cache_state(self) -> dict[str, tuple[int, list[Block]]]:
        """Per model, the version of what its caches hold and the prefixes (hash, tokens) they hold."""
        ...

    def watch_cache(self, callback: Callable[[], None]) -> None:
        """Have `callback` called (from any thread) whenever a model's cached prefixes change."""
        ...


class CacheReports:
    """The summaries the queen has not been sent yet, and the task that sends them as they change."""

    def __init__(self, engine: CacheReporter, loop: asyncio.AbstractEventLoop) -> None:
        self._engine = engine
        self._changed = asyncio.Event()
        self._sent: dict[str, int] = {}

        def changed() -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(self._changed.set)

        engine.watch_cache(changed)

    def reset(self) -> None:
        """A new connection: the queen knows nothing of this worker's caches."""
        self._sent.clear()
        self._changed.set()

    def pending(self, limit: int) -> list[CacheSummary]:
        """A summary for every model whose caches changed since it was last sent, within `limit` bytes."""
        frames: list[CacheSummary] = []
        for model, (version, prefixes) in self._engine.cache_state().items():
            if self._sent.get(model) == version:
                continue
            self._sent[model] = version
            frame = CacheSummary(model=model, prefixes=prefixes)
            size = encoded_size(encode(frame))
            if size > limit:
                # Longest first: what is cut is the shortest prefixes of a summary too big to send.
                keep = max(0, len(prefixes) * limit // size - 16)
                frame = CacheSummary(model=model, prefixes=prefixes[:keep])
            frames.append(frame)
        return frames

    async def run(
        self, send: Callable[[CacheSummary], Awaitable[None]], limit: Callable[[], int], refresh: float
    ) -> None:
        """Send summaries as caches change, and all of them every `refresh` seconds; runs until cancelled."""
        while True:
            try:
                async with asyncio.timeout(refresh):
                    await self._changed.wait()
            except TimeoutError:
                self._sent.clear()
            self._changed.clear()
            for frame in self.pending(limit()):
                await send(frame)
