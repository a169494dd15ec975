"""Keeping Python's cyclic garbage collector off the request path of a queen holding a large hive.

A full (generation 2) collection walks every object the collector tracks, and nothing else runs on the
event loop meanwhile. Ten thousand connected workers are some millions of such objects (their sessions,
websockets, transports, models and tasks): each full collection then took 0.5 to 0.9 s on this
project's 2-core benchmark machine, a pause every client in flight waits through. Those objects live as
long as their workers, so walking them again and again frees nothing.

`CollectorGuard` moves them out of the collector's sight with `gc.freeze()` (constant time: it splices
the generations onto the permanent one) a little after workers join, and again every `refreeze_interval`
seconds, so full collections walk only what was made since. Frozen objects are still freed by reference
counting when they are dropped; what freezing keeps is cyclic garbage, such as that of workers that
have left. The guard bounds it: once the workers that left since the last full collection are a quarter
of those held then (at least `MIN_DEPARTURES`), it unfreezes, collects once, and freezes again. That one
collection is a pause like those above, once per quarter of the hive replaced, not every few seconds.

The young generation is the other cost. A request's objects are freed by reference counting as it ends
(none of them is in a reference cycle: tests/queenbee/test_gc_guard.py holds every API to that), so a
young collection frees nothing a queen made: it walks the requests in flight and moves them on. At
Python's default threshold (700 allocations) a queen serving thousands of requests a second ran one
every ten requests, 13 to 24 µs of CPU a request. While it runs, the guard raises that threshold to
`YOUNG_THRESHOLD`: young collections are that many times rarer, and each still walks no more than
what is in flight.

Every collection's duration goes to `queenbee_gc_pause_seconds` (per generation), so an operator sees
what the collector costs with and without the guard (`--no-gc-freeze`).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any

log = logging.getLogger("queenbee.gc")

FREEZE_DELAY = 1.0
"""Seconds after a worker joins before the guard freezes: joins come in bursts, one freeze covers one."""
REFREEZE_INTERVAL = 60.0
"""Seconds between freezes while no worker joins: state the hive keeps replacing (heartbeats, cache
summaries) joins the frozen set too."""
MIN_DEPARTURES = 64
"""Workers that must leave before their cyclic garbage is collected, however small the hive."""
YOUNG_THRESHOLD = 10_000
"""Allocations (less deallocations) between collections of the youngest generation while the guard runs;
Python's default is 700. The older generations keep their own thresholds."""

PauseObserver = Callable[[int, float], None]
"""Called with a collection's generation and its duration in seconds."""


class CollectorGuard:
    """Freezes the hive's long-lived objects and measures every collection; one per queen."""

    def __init__(
        self,
        *,
        freeze: bool = True,
        observe: PauseObserver | None = None,
        freeze_delay: float = FREEZE_DELAY,
        refreeze_interval: float = REFREEZE_INTERVAL,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.freeze_enabled = freeze
        self.observe = observe
        self.freeze_delay = freeze_delay
        self.refreeze_interval = refreeze_interval
        self._clock = clock
        self._started_at: float | None = None
        self._joined = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.freezes = 0
        """How often the guard froze."""
        self.full_collections = 0
        """Collections the guard ran itself (after departures)."""
        self.departed = 0
        """Workers that left since the guard last collected."""
        self.held_at_collection = 0
        """Workers held when the guard last collected (or started)."""
        self.longest_pause = 0.0
        """The longest collection seen, in seconds."""
        self._thresholds_before: tuple[int, int, int] | None = None

    def start(self, workers: int = 0) -> None:
        """Measure every collection from now on and, if enabled, freeze what the queen holds now and
        collect the young generation every `YOUNG_THRESHOLD` allocations."""
        gc.callbacks.append(self._on_collection)
        if not self.freeze_enabled:
            return
        self._thresholds_before = gc.get_threshold()
        gc.set_threshold(YOUNG_THRESHOLD, *self._thresholds_before[1:])
        self.held_at_collection = workers
        self._freeze()
        self._task = asyncio.create_task(self._run(), name="gc-guard")

    async def close(self) -> None:
        """Stop measuring and freezing; what is frozen goes back to the collector, and its thresholds
        are what they were."""
        with suppress(ValueError):
            gc.callbacks.remove(self._on_collection)
        if self._thresholds_before is not None:
            if gc.get_threshold()[0] == YOUNG_THRESHOLD:  # not already set back by another guard
                gc.set_threshold(*self._thresholds_before)
            self._thresholds_before = None
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
            self._task = None
            gc.unfreeze()

    def worker_joined(self) -> None:
        """A worker registered: its session is long-lived, freeze it soon."""
        self._joined.set()

    def worker_left(self, workers: int) -> None:
        """A worker left, `workers` remain: collect its garbage once enough have left."""
        if not self.freeze_enabled:
            return
        self.departed += 1
        if self.departed >= max(MIN_DEPARTURES, self.held_at_collection // 4):
            self.collect(workers)

    def collect(self, workers: int) -> None:
        """Give the frozen objects back, collect everything once, and freeze what survived."""
        gc.unfreeze()
        started = self._clock()
        gc.collect()
        log.info(
            "collected the garbage of %d departed workers in %.3f s (%d held now)",
            self.departed,
            self._clock() - started,
            workers,
        )
        self.full_collections += 1
        self.departed = 0
        self.held_at_collection = workers
        self._freeze()

    async def _run(self) -> None:
        while True:
            with suppress(TimeoutError):
                async with asyncio.timeout(self.refreeze_interval):
                    await self._joined.wait()
                    await asyncio.sleep(self.freeze_delay)
            self._joined.clear()
            self._freeze()

    def _freeze(self) -> None:
        gc.freeze()
        self.freezes += 1

    def _on_collection(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = self._clock()
            return
        if self._started_at is None:
            return
        pause = self._clock() - self._started_at
        self._started_at = None
        self.longest_pause = max(self.longest_pause, pause)
        if self.observe is not None:
            self.observe(int(info.get("generation", 0)), pause)
