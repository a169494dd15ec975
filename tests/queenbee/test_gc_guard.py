"""The garbage collector's guard: long-lived objects frozen, departed workers' garbage collected, pauses
measured. These use the real collector of the test process; each test gives back what it froze."""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from collections.abc import AsyncIterator

import httpx
import pytest
from fake_worker import FakeWorker
from servers import QueenServer, eventually

from queenbee.gc_guard import MIN_DEPARTURES, YOUNG_THRESHOLD, CollectorGuard
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


async def test_the_guard_collects_the_young_generation_less_often_while_it_runs(thawed: None) -> None:
    before = gc.get_threshold()
    assert before[0] != YOUNG_THRESHOLD
    guard = CollectorGuard()
    guard.start()
    try:
        assert gc.get_threshold() == (YOUNG_THRESHOLD, *before[1:])
    finally:
        await guard.close()
    assert gc.get_threshold() == before
    measuring = CollectorGuard(freeze=False)
    measuring.start()
    try:
        assert gc.get_threshold() == before
    finally:
        await measuring.close()


async def test_two_guards_leave_the_thresholds_as_they_found_them(thawed: None) -> None:
    """Test queens share one process: whichever closes first, the collector ends as it began."""
    before = gc.get_threshold()
    first, second = CollectorGuard(), CollectorGuard()
    first.start()
    second.start()
    await first.close()
    await second.close()
    assert gc.get_threshold() == before
    first, second = CollectorGuard(), CollectorGuard()
    first.start()
    second.start()
    await second.close()
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD  # the first still runs
    await first.close()
    assert gc.get_threshold() == before


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


def _queen_garbage() -> Counter[str]:
    """The queen's own objects among what the last collection found unreachable (`DEBUG_SAVEALL`)."""
    return Counter(
        f"{type(obj).__module__}.{type(obj).__qualname__}"
        for obj in gc.garbage
        if type(obj).__module__.partition(".")[0] in ("queenbee", "protocol")
    )


CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", CHAT, 200),
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, 200),
        ("/v1/responses", {"model": "fake-model", "input": "hi", "store": False}, 200),
        ("/v1/responses", {"model": "fake-model", "input": "hi", "store": False, "stream": True}, 200),
        ("/v1/messages", {**CHAT, "max_tokens": 16, "stream": True}, 200),
        ("/v1/chat/completions", {**CHAT, "model": "no-such-model"}, 404),
    ],
    ids=["chat", "chat-streamed", "responses", "responses-streamed", "messages-streamed", "unknown-model"],
)
async def test_a_finished_request_leaves_no_garbage_for_the_cyclic_collector(
    queen: QueenServer, thawed: None, path: str, body: dict[str, object], status: int
) -> None:
    """What a request held (its call, presenter, stream, lease, answer) is freed by reference counting as
    it ends. In a reference cycle it would wait for the collector: at thousands of requests a second
    that made every collection walk them, a tenth of the queen's CPU and full collections of
    milliseconds."""
    assert queen.server is not None
    tasks = queen.server.server_state.tasks
    worker = await FakeWorker(queen.worker_url).connect()
    try:
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            assert (await client.post(path, json=body)).status_code == status  # lazy state made once
            await eventually(lambda: len(tasks) == 1)  # only the worker's connection is left running
            gc.collect()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(5):
                    response = await client.post(path, json=body)
                    assert response.status_code == status, response.text
                await eventually(lambda: len(tasks) == 1)
                gc.collect()
                garbage = _queen_garbage()
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
    finally:
        await worker.close()
    assert garbage == Counter()
