"""A worker's Delta frames (protocol 6): the compact chunk of new text reaches every API's clients as
the chunk it stands for, is counted and bounded as that chunk would be, and a bad one is refused."""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fake_worker import FakeWorker, content_chunk
from servers import TIME_UNIT, QueenServer, eventually

from protocol import Chunk, CompletionJob, Delta, ErrorCode, Job, Result, Usage, encode
from queenbee.deltas import DeltaChunks
from queenbee.settings import QueenSettings
from queenbee.streaming import sse_event

FINGERPRINT = "b1234-fake"
PIECES = ("Hello", ' "quoted"', " line\nbreak", " ünïcødé", " \u2028sep", " done")


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """Where the test queen keeps its ledger."""
    return tmp_path / "ledger.db"


@pytest.fixture
def queen_settings(db: Path) -> QueenSettings:
    """A queen with a ledger of the test's own."""
    return QueenSettings(queue_timeout=5.0, first_token_timeout=10.0, token_timeout=10.0, db=db)


def ledger_rows(db: Path) -> list[tuple[str, int]]:
    """(outcome, completion tokens) of every usage row."""
    with closing(sqlite3.connect(db)) as connection:
        return list(connection.execute("SELECT outcome, completion_tokens FROM usage ORDER BY id"))


def fingerprinted(chunk: dict[str, Any]) -> dict[str, Any]:
    """A chunk body as workerbee sends it: with the worker's system_fingerprint."""
    return {**chunk, "system_fingerprint": FINGERPRINT}


def speaker(as_deltas: bool, pieces: tuple[str, ...] = PIECES, claimed: int = 1) -> Any:
    """A worker that streams `pieces` after a role chunk, each claiming `claimed` tokens: as Delta
    frames, or as the Chunk frames they stand for; a text completion's shape for completion jobs."""

    async def behaviour(worker: FakeWorker, job: Job) -> None:
        request_id = job.request_id
        completion = isinstance(job.request, CompletionJob)

        def text_chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
            if completion:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
                return fingerprinted({"choices": [choice]})
            return fingerprinted(content_chunk(text, finish_reason=finish_reason))

        if completion:
            first = Chunk(request_id=request_id, chunk=text_chunk(""))
        else:
            first = Chunk(request_id=request_id, chunk=fingerprinted(content_chunk("", role=True)))
        await worker.send(first)
        for number, piece in enumerate(pieces):
            ids = [200 + number] * claimed
            if as_deltas:
                frame: Chunk | Delta = Delta(request_id=request_id, text=piece, tokens=claimed, token_ids=ids)
            else:
                frame = Chunk(request_id=request_id, chunk=text_chunk(piece), tokens=claimed, token_ids=ids)
            await worker.send(frame)
        await worker.send(Chunk(request_id=request_id, chunk=text_chunk("", finish_reason="stop")))
        tokens = claimed * len(pieces)
        await worker.send(
            Result(
                request_id=request_id,
                usage=Usage(prompt_tokens=3, completion_tokens=tokens, total_tokens=3 + tokens),
            )
        )

    return behaviour


def data_events(text: str) -> list[Any]:
    """The data of each SSE event, parsed ("[DONE]" as it is)."""
    events = []
    for block in text.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                data = line[len("data: ") :]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def without_identity(event: Any) -> Any:
    """An event less the fields that differ between two requests (id, created)."""
    if not isinstance(event, dict):
        return event
    return {key: value for key, value in event.items() if key not in {"id", "created"}}


async def stream_events(queen: QueenServer, as_deltas: bool, path: str, body: dict[str, Any]) -> list[Any]:
    worker = await FakeWorker(queen.worker_url, behaviour=speaker(as_deltas)).connect()
    try:
        async with httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT) as client:
            response = await client.post(path, json=body)
        assert response.status_code == 200, response.text
        return data_events(response.text)
    finally:
        await worker.close()


CHAT_BODY = {
    "model": "fake-model",
    "messages": [{"role": "user", "content": "hi"}],
    "stream": True,
    "stream_options": {"include_usage": True},
}
COMPLETION_BODY = {"model": "fake-model", "prompt": "Once", "stream": True}


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT_BODY), ("/v1/completions", COMPLETION_BODY)]
)
async def test_a_stream_of_deltas_reads_as_the_same_stream_of_chunks(
    queen: QueenServer, path: str, body: dict[str, Any]
) -> None:
    """Chat (with usage chunks asked for) and text completions: the client's events from Delta frames
    equal, field for field, those from the Chunk frames they stand for."""
    from_chunks = await stream_events(queen, False, path, body)
    from_deltas = await stream_events(queen, True, path, body)
    assert [without_identity(event) for event in from_deltas] == [
        without_identity(event) for event in from_chunks
    ]
    assert len({event["id"] for event in from_deltas if isinstance(event, dict)}) == 1
    key = "content" if path == "/v1/chat/completions" else "text"
    texts = [
        (choice.get("delta", choice)).get(key) or ""
        for event in from_deltas
        if isinstance(event, dict)
        for choice in event["choices"]
    ]
    assert "".join(texts) == "".join(PIECES)
    assert all(event.get("system_fingerprint") == FINGERPRINT for event in from_deltas[:-1])


