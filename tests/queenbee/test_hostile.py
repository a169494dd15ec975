"""A queen in public: hostile clients and hostile workers cannot hurt others or cheat the ledger."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from fake_worker import FakeWorker, answer, content_chunk
from servers import TIME_UNIT, QueenServer, eventually

from protocol import (
    MIN_FRAME_BYTES,
    Chunk,
    ErrorCode,
    Job,
    JobError,
    ProtocolError,
    Result,
    Usage,
    decode_queen_frame,
)
from queenbee.settings import QueenSettings

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
API_KEY = "sk-hostile-test-key"


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where the test queen keeps its ledger."""
    return tmp_path / "ledger.db"


@pytest.fixture
def queen_settings(db: Path) -> QueenSettings:
    """Short deadlines and a ledger of the test's own."""
    return QueenSettings(
        queue_timeout=2.0,
        first_token_timeout=5.0,
        token_timeout=5.0,
        cancel_grace=1.0,
        db=db,
    )


def rows(db: Path) -> list[dict[str, Any]]:
    """Every usage row, read as another process would."""
    with closing(sqlite3.connect(db)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("SELECT * FROM usage ORDER BY id")]


def session(queen: QueenServer, worker: FakeWorker) -> Any:
    """The queen's session of a connected fake worker."""
    hive = queen.hive
    return next(session for session in hive.workers.values() if session.id == worker.worker_id)


def http(queen: QueenServer, **headers: str) -> httpx.AsyncClient:
    """An HTTP client for the queen."""
    return httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT, headers=headers)


# One request must never hurt a worker.


async def test_a_job_bigger_than_the_workers_frame_limit_is_a_413_and_never_sent(queen: QueenServer) -> None:
    """The encoded job is checked against the worker's stated limit: 413, and the worker is unharmed."""
    worker = await FakeWorker(queen.worker_url, max_frame_bytes=MIN_FRAME_BYTES).connect()
    # Well under the queen's body limit, but over the worker's frame limit once it is a job.
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (MIN_FRAME_BYTES + 10)}]}
    async with http(queen) as client:
        refused = await client.post("/v1/chat/completions", json=big)
        served = await client.post("/v1/chat/completions", json=CHAT)
    benched = session(queen, worker).health.benched(time.monotonic())
    await worker.close()
    assert refused.status_code == 413
    assert refused.json()["error"]["code"] == "request_too_large"
    assert served.status_code == 200
    assert len(worker.jobs) == 1, "only the small job reached the worker"
    assert not benched


async def test_a_job_goes_to_a_worker_whose_frame_limit_it_fits(queen: QueenServer) -> None:
    """With a small-limit and a large-limit worker, a big job skips the small one."""
    small = await FakeWorker(queen.worker_url, max_frame_bytes=MIN_FRAME_BYTES).connect()
    large = await FakeWorker(queen.worker_url).connect()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * (MIN_FRAME_BYTES + 10)}]}
    async with http(queen) as client:
        responses = [await client.post("/v1/chat/completions", json=big) for _ in range(3)]
    await small.close()
    await large.close()
    assert [response.status_code for response in responses] == [200, 200, 200]
    assert not small.jobs
    assert len(large.jobs) == 3


POISON_BODIES = {
    "deep tool parameters": {
        **CHAT,
        "tools": [
            {"type": "function", "function": {"name": "f", "parameters": json.loads("[" * 70 + "]" * 70)}}
        ],
    },
    "deep json schema": {
        **CHAT,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": json.loads('{"a":' * 70 + "1" + "}" * 70)},
        },
    },
    "huge top_k": {**CHAT, "top_k": 2**80},
    "seed beyond 64 bits": {**CHAT, "seed": 2**64},
    "seed below 64 bits": {**CHAT, "seed": -(2**63) - 1},
    "max_tokens beyond the context": {**CHAT, "max_tokens": 4096},
    "huge logit_bias token": {**CHAT, "logit_bias": {"9" * 5000: 1}},
}

