"""End to end with --parallel 4: a real queen, a real workerbee process, four answers generated at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from servers import TIME_UNIT, QueenServer, hive_with_worker, smollm2_path

MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
QUESTIONS = [
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain recursion in one sentence.",
    "What is the capital of Iceland?",
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hive() -> Iterator[QueenServer]:
    """A queen with one real worker serving SmolLM2 four requests at a time."""
    with hive_with_worker("--parallel", "4") as queen:
        yield queen


@pytest.fixture(scope="module")
def expected() -> dict[str, str]:
    """llama-cpp-python's greedy answers, each generated alone."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(smollm2_path()), n_ctx=4096, n_threads=1, verbose=False)
    try:
        return {
            question: llama.create_chat_completion(
                messages=[{"role": "user", "content": question}], temperature=0, max_tokens=MAX_TOKENS
            )["choices"][0]["message"]["content"]
            for question in QUESTIONS
        }
    finally:
        llama.close()


class StreamRecord:
    """What one streamed request saw: its text, when its first content arrived, when it ended."""

    def __init__(self) -> None:
        self.text = ""
        self.first_content: float | None = None
        self.ended: float | None = None
        self.usage: dict[str, Any] | None = None
        self.finish_reason: str | None = None


async def stream(client: httpx.AsyncClient, body: dict[str, Any], record: StreamRecord) -> None:
    """POST a streamed chat request and record it chunk by chunk."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                record.usage = chunk["usage"]
            for choice in chunk["choices"]:
                content = choice["delta"].get("content")
                if content:
                    record.text += content
                    record.first_content = record.first_content or time.monotonic()
                record.finish_reason = choice["finish_reason"] or record.finish_reason
    record.ended = time.monotonic()


def body(question: str, **fields: Any) -> dict[str, Any]:
    """A streamed greedy chat request body."""
    return {
        "model": MODEL_ID,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "stream_options": {"include_usage": True},
        **fields,
    }


async def test_four_streams_are_generated_at_once(hive: QueenServer) -> None:
    """Four long streams on one --parallel 4 worker all produce text before any of them ends."""
    records = [StreamRecord() for _ in QUESTIONS]
    async with httpx.AsyncClient(base_url=hive.base_url, timeout=120 * TIME_UNIT) as client:
        await asyncio.gather(
            *(
                stream(client, body(question, max_tokens=64, ignore_eos=True), record)
                for question, record in zip(QUESTIONS, records, strict=True)
            )
        )
    first_contents = [record.first_content for record in records]
    endings = [record.ended for record in records]
    assert None not in first_contents
    assert max(first_contents) < min(endings)  # type: ignore[type-var]
    for record in records:
        assert record.usage is not None
        assert record.usage["completion_tokens"] == 64
        assert record.finish_reason == "length"


async def test_concurrent_greedy_answers_equal_llama_cpp_alone(
    hive: QueenServer, expected: dict[str, str]
) -> None:
    """Through the queen, four greedy answers decoded together equal llama-cpp-python's, each alone."""
    records = [StreamRecord() for _ in QUESTIONS]
    async with httpx.AsyncClient(base_url=hive.base_url, timeout=120 * TIME_UNIT) as client:
        whole = client.post(
            "/v1/chat/completions", json=body(QUESTIONS[0], stream=False, stream_options=None)
        )
        results = await asyncio.gather(
            whole,
            *(
                stream(client, body(question), record)
                for question, record in zip(QUESTIONS, records, strict=True)
            ),
        )
    assert [record.text for record in records] == [expected[question] for question in QUESTIONS]
    response = results[0]
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == expected[QUESTIONS[0]]
