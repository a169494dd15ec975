"""End to end: the openai SDK and httpx -> a real queen -> a real workerbee process -> llama.cpp -> back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from servers import (
    BUNDLED_MODEL_ID,
    TIME_UNIT,
    QueenServer,
    eventually,
    hive_with_worker,
    smollm2_path,
    start_worker,
    stop_process,
)

MODEL_ID = BUNDLED_MODEL_ID
MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three primary colors."},
]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def hive() -> Iterator[QueenServer]:
    """A queen with one real worker serving SmolLM2."""
    with hive_with_worker() as queen:
        yield queen


@pytest.fixture(scope="module")
def reference() -> Any:
    """llama-cpp-python used directly on the same file, for the answers the queen must reproduce."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(smollm2_path()), n_ctx=4096, n_threads=1, verbose=False)
    yield llama
    llama.close()


@pytest.fixture(scope="module")
def expected(reference: Any) -> str:
    """What llama-cpp-python answers for MESSAGES at temperature 0."""
    response = reference.create_chat_completion(messages=MESSAGES, temperature=0, max_tokens=MAX_TOKENS)
    text: str = response["choices"][0]["message"]["content"]
    assert text
    return text


def test_models_lists_the_bundled_model(hive: QueenServer) -> None:
    """The worker's model id is the file name without .gguf."""
    client = openai.OpenAI(base_url=hive.openai_url, api_key="unused")
    assert [model.id for model in client.models.list()] == [MODEL_ID]


def test_sync_sdk_matches_llama_cpp(hive: QueenServer, expected: str) -> None:
    """A non-streamed answer through the queen equals llama-cpp-python's for the same request."""
    client = openai.OpenAI(base_url=hive.openai_url, api_key="unused")
    response = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )
    assert response.choices[0].message.content == expected
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert response.usage is not None
    assert response.usage.completion_tokens <= MAX_TOKENS
    assert response.usage.prompt_tokens > 10


def test_sync_sdk_stream_matches_llama_cpp(hive: QueenServer, expected: str) -> None:
    """A streamed answer through the queen, joined, equals llama-cpp-python's."""
    client = openai.OpenAI(base_url=hive.openai_url, api_key="unused")
    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage is not None
    assert 0 < chunks[-1].usage.completion_tokens <= MAX_TOKENS
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices]
    assert finishes[-1] in {"stop", "length"}


async def test_async_sdk_stream_and_whole(hive: QueenServer, expected: str) -> None:
    """The async SDK, streamed and not, gives the same text."""
    client = openai.AsyncOpenAI(base_url=hive.openai_url, api_key="unused")
    whole = await client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,  # type: ignore[arg-type]
    )
    stream = await client.chat.completions.create(
        model=MODEL_ID,
        messages=MESSAGES,
        temperature=0,
        max_tokens=MAX_TOKENS,
        stream=True,  # type: ignore[arg-type]
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    await client.close()
    assert whole.choices[0].message.content == expected
    assert text == expected


def test_raw_sse_wire_format(hive: QueenServer, expected: str) -> None:
    """curl-level view: data: lines of chat.completion.chunk, then data: [DONE]."""
    body = {
        "model": MODEL_ID,
        "messages": MESSAGES,
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
        "stream": True,
    }
    with httpx.Client(base_url=hive.base_url, timeout=120) as client:
        response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    events = [event for event in response.text.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(event[6:]) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks) == expected


def test_context_overflow_is_a_400(hive: QueenServer) -> None:
    """A prompt longer than the model's context is refused before generation with context_length_exceeded."""
    client = openai.OpenAI(base_url=hive.openai_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "word " * 5000}], max_tokens=4
        )
    assert raised.value.code == "context_length_exceeded"


async def test_stream_cancel_frees_the_worker(hive: QueenServer) -> None:
    """Closing a long stream early frees the worker's slot promptly; the next request is served."""
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    async with (
        httpx.AsyncClient(base_url=hive.base_url, timeout=120) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if '"content"' in line:
                break
    worker = next(iter(hive.hive.workers.values()))
    await eventually(lambda: worker.in_flight == 0, timeout=2)
    client_sdk = openai.AsyncOpenAI(base_url=hive.openai_url, api_key="unused")
    response2 = await client_sdk.chat.completions.create(model=MODEL_ID, messages=MESSAGES, max_tokens=4)  # type: ignore[arg-type]
    await client_sdk.close()
    assert response2.choices[0].message.content


def test_missing_model_file_exits_with_one_line(tmp_path: Path) -> None:
    """A missing GGUF stops the worker with a one-line error and a non-zero exit, no traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "workerbee", "--model", str(tmp_path / "nope.gguf")],
        capture_output=True,
        text=True,
        timeout=60 * TIME_UNIT,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "nope.gguf" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_corrupt_model_file_exits_with_one_line(tmp_path: Path) -> None:
    """A corrupt GGUF stops the worker with a one-line error and a non-zero exit, no traceback."""
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + os.urandom(4096))
    result = subprocess.run(
        [sys.executable, "-m", "workerbee", "--model", str(corrupt)],
        capture_output=True,
        text=True,
        timeout=60 * TIME_UNIT,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "corrupt.gguf" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unreachable_queen_is_retried_with_backoff() -> None:
    """A worker whose queen is down says so and keeps retrying; SIGTERM then stops it cleanly."""
    from servers import bound_socket

    sock = bound_socket()  # bound but not listening: connections are refused
    port = sock.getsockname()[1]
    worker = start_worker(f"ws://127.0.0.1:{port}/worker", "--reconnect-max-delay", "0.2")
    try:
        assert worker.stderr is not None
        retries = 0
        while retries < 2:
            line = worker.stderr.readline()
            assert line, "worker exited early"
            retries += "retrying in" in line
    finally:
        code, _ = stop_process(worker)
        sock.close()
    assert code == 0
