"""Who pays and who is paid when a stream ends early or late: the client for what it was sent, the
worker for what it generated."""

from __future__ import annotations

import asyncio
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import pytest
from fake_worker import FakeWorker, content_chunk
from servers import TIME_UNIT, QueenServer, eventually

from protocol import Chunk, Job, Result, Usage
from queenbee.settings import QueenSettings

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where the test queen keeps its ledger."""
    return tmp_path / "ledger.db"


@pytest.fixture
def queen_settings(db: Path) -> QueenSettings:
    """A ledger of the test's own and a short cancel grace."""
    return QueenSettings(queue_timeout=2.0, cancel_grace=1.0, db=db)


def rows(db: Path) -> list[dict[str, Any]]:
    """Every usage row, read as another process would."""
    with closing(sqlite3.connect(db)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("SELECT * FROM usage ORDER BY id")]


async def read_until_finish(queen: QueenServer) -> int:
    """Stream a chat and hang up right after the chunk with finish_reason; returns the chunks seen."""
    seen = 0
    async with (
        httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT) as client,
        client.stream("POST", "/v1/chat/completions", json=CHAT) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                seen += 1
            if '"finish_reason":"stop"' in line:
                break
    return seen


async def test_a_client_that_leaves_right_after_the_last_token_pays_for_all_of_it(
    queen: QueenServer, db: Path
) -> None:
    """The last token was relayed, the result had not come yet: billed and credited in full, cancelled."""
    hung_up = asyncio.Event()

    async def slow_result(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        for word in ("one", " two"):
            await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk(word), tokens=1))
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", finish_reason="stop")))
        await hung_up.wait()
        usage = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
        await worker.send(Result(request_id=job.request_id, usage=usage))

    worker = await FakeWorker(queen.worker_url, behaviour=slow_result).connect()
    assert await read_until_finish(queen) == 4
    await asyncio.wait_for(worker.cancelled.wait(), 10 * TIME_UNIT)
    hung_up.set()
    await eventually(lambda: len(rows(db)) == 1)
    await worker.close()
    (row,) = rows(db)
    assert row["outcome"] == "cancelled"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 2)
    assert (row["worker_prompt_tokens"], row["worker_completion_tokens"]) == (3, 2)
    assert row["usage_violation"] is None


async def test_a_worker_cannot_claim_more_than_it_could_have_generated_for_a_cancelled_stream(
    queen: QueenServer, db: Path
) -> None:
    """A cancel confirmation claiming a million tokens is bounded like any other report."""
    hung_up = asyncio.Event()

    async def greedy(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("one"), tokens=1))
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", finish_reason="stop")))
        await hung_up.wait()
        usage = Usage(prompt_tokens=10**9, completion_tokens=10**6, total_tokens=10**9 + 10**6)
        await worker.send(Result(request_id=job.request_id, usage=usage))

    worker = await FakeWorker(queen.worker_url, behaviour=greedy, n_ctx=512).connect()
    await read_until_finish(queen)
    await asyncio.wait_for(worker.cancelled.wait(), 10 * TIME_UNIT)
    hung_up.set()
    await eventually(lambda: len(rows(db)) == 1)
    await worker.close()
    (row,) = rows(db)
    assert row["completion_tokens"] == 1
    assert row["worker_completion_tokens"] <= 512
    assert row["worker_prompt_tokens"] <= 512
    assert row["usage_violation"]
