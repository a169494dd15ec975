"""Failures the queen must survive: silent, slow, failing and draining workers, and fair queueing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from fake_worker import FakeWorker, answer, content_chunk
from servers import QueenServer, eventually

from protocol import ChatJob, Chunk, Draining, ErrorCode, Job
from queenbee.settings import QueenSettings

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


async def never_answers(worker: FakeWorker, job: Job) -> None:
    """Accept the job and say nothing, ever."""
    await asyncio.Event().wait()


async def always_fails(worker: FakeWorker, job: Job) -> None:
    """Fail every job through the worker's own fault."""
    await worker.fail(job)


@pytest.fixture
def queen_settings() -> QueenSettings:
    """Short deadlines, so that timeouts show within a test."""
    return QueenSettings(
        queue_timeout=2.0,
        first_token_timeout=0.5,
        token_timeout=0.5,
        heartbeat_interval=0.2,
        heartbeat_timeout=0.5,
        cancel_grace=0.5,
    )


async def test_silent_worker_before_first_token_is_retried(queen: QueenServer) -> None:
    """A worker that never starts its stream times out, and another worker serves the request."""
    silent = await FakeWorker(queen.worker_url, behaviour=never_answers).connect()
    good = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        responses = [
            await client.post("/v1/chat/completions", json={**CHAT, "stream": True}) for _ in range(2)
        ]
    await silent.close()
    await good.close()
    assert [response.status_code for response in responses] == [200, 200]
    assert silent.jobs, "the silent worker should have been tried"
    assert set(silent.cancels) == {job.request_id for job in silent.jobs}


async def test_only_a_silent_worker_gives_504(queen: QueenServer) -> None:
    """With no other worker to retry on, a first-token timeout is a 504 in OpenAI's shape."""
    silent = await FakeWorker(queen.worker_url, behaviour=never_answers).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await silent.close()
    assert response.status_code == 504
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_whole_answers_may_take_longer_than_the_first_token_deadline(queen: QueenServer) -> None:
    """A non-streamed answer arrives only at its end, so only the request deadline bounds it."""

    async def slow_whole(worker: FakeWorker, job: Job) -> None:
        await asyncio.sleep(1.0)  # twice the first-token deadline of this queen
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=slow_whole).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await worker.close()
    assert response.status_code == 200
    assert worker.cancels == []


@pytest.mark.parametrize("patient_queen", [{"request_timeout": 2.0}], indirect=True)
async def test_silent_worker_hits_the_request_deadline(patient_queen: QueenServer) -> None:
    """A whole answer that never comes ends at the request deadline with a 504."""
    queen = patient_queen
    silent = await FakeWorker(queen.worker_url, behaviour=never_answers).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await silent.close()
    assert response.status_code == 504
    assert silent.cancels == [silent.jobs[0].request_id]


async def test_stalled_stream_ends_with_a_timeout_error(queen: QueenServer) -> None:
    """A worker that goes quiet between tokens ends the stream with an error event, then [DONE]."""

    async def stall(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("Hel")))
        await asyncio.Event().wait()

    worker = await FakeWorker(queen.worker_url, behaviour=stall).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await worker.close()
    events = [event for event in response.text.split("\n\n") if event]
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: ") :])["error"]
    assert error["code"] == "worker_timeout"
    assert worker.cancels == [worker.jobs[0].request_id]


async def test_worker_that_stops_answering_pings_is_dropped(queen: QueenServer) -> None:
    """Heartbeats: a worker whose connection goes dead is dropped and its stream ends with an error."""

    async def freeze(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("Hel")))
        worker.freeze()

    worker = await FakeWorker(queen.worker_url, behaviour=freeze).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await eventually(lambda: not queen.hive.workers)
    await worker.close()
    events = [event for event in response.text.split("\n\n") if event]
    assert events[-1] == "data: [DONE]"
    assert "error" in json.loads(events[-2][len("data: ") :])


async def test_failing_worker_is_benched(queen: QueenServer) -> None:
    """After three failures in a row a worker is benched: later requests go straight to the good one."""
    bad = await FakeWorker(queen.worker_url, behaviour=always_fails).connect()
    good = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        responses = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(8)]
    session = queen.hive.workers[bad.worker_id]
    await bad.close()
    await good.close()
    assert all(response.status_code == 200 for response in responses)
    assert len(bad.jobs) == 3
    assert session.health.bench_count == 1


async def test_client_errors_never_bench_a_worker(queen: QueenServer) -> None:
    """4xx answers are the client's fault: a worker that gives many is still in rotation."""

    async def refuse(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job, code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, message="too long")

    worker = await FakeWorker(queen.worker_url, behaviour=refuse).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        statuses = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(5)]
    session = queen.hive.workers[worker.worker_id]
    await worker.close()
    assert statuses == [400] * 5
    assert session.health.bench_count == 0
    assert session.health.consecutive_failures == 0


