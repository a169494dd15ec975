"""A hive of several queen replicas on a real Redis: workers on one replica serve clients of another."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets
from browser import headless_chromium
from fake_worker import FakeWorker, answer, content_chunk, reply
from playwright.async_api import async_playwright
from queen_process import QueenProcess
from redis_server import RedisServer, redis_server
from servers import (
    BUNDLED_MODEL_ID,
    TIME_UNIT,
    QueenServer,
    eventually,
    start_worker,
    stop_process,
    wait_until,
)

from protocol import Chunk, ErrorCode, Job, Result, Usage
from queenbee.settings import QueenSettings

__all__ = ["redis_server"]

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def replica_settings(tmp_path: Path, redis: RedisServer, name: str, **options: Any) -> QueenSettings:
    """A replica of the test's hive: its own ledger, the shared Redis, a short lease."""
    options.setdefault("queue_timeout", 2.0)
    options.setdefault("first_token_timeout", 5.0)
    options.setdefault("token_timeout", 5.0)
    options.setdefault("cancel_grace", 1.0)
    options.setdefault("replica_lease", 0.6)
    return QueenSettings(db=tmp_path / f"{name}.db", redis_url=redis.url, replica_id=name, **options)


@contextmanager
def replicas(tmp_path: Path, redis: RedisServer, *names: str, **options: Any) -> Iterator[list[QueenServer]]:
    """Queens `names` in one hive, stopped on the way out."""
    queens = [QueenServer(replica_settings(tmp_path, redis, name, **options)).start() for name in names]
    try:
        yield queens
    finally:
        for queen in queens:
            queen.stop()


def sees(queen: QueenServer, worker: FakeWorker) -> bool:
    """Whether `queen`'s hive holds `worker` (its own or another replica's)."""
    return worker.worker_id in queen.hive.workers


