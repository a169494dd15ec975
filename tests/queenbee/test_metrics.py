"""GET /metrics: request counters and histograms from finished requests, hive gauges read at scrape."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from fake_worker import FakeWorker, answer
from ledger_records import record
from prometheus_client.parser import text_string_to_metric_families
from servers import QueenServer, eventually

from protocol import Job
from queenbee.hive import Hive
from queenbee.metrics import RecentActivity, worker_failures
from queenbee.observer import Outcome, RequestRecord
from queenbee.settings import QueenSettings

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def queen_settings(tmp_path: Path) -> QueenSettings:
    """A test queen with its ledger in tmp_path."""
    return QueenSettings(
        queue_timeout=5.0, first_token_timeout=10.0, token_timeout=10.0, db=tmp_path / "l.db"
    )


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus exposition; 0 if it is absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


async def scrape(queen: QueenServer) -> str:
    """GET /metrics."""
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    return response.text


async def test_requests_tokens_and_latencies_are_counted(queen: QueenServer) -> None:
    """Outcomes by model, tokens in and out, TTFT and duration histograms, connected workers."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        await client.post("/v1/chat/completions", json=CHAT)
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await client.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
    text = await scrape(queen)
    await worker.close()
    assert metric(text, "queenbee_requests_total", model="fake-model", outcome="success") == 2
    # A model no worker serves is not a label of its own: clients could grow /metrics without bound.
    assert metric(text, "queenbee_requests_total", model="unknown", outcome="error") == 1
    assert metric(text, "queenbee_prompt_tokens_total", model="fake-model") == 6
    assert metric(text, "queenbee_completion_tokens_total", model="fake-model") == 4
    # Only the stream has a first token the queen saw; a whole answer arrives in one piece.
    assert metric(text, "queenbee_time_to_first_token_seconds_count", model="fake-model") == 1
    assert metric(text, "queenbee_time_to_first_token_seconds_bucket", model="fake-model", le="+Inf") == 1
    assert metric(text, "queenbee_request_duration_seconds_count", model="fake-model") == 2
    assert metric(text, "queenbee_request_duration_seconds_count", model="unknown") == 1
    assert metric(text, "queenbee_workers_connected") == 1
    assert metric(text, "queenbee_model_workers", model="fake-model") == 1
    assert metric(text, "queenbee_slots", state="free") == 1
    assert metric(text, "queenbee_slots", state="busy") == 0


async def test_busy_slots_and_queue_depth_are_live(queen: QueenServer) -> None:
    """While one request holds the only slot and another waits, the gauges say so."""
    release = asyncio.Event()

    async def slow(worker: FakeWorker, job: Job) -> None:
        await release.wait()
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=slow).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: bool(worker.jobs))
        second = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: queen.hive.queue_depth("fake-model") == 1)
        during = await scrape(queen)
        release.set()
        assert [(await first).status_code, (await second).status_code] == [200, 200]
    after = await scrape(queen)
    await worker.close()
    assert metric(during, "queenbee_slots", state="busy") == 1
    assert metric(during, "queenbee_slots", state="free") == 0
    assert metric(during, "queenbee_queue_depth", model="fake-model") == 1
    assert metric(after, "queenbee_slots", state="busy") == 0
    assert metric(after, "queenbee_queue_depth", model="fake-model") == 0


async def test_retries_and_worker_failures(queen: QueenServer) -> None:
    """A request moved off a failing worker counts one retry and one worker failure."""

    async def broken(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job)

    bad = await FakeWorker(queen.worker_url, behaviour=broken).connect()
    good = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        responses = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
    text = await scrape(queen)
    await bad.close()
    await good.close()
    assert [response.status_code for response in responses] == [200] * 3
    assert bad.jobs
    assert metric(text, "queenbee_retries_total", model="fake-model") == len(bad.jobs)
    assert metric(text, "queenbee_worker_failures_total", model="fake-model") == len(bad.jobs)
    assert metric(text, "queenbee_requests_total", model="fake-model", outcome="success") == 3


async def test_each_queen_counts_its_own_requests(queen: QueenServer, tmp_path: Path) -> None:
    """Two queens in one process keep separate registries."""
    other = QueenServer(QueenSettings(db=tmp_path / "other.db")).start()
    try:
        worker = await FakeWorker(queen.worker_url).connect()
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            await client.post("/v1/chat/completions", json=CHAT)
        await worker.close()
        mine, theirs = await scrape(queen), await scrape(other)
    finally:
        other.stop()
    assert metric(mine, "queenbee_requests_total", model="fake-model", outcome="success") == 1
    assert metric(theirs, "queenbee_requests_total", model="fake-model", outcome="success") == 0
    assert metric(theirs, "queenbee_workers_connected") == 0


@pytest.mark.parametrize(
    ("outcome", "status", "attempts", "failures"),
    [
        ("success", 200, 1, 0),
        ("success", 200, 3, 2),
        ("error", 502, 3, 3),
        ("error", 503, 0, 0),
        ("error", 400, 2, 1),
        ("cancelled", 499, 1, 0),
    ],
)
def test_worker_failures_from_a_record(outcome: Outcome, status: int, attempts: int, failures: int) -> None:
    """Every attempt but the last failed; the last did too when the request ended in a 5xx."""
    record = RequestRecord("r", "/v1/chat/completions", "m", 0.0, outcome, status, attempts=attempts)
    assert worker_failures(record) == failures


async def test_the_last_minutes_throughput_counts_what_is_in_the_window() -> None:
    """Requests count while they are younger than the window, then leave it, however many came."""
    now = [0.0]
    activity = RecentActivity(Hive(QueenSettings()), window=60.0, clock=lambda: now[0])
    now[0] = 1000.0  # a queen older than the window: rates are over the whole window
    await activity.request_finished(record("r1", 0.0, prompt_tokens=30, completion_tokens=12))
    now[0] += 30
    await activity.request_finished(record("r2", 0.0, outcome="error", prompt_tokens=6, completion_tokens=0))
    assert activity.throughput() == {
        "window_seconds": 60.0,
        "requests_per_minute": 2.0,
        "prompt_tokens_per_second": 36 / 60,
        "completion_tokens_per_second": 12 / 60,
        "errors_per_minute": 1.0,
    }
    now[0] += 31  # the first is 61 s old: out of the window; the totals keep it
    assert activity.throughput()["requests_per_minute"] == 1.0
    assert activity.throughput()["prompt_tokens_per_second"] == 6 / 60
    assert activity.throughput()["completion_tokens_per_second"] == 0.0
    assert activity.throughput()["errors_per_minute"] == 1.0
    now[0] += 60
    assert activity.throughput()["errors_per_minute"] == 0.0
    assert activity.throughput()["prompt_tokens_per_second"] == 0.0
    assert (activity.totals.requests, activity.totals.prompt_tokens, activity.failed) == (2, 36, 1)