RAW_POISON = {
    "NaN": '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    "Infinity": '{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}',
    "-Infinity": '{"model": "fake-model", "messages": [], "presence_penalty": -Infinity}',
    "overflowing float": '{"model": "fake-model", "messages": [], "temperature": 1e400}',
    "5,000-digit integer": '{"model": "fake-model", "messages": [], "seed": ' + "7" * 5000 + "}",
    "nesting 100,000 deep": '{"model": "fake-model", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
}


async def test_poison_input_is_a_400_and_never_reaches_a_worker(queen: QueenServer) -> None:
    """Deep nesting, absurd numbers, NaN and infinities: a 400 in OpenAI's shape, never a 500."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with http(queen) as client:
        answers = {
            name: await client.post("/v1/chat/completions", json=body) for name, body in POISON_BODIES.items()
        }
        for name, text in RAW_POISON.items():
            answers[name] = await client.post(
                "/v1/chat/completions", content=text, headers={"Content-Type": "application/json"}
            )
        completions = await client.post("/v1/completions", json={"model": "fake-model", "prompt": [2**40]})
    await worker.close()
    statuses = {name: response.status_code for name, response in answers.items()}
    assert statuses == {name: 400 for name in answers}
    for name, response in answers.items():
        error = response.json()["error"]
        assert error["type"] == "invalid_request_error", name
        assert error["message"], name
    assert answers["max_tokens beyond the context"].json()["error"]["code"] == "context_length_exceeded"
    assert answers["max_tokens beyond the context"].json()["error"]["param"] == "max_tokens"
    assert answers["huge top_k"].json()["error"]["param"] == "top_k"
    assert completions.status_code == 400
    assert not worker.jobs


async def test_a_body_that_is_not_declared_json_is_a_415(queen: QueenServer) -> None:
    """A form post (what a web page can send cross-origin without a preflight) is refused."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with http(queen) as client:
        form = await client.post(
            "/v1/chat/completions", content=json.dumps(CHAT), headers={"Content-Type": "text/plain"}
        )
        bare = await client.post("/v1/chat/completions", content=json.dumps(CHAT))
        suffixed = await client.post(
            "/v1/chat/completions",
            content=json.dumps(CHAT),
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
    await worker.close()
    assert (form.status_code, bare.status_code, suffixed.status_code) == (415, 415, 200)
    assert form.json()["error"]["code"] == "unsupported_media_type"
    assert len(worker.jobs) == 1


async def test_client_errors_never_bench_a_worker(queen: QueenServer) -> None:
    """A worker refusing what clients sent, however often, stays in rotation and connected."""

    async def refuses(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job, ErrorCode.INVALID_REQUEST, "bad input")

    worker = await FakeWorker(queen.worker_url, behaviour=refuses).connect()
    async with http(queen) as client:
        answers = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(8)]
    assert [answer.status_code for answer in answers] == [400] * 8
    worker_session = session(queen, worker)
    assert not worker_session.health.benched(time.monotonic())
    assert worker_session.health.consecutive_failures == 0
    await worker.close()


async def test_retries_skip_a_worker_by_identity_not_connection(queen: QueenServer) -> None:
    """Two connections of one failing worker count as one: the retry goes to someone else."""

    async def fails(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job)

    first = await FakeWorker(queen.worker_url, behaviour=fails, instance_id="same-worker-1").connect()
    second = await FakeWorker(queen.worker_url, behaviour=fails, instance_id="same-worker-1").connect()
    good = await FakeWorker(queen.worker_url).connect()
    async with http(queen) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    for worker in (first, second, good):
        await worker.close()
    assert response.status_code == 200
    assert len(first.jobs) + len(second.jobs) == 1, (
        "the failing worker was tried once, not once per connection"
    )
    assert len(good.jobs) == 1


