"""Admission of a burst: newcomers that arrive a moment apart have their prompts read in one step.

On the real model, with the scheduler's waits stretched (monkeypatched) far beyond the moments between
the requests here, so that what is asserted does not depend on how busy the machine is: without the
wait, the first request's prompt step would start alone and the others would join only after it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from servers import smollm2_path

from protocol.openai import ChatCompletionRequest
from workerbee import scheduler
from workerbee.batching import BatchedModel
from workerbee.llama_context import TokenBatch
from workerbee.prompts import ModelConfig

CONFIG = ModelConfig(id="smol", path=smollm2_path(), n_ctx=512)
TOPICS = ["the sea at night", "a kite in a storm", "bread rising in an oven"]


@pytest.fixture
def backend() -> Iterator[BatchedModel]:
    """A model batching two sequences."""
    model = BatchedModel.load(CONFIG, parallel=2, threads=1)
    yield model
    model.close()


def record_batches(backend: BatchedModel, monkeypatch: pytest.MonkeyPatch) -> list[set[int]]:
    """The sequence ids of every batch the scheduler decodes from now on, batch by batch."""
    batches: list[set[int]] = []
    context = backend.scheduler.context
    decode = context.decode

    def recording(batch: TokenBatch) -> None:
        raw = batch.raw
        batches.append({raw.seq_id[i][0] for i in range(len(batch))})
        decode(batch)

    monkeypatch.setattr(context, "decode", recording)
    return batches


async def ask(backend: BatchedModel, topic: str, max_tokens: int = 3) -> dict[str, Any]:
    """A greedy streamed request, run to its end; returns its last chunk."""
    request = ChatCompletionRequest.model_validate(
        {
            "model": "smol",
            "messages": [{"role": "user", "content": f"Write about {topic}."}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
        }
    )
    chunks: list[dict[str, Any]] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        chunks.append(chunk)

    await backend.chat(request, threading.Event(), on_chunk)
    return chunks[-1]


async def test_newcomers_a_moment_apart_share_their_first_step(
    backend: BatchedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler, "ARRIVAL_GAP_SECONDS", 2.0)
    monkeypatch.setattr(scheduler, "GATHER_SECONDS", 20.0)
    batches = record_batches(backend, monkeypatch)
    first = asyncio.ensure_future(ask(backend, TOPICS[0]))
    await asyncio.sleep(0.2)  # well past the moment the thread would have started the first alone
    second = asyncio.ensure_future(ask(backend, TOPICS[1]))
    await asyncio.wait_for(asyncio.gather(first, second), 60)
    assert batches[0] == {0, 1}, batches
    assert len(batches) == 3  # both prompts, then the next two tokens of both


async def test_the_wait_ends_once_the_free_slots_are_spoken_for(
    backend: BatchedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two newcomers fill both slots: nothing more could join, so the first step starts at once rather
    than after the (here very long) gap."""
    monkeypatch.setattr(scheduler, "ARRIVAL_GAP_SECONDS", 600.0)
    monkeypatch.setattr(scheduler, "GATHER_SECONDS", 600.0)
    batches = record_batches(backend, monkeypatch)
    await asyncio.wait_for(asyncio.gather(ask(backend, TOPICS[0]), ask(backend, TOPICS[1])), 60)
    assert batches[0] == {0, 1}


async def test_a_lone_request_waits_one_gap_not_the_whole_window(
    backend: BatchedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduler, "ARRIVAL_GAP_SECONDS", 0.5)
    monkeypatch.setattr(scheduler, "GATHER_SECONDS", 600.0)
    last = await asyncio.wait_for(ask(backend, TOPICS[2]), 60)
    assert last["choices"][0]["finish_reason"] == "length"


async def test_a_newcomer_after_the_burst_joins_the_running_batch(
    backend: BatchedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait is for the rest of a burst only: a request that comes while one generates joins it at
    the next step, its prompt beside the other's next token."""
    monkeypatch.setattr(scheduler, "ARRIVAL_GAP_SECONDS", 0.05)
    batches = record_batches(backend, monkeypatch)
    started = asyncio.Event()
    request = ChatCompletionRequest.model_validate(
        {
            "model": "smol",
            "messages": [{"role": "user", "content": f"Write about {TOPICS[0]}."}],
            "temperature": 0,
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": True,
        }
    )

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        if tokens:
            started.set()

    long = asyncio.ensure_future(backend.chat(request, threading.Event(), on_chunk))
    await asyncio.wait_for(started.wait(), 60)
    await asyncio.wait_for(ask(backend, TOPICS[1]), 60)
    await asyncio.wait_for(long, 60)
    assert batches[0] == {0}
    assert {0, 1} in batches[1:]
