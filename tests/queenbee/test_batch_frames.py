"""A worker's batch frames (protocol 5): every frame in one is handled as if sent alone, in order, and
a batch the queen cannot read is refused whole."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_worker import FakeWorker, completion, content_chunk
from servers import TIME_UNIT, QueenServer, eventually

from protocol import Chunk, ErrorCode, Job, Result, Usage, batch_messages, encode
from queenbee.settings import QueenSettings

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where the test queen keeps its ledger."""
    return tmp_path / "ledger.db"


@pytest.fixture
def queen_settings(db: Path) -> QueenSettings:
    """A queen with a ledger of the test's own."""
    return QueenSettings(queue_timeout=5.0, first_token_timeout=10.0, token_timeout=10.0, db=db)


def ledger_rows(db: Path) -> list[tuple[str, int, str]]:
    """(outcome, completion tokens, request id) of every usage row."""
    with closing(sqlite3.connect(db)) as connection:
        query = "SELECT outcome, completion_tokens, request_id FROM usage ORDER BY id"
        return list(connection.execute(query))


def words_of(job: Job) -> list[str]:
    """What the batching fake answers a job: its last message's text, word by word."""
    text = job.request.body.messages[-1].text()  # type: ignore[union-attr]
    return [word if index == 0 else " " + word for index, word in enumerate(text.split())]


def frames_for(job: Job, words: list[str]) -> list[list[str]]:
    """A job's answer as steps of encoded frames: one chunk a step, then the end."""
    usage = Usage(prompt_tokens=3, completion_tokens=len(words), total_tokens=3 + len(words))
    if not job.stream:
        result = Result(
            request_id=job.request_id,
            usage=usage,
            response=completion("".join(words)),
            token_ids=[[7] * len(words)],
        )
        return [[encode(result)]]
    steps = [[encode(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))]]
    steps += [
        [encode(Chunk(request_id=job.request_id, chunk=content_chunk(word), tokens=1, token_ids=[7]))]
        for word in words
    ]
    steps.append([encode(Chunk(request_id=job.request_id, chunk=content_chunk("", finish_reason="stop")))])
    steps.append([encode(Result(request_id=job.request_id, usage=usage))])
    return steps


class BatchingEngine:
    """A fake worker's behaviour that answers like a batching engine: once `expected` jobs are in, every
    step sends the next frame of each of them in one batch message."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.jobs: list[Job] = []
        self.all_in = asyncio.Event()
        self.messages: list[str] = []

    async def __call__(self, worker: FakeWorker, job: Job) -> None:
        self.jobs.append(job)
        if len(self.jobs) < self.expected:
            return
        answers = [frames_for(each, words_of(each)) for each in self.jobs]
        for step in range(max(len(answer) for answer in answers)):
            texts = [text for answer in answers if step < len(answer) for text in answer[step]]
            for message in batch_messages(texts, worker.queen_max_frame_bytes):
                self.messages.append(message)
                await worker.send_raw(message)


async def stream_text(client: httpx.AsyncClient, content: str) -> str:
    """A streamed chat's text."""
    body = {**CHAT, "messages": [{"role": "user", "content": content}], "stream": True}
    text: list[str] = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk: dict[str, Any] = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += [choice["delta"].get("content") or "" for choice in chunk["choices"]]
    return "".join(text)


async def test_streams_and_whole_answers_in_shared_batches_reach_their_own_clients(
    queen: QueenServer, db: Path
) -> None:
    """Three requests answered in the same batch messages (two streams and a whole answer, their frames
    interleaved): each client gets its own answer, each is counted once with its own tokens."""
    engine = BatchingEngine(expected=3)
    worker = await FakeWorker(queen.worker_url, parallel=3, behaviour=engine).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT) as client:
        whole_body = {**CHAT, "messages": [{"role": "user", "content": "whole answer here"}]}
        first, second, whole = await asyncio.gather(
            stream_text(client, "alpha beta gamma"),
            stream_text(client, "one two three four"),
            client.post("/v1/chat/completions", json=whole_body),
        )
    assert first == "alpha beta gamma"
    assert second == "one two three four"
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["message"]["content"] == "whole answer here"
    assert any(message.startswith('{"type":"batch"') for message in engine.messages)
    await eventually(lambda: len(ledger_rows(db)) == 3)
    await worker.close()
    counted = {request_id: (outcome, tokens) for outcome, tokens, request_id in ledger_rows(db)}
    by_job = {job.request_id: len(words_of(job)) for job in engine.jobs}
    assert counted == {request_id: ("success", tokens) for request_id, tokens in by_job.items()}


async def test_a_batch_with_one_bad_frame_is_refused_whole(queen: QueenServer, db: Path) -> None:
    """A batch whose second frame is malformed: a protocol_error naming it, and not even the good first
    frame reaches the client; the answer sent afterwards is relayed as if the batch had never come."""
    sent_bad = asyncio.Event()

    async def behaviour(worker: FakeWorker, job: Job) -> None:
        forged = encode(Chunk(request_id=job.request_id, chunk=content_chunk("FORGED"), tokens=1))
        bad = '{"type":"batch","frames":[' + forged + ',{"type":"chunk","chunk":{}}]}'
        await worker.send_raw(bad)
        await eventually(lambda: bool(worker.protocol_errors))
        sent_bad.set()
        for step in frames_for(job, ["fine", " answer"]):
            for text in step:
                await worker.send_raw(text)

    worker = await FakeWorker(queen.worker_url, behaviour=behaviour).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT) as client:
        text = await stream_text(client, "anything")
    assert sent_bad.is_set()
    assert text == "fine answer"
    (error,) = worker.protocol_errors
    assert error.code is ErrorCode.INVALID_FRAME
    assert "frames.1" in error.message
    await eventually(lambda: len(ledger_rows(db)) == 1)
    await worker.close()
    assert [(outcome, tokens) for outcome, tokens, _ in ledger_rows(db)] == [("success", 2)]
