"""A hive of several queen replicas on a real Redis: workers on one replica serve clients of another."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fake_worker import FakeWorker, answer, reply
from redis_server import RedisServer, redis_server
from servers import QueenServer, eventually

from protocol import Job
from queenbee.settings import QueenSettings

__all__ = ["redis_server"]

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def replica_settings(tmp_path: Path, redis: RedisServer, name: str, **options: Any) -> QueenSettings:
    """A replica of the test's hive: its own ledger, the shared Redis, a short lease."""
    options.setdefault("queue_timeout", 2.0)
    options.setdefault("first_token_timeout", 5.0)
    options.setdefault("token_timeout", 5.0)
    options.setdefault("cancel_grace", 1.0)
    return QueenSettings(
        db=tmp_path / f"{name}.db", redis_url=redis.url, replica_id=name, replica_lease=0.6, **options
    )


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
    """Streamed and whole answers from a worker on replica A reach a client of replica B, as from a local one."""
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
    assert whole.usage is not None and whole.usage.completion_tokens == 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert len(worker.jobs) == 2
