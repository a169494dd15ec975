"""The frames a worker streams with: batches (protocol 5), whose every frame is handled as if sent alone,
in order, and which are refused whole when the queen cannot read one; and deltas (protocol 6), the
compact chunk of new text, which reach every API's clients as the chunk they stand for, are counted and
bounded as that chunk would be, and are refused when malformed."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fake_worker import FakeWorker, completion, content_chunk
from servers import TIME_UNIT, QueenServer, eventually

from protocol import (
    Chunk,
    CompletionJob,
    Delta,
    ErrorCode,
    Job,
    Result,
    Usage,
    batch_messages,
    decode_worker_frame,
    encode,
)
from queenbee.deltas import DeltaChunks
from queenbee.settings import QueenSettings
from queenbee.streaming import SSE_DONE, RelayResponse, StreamEnd, sse_event

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
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
    ((_, tokens, _),) = ledger_rows(db)
    assert tokens == usage["completion_tokens"]


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
    assert [(outcome, tokens) for outcome, tokens, _ in ledger_rows(db)] == [("success", 2)]


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
    delta = Delta(request_id="r1", index=2, text="hé", tokens=1, token_ids=[9])
    assert decode_worker_frame(encode(delta)) == delta
    (message,) = batch_messages([encode(delta), encode(delta)], 2**20)
    batch = decode_worker_frame(message)
    assert batch.type == "batch"
    assert list(batch.frames) == [delta, delta]  # type: ignore[union-attr]


async def _sent_by_relay_response(pieces: list[bytes]) -> list[dict[str, Any]]:
    """The ASGI messages a RelayResponse sends for a body of `pieces` (its client never leaves)."""

    async def body() -> Any:
        for piece in pieces:
            yield piece

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await RelayResponse(body(), media_type="text/event-stream")({"type": "http"}, receive, send)
    return sent


async def test_a_stream_end_leaves_with_the_end_of_the_response() -> None:
    # One write for the stream's last events and the response's end, not one each.
    sent = await _sent_by_relay_response([b"data: a\n\n", StreamEnd(SSE_DONE)])
    assert [message["type"] for message in sent] == ["http.response.start", *["http.response.body"] * 2]
    assert [(message["body"], message["more_body"]) for message in sent[1:]] == [
        (b"data: a\n\n", True),
        (SSE_DONE, False),
    ]
    assert type(sent[2]["body"]) is bytes


async def test_a_body_without_a_stream_end_still_ends_the_response() -> None:
    sent = await _sent_by_relay_response([b"data: a\n\n"])
    assert [(message["body"], message["more_body"]) for message in sent[1:]] == [
        (b"data: a\n\n", True),
        (b"", False),
    ]