async def test_a_benched_worker_that_reconnects_is_still_benched(queen: QueenServer) -> None:
    """Leaving and coming back under the same identity is no way off the bench."""

    async def fails(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job)

    worker = await FakeWorker(queen.worker_url, behaviour=fails, instance_id="flaky-worker-1").connect()
    async with http(queen) as client:
        for _ in range(3):
            await client.post("/v1/chat/completions", json=CHAT)
    assert session(queen, worker).health.benched(time.monotonic())
    await worker.close()
    await eventually(lambda: not queen.hive.workers)
    again = await FakeWorker(queen.worker_url, instance_id="flaky-worker-1").connect()
    assert session(queen, again).health.benched(time.monotonic())
    async with http(queen) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await again.close()
    assert response.status_code == 503
    assert not again.jobs


# A worker must not be trusted blindly.


def inflating(prompt: int, completion: int, total: int | None = None) -> Any:
    """A behaviour that answers properly but claims the given usage."""

    async def behaviour(worker: FakeWorker, job: Job) -> None:
        usage = Usage(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion if total is None else total,
        )
        if job.stream:
            await worker.send(
                Chunk(request_id=job.request_id, chunk=content_chunk("Hi", role=True), tokens=1)
            )
            await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", finish_reason="stop")))
            await worker.send(Result(request_id=job.request_id, usage=usage))
        else:
            response = {
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
                ]
            }
            await worker.send(Result(request_id=job.request_id, usage=usage, response=response))

    return behaviour


async def test_inflated_usage_is_bounded_recorded_counted_and_benches_the_worker(
    queen: QueenServer, db: Path
) -> None:
    """Claiming a million tokens for a 5-token answer: bounded figures, a violation, a metric, the bench."""
    worker = await FakeWorker(queen.worker_url, behaviour=inflating(10**9, 10**6)).connect()
    async with http(queen) as client:
        whole = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
        metrics = await client.get("/metrics")
    benched = session(queen, worker).health.benched(time.monotonic())
    await worker.close()
    assert whole.status_code == 200
    usage = whole.json()["usage"]
    assert usage["completion_tokens"] <= 5
    assert usage["prompt_tokens"] < 2048
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    (row,) = rows(db)
    assert row["completion_tokens"] <= 5
    assert row["worker_completion_tokens"] <= 5
    assert row["prompt_tokens"] < 2048
    assert "completion_tokens" in row["usage_violation"]
    assert 'queenbee_usage_violations_total{model="fake-model"} 1.0' in metrics.text
    assert benched


async def test_a_whole_answer_without_its_token_ids_benches_the_worker(queen: QueenServer, db: Path) -> None:
    """Protocol 4: a whole answer names the ids behind each choice. One that leaves them out could be
    neither counted by them nor audited: the client gets it, within bounds, and the worker is benched."""
    worker = await FakeWorker(queen.worker_url, behaviour=inflating(3, 2), names_ids=False).connect()
    async with http(queen) as client:
        whole = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
        metrics = await client.get("/metrics")
    benched = session(queen, worker).health.benched(time.monotonic())
    await worker.close()
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["message"]["content"] == "Hi"
    (row,) = rows(db)
    assert "token ids" in row["usage_violation"]
    assert row["completion_tokens"] == 2
    assert 'queenbee_usage_violations_total{model="fake-model"} 1.0' in metrics.text
    assert benched


async def test_a_whole_answer_naming_its_token_ids_is_counted_by_them(queen: QueenServer, db: Path) -> None:
    """The same answer with its ids: no violation, no bench, and a count of more tokens than it named
    is cut to the ids."""

    async def named(worker: FakeWorker, job: Job) -> None:
        response = {
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
            ]
        }
        usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
        await worker.send(
            Result(request_id=job.request_id, usage=usage, response=response, token_ids=[[7, 8]])
        )

    worker = await FakeWorker(queen.worker_url, behaviour=named).connect()
    async with http(queen) as client:
        whole = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 5})
    benched = session(queen, worker).health.benched(time.monotonic())
    await worker.close()
    assert whole.status_code == 200
    assert whole.json()["usage"]["completion_tokens"] == 2
    (row,) = rows(db)
    assert row["usage_violation"] is None
    assert not benched