async def test_deltas_through_the_openai_and_anthropic_sdks(queen: QueenServer) -> None:
    """Chat, Responses and Messages streams built from Delta frames give the SDKs the whole text."""
    worker = await FakeWorker(queen.worker_url, behaviour=speaker(True)).connect()
    client = openai.AsyncOpenAI(base_url=queen.base_url + "/v1", api_key="none")
    chat = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chat_text = "".join([chunk.choices[0].delta.content or "" async for chunk in chat if chunk.choices])
    async with client.responses.stream(model="fake-model", input="hi") as responses:
        final = await responses.get_final_response()
    messages = anthropic.AsyncAnthropic(base_url=queen.base_url, api_key="none")
    async with messages.messages.stream(
        model="fake-model", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        message_text = await stream.get_final_text()
    await client.close()
    await messages.close()
    await worker.close()
    assert chat_text == final.output_text == message_text == "".join(PIECES)


async def test_deltas_are_counted_and_bounded_as_chunks(queen: QueenServer, db: Path) -> None:
    """A Delta claiming 50 tokens for two bytes of text is counted as the chunk would be: at most one
    token a byte and one more."""
    worker = await FakeWorker(queen.worker_url, behaviour=speaker(True, ("hi", " yo"), claimed=50)).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT) as client:
        response = await client.post("/v1/chat/completions", json=CHAT_BODY)
    events = data_events(response.text)
    await eventually(lambda: len(ledger_rows(db)) == 1)
    await worker.close()
    usage = events[-2]["usage"]
    assert usage["completion_tokens"] < 100
    (row,) = ledger_rows(db)
    assert row[1] == usage["completion_tokens"]


@pytest.mark.parametrize(
    ("frame", "where"),
    [
        ({"type": "delta", "text": "x"}, "request_id"),
        ({"type": "delta", "request_id": "{id}"}, "text"),
        ({"type": "delta", "request_id": "{id}", "text": 5}, "text"),
        ({"type": "delta", "request_id": "{id}", "text": "x", "index": -1}, "index"),
        ({"type": "delta", "request_id": "{id}", "text": "x", "tokens": -2}, "tokens"),
        ({"type": "delta", "request_id": "{id}", "text": "x", "token_ids": ["a"]}, "token_ids"),
        ({"type": "delta", "request_id": "{id}", "text": "x", "chunk": {}}, "chunk"),
    ],
)
async def test_a_bad_delta_is_refused_and_relays_nothing(
    queen: QueenServer, db: Path, frame: dict[str, Any], where: str
) -> None:
    """A malformed Delta gets a protocol_error naming the field, its text never reaches the client, and
    the answer that follows is relayed and counted as if it had not been sent."""

    async def behaviour(worker: FakeWorker, job: Job) -> None:
        bad = json.dumps(frame).replace("{id}", job.request_id)
        await worker.send_raw(bad)
        await eventually(lambda: bool(worker.protocol_errors))
        await speaker(True, ("fine", " answer"))(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=behaviour).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT) as client:
        response = await client.post("/v1/chat/completions", json=CHAT_BODY)
    events = data_events(response.text)
    text = "".join(
        choice["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event["choices"]
    )
    assert text == "fine answer"
    (error,) = worker.protocol_errors
    assert error.code is ErrorCode.INVALID_FRAME
    assert where in error.message
    await eventually(lambda: len(ledger_rows(db)) == 1)
    await worker.close()
    assert ledger_rows(db) == [("success", 2)]


@pytest.mark.parametrize("chat", [True, False])
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("fingerprint", [FINGERPRINT, None])
def test_the_written_event_is_the_chunk_it_stands_for(
    chat: bool, include_usage: bool, fingerprint: str | None
) -> None:
    """DeltaChunks.event's bytes are sse_event of DeltaChunks.chunk, whatever the text holds."""
    deltas = DeltaChunks(
        request_id='chatcmpl-"odd"',
        chunk_object="chat.completion.chunk" if chat else "text_completion",
        created=1765000000,
        model="a/model:Q4 \u00e9",
        chat=chat,
        include_usage=include_usage,
    )
    for index, text in enumerate(["", "plain", '"\\\n\t\x00', "\u2028\u2029 ünï 🐝"]):
        chunk = deltas.chunk(index, text, fingerprint)
        assert deltas.event(index, text, fingerprint) == sse_event(chunk)
        (choice,) = chunk["choices"]
        assert (choice["delta"]["content"] if chat else choice["text"]) == text
        assert ("usage" in chunk) is include_usage
        assert chunk.get("system_fingerprint") == fingerprint
    # The fingerprint may change between events: each is written with the one given.
    assert b"other" in deltas.event(0, "x", "other")
    assert b"other" not in deltas.event(0, "x", fingerprint)


def test_a_delta_is_a_protocol_frame_of_its_own() -> None:
    """Encoded and decoded as itself, alone or in a batch."""
    from protocol import batch_messages, decode_worker_frame

    delta = Delta(request_id="r1", index=2, text="hé", tokens=1, token_ids=[9])
    assert decode_worker_frame(encode(delta)) == delta
    (message,) = batch_messages([encode(delta), encode(delta)], 2**20)
    batch = decode_worker_frame(message)
    assert batch.type == "batch"
    assert list(batch.frames) == [delta, delta]  # type: ignore[union-attr]
