"""Answers that survive their worker: scripted workers die, go silent or fail mid-stream, and the queen
continues the answer on another worker with the same model file, from the token ids it relayed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_worker import FakeWorker, content_chunk
from servers import QueenServer, eventually

from protocol import ChatJob, Chunk, CompletionJob, Delta, Draining, Job, Result, Usage
from protocol.openai import ChatCompletionRequest
from queenbee.ledger import Row
from queenbee.ledger_db import open_database
from queenbee.observer import RequestRecord
from queenbee.resume import AnswerSoFar
from queenbee.settings import QueenSettings
from queenbee.usage_report import usage_totals

WORDS = tuple(f" w{index}" for index in range(12))
"""The answer every scripted worker gives: word i is token id 100 + i."""
HASH = "ab" * 32
OTHER_HASH = "cd" * 32
CHAT = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
    "max_tokens": 50,
}


@pytest.fixture
def queen_settings() -> QueenSettings:
    """Short deadlines, so that a silent worker shows within a test; two resumes at most."""
    return QueenSettings(
        queue_timeout=2.0,
        first_token_timeout=2.0,
        token_timeout=0.5,
        heartbeat_interval=0.2,
        heartbeat_timeout=0.5,
        cancel_grace=0.5,
        max_resumes=2,
    )


def speaker(
    die_after: int | None = None,
    how: str = "abort",
    proceed: asyncio.Event | None = None,
    *,
    each: int | None = None,
    deltas: bool = False,
) -> Any:
    """A worker that speaks WORDS from where the job's resume stands, one token a chunk, and after word
    `die_after` (or `each` words of its own; once `proceed` is set) dies: drops the connection, goes
    silent, or fails. With `deltas` the words go as Delta frames (as workerbee sends them)."""

    async def behaviour(worker: FakeWorker, job: Job) -> None:
        request = job.request
        assert isinstance(request, ChatJob | CompletionJob)
        resume = request.resume
        start = len(resume.choices[0].token_ids) if resume is not None else 0
        end = start + each if each is not None else die_after
        if resume is None:
            await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        for number, word in enumerate(WORDS[start:], start):
            if end is not None and number == end:
                if proceed is not None:
                    await proceed.wait()
                if how == "abort":
                    await worker.abort()
                elif how == "silent":
                    await asyncio.Event().wait()
                else:
                    await worker.fail(job)
                return
            frame: Chunk | Delta
            if deltas:
                frame = Delta(request_id=job.request_id, text=word, tokens=1, token_ids=[100 + number])
            else:
                frame = Chunk(
                    request_id=job.request_id, chunk=content_chunk(word), tokens=1, token_ids=[100 + number]
                )
            await worker.send(frame)
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", finish_reason="stop")))
        generated = len(WORDS) - start
        usage = Usage(prompt_tokens=3, completion_tokens=generated, total_tokens=3 + generated)
        await worker.send(Result(request_id=job.request_id, usage=usage))

    return behaviour


def events_of(response: httpx.Response) -> list[Any]:
    """The SSE events of a stream: parsed JSON, and the final "[DONE]"."""
    events: list[Any] = []
    for event in response.text.split("\n\n"):
        if event:
            data = event[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def unbroken(events: list[Any]) -> str:
    """Check the stream is one answer (one id, one finish_reason, no error, [DONE]); its text."""
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert not [event for event in chunks if "error" in event]
    assert len({event["id"] for event in chunks}) == 1
    finishes = [c["finish_reason"] for event in chunks for c in event["choices"] if c["finish_reason"]]
    assert finishes == ["stop"]
    roles = [c for event in chunks for c in event["choices"] if "role" in c["delta"]]
    assert len(roles) == 1
    return "".join(c["delta"].get("content") or "" for event in chunks for c in event["choices"])


async def stream_with_failover(
    queen: QueenServer, first: FakeWorker, *others: FakeWorker, proceed: asyncio.Event
) -> httpx.Response:
    """Stream CHAT while only `first` is connected, then connect `others` and let `first` fail."""
    await first.connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        request = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: bool(first.jobs))
        for other in others:
            await other.connect()
        proceed.set()
        response = await request
    return response


@pytest.mark.parametrize(
    ("how", "deltas"), [("abort", False), ("silent", False), ("error", False), ("abort", True)]
)
async def test_a_failing_worker_is_replaced_mid_stream(queen: QueenServer, how: str, deltas: bool) -> None:
    """Dead, silent past the token deadline, or failing after output: the answer goes on unbroken (its
    text sent as chunks, or as deltas: their token ids are what the next worker continues from)."""
    proceed = asyncio.Event()
    first = FakeWorker(queen.worker_url, behaviour=speaker(4, how, proceed, deltas=deltas), sha256=HASH)
    second = FakeWorker(queen.worker_url, behaviour=speaker(deltas=deltas), sha256=HASH)
    response = await stream_with_failover(queen, first, second, proceed=proceed)
    events = events_of(response)
    assert unbroken(events) == "".join(WORDS)
    assert events[-2]["usage"] == {"prompt_tokens": 3, "completion_tokens": 12, "total_tokens": 15}
    resumed = second.jobs[0].request
    assert isinstance(resumed, ChatJob)
    assert resumed.resume is not None
    assert resumed.resume.choices[0].token_ids == [100, 101, 102, 103]
    assert resumed.resume.choices[0].budget == 50 - 4
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        metrics = (await client.get("/metrics")).text
    assert 'queenbee_resumes_total{model="fake-model",outcome="success"} 1.0' in metrics
    await first.close()
    await second.close()


async def test_the_ledger_credits_each_worker_its_tokens(tmp_path: Path) -> None:
    """The worker replaced mid-answer is credited what it relayed; the client is billed once, and
    `queenbee usage` sums both per ln_url."""
    db = tmp_path / "ledger.db"
    settings = QueenSettings(queue_timeout=2.0, cancel_grace=0.5, db=db)
    queen = QueenServer(settings).start()
    try:
        proceed = asyncio.Event()
        first = FakeWorker(
            queen.worker_url, behaviour=speaker(5, "abort", proceed), sha256=HASH, ln_url="first@example.com"
        )
        second = FakeWorker(queen.worker_url, behaviour=speaker(), sha256=HASH, ln_url="second@example.com")
        response = await stream_with_failover(queen, first, second, proceed=proceed)
        assert unbroken(events_of(response)) == "".join(WORDS)
        await second.close()
    finally:
        queen.stop()
    with closing(sqlite3.connect(db)) as connection:
        connection.row_factory = sqlite3.Row
        rows = [dict(row) for row in connection.execute("SELECT * FROM usage ORDER BY id")]
    with closing(open_database(db)) as database:
        workers, keys = usage_totals(database, None, None)
    request, segment = sorted(rows, key=lambda row: row["segment_of"] is not None)
    assert (request["prompt_tokens"], request["completion_tokens"]) == (3, 12)
    assert (request["ln_url"], request["worker_completion_tokens"]) == ("second@example.com", 7)
    assert (segment["ln_url"], segment["worker_completion_tokens"]) == ("first@example.com", 5)
    assert (segment["completion_tokens"], segment["segment_of"]) == (0, request["request_id"])
    credited = {row.name: row.completion_tokens for row in workers}
    assert credited == {"first@example.com": 5, "second@example.com": 7}
    assert [(row.requests, row.completion_tokens) for row in keys] == [(1, 12)]


async def test_no_worker_with_the_same_file_ends_the_stream_with_an_error(queen: QueenServer) -> None:
    """A worker serving the model from another file is not resumed onto: error event, then [DONE]."""
    proceed = asyncio.Event()
    first = FakeWorker(queen.worker_url, behaviour=speaker(4, "abort", proceed), sha256=HASH)
    other = FakeWorker(queen.worker_url, behaviour=speaker(), sha256=OTHER_HASH)
    response = await stream_with_failover(queen, first, other, proceed=proceed)
    events = events_of(response)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2]
    assert not other.jobs
    await other.close()


async def test_a_lone_worker_dying_ends_the_stream_with_an_error(queen: QueenServer) -> None:
    """Nobody left to resume on: the error event and [DONE], never a hang."""
    proceed = asyncio.Event()
    proceed.set()
    first = FakeWorker(queen.worker_url, behaviour=speaker(4, "abort", proceed), sha256=HASH)
    response = await stream_with_failover(queen, first, proceed=proceed)
    events = events_of(response)
    assert events[-1] == "[DONE]"
    assert "error" in events[-2]
    text = "".join(c["delta"].get("content") or "" for event in events[:-2] for c in event["choices"])
    assert text == "".join(WORDS[:4])


async def test_resumes_stop_at_the_limit(queen: QueenServer) -> None:
    """With max_resumes=2, the third worker to fail ends the stream: a fourth is never asked."""
    workers = [
        FakeWorker(queen.worker_url, behaviour=speaker(how="error", each=2), sha256=HASH) for _ in range(4)
    ]
    for worker in workers:
        await worker.connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    events = events_of(response)
    assert "error" in events[-2]
    assert sorted(len(worker.jobs) for worker in workers) == [0, 1, 1, 1]
    text = "".join(c["delta"].get("content") or "" for event in events[:-2] for c in event["choices"])
    assert text == "".join(WORDS[:6])
    for worker in workers:
        await worker.close()


async def test_a_whole_answer_survives_its_worker(queen: QueenServer) -> None:
    """A non-streamed request whose worker dies before answering is answered by another in full."""
    proceed = asyncio.Event()
    first = FakeWorker(queen.worker_url, behaviour=speaker(0, "abort", proceed), sha256=HASH)
    second = FakeWorker(queen.worker_url, sha256=HASH)
    await first.connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        request = asyncio.create_task(
            client.post("/v1/chat/completions", json={**CHAT, "stream": False, "stream_options": None})
        )
        await eventually(lambda: bool(first.jobs))
        await second.connect()
        proceed.set()
        response = await request
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello there"
    await second.close()


def slow_speaker(drain_after: int | None = None) -> Any:
    """Speak WORDS from where the resume stands, a word every 50 ms; say Draining after `drain_after`."""

    async def behaviour(worker: FakeWorker, job: Job) -> None:
        request = job.request
        assert isinstance(request, ChatJob)
        start = len(request.resume.choices[0].token_ids) if request.resume is not None else 0
        if request.resume is None:
            await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        for number, word in enumerate(WORDS[start:], start):
            if job.request_id in worker.cancels:
                return
            if number == drain_after:
                await worker.send(Draining())
            chunk = Chunk(
                request_id=job.request_id, chunk=content_chunk(word), tokens=1, token_ids=[100 + number]
            )
            await worker.send(chunk)
            await asyncio.sleep(0.05)
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", finish_reason="stop")))
        generated = len(WORDS) - start
        usage = Usage(prompt_tokens=3, completion_tokens=generated, total_tokens=3 + generated)
        await worker.send(Result(request_id=job.request_id, usage=usage))

    return behaviour


@pytest.mark.parametrize("queen_settings", [QueenSettings(queue_timeout=2.0, drain_handover=0.1)])
async def test_a_draining_worker_hands_its_stream_over(queen: QueenServer) -> None:
    """A worker shutting down keeps a stream only for the grace; then another worker continues it."""
    first = FakeWorker(queen.worker_url, behaviour=slow_speaker(drain_after=3), sha256=HASH)
    second = FakeWorker(queen.worker_url, behaviour=slow_speaker(), sha256=HASH)
    response = await stream_with_failover(queen, first, second, proceed=asyncio.Event())
    assert unbroken(events_of(response)) == "".join(WORDS)
    assert first.cancels == [first.jobs[0].request_id]
    resumed = second.jobs[0].request
    assert isinstance(resumed, ChatJob)
    assert resumed.resume is not None
    assert len(resumed.resume.choices[0].token_ids) < len(WORDS)
    await first.close()
    await second.close()


@pytest.mark.parametrize("queen_settings", [QueenSettings(queue_timeout=2.0, drain_handover=0.1)])
async def test_a_draining_worker_keeps_a_stream_nobody_else_can_take(queen: QueenServer) -> None:
    """With no other worker for the file, the draining worker finishes the stream itself."""
    first = FakeWorker(queen.worker_url, behaviour=slow_speaker(drain_after=3), sha256=HASH)
    response = await stream_with_failover(queen, first, proceed=asyncio.Event())
    assert unbroken(events_of(response)) == "".join(WORDS)
    assert not first.cancels
    await first.close()


def test_what_the_client_has_becomes_the_resume() -> None:
    """Relayed ids per choice, finished choices left out, the budget left of max_tokens."""
    so_far = AnswerSoFar()
    for index, ids in [(0, [1, 2]), (1, [5]), (0, [3])]:
        chunk = {"choices": [{"index": index, "delta": {"content": "x"}, "finish_reason": None}]}
        so_far.relayed(Chunk(request_id="r", chunk=chunk, tokens=len(ids), token_ids=ids))
    so_far.relayed(Chunk(request_id="r", chunk=content_chunk("", finish_reason="stop")))
    request = ChatCompletionRequest.model_validate({**CHAT, "n": 3, "max_tokens": 10})
    resume = so_far.resume(request)
    assert resume is not None
    assert [(c.index, c.token_ids, c.budget) for c in resume.choices] == [(1, [5], 9), (2, [], 10)]


def test_tokens_without_ids_cannot_be_resumed() -> None:
    """A worker that counts tokens but does not name them makes an answer nobody can continue."""
    so_far = AnswerSoFar()
    so_far.relayed(Chunk(request_id="r", chunk=content_chunk("Hel"), tokens=1))
    assert so_far.resume(ChatCompletionRequest.model_validate(CHAT)) is None


def test_a_spooled_row_from_before_segments_still_reads() -> None:
    """Spool lines written before segment rows existed read back as requests' own rows."""
    row = Row.rows_for(
        RequestRecord(
            request_id="r",
            path="/v1/chat/completions",
            model="m",
            started_at=1.0,
            outcome="success",
            status=200,
        )
    )[0]
    old = row.to_json()
    del old["segment_of"]
    assert Row.from_json(old) == row