async def test_a_stream_cannot_claim_more_tokens_than_it_relayed(queen: QueenServer, db: Path) -> None:
    """Two bytes relayed cannot be five hundred tokens, even with no max_tokens to bound them."""
    worker = await FakeWorker(queen.worker_url, behaviour=inflating(3, 500)).connect()
    async with http(queen) as client:
        response = await client.post(
            "/v1/chat/completions", json={**CHAT, "stream": True, "stream_options": {"include_usage": True}}
        )
    await worker.close()
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    usage = events[-1]["usage"]
    assert usage["completion_tokens"] < 50
    (row,) = rows(db)
    assert row["completion_tokens"] < 50
    assert row["usage_violation"]


async def test_a_wrong_total_is_a_violation(queen: QueenServer, db: Path) -> None:
    """total_tokens that is not prompt + completion is caught and recomputed."""
    worker = await FakeWorker(queen.worker_url, behaviour=inflating(3, 1, total=10**12)).connect()
    async with http(queen) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await worker.close()
    assert response.json()["usage"]["total_tokens"] == 4
    (row,) = rows(db)
    assert "total_tokens" in row["usage_violation"]


async def test_honest_usage_is_not_a_violation(queen: QueenServer, db: Path) -> None:
    """The checks leave an honest worker's figures alone."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with http(queen) as client:
        await client.post("/v1/chat/completions", json=CHAT)
        await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await worker.close()
    assert [(row["prompt_tokens"], row["completion_tokens"], row["usage_violation"]) for row in rows(db)] == [
        (3, 2, None),
        (3, 2, None),
    ]


@pytest.fixture
def small_buffer_settings(db: Path) -> QueenSettings:
    """A queen that holds little for a client that does not read."""
    return QueenSettings(queue_timeout=2.0, cancel_grace=1.0, db=db, max_request_buffer_bytes=64 * 2**10)


# A flood can fill the queen's buffer before the response is written at all, so that the relay meets
# the overflow in its queue; chunks that trickle in fill it only once the relay is blocked writing to the
# client, and the overflow aborts that write. Both are recorded as the client being too slow.
@pytest.mark.parametrize("pause", [0.0, 0.001], ids=["flood", "trickle"])
async def test_a_client_that_does_not_read_cannot_grow_the_queens_memory(
    small_buffer_settings: QueenSettings, db: Path, pause: float
) -> None:
    """Chunks for a client that never reads: cancelled on the worker, response ended."""
    queen = QueenServer(small_buffer_settings).start()
    try:
        flood_sent = asyncio.Event()

        async def floods(worker: FakeWorker, job: Job) -> None:
            piece = content_chunk("x" * 16_000)
            for _ in range(2000):  # 32 MB, far beyond what the queen may hold
                if job.request_id in worker.cancels:
                    break
                await worker.send(Chunk(request_id=job.request_id, chunk=piece, tokens=1))
                if pause:
                    await asyncio.sleep(pause)
            flood_sent.set()

        worker = await FakeWorker(queen.worker_url, behaviour=floods).connect()
        body = json.dumps({**CHAT, "stream": True}).encode()
        with socket.socket() as raw:
            # Set before connecting, so that the window the queen sees is small from the start.
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            raw.connect(("127.0.0.1", queen.port))
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: q\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await asyncio.wait_for(worker.cancelled.wait(), 20 * TIME_UNIT)
            # Once the queen gave up on it, the response is over: the socket reaches its end. (Read with
            # a larger buffer: what the kernel holds would take long to arrive through 4 KiB.)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            raw.settimeout(20 * TIME_UNIT)
            received = 0
            while chunk := await asyncio.to_thread(raw.recv, 1 << 20):
                received += len(chunk)
        await asyncio.wait_for(flood_sent.wait(), 20 * TIME_UNIT)
        await eventually(lambda: len(rows(db)) == 1)
        await worker.close()
    finally:
        queen.stop()
    assert received < 8 * 2**20, "the client got a bounded part of the flood"
    (row,) = rows(db)
    assert row["outcome"] == "cancelled"
    assert row["error_code"] == "client_too_slow"


async def test_a_worker_cannot_register_a_forged_payout_address(queen: QueenServer) -> None:
    """A payout address with a line break (a forged log line or row) is refused at registration."""
    replies = []
    for ln_url in ("me@wallet.example\nINFO payout to thief", "not a payout address"):
        registration = FakeWorker(queen.worker_url, ln_url="").registration().model_dump()
        registration["ln_url"] = ln_url
        async with websockets.connect(queen.worker_url) as websocket:
            await websocket.send(json.dumps(registration))
            replies.append(decode_queen_frame(await asyncio.wait_for(websocket.recv(), 10 * TIME_UNIT)))
    honest = await FakeWorker(queen.worker_url, ln_url="bee@wallet.example").connect()
    await honest.close()
    for reply in replies:
        assert isinstance(reply, ProtocolError)
        assert "ln_url" in reply.message
    assert not queen.hive.workers or all(
        session.registration.ln_url == "bee@wallet.example" for session in queen.hive.workers.values()
    )


def test_log_lines_cannot_be_forged() -> None:
    """Whatever a message carries, a text log line stays one line."""
    import logging

    from queenbee.logs import TextFormatter

    record = logging.LogRecord(
        "t", logging.WARNING, __file__, 1, "model %s", ("m\nINFO forged\r\x1b[2J",), None
    )
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert not {"\n", "\r", "\x1b"} & set(line)
    assert "m\\nINFO forged\\r\\x1b[2J" in line


# Limits that hold.


@pytest.fixture
def limited_settings(db: Path, tmp_path: Path) -> QueenSettings:
    """A queen whose one key may use 1,000 tokens a minute and run two requests at once."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice {API_KEY} tpm=1000\n")
    return QueenSettings(queue_timeout=5.0, db=db, api_keys_file=keys, max_concurrent_per_key=2)