async def test_a_client_of_one_replica_is_served_by_a_worker_of_another(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Streamed and whole answers from a worker on replica A reach a client of replica B, as from a
    local worker."""
    with replicas(tmp_path, redis_server, "a", "b") as (a, b):
        worker = await FakeWorker(a.worker_url).connect()
        await eventually(lambda: sees(b, worker))
        client = openai.AsyncOpenAI(base_url=b.openai_url, api_key="unused", max_retries=0)
        whole = await client.chat.completions.create(model="fake-model", messages=CHAT["messages"])
        chunks = [
            chunk
            async for chunk in await client.chat.completions.create(
                model="fake-model", messages=CHAT["messages"], stream=True
            )
        ]
        await client.close()
        await worker.close()
    assert whole.choices[0].message.content == "Hello there"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert len(worker.jobs) == 2


async def streams_until_cancelled(worker: FakeWorker, job: Job) -> None:
    """Stream a word (token 7) every 20 ms until the queen cancels; then confirm with the usage so far."""
    sent = 0
    await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
    while job.request_id not in worker.cancels:
        chunk = Chunk(request_id=job.request_id, chunk=content_chunk(" word"), tokens=1, token_ids=[7])
        await worker.send(chunk)
        sent += 1
        await asyncio.sleep(0.02)
    usage = Usage(prompt_tokens=3, completion_tokens=sent, total_tokens=3 + sent)
    await worker.send(Result(request_id=job.request_id, usage=usage))


async def test_a_client_that_leaves_cancels_the_job_on_the_other_replica(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A client of B that disconnects mid-stream cancels the job on A's worker, whose slot frees on both."""
    with replicas(tmp_path, redis_server, "a", "b") as (a, b):
        worker = await FakeWorker(a.worker_url, behaviour=streams_until_cancelled).connect()
        await eventually(lambda: sees(b, worker))
        async with (
            httpx.AsyncClient(base_url=b.base_url, timeout=30) as client,
            client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
        ):
            assert response.status_code == 200
            lines = response.aiter_lines()
            while "word" not in await anext(lines):
                pass
        await eventually(lambda: worker.cancels == [worker.jobs[0].request_id])
        await eventually(lambda: a.hive.workers[worker.worker_id].in_flight == 0)
        await eventually(lambda: b.hive.workers[worker.worker_id].held_here == 0)
        await worker.close()


async def test_a_failure_before_the_first_token_is_retried_on_another_worker_of_the_hive(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A remote worker that fails before answering is replaced by the next one, as a local one is."""

    async def fails(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job)

    with replicas(tmp_path, redis_server, "a", "b") as (a, b):
        failing = await FakeWorker(a.worker_url, behaviour=fails).connect()
        good = await FakeWorker(a.worker_url).connect()
        await eventually(lambda: sees(b, failing) and sees(b, good))
        async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await failing.close()
        await good.close()
    assert response.status_code == 200
    assert "Hello" in response.text
    assert len(failing.jobs) == 1
    assert len(good.jobs) == 1


async def test_a_client_error_from_a_remote_worker_reaches_the_client_as_it_is(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The worker's own refusal of a request travels back as the same OpenAI error, not a retry."""

    async def refuses(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job, ErrorCode.INVALID_REQUEST, "the prompt is not acceptable")

    with replicas(tmp_path, redis_server, "a", "b") as (a, b):
        worker = await FakeWorker(a.worker_url, behaviour=refuses).connect()
        other = await FakeWorker(a.worker_url).connect()
        await eventually(lambda: sees(b, worker) and sees(b, other))
        async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as client:
            response = await client.post("/v1/chat/completions", json=CHAT)
        await worker.close()
        await other.close()
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "the prompt is not acceptable"
    assert other.jobs == []


async def test_every_replica_shows_the_whole_hive(tmp_path: Path, redis_server: RedisServer) -> None:
    """/v1/models, /v1/workers, /metrics and /health of B show A's worker, labelled with its replica;
    A's /metrics counts what B's clients asked and what A's workers ran for them."""
    with replicas(tmp_path, redis_server, "a", "b") as (a, b):
        worker = await FakeWorker(a.worker_url, models=("only-on-a",), parallel=3).connect()
        await eventually(lambda: sees(b, worker))
        async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as client:
            models = (await client.get("/v1/models")).json()
            workers = (await client.get("/v1/workers")).json()
            metrics = (await client.get("/metrics")).text
            health = (await client.get("/health")).json()
            served = await client.post("/v1/chat/completions", json={**CHAT, "model": "only-on-a"})
            assert served.status_code == 200
            counted = [
                'queenbee_replica_requests_total{replica="b"} 1.0',
                'queenbee_replica_jobs_run_total{replica="a"} 1.0',
            ]
            seen_by_a = ""
            async with asyncio.timeout(10 * TIME_UNIT):
                while not all(line in seen_by_a for line in counted):  # announced at the next beats
                    seen_by_a = (await client.get(f"{a.base_url}/metrics")).text
                    await asyncio.sleep(0.05)
            stats_of_a = (await client.get(f"{a.base_url}/stats")).json()
            stats_of_b = (await client.get("/stats")).json()
        await worker.close()
        await eventually(lambda: not sees(b, worker))
    assert [model["id"] for model in models["data"]] == ["only-on-a"]
    [shown] = workers["data"]
    assert shown["id"] == worker.worker_id
    assert shown["replica"] == "a"
    assert shown["slots"] == {"total": 3, "busy": 0, "free": 3}
    assert 'queenbee_replica_workers{replica="a"} 1.0' in metrics
    assert 'queenbee_replica_workers{replica="b"} 0.0' in metrics
    assert 'queenbee_replica_slots{replica="a",state="free"} 3.0' in metrics
    assert 'queenbee_redis_up{replica="b"} 1.0' in metrics
    assert 'queenbee_replica_requests_total{replica="a"} 0.0' in metrics
    assert health["status"] == "ok"
    assert health["hive"] == {"replica": "b", "redis": "ok", "replicas": ["a", "b"], "remote_workers": 1}
    # /stats of either replica: its own clients' traffic, and the whole hive's (B's client, seen by A).
    tokens = {"prompt_tokens": 3, "completion_tokens": 2}
    assert stats_of_b["totals"] == {"requests": 1, "failed": 0, **tokens}
    assert stats_of_a["totals"] == {"requests": 0, "failed": 0, "prompt_tokens": 0, "completion_tokens": 0}
    for stats, name in ((stats_of_a, "a"), (stats_of_b, "b")):
        assert stats["hive"]["replica"] == name
        assert stats["hive"]["replicas"] == ["a", "b"]
        assert stats["hive"]["totals"] == {"requests": 1, "failed": 0, **tokens}
        assert stats["hive"]["throughput"]["requests_per_minute"] > 0
        assert stats["hive"]["throughput"]["errors_per_minute"] == 0


async def test_the_dashboard_of_one_replica_shows_the_whole_hive(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Replica A's page, in a headless Chromium, shows B's worker with its replica and the tokens B's
    client was served."""
    with replicas(tmp_path, redis_server, "a", "b") as (a, b):
        worker = await FakeWorker(b.worker_url).connect()
        await eventually(lambda: sees(a, worker))
        async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as client:
            assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
        problems: list[str] = []
        timeout_ms = 15_000 * TIME_UNIT
        async with async_playwright() as playwright:
            browser = await headless_chromium(playwright, tmp_path)
            try:
                page = await browser.new_page()
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
                await page.goto(a.base_url + "/", wait_until="load", timeout=timeout_ms)
                row = page.locator(f'#workers tr[data-worker-id="{worker.worker_id}"]')
                await row.wait_for(timeout=timeout_ms)
                row_text = await row.inner_text()
                # B's client's 3 + 2 tokens, once A has heard B's next announcement.
                served = page.locator("#stat-tokens", has_text=re.compile(r"^5$"))
                await served.wait_for(timeout=timeout_ms)
                updated = await page.locator("#updated").inner_text()
            finally:
                await browser.close()
        await worker.close()
    assert problems == []
    assert "on b" in row_text
    assert updated.startswith("replica a of 2, updated")


async def test_a_local_worker_is_preferred_when_the_scores_tie(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """With an idle worker on each replica, every replica's clients are served by its own."""
    with replicas(tmp_path, redis_server, "a", "b") as (a, b):
        on_a = await FakeWorker(a.worker_url).connect()
        on_b = await FakeWorker(b.worker_url).connect()
        await eventually(lambda: sees(a, on_b) and sees(b, on_a))
        async with httpx.AsyncClient(timeout=30) as client:
            for _ in range(3):
                assert (await client.post(f"{a.base_url}/v1/chat/completions", json=CHAT)).status_code == 200
                assert (await client.post(f"{b.base_url}/v1/chat/completions", json=CHAT)).status_code == 200
        await on_a.close()
        await on_b.close()
    assert len(on_a.jobs) == 3
    assert len(on_b.jobs) == 3


async def test_a_key_cannot_multiply_its_limits_by_the_replicas(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A key allowed 3 requests a minute gets 3 across two replicas, not 3 on each; another key is not
    held back by it."""
    keys = tmp_path / "keys"
    keys.write_text("alice sk-alice rpm=3\nbob sk-bob rpm=3\n")
    with replicas(tmp_path, redis_server, "a", "b", api_keys_file=keys) as (a, b):
        on_a = await FakeWorker(a.worker_url).connect()
        on_b = await FakeWorker(b.worker_url).connect()
        await eventually(lambda: sees(a, on_b) and sees(b, on_a))
        alice = {"Authorization": "Bearer sk-alice"}
        async with httpx.AsyncClient(timeout=30) as client:
            statuses = [
                (
                    await client.post(f"{queen.base_url}/v1/chat/completions", json=CHAT, headers=alice)
                ).status_code
                for queen in (a, b, a, b)
            ]
            refused = await client.post(f"{a.base_url}/v1/chat/completions", json=CHAT, headers=alice)
            bob = await client.post(
                f"{b.base_url}/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer sk-bob"}
            )
        await on_a.close()
        await on_b.close()
    assert statuses == [200, 200, 200, 429]
    assert refused.status_code == 429
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "requests"
    assert "limit 3" in error["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert bob.status_code == 200


async def test_concurrency_and_tokens_per_key_are_held_across_replicas(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A request in flight on A holds the key's one concurrent slot against B; once it ends, its tokens
    count against the key's minute on B too."""
    release = asyncio.Event()

    async def waits(worker: FakeWorker, job: Job) -> None:
        await release.wait()
        await reply(worker, job, "one two three four five", prompt_tokens=5)

    with replicas(tmp_path, redis_server, "a", "b", max_concurrent_per_key=1, rate_limit_tpm=30) as (a, b):
        on_a = await FakeWorker(a.worker_url, behaviour=waits).connect()
        on_b = await FakeWorker(b.worker_url).connect()
        await eventually(lambda: sees(a, on_b) and sees(b, on_a))
        async with httpx.AsyncClient(timeout=30) as client:
            small = {**CHAT, "max_tokens": 5}
            first = asyncio.create_task(client.post(f"{a.base_url}/v1/chat/completions", json=small))
            await eventually(lambda: len(on_a.jobs) == 1)
            busy = await client.post(f"{b.base_url}/v1/chat/completions", json=small)
            release.set()
            assert (await first).status_code == 200
            after = await client.post(f"{b.base_url}/v1/chat/completions", json=small)
        await on_a.close()
        await on_b.close()
    assert busy.status_code == 429
    assert "concurrent" in busy.json()["error"]["message"]
    assert busy.json()["error"]["message"].endswith("has finished.")
    # The 10 tokens used on A leave B no room for the next request's reservation.
    assert after.status_code == 429
    error = after.json()["error"]
    assert error["type"] == "tokens"
    assert "limit 30, used 10, reserved by requests in flight 0" in error["message"]


SHA = "ab" * 32
"""The model file both fake workers of a resume test claim to hold."""


def ledger_rows(db: Path, request_id: str) -> list[sqlite3.Row]:
    """The usage rows of a request and of its segments, from a replica's own SQLite ledger."""
    connection = sqlite3.connect(db)
    connection.row_factory = sqlite3.Row
    try:
        query = "SELECT * FROM usage WHERE request_id = ? OR segment_of = ? ORDER BY request_id"
        return connection.execute(query, (request_id, request_id)).fetchall()
    finally:
        connection.close()


async def test_a_replica_killed_mid_answer_leaves_the_other_replicas_client_a_resumed_stream(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """kill -9 of replica A while its worker streams to a client of B: B resumes the answer on a worker
    with the same file, the client's stream ends well, and only B records the request, once."""

    async def streams_until_gone(worker: FakeWorker, job: Job) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            await streams_until_cancelled(worker, job)

    a = QueenProcess.start(
        tmp_path,
        *("--redis-url", redis_server.url, "--replica-id", "a", "--replica-lease", "0.6"),
        *("--db", str(tmp_path / "a.db")),
    )
    try:
        with replicas(tmp_path, redis_server, "b") as (b,):
            doomed = await FakeWorker(a.worker_url, behaviour=streams_until_gone, sha256=SHA).connect()
            await eventually(lambda: sees(b, doomed))
            async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as client:
                body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    lines = response.aiter_lines()
                    first = ""
                    while "word" not in first:
                        first = await anext(lines)
                    rescuer = await FakeWorker(b.worker_url, sha256=SHA).connect()
                    a.kill()
                    rest = [line async for line in lines]
            await eventually(lambda: not sees(b, doomed))
            request_id = json.loads(first.removeprefix("data: "))["id"]
            await eventually(lambda: len(ledger_rows(tmp_path / "b.db", request_id)) == 2)
            await rescuer.close()
            await doomed.close()
    finally:
        a.kill()
    events = [json.loads(line.removeprefix("data: ")) for line in rest if line.startswith("data: {")]
    assert rest[-2:] == ["data: [DONE]", ""] or rest[-1] == "data: [DONE]"
    assert not any("error" in event for event in events)
    text = "".join(
        choice["delta"].get("content") or "" for event in events for choice in event.get("choices", [])
    )
    assert text.endswith("Hello there")
    assert rescuer.jobs[0].request.resume is not None  # type: ignore[union-attr]
    main, segment = ledger_rows(tmp_path / "b.db", request_id)
    assert main["outcome"] == "success"
    assert main["worker_id"] == rescuer.worker_id
    assert segment["worker_id"] == doomed.worker_id
    assert segment["error_code"] == "resumed_elsewhere"
    assert segment["prompt_tokens"] == 0  # the client pays for the prompt once, on the main row
    assert events[-1]["usage"]["completion_tokens"] == main["completion_tokens"]
    assert ledger_rows(tmp_path / "a.db", request_id) == []


async def test_a_worker_moves_to_the_next_replica_when_its_own_dies(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A real worker given two --queen-url values reconnects to B when A is killed, and serves B's
    clients from there (a real answer from the bundled model)."""
    a = QueenProcess.start(
        tmp_path,
        *("--redis-url", redis_server.url, "--replica-id", "a", "--replica-lease", "0.6"),
        *("--db", str(tmp_path / "a.db")),
    )
    try:
        with replicas(tmp_path, redis_server, "b", queue_timeout=30.0) as (b,):
            worker = start_worker(a.worker_url, "--queen-url", b.worker_url, "--reconnect-max-delay", "0.5")
            try:

                def served_from(replica: str | None) -> bool:
                    serving = b.hive.serving(BUNDLED_MODEL_ID)
                    return any(session.replica == replica for session in serving)

                await eventually(lambda: served_from("a") or worker.poll() is not None, timeout=120)
                assert worker.poll() is None
                a.kill()
                await eventually(lambda: served_from(None) and not served_from("a"), timeout=30)
                client = openai.AsyncOpenAI(base_url=b.openai_url, api_key="unused", max_retries=0)
                answer = await client.chat.completions.create(
                    model=BUNDLED_MODEL_ID,
                    messages=[{"role": "user", "content": "What is the capital of France?"}],
                    max_tokens=16,
                    temperature=0,
                )
                await client.close()
            finally:
                code, stderr = stop_process(worker)
    finally:
        a.kill()
    assert answer.choices[0].message.content
    assert code == 0, stderr
    assert "retrying in" in stderr
    assert b.worker_url in stderr


async def test_redis_stopped_and_restarted_under_traffic(tmp_path: Path, redis_server: RedisServer) -> None:
    """Without Redis a replica serves its own workers (rate limits its own), says so in /health and
    /metrics, and rejoins the hive when Redis is back."""
    keys = tmp_path / "keys"
    keys.write_text("alice sk-alice rpm=1000\n")
    headers = {"Authorization": "Bearer sk-alice"}
    with replicas(tmp_path, redis_server, "a", "b", api_keys_file=keys) as (a, b):
        on_a = await FakeWorker(a.worker_url).connect()
        on_b = await FakeWorker(b.worker_url).connect()
        await eventually(lambda: sees(b, on_a))
        async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as client:
            statuses: list[int] = []
            stop = asyncio.Event()

            async def traffic() -> None:
                while not stop.is_set():
                    response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
                    statuses.append(response.status_code)

            running = asyncio.create_task(traffic())
            await eventually(lambda: len(statuses) >= 5)
            redis_server.kill()
            await eventually(lambda: not sees(b, on_a))
            health = (await client.get("/health")).json()
            metrics = (await client.get("/metrics")).text
            during = len(statuses)
            await eventually(lambda: len(statuses) >= during + 5)
            redis_server.launch()
            await eventually(lambda: sees(b, on_a), timeout=20)
            after = len(statuses)
            await eventually(lambda: len(statuses) >= after + 5)
            healed = (await client.get("/health")).json()
            stop.set()
            await running
        await on_a.close()
        await on_b.close()
    assert set(statuses) == {200}
    assert health["status"] == "degraded"
    assert health["hive"]["redis"] == "unavailable"
    assert 'queenbee_redis_up{replica="b"} 0.0' in metrics
    assert "queenbee_redis_outages 1.0" in metrics
    assert healed["status"] == "ok"
    assert healed["hive"]["replicas"] == ["a", "b"]


def beat_now(queen: QueenServer) -> None:
    """Run one heartbeat of `queen`'s replica at once, on its own event loop."""
    replicas = queen.server.config.app.state.replicas  # type: ignore[union-attr]
    wait_until(replicas.mailbox.subscribed.is_set)
    loop = replicas._task.get_loop()
    asyncio.run_coroutine_threadsafe(replicas.beat(), loop).result(10)


async def test_a_remote_worker_taken_meanwhile_is_waited_for_not_failed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """B dispatches to A's one-slot worker that A's own client took since the last announcement: A
    refuses, and B's request waits for the slot, as for a busy local worker, instead of failing."""
    release = asyncio.Event()

    async def held(worker: FakeWorker, job: Job) -> None:
        if len(worker.jobs) == 1:
            await release.wait()
        await answer(worker, job)

    # Beats every 10 s: the test runs them itself, so that B's view is stale when it needs to be.
    with replicas(tmp_path, redis_server, "a", "b", replica_lease=30.0, queue_timeout=20.0) as (a, b):
        worker = await FakeWorker(a.worker_url, behaviour=held).connect()
        await asyncio.to_thread(beat_now, a)
        await asyncio.to_thread(beat_now, b)
        assert b.hive.workers[worker.worker_id].free_slots == 1
        async with httpx.AsyncClient(timeout=30) as client:
            first = asyncio.create_task(client.post(f"{a.base_url}/v1/chat/completions", json=CHAT))
            await eventually(lambda: len(worker.jobs) == 1)
            second = asyncio.create_task(client.post(f"{b.base_url}/v1/chat/completions", json=CHAT))
            await eventually(lambda: b.hive.workers[worker.worker_id].free_slots == 0)
            await eventually(lambda: b.hive.queue_depth("fake-model") == 1)
            release.set()
            assert (await first).status_code == 200
            await asyncio.to_thread(beat_now, a)
            await asyncio.to_thread(beat_now, b)
            response = await second
        await worker.close()
    assert response.status_code == 200
    assert len(worker.jobs) == 2


def test_a_bad_redis_url_is_refused_at_startup(capsys: pytest.CaptureFixture[str]) -> None:
    """`queenbee --redis-url` with something that is not a Redis URL exits 2 naming the option."""
    from queenbee.cli import load_settings

    with pytest.raises(SystemExit) as exited:
        load_settings(["--redis-url", "http://127.0.0.1:6379"])
    assert exited.value.code == 2
    assert "--redis-url" in capsys.readouterr().err
    assert load_settings(["--redis-url", "redis://127.0.0.1:6379/0"]).redis_url == "redis://127.0.0.1:6379/0"


def test_a_worker_takes_several_queen_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    """--queen-url repeats (WORKERBEE_QUEEN_URL lists them comma-separated); each is a websocket URL."""
    from pydantic import ValidationError
    from pydantic_settings import CliApp

    from workerbee.settings import WorkerSettings

    urls = ["ws://a.example:8000/worker", "wss://b.example/worker"]
    flags = CliApp.run(WorkerSettings, cli_args=["--queen-url", urls[0], "--queen-url", urls[1]])
    assert flags.queen_url == urls
    monkeypatch.setenv("WORKERBEE_QUEEN_URL", ",".join(urls))
    assert CliApp.run(WorkerSettings, cli_args=[]).queen_url == urls
    monkeypatch.setenv("WORKERBEE_QUEEN_URL", urls[0])
    assert CliApp.run(WorkerSettings, cli_args=[]).queen_url == urls[:1]
    monkeypatch.delenv("WORKERBEE_QUEEN_URL")
    assert CliApp.run(WorkerSettings, cli_args=[]).queen_url == ["ws://127.0.0.1:8000/worker"]
    with pytest.raises(ValidationError, match="must start with ws:// or wss://"):
        CliApp.run(
            WorkerSettings, cli_args=["--queen-url", urls[0], "--queen-url", "http://c.example/worker"]
        )


async def test_a_replica_killed_while_another_replicas_worker_serves_its_client(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """kill -9 of replica B while A's worker streams to B's client: A cancels the job on its worker, and
    the key's one concurrent request held by B stops counting once B's lease expires."""
    keys = tmp_path / "keys"
    keys.write_text("alice sk-alice\n")
    alice = {"Authorization": "Bearer sk-alice"}
    limits = {"api_keys_file": keys, "max_concurrent_per_key": 1}
    with replicas(tmp_path, redis_server, "a", **limits) as (a,):  # type: ignore[arg-type]

        async def streams_or_answers(worker: FakeWorker, job: Job) -> None:
            await (streams_until_cancelled if job.stream else answer)(worker, job)

        worker = await FakeWorker(a.worker_url, behaviour=streams_or_answers, parallel=2).connect()
        b = QueenProcess.start(
            tmp_path,
            *("--redis-url", redis_server.url, "--replica-id", "b", "--replica-lease", "0.6"),
            *("--db", str(tmp_path / "b.db"), "--api-keys-file", str(keys), "--max-concurrent-per-key", "1"),
        )
        try:

            def b_sees_the_worker() -> bool:
                workers = httpx.get(f"{b.base_url}/v1/workers").json()["data"]
                return any(shown["id"] == worker.worker_id for shown in workers)

            await eventually(b_sees_the_worker)
            async with httpx.AsyncClient(timeout=30) as client:
                body = {**CHAT, "stream": True}
                url = f"{b.base_url}/v1/chat/completions"
                async with client.stream("POST", url, json=body, headers=alice) as response:
                    assert response.status_code == 200
                    lines = response.aiter_lines()
                    while "word" not in await anext(lines):
                        pass
                    held = await client.post(f"{a.base_url}/v1/chat/completions", json=CHAT, headers=alice)
                    b.kill()
                await eventually(lambda: worker.cancels == [worker.jobs[0].request_id])
                await eventually(lambda: a.hive.workers[worker.worker_id].in_flight == 0)
                statuses: list[int] = []
                async with asyncio.timeout(10 * TIME_UNIT):
                    while not statuses or statuses[-1] == 429:
                        reply = await client.post(
                            f"{a.base_url}/v1/chat/completions", json=CHAT, headers=alice
                        )
                        statuses.append(reply.status_code)
                        await asyncio.sleep(0.05)
        finally:
            b.kill()
        await worker.close()
    assert held.status_code == 429  # B's client held the key's one slot, across the hive
    assert statuses[-1] == 200
    assert len(worker.jobs) == 2


async def test_a_replica_shutting_down_finishes_the_other_replicas_requests_first(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """SIGTERM of replica A (a rolling restart) lets the job it runs for B's client finish, and shows
    its workers to B as draining meanwhile, so that nothing new is sent to them."""
    release = asyncio.Event()

    async def slow(worker: FakeWorker, job: Job) -> None:
        await release.wait()
        await answer(worker, job)

    with replicas(tmp_path, redis_server, "a", "b", shutdown_grace=20.0) as (a, b):
        worker = await FakeWorker(a.worker_url, behaviour=slow, parallel=2).connect()
        await eventually(lambda: sees(b, worker))
        async with httpx.AsyncClient(timeout=30) as client:
            pending = asyncio.create_task(client.post(f"{b.base_url}/v1/chat/completions", json=CHAT))
            await eventually(lambda: len(worker.jobs) == 1)
            stopping = asyncio.create_task(asyncio.to_thread(a.stop))
            await eventually(lambda: b.hive.workers[worker.worker_id].draining)
            assert not pending.done()
            release.set()
            response = await pending
            await stopping
        await worker.close()
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello there"
    assert len(worker.jobs) == 1


def test_a_remote_worker_ranks_as_if_a_quarter_of_its_slots_more_were_busy() -> None:
    """Local one busy of 4 ties with a remote idle one (its penalty is one): the local worker wins; local
    two busy of 4 loses to it. The index and the reference scan agree."""
    from bench.scheduling import make_workers
    from queenbee.scheduling import WorkerIndex, choose_worker

    local, remote = make_workers(2)
    remote.replica = "a"
    for busy, expected in ((1, local), (2, remote)):
        for n in range(busy):
            local.reserve(f"r{busy}-{n}", "m")
        index = WorkerIndex()
        for worker in (remote, local):
            index.update(worker)
        assert choose_worker([remote, local], "m", now=0.0) is expected
        assert index.choose("m", now=0.0) is expected
        for n in range(busy):
            local.release(f"r{busy}-{n}")


async def test_a_silent_remote_worker_runs_into_the_first_token_deadline(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A worker on A that never starts its answer times out for B's client as a local one would (504),
    and the job is cancelled on A's worker."""

    async def never_answers(worker: FakeWorker, job: Job) -> None:
        await asyncio.Event().wait()

    with replicas(tmp_path, redis_server, "a", "b", first_token_timeout=0.5) as (a, b):
        worker = await FakeWorker(a.worker_url, behaviour=never_answers).connect()
        await eventually(lambda: sees(b, worker))
        async with httpx.AsyncClient(base_url=b.base_url, timeout=30) as client:
            response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
        await eventually(lambda: worker.cancels == [worker.jobs[0].request_id])
        await worker.close()
    assert response.status_code == 504
    error = response.json()["error"]
    assert error["code"] == "worker_timeout"
    assert error["message"] == "The worker sent nothing for 0.5 s."


async def test_cache_summaries_are_shared_with_every_replica(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """What a worker on A says its cache holds reaches B's cache-aware routing, and a replica that
    joins later, C, is told too; the prefixes go with the worker when it leaves."""
    from protocol import CacheSummary

    def holds(queen: QueenServer, worker: FakeWorker) -> bool:
        return worker.worker_id in queen.hive.cache.index.matches("fake-model", [11, 22], 0.0)

    with replicas(tmp_path, redis_server, "a", "b") as (a, b):
        worker = await FakeWorker(a.worker_url).connect()
        await eventually(lambda: sees(b, worker))
        await worker.send(CacheSummary(model="fake-model", prefixes=[(22, 700), (11, 300)]))
        await eventually(lambda: holds(b, worker))
        with replicas(tmp_path, redis_server, "c") as (c,):
            await eventually(lambda: sees(c, worker) and holds(c, worker))
            await worker.close()
            await eventually(lambda: not holds(b, worker) and not holds(c, worker))
    assert holds(a, worker) is False