async def test_overloaded_worker_is_skipped_without_penalty(queen: QueenServer) -> None:
    """A worker that answers 'overloaded' is passed over for another, and not held to account."""

    async def overloaded(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job, code=ErrorCode.OVERLOADED, message="busy")

    full = await FakeWorker(queen.worker_url, behaviour=overloaded).connect()
    good = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        statuses = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(4)]
    session = queen.hive.workers[full.worker_id]
    await full.close()
    await good.close()
    assert statuses == [200] * 4
    assert session.health.consecutive_failures == 0


async def test_draining_worker_gets_no_new_jobs(queen: QueenServer) -> None:
    """After a worker says it is draining, the queen sends its requests elsewhere."""
    draining = await FakeWorker(queen.worker_url).connect()
    await draining.send(Draining())
    await eventually(lambda: queen.hive.workers[draining.worker_id].draining)
    good = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        statuses = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)]
    await draining.close()
    await good.close()
    assert statuses == [200] * 3
    assert draining.jobs == []


async def test_waiting_requests_are_served_first_come_first_served(queen: QueenServer) -> None:
    """Requests queued for a busy worker run in the order they arrived."""
    gate = asyncio.Event()
    order: list[str] = []

    async def gated(worker: FakeWorker, job: Job) -> None:
        assert isinstance(job.request, ChatJob)
        order.append(job.request.body.messages[0].text())
        if len(order) == 1:
            await gate.wait()
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=gated).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:

        def ask(text: str) -> asyncio.Task[httpx.Response]:
            body = {"model": "fake-model", "messages": [{"role": "user", "content": text}]}
            return asyncio.create_task(client.post("/v1/chat/completions", json=body))

        first = ask("first")
        await eventually(lambda: len(order) == 1)
        queued = []
        for index in range(4):
            queued.append(ask(f"queued-{index}"))
            await eventually(lambda index=index: queen.hive.queue_depth("fake-model") == index + 1)
        gate.set()
        responses = await asyncio.gather(first, *queued)
    await worker.close()
    assert all(response.status_code == 200 for response in responses)
    assert order == ["first", "queued-0", "queued-1", "queued-2", "queued-3"]


@pytest.fixture(params=[{}])
def patient_queen(queen_settings: QueenSettings, request: pytest.FixtureRequest) -> Iterator[QueenServer]:
    """A queen whose requests may wait long for a slot, in a queue of one; the param overrides settings."""
    settings = queen_settings.model_copy(update={"queue_size": 1, "queue_timeout": 30, **request.param})
    server = QueenServer(settings).start()
    yield server
    server.stop()


async def test_full_queue_is_503_at_once(patient_queen: QueenServer) -> None:
    """Past the queue's size, a request gets 503 with Retry-After without waiting."""
    queen = patient_queen
    gate = asyncio.Event()

    async def gated(worker: FakeWorker, job: Job) -> None:
        await gate.wait()
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=gated).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        running = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: len(worker.jobs) == 1)
        waiting = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: queen.hive.queue_depth("fake-model") == 1)
        refused = await client.post("/v1/chat/completions", json=CHAT)
        gate.set()
        done = await asyncio.gather(running, waiting)
    await worker.close()
    assert refused.status_code == 503
    assert "queue is full" in refused.json()["error"]["message"]
    assert "retry-after" in refused.headers
    assert [response.status_code for response in done] == [200, 200]


async def test_waiting_request_learns_when_the_last_worker_leaves(patient_queen: QueenServer) -> None:
    """A request waiting for a model gets 404 as soon as no worker serves it any more."""
    queen = patient_queen
    gate = asyncio.Event()

    async def gated(worker: FakeWorker, job: Job) -> None:
        await gate.wait()

    worker = await FakeWorker(queen.worker_url, behaviour=gated).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        running = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: len(worker.jobs) == 1)
        waiting = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: queen.hive.queue_depth("fake-model") == 1)
        await worker.abort()
        waited = await waiting
        ran = await running
    assert waited.status_code == 404
    assert ran.status_code == 502


@pytest.mark.parametrize("patient_queen", [{"queue_size": 16}], indirect=True)
async def test_parallel_slots_are_never_exceeded(patient_queen: QueenServer) -> None:
    """A worker advertising 2 slots never has more than 2 jobs at once, however many requests come."""
    running = 0
    peak = 0

    async def counted(worker: FakeWorker, job: Job) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.02)
        running -= 1
        await answer(worker, job)

    queen = patient_queen
    worker = await FakeWorker(queen.worker_url, parallel=2, behaviour=counted).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=CHAT) for _ in range(10)))
    await worker.close()
    assert all(response.status_code == 200 for response in responses)
    assert peak == 2
    assert len(worker.jobs) == 10