async def test_concurrent_requests_cannot_spend_many_times_the_token_limit(
    limited_settings: QueenSettings,
) -> None:
    """Twelve concurrent requests of 600 tokens each: tokens are reserved at admission, so one runs."""
    queen = QueenServer(limited_settings).start()
    release = asyncio.Event()

    async def slow(worker: FakeWorker, job: Job) -> None:
        await release.wait()
        usage = Usage(prompt_tokens=3, completion_tokens=590, total_tokens=593)
        response = {
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "x" * 600},
                    "finish_reason": "length",
                }
            ]
        }
        await worker.send(Result(request_id=job.request_id, usage=usage, response=response))

    try:
        worker = await FakeWorker(queen.worker_url, behaviour=slow, parallel=12).connect()
        async with http(queen, Authorization=f"Bearer {API_KEY}") as client:
            sent = [
                asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 590}))
                for _ in range(12)
            ]
            await eventually(lambda: sum(task.done() for task in sent) >= 11)
            release.set()
            answers = await asyncio.gather(*sent)
        await worker.close()
    finally:
        queen.stop()
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200] + [429] * 11
    assert len(worker.jobs) == 1
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"


async def test_a_key_may_run_only_so_many_requests_at_once(limited_settings: QueenSettings) -> None:
    """With --max-concurrent-per-key 2, a third request in flight is a 429; the slot frees afterwards."""
    queen = QueenServer(limited_settings).start()
    release = asyncio.Event()

    async def slow(worker: FakeWorker, job: Job) -> None:
        await release.wait()
        await answer(worker, job)

    try:
        worker = await FakeWorker(queen.worker_url, behaviour=slow, parallel=4).connect()
        async with http(queen, Authorization=f"Bearer {API_KEY}") as client:
            running = [
                asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10}))
                for _ in range(2)
            ]
            await eventually(lambda: len(worker.jobs) == 2)
            third = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10})
            release.set()
            first_two = await asyncio.gather(*running)
            later = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 10})
        await worker.close()
    finally:
        queen.stop()
    assert third.status_code == 429
    assert "concurrent" in third.json()["error"]["message"]
    assert [response.status_code for response in first_two] == [200, 200]
    assert later.status_code == 200


