"""The routing policy and the hive's slot accounting, on made-up workers."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from typing import Any

import pytest
from servers import eventually

from protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, ModelInfo, Register, Result, Usage, encode
from queenbee.errors import ModelNotFound, NoCapacity
from queenbee.hive import Hive
from queenbee.scheduling import WorkerIndex, choose_worker, speed_score
from queenbee.settings import QueenSettings
from queenbee.worker_session import ModelSpeed, WorkerSession


def make_worker(worker_id: str, *, parallel: int = 1, models: tuple[str, ...] = ("m",)) -> WorkerSession:
    """A session with no socket behind it: enough for routing decisions."""
    registration = Register(
        protocol_version=PROTOCOL_VERSION,
        instance_id="fake-" + uuid.uuid4().hex[:12],
        max_frame_bytes=MAX_FRAME_BYTES,
        worker_version="t",
        cpu_count=1,
        disk_space=1,
        vram=0,
        models=[ModelInfo(id=model, n_ctx=512) for model in models],
        parallel=parallel,
    )
    socket: Any = None
    return WorkerSession(
        worker_id, socket, registration, on_slot_free=lambda _: None, cancel_grace=1.0, max_frame_bytes=2**20
    )


def measured(worker: WorkerSession, tokens_per_second: float) -> WorkerSession:
    """Give a worker a measured speed for model m."""
    worker.speed["m"] = ModelSpeed(ttft=0.1, tokens_per_second=tokens_per_second, samples=5)
    return worker


def test_least_loaded_worker_wins() -> None:
    """A worker with a smaller share of its slots busy is chosen over a busier one, whatever its speed."""
    busy = measured(make_worker("busy", parallel=2), 1000.0)
    idle = measured(make_worker("idle", parallel=2), 10.0)
    busy.reserve("r1", "m")
    assert choose_worker([busy, idle], "m", now=time.monotonic()) is idle


def test_fastest_wins_among_equally_loaded() -> None:
    """Among equally loaded workers the one the queen measured fastest is chosen."""
    slow = measured(make_worker("slow"), 20.0)
    fast = measured(make_worker("fast"), 80.0)
    assert choose_worker([slow, fast], "m", now=time.monotonic()) is fast


def test_new_workers_get_a_chance() -> None:
    """An unmeasured worker is tried before measured ones of equal load."""
    known = measured(make_worker("known"), 500.0)
    new = make_worker("new")
    assert choose_worker([known, new], "m", now=time.monotonic()) is new


def test_full_benched_and_excluded_workers_are_skipped() -> None:
    """No free slot, a bench, or an exclusion each take a worker out of the choice."""
    full = make_worker("full")
    full.reserve("r", "m")
    benched = make_worker("benched")
    benched.health.benched_until = time.monotonic() + 60
    excluded = make_worker("excluded")
    ok = make_worker("ok")
    now = time.monotonic()
    assert choose_worker([full, benched, excluded, ok], "m", now=now, exclude=frozenset({"excluded"})) is ok
    assert choose_worker([full, benched, excluded], "m", now=now, exclude=frozenset({"excluded"})) is None


def test_bench_time_grows_with_each_bench() -> None:
    """Each bench lasts twice as long as the one before, up to a cap."""
    worker = make_worker("w")
    lengths = []
    for _ in range(5):
        now = 1000.0
        for _ in range(3):
            worker.health.record_failure(now)
        lengths.append(worker.health.benched_until - now)
    assert lengths == [5.0, 10.0, 20.0, 40.0, 80.0]
    worker.health.record_success()
    assert worker.health.consecutive_failures == 0


def test_a_thousand_workers_spread_the_load() -> None:
    """With 1,000 workers, 1,000 requests land on 1,000 different workers."""
    workers = [make_worker(f"w{index}") for index in range(1000)]
    chosen = set()
    for index in range(1000):
        worker = choose_worker(workers, "m", now=time.monotonic())
        assert worker is not None
        worker.reserve(f"r{index}", "m")
        chosen.add(worker.id)
    assert len(chosen) == 1000
    assert choose_worker(workers, "m", now=time.monotonic()) is None


async def test_hive_routes_only_to_workers_of_the_model() -> None:
    """The hive reserves a slot on a worker that serves the model; other models are 404 at once."""
    hive = Hive(QueenSettings(queue_timeout=0.05))
    alpha = make_worker("alpha", models=("a",))
    beta = make_worker("beta", models=("b",))
    hive.add(alpha)
    hive.add(beta)
    worker, stream = await hive.acquire("b", "r1")
    assert worker is beta
    assert stream.request_id == "r1"
    with pytest.raises(ModelNotFound):
        await hive.acquire("c", "r2")
    with pytest.raises(NoCapacity):
        await hive.acquire("b", "r3")
    assert hive.models() == ["a", "b"]
    hive.remove(alpha)
    assert hive.models() == ["b"]


async def test_freed_slot_goes_to_the_waiting_request() -> None:
    """A request waiting in line gets the slot the moment it frees."""
    hive = Hive(QueenSettings(queue_timeout=5))
    worker = make_worker("w")
    worker._on_slot_free = hive.slot_freed
    hive.add(worker)
    await hive.acquire("m", "first")
    waiting = asyncio.create_task(hive.acquire("m", "second"))
    await eventually(lambda: hive.queue_depth("m") == 1)
    usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    await worker._handle(encode(Result(request_id="first", usage=usage)))  # as the reader would
    chosen, stream = await asyncio.wait_for(waiting, 5)
    assert chosen is worker
    assert stream.request_id == "second"
    assert hive.queue_depth() == 0


def test_index_agrees_with_the_reference_policy() -> None:
    """Through random loads, speeds, benches and exclusions the fast index ranks as choose_worker does."""
    rng = random.Random(7)
    workers = [make_worker(f"w{index}", parallel=rng.choice([1, 2, 4])) for index in range(40)]
    index = WorkerIndex()
    for worker in workers:
        index.update(worker)
    running: list[tuple[WorkerSession, str]] = []
    for step in range(2000):
        now = float(step)
        action = rng.random()
        if action < 0.45:
            exclude = frozenset(rng.sample([w.id for w in workers], 3))
            slots = rng.choice([1, 1, 1, 2, 3, 4])
            expected = choose_worker(workers, "m", now=now, exclude=exclude, slots=slots)
            chosen = index.choose("m", now=now, exclude=exclude, slots=slots)
            if expected is None:
                assert chosen is None
                continue
            assert chosen is not None
            assert chosen.free_slots >= slots
            assert rank(chosen) == rank(expected)
            request_id = f"r{step}"
            chosen.reserve(request_id, "m", slots)
            index.update(chosen)
            running.append((chosen, request_id))
        elif action < 0.85 and running:
            worker, request_id = running.pop(rng.randrange(len(running)))
            worker.release(request_id)
            if rng.random() < 0.5:
                measured(worker, rng.uniform(5, 100))
            index.update(worker)
        else:
            worker = rng.choice(workers)
            worker.health.benched_until = now + rng.choice([0, 5, 50])


async def test_a_request_with_n_choices_takes_n_slots() -> None:
    """n choices hold n slots of one worker: chosen only where n are free, and freed together."""
    hive = Hive(QueenSettings(queue_timeout=0.05))
    small, large = make_worker("small", parallel=2), make_worker("large", parallel=4)
    for worker in (small, large):
        worker._on_slot_free = hive.slot_freed
        hive.add(worker)
    worker, stream = await hive.acquire("m", "three", sequences=3)
    assert (worker, stream.slots) == (large, 3)
    assert (large.in_flight, large.free_slots) == (3, 1)
    worker, _ = await hive.acquire("m", "two", sequences=2)
    assert worker is small  # the large one has one slot left, not two
    with pytest.raises(NoCapacity):
        await hive.acquire("m", "another-two", sequences=2)
    worker, _ = await hive.acquire("m", "one")
    assert worker is large
    large.release("three")
    assert (large.in_flight, large.free_slots) == (1, 3)
    worker, stream = await hive.acquire("m", "three-again", sequences=3)
    assert (worker, stream.slots) == (large, 3)


async def test_more_choices_than_any_worker_has_slots_take_a_whole_worker() -> None:
    """n beyond every worker's slots takes all the slots of a largest idle worker, which runs the rest in
    turn; a retry that excludes the largest caps n at what the others have."""
    hive = Hive(QueenSettings(queue_timeout=0.05))
    small, large = make_worker("small", parallel=2), make_worker("large", parallel=4)
    for worker in (small, large):
        worker._on_slot_free = hive.slot_freed
        hive.add(worker)
    worker, stream = await hive.acquire("m", "eight", sequences=8)
    assert (worker, stream.slots, large.free_slots) == (large, 4, 0)
    large.release("eight")
    worker, stream = await hive.acquire("m", "retry", sequences=8, exclude=frozenset({"large"}))
    assert (worker, stream.slots, small.free_slots) == (small, 2, 0)


async def test_a_waiting_request_for_several_slots_keeps_its_place() -> None:
    """A request waiting for three slots gets them once they are free; a later one-slot request does not
    overtake it meanwhile."""
    hive = Hive(QueenSettings(queue_timeout=5))
    worker = make_worker("w", parallel=4)
    worker._on_slot_free = hive.slot_freed
    hive.add(worker)
    await hive.acquire("m", "a", sequences=2)
    await hive.acquire("m", "b")
    waiting = asyncio.create_task(hive.acquire("m", "three", sequences=3))
    await eventually(lambda: hive.queue_depth("m") == 1)
    later = asyncio.create_task(hive.acquire("m", "later"))
    await eventually(lambda: hive.queue_depth("m") == 2)
    worker.release("b")  # two free: not enough for the first in line, and the later one waits its turn
    await asyncio.sleep(0)
    assert not waiting.done()
    assert not later.done()
    worker.release("a")  # four free
    _, stream = await asyncio.wait_for(waiting, 5)
    assert stream.slots == 3
    _, stream = await asyncio.wait_for(later, 5)
    assert (stream.request_id, worker.free_slots) == ("later", 0)


def rank(worker: WorkerSession) -> tuple[float, float]:
    """The sort key both implementations order by."""
    return (worker.in_flight / worker.parallel, -speed_score(worker, "m"))


def test_index_decisions_stay_cheap_with_many_workers() -> None:
    """With 10,000 workers a decision looks at a handful of heap entries, not at every worker."""
    workers = [make_worker(f"w{index}") for index in range(10_000)]
    index = WorkerIndex()
    for worker in workers:
        index.update(worker)
    chosen = {index.choose("m", now=0.0).id for _ in range(10)}  # type: ignore[union-attr]
    assert len(chosen) == 1  # nothing reserved: the same best worker, found without a scan
    assert len(index._heaps["m"]) == 10_000


def test_measured_speed_of_streams_and_whole_answers() -> None:
    """Streams are timed from their first token; whole answers, which show none, over their duration."""
    streamed = ModelSpeed()
    streamed.record(0.5, 41, 2.5)
    assert streamed.ttft == 0.5
    assert streamed.tokens_per_second == 20.0
    whole = ModelSpeed()
    whole.record(None, 41, 2.0)
    assert whole.ttft is None
    assert whole.tokens_per_second == 20.0
