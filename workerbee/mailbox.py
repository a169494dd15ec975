"""Events from the batching thread to the requests' event loops, a step's events in one hand-off.

A step gives every stream its token at once. Handed over one by one, the event loop may wake for the
first before the thread has sampled the last, and the streams' chunks then leave in separate messages;
held until the step ends, they reach each loop in one call, so the requests all run in the same turn
and their frames leave together (workerbee/outbox.py). Events posted from any other thread, or outside
a step, are handed over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

Delivery = tuple[Callable[[Any], None], Any]
"""A callback to run on the loop and its argument."""


def _deliver_all(deliveries: list[Delivery]) -> None:
    for deliver, item in deliveries:
        deliver(item)


class Mailbox:
    """Hands events to event loops; a thread inside `holding()` hands its events over when it leaves."""

    def __init__(self) -> None:
        self._local = threading.local()

    def post(self, loop: asyncio.AbstractEventLoop, deliver: Callable[[Any], None], item: Any) -> None:
        """Run `deliver(item)` on `loop`: now, or when this thread's `holding()` ends.

        A closed loop is skipped: nobody waits for its events any more.
        """
        held: dict[asyncio.AbstractEventLoop, list[Delivery]] | None = getattr(self._local, "held", None)
        if held is None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(deliver, item)
        else:
            held.setdefault(loop, []).append((deliver, item))

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold this thread's events until the block ends, then give each loop its events in one call."""
        held: dict[asyncio.AbstractEventLoop, list[Delivery]] = {}
        self._local.held = held
        try:
            yield
        finally:
            self._local.held = None
            for loop, deliveries in held.items():
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_deliver_all, deliveries)
