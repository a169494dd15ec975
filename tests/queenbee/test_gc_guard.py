"""The garbage collector's guard: long-lived objects frozen, departed workers' garbage collected, pauses
measured. These use the real collector of the test process; each test gives back what it froze."""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator

import httpx
import pytest
from fake_worker import FakeWorker
from servers import QueenServer, eventually

from queenbee.gc_guard import MIN_DEPARTURES, CollectorGuard
from queenbee.settings import QueenSettings


class Cycle:
    """An object in a reference cycle: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
async def thawed() -> AsyncIterator[None]:
    """Nothing frozen before or after, and no garbage of earlier tests left (conftest collects each
    module's as it ends, so a leak is reported where it happened, not here)."""
    gc.unfreeze()
    gc.collect()
    yield
    gc.unfreeze()


async def test_a_started_guard_freezes_and_measures_every_collection(thawed: None) -> None:
    pauses: list[tuple[int, float]] = []
    guard = CollectorGuard(observe=lambda generation, seconds: pauses.append((generation, seconds)))
    guard.start()
    try:
        assert gc.get_freeze_count() > 0
        gc.collect()
        assert (2, pytest.approx(guard.longest_pause, abs=1.0)) in pauses
        assert all(seconds >= 0 for _, seconds in pauses)
    finally:
        await guard.close()
    assert gc.get_freeze_count() == 0
    count = len(pauses)
    gc.collect()
    assert len(pauses) == count  # closed: no longer measuring


async def test_without_freezing_the_guard_only_measures(thawed: None) -> None:
    pauses: list[tuple[int, float]] = []
    guard = CollectorGuard(
        freeze=False, observe=lambda generation, seconds: pauses.append((generation, seconds))
    )
    guard.start(workers=100)
    try:
        guard.worker_joined()
        for _ in range(MIN_DEPARTURES):
            guard.worker_left(100)
        assert gc.get_freeze_count() == 0
        assert guard.full_collections == 0
        gc.collect()
        assert any(generation == 2 for generation, _ in pauses)
    finally:
        await guard.close()


async def test_a_joining_worker_is_frozen_soon_after(thawed: None) -> None:
    guard = CollectorGuard(freeze_delay=0.01)
    guard.start()
    try:
        gc.unfreeze()
        session = [object() for _ in range(100)]  # a newcomer's long-lived state, tracked by the collector
        guard.worker_joined()
        await eventually(lambda: gc.get_freeze_count() >= len(session))
        assert guard.freezes == 2
    finally:
        await guard.close()


async def test_the_garbage_of_departed_workers_is_collected_once_a_quarter_has_left(thawed: None) -> None:
    held = 4 * MIN_DEPARTURES + 8  # a hive large enough that its quarter, not the minimum, counts
    cycle = Cycle()
    gone = weakref.ref(cycle)
    guard = CollectorGuard()
    guard.start(workers=held)
    try:
        del cycle
        gc.collect()
        assert gone() is not None  # frozen: the collector does not see it
        for left in range(held // 4 - 1):
            guard.worker_left(held - left - 1)
        gc.collect()
        assert gone() is not None
        assert guard.full_collections == 0
        guard.worker_left(held - held // 4)
        assert gone() is None
        assert guard.full_collections == 1
        assert guard.departed == 0
        assert guard.held_at_collection == held - held // 4
        assert gc.get_freeze_count() > 0  # the survivors are frozen again
    finally:
        await guard.close()


@pytest.mark.parametrize("queen_settings", [QueenSettings(gc_freeze=True, queue_timeout=2.0)])
async def test_a_queen_freezes_its_workers_and_exports_the_pauses(queen: QueenServer, thawed: None) -> None:
    """A worker's registration reaches the guard through the hive, and so does its departure; /metrics
    shows the collector's pauses."""
    assert queen.server is not None
    collector: CollectorGuard = queen.server.config.app.state.collector
    frozen = collector.freezes
    worker = await FakeWorker(queen.worker_url).connect()
    await eventually(lambda: collector.freezes > frozen)
    await worker.close()
    await eventually(lambda: collector.departed == 1)
    gc.collect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        text = (await client.get("/metrics")).text
    assert 'queenbee_gc_pause_seconds_count{generation="2"}' in text