async def test_a_client_that_leaves_mid_stream_pays_for_what_was_relayed(
    queen: QueenServer, db: Path
) -> None:
    """Billed for the tokens it was sent; the worker credited for what it generated before the cancel."""
    three_sent = asyncio.Event()

    async def streams_until_cancelled(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        for word in ("one", " two", " three"):
            await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk(word), tokens=1))
        three_sent.set()
        await worker.cancelled.wait()
        # Four more tokens were generated while the cancel was on its way.
        usage = Usage(prompt_tokens=3, completion_tokens=7, total_tokens=10)
        await worker.send(
            JobError(request_id=job.request_id, code=ErrorCode.CANCELLED, message="cancelled", usage=usage)
        )

    worker = await FakeWorker(queen.worker_url, behaviour=streams_until_cancelled).connect()
    request = {**CHAT, "stream": True}
    async with http(queen) as client, client.stream("POST", "/v1/chat/completions", json=request) as response:
        seen = 0
        async for line in response.aiter_lines():
            if line.startswith("data: {") and '"content"' in line:
                seen += 1
            if seen == 3:
                break
    await eventually(lambda: len(rows(db)) == 1)
    await worker.close()
    (row,) = rows(db)
    assert row["outcome"] == "cancelled"
    assert row["completion_tokens"] == 3
    assert row["worker_completion_tokens"] == 7
    assert row["prompt_tokens"] == 3


async def test_a_request_abandoned_in_the_queue_is_recorded(queen: QueenServer, db: Path) -> None:
    """A client that gives up while waiting for a slot still leaves its row (cancelled)."""
    release = asyncio.Event()

    async def slow(worker: FakeWorker, job: Job) -> None:
        await release.wait()
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=slow).connect()
    async with http(queen) as client:
        busy = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: len(worker.jobs) == 1)
        waiting = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: queen.hive.queue_depth() == 1)
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await eventually(lambda: len(rows(db)) == 1)
        release.set()
        await busy
    await eventually(lambda: len(rows(db)) == 2)
    await worker.close()
    outcomes = sorted(row["outcome"] for row in rows(db))
    assert outcomes == ["cancelled", "success"]


async def test_a_client_that_leaves_before_the_first_token_frees_the_workers_slot(
    queen: QueenServer, db: Path
) -> None:
    """Leaving while the worker prepares its answer cancels the job and records the request."""

    async def thinks(worker: FakeWorker, job: Job) -> None:
        await worker.cancelled.wait()
        await worker.send(JobError(request_id=job.request_id, code=ErrorCode.CANCELLED, message="cancelled"))

    worker = await FakeWorker(queen.worker_url, behaviour=thinks).connect()
    async with http(queen) as client:
        pending = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "stream": True}))
        await eventually(lambda: len(worker.jobs) == 1)
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
    await asyncio.wait_for(worker.cancelled.wait(), 10 * TIME_UNIT)
    await eventually(lambda: len(rows(db)) == 1)
    await eventually(lambda: session(queen, worker).in_flight == 0)
    await worker.close()
    assert rows(db)[0]["outcome"] == "cancelled"