@pytest.mark.parametrize(
    ("path", "body", "delta_type", "field"),
    [
        ("/v1/messages", {"max_tokens": 50}, "content_block_delta", "delta"),
        ("/v1/responses", {"input": "hi"}, "response.output_text.delta", None),
    ],
    ids=["messages", "responses"],
)
async def test_the_other_apis_resume_too(
    queen: QueenServer, path: str, body: dict[str, Any], delta_type: str, field: str | None
) -> None:
    """The Messages and Responses streams go through the same loop: their text survives the worker."""
    proceed = asyncio.Event()
    first = FakeWorker(queen.worker_url, behaviour=speaker(4, "abort", proceed), sha256=HASH)
    second = FakeWorker(queen.worker_url, behaviour=speaker(), sha256=HASH)
    await first.connect()
    request = {"model": "fake-model", "stream": True, **body}
    if path == "/v1/messages":
        request["messages"] = [{"role": "user", "content": "hi"}]
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        task = asyncio.create_task(client.post(path, json=request))
        await eventually(lambda: bool(first.jobs))
        await second.connect()
        proceed.set()
        response = await task
    events = [
        json.loads(line[len("data: ") :]) for line in response.text.splitlines() if line.startswith("data: {")
    ]
    assert not [event for event in events if event.get("type") in {"error", "response.failed"}]
    deltas = [event for event in events if event.get("type") == delta_type]
    text = "".join(event[field]["text"] if field else event["delta"] for event in deltas)
    assert text == "".join(WORDS)
    await first.close()
    await second.close()