async def test_metric_labels_come_only_from_served_models(queen: QueenServer) -> None:
    """Requests for made-up models do not grow /metrics: they are counted as `unknown`."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with http(queen) as client:
        for number in range(20):
            await client.post("/v1/chat/completions", json={**CHAT, "model": f"made-up-{number}"})
        await client.post("/v1/chat/completions", json=CHAT)
        metrics = (await client.get("/metrics")).text
    await worker.close()
    assert "made-up" not in metrics
    assert 'queenbee_requests_total{model="unknown",outcome="error"} 20.0' in metrics
    assert 'queenbee_requests_total{model="fake-model",outcome="success"} 1.0' in metrics


@pytest.fixture
def big_body_settings(db: Path) -> QueenSettings:
    """A queen that takes bodies of up to 16 MiB."""
    return QueenSettings(queue_timeout=2.0, db=db, max_body_bytes=16 * 2**20)


async def test_a_large_body_does_not_freeze_other_clients(big_body_settings: QueenSettings) -> None:
    """While an 8 MiB body is parsed and validated, /health keeps answering."""
    queen = QueenServer(big_body_settings).start()
    try:
        messages = [{"role": "user", "content": "x" * 100}] * 60_000
        body = json.dumps({"model": "fake-model", "messages": messages}).encode()
        assert len(body) > 7 * 2**20
        async with http(queen) as client:
            latencies: list[float] = []

            async def poll() -> None:
                while True:
                    started = time.monotonic()
                    await client.get("/health")
                    latencies.append(time.monotonic() - started)
                    await asyncio.sleep(0.01)

            poller = asyncio.create_task(poll())
            await eventually(lambda: len(latencies) > 3)
            big = await client.post(
                "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
            )
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
    finally:
        queen.stop()
    assert big.status_code == 404  # no worker serves it: parsed and validated all the same
    assert max(latencies) < 1.0 * TIME_UNIT


# A ledger that loses nothing.


async def test_health_says_degraded_while_rows_wait_in_the_spool(queen: QueenServer, db: Path) -> None:
    """A locked database: requests answer, /health says degraded with the spooled rows, then ok again."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with http(queen) as client:
        with closing(sqlite3.connect(db, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")
            answered = await client.post("/v1/chat/completions", json=CHAT)
            degraded = (await client.get("/health")).json()
            metrics = (await client.get("/metrics")).text
            other.execute("ROLLBACK")
        await eventually(lambda: len(rows(db)) == 1)
        recovered = (await client.get("/health")).json()
    await worker.close()
    assert answered.status_code == 200
    assert degraded["status"] == "degraded"
    assert degraded["ledger_spooled_rows"] == 1
    assert "queenbee_ledger_spooled_rows 1.0" in metrics
    assert recovered["status"] == "ok"


async def test_a_request_that_cannot_be_recorded_anywhere_is_a_503(queen: QueenServer, db: Path) -> None:
    """Database locked and spool unwritable: the client gets 503, not a 200 whose row is lost."""
    worker = await FakeWorker(queen.worker_url).connect()
    spool = db.with_name(db.name + ".spool")
    spool.mkdir()  # a directory where the spool file should be: appending to it fails
    try:
        async with http(queen) as client:
            with closing(sqlite3.connect(db, isolation_level=None)) as other:
                other.execute("BEGIN EXCLUSIVE")
                whole = await client.post("/v1/chat/completions", json=CHAT)
                streamed = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
                other.execute("ROLLBACK")
    finally:
        spool.rmdir()
        await worker.close()
    assert whole.status_code == 503
    assert whole.json()["error"]["code"] == "ledger_unavailable"
    # A stream has begun by then: it ends with the error event instead of a clean [DONE].
    assert '"ledger_unavailable"' in streamed.text


@pytest.fixture
def slow_body_settings(db: Path) -> QueenSettings:
    """A queen that gives a body half a second."""
    return QueenSettings(queue_timeout=2.0, db=db, body_timeout=0.5 * TIME_UNIT)


def read_response(raw: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length (its head and body may come in several reads)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < _content_length(data):
        piece = raw.recv(65536)
        if not piece:
            break
        data += piece
    return data


def _content_length(data: bytes) -> int:
    for line in data.partition(b"\r\n\r\n")[0].split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return 0


async def test_a_body_that_never_arrives_is_a_408(slow_body_settings: QueenSettings) -> None:
    """Headers promise 100 bytes, ten come: the queen answers 408 in OpenAI's shape and moves on."""
    queen = QueenServer(slow_body_settings).start()
    try:
        with socket.create_connection(("127.0.0.1", queen.port)) as raw:
            raw.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: q\r\nContent-Type: application/json\r\n"
                b'Content-Length: 100\r\n\r\n{"model": '
            )
            raw.settimeout(10 * TIME_UNIT)
            reply = await asyncio.to_thread(read_response, raw)
    finally:
        queen.stop()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert json.loads(body)["error"]["code"] == "request_timeout"
