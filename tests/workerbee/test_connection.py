"""The worker's connection: registration, job dispatch, cancels, bad frames, refusals, draining, frame
limits both ways, and TLS.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_queen import FakeQueen
from servers import eventually, smollm2_path

from protocol import (
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    PROTOCOL_VERSION,
    CacheSummary,
    Cancel,
    ChatJob,
    Chunk,
    Delta,
    Draining,
    EmbeddingJob,
    ErrorCode,
    Job,
    JobError,
    ModelInfo,
    ProtocolError,
    Register,
    Result,
    ResultPart,
    Usage,
    assemble_response,
)
from protocol.openai import ChatCompletionRequest, EmbeddingRequest
from workerbee.batching import BatchedModel
from workerbee.connection import QueenRefused, WorkerConnection
from workerbee.engine import Cancelled, EngineError
from workerbee.llama_engine import LlamaEngine
from workerbee.prompts import ModelConfig

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


def chat_job(request_id: str, body: dict[str, Any] = CHAT) -> Job:
    """A chat job for `body`."""
    return Job(request_id=request_id, request=ChatJob(body=ChatCompletionRequest.model_validate(body)))


class StubEngine:
    """Streams a few chunks per request (or answers whole), slowly enough to be cancelled, without llama.cpp.

    A chunk's text is its index, or `text` if given; a request that is not streamed gets a response
    whose content is `text`. On cancel it reports the chunks sent so far as completion tokens.
    """

    def __init__(self, *, chunks: int = 3, delay: float = 0.0, text: str | None = None) -> None:
        self.chunks = chunks
        self.delay = delay
        self.text = text
        self.started = asyncio.Event()
        self.stopped_early = asyncio.Event()

    def model_infos(self) -> list[ModelInfo]:
        """One model, m."""
        return [ModelInfo(id="m", n_ctx=512)]

    async def chat(self, chat: ChatCompletionRequest, cancel: threading.Event, on_chunk: Any) -> Any:
        """Emit `chunks` pieces, honouring the cancel flag between them."""
        if chat.model != "m":
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, "no such model", "model")
        self.started.set()
        if not chat.stream:
            message = {"role": "assistant", "content": self.text or ""}
            response = {"object": "chat.completion", "choices": [{"index": 0, "message": message}]}
            return Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2), response
        for index in range(self.chunks):
            if cancel.is_set():
                usage = Usage(prompt_tokens=1, completion_tokens=index, total_tokens=1 + index)
                raise Cancelled(index, usage)
            delta = {"content": self.text if self.text is not None else str(index)}
            try:
                await on_chunk({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]}, 1)
            except BaseException:
                self.stopped_early.set()
                raise
            await asyncio.sleep(self.delay)
        return Usage(prompt_tokens=1, completion_tokens=self.chunks, total_tokens=1 + self.chunks), None


def registration(engine: Any, max_frame_bytes: int = MAX_FRAME_BYTES) -> Register:
    """A minimal registration for the engine's models."""
    return Register(
        protocol_version=PROTOCOL_VERSION,
        worker_version="t",
        instance_id="test-instance",
        max_frame_bytes=max_frame_bytes,
        cpu_count=1,
        disk_space=1,
        vram=0,
        models=engine.model_infos(),
    )


async def start(
    queen: FakeQueen, engine: Any, *, max_frame_bytes: int = MAX_FRAME_BYTES
) -> tuple[WorkerConnection, asyncio.Event, asyncio.Task[None]]:
    """Run a worker connection against the fake queen until the test stops it."""
    connection = WorkerConnection(
        queen.url,
        engine,
        lambda: registration(engine, max_frame_bytes),
        reconnect_max_delay=0.1,
        shutdown_grace=5,
        max_frame_bytes=max_frame_bytes,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(connection.run(stop))
    await asyncio.wait_for(queen.connected.wait(), 10)
    return connection, stop, task


async def test_job_streams_chunks_then_a_result() -> None:
    """A job becomes chunk frames with its request id, then a result with usage."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, StubEngine())
    await queen.send(chat_job("r1", CHAT))
    frames = [await queen.next_frame() for _ in range(4)]
    stop.set()
    await task
    await queen.stop()
    assert [type(frame) for frame in frames] == [Chunk, Chunk, Chunk, Result]
    assert {frame.request_id for frame in frames} == {"r1"}
    assert [frame.tokens for frame in frames[:3]] == [1, 1, 1]
    assert frames[-1].usage.completion_tokens == 3


UNREADABLE_IDS = [
    "{not json",
    "[1, 2]",
    '{"type": "job", "request": {"kind": "chat"}}',
    '{"type": "job", "request_id": 7}',
    '{"type": "job", "request_id": ""}',
    json.dumps({"type": "job", "request_id": "x" * 129}),
    json.dumps({"type": "job", "request_id": "forged\nlog line"}),
    '{"type": "cancel", "request_id": "r0", "extra": 1}',
    b"\xff\xfe binary",
]


async def test_frames_without_a_readable_job_id_get_a_protocol_error_and_are_survived() -> None:
    """A bad frame whose job id cannot be read (or is no valid id) gets protocol_error; jobs still run."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, StubEngine(chunks=1))
    replies = []
    for garbage in UNREADABLE_IDS:
        await queen.send(garbage)
        replies.append(await queen.next_frame())
    await queen.send(chat_job("r1", CHAT))
    chunk, result = await queen.next_frame(), await queen.next_frame()
    stop.set()
    await task
    await queen.stop()
    assert all(isinstance(reply, ProtocolError) for reply in replies), replies
    assert replies[0].code is ErrorCode.INVALID_FRAME
    assert isinstance(chunk, Chunk)
    assert isinstance(result, Result)
    assert len(queen.registrations) == 1


@pytest.mark.parametrize(
    "raw",
    [
        {"type": "job", "request_id": "r0"},
        {"type": "job", "request_id": "r0", "request": {"kind": "chat", "body": "hi"}},
        {"type": "job", "request_id": "r0", "request": {"kind": "chat", "body": CHAT}, "x": 1},
        {"type": "job", "request_id": "r0", "request": {"kind": 5, "body": CHAT}},
        {"type": "job", "request_id": "r0", "openai_url": "/v1/chat/completions", "openai_req": CHAT},
    ],
)
async def test_undecodable_job_gets_a_job_error_naming_it(raw: dict[str, Any]) -> None:
    """A job frame that fails to decode but whose id can be read ends that request as invalid_request."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, StubEngine(chunks=1))
    await queen.send(json.dumps(raw))
    error = await queen.next_frame()
    await queen.send(chat_job("r1", CHAT))
    chunk, result = await queen.next_frame(), await queen.next_frame()
    stop.set()
    await task
    await queen.stop()
    assert isinstance(error, JobError)
    assert error.request_id == "r0"
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.message.startswith("invalid frame")
    assert isinstance(chunk, Chunk)
    assert isinstance(result, Result)
    assert len(queen.registrations) == 1


@pytest.mark.parametrize(
    ("job", "code"),
    [
        (
            json.dumps({"type": "job", "request_id": "r", "request": {"kind": "chat", "body": {"x": 1}}}),
            ErrorCode.INVALID_REQUEST,
        ),
        (
            json.dumps({"type": "job", "request_id": "r", "request": {"kind": "teleport", "body": CHAT}}),
            ErrorCode.INVALID_REQUEST,
        ),
        (chat_job("r", {**CHAT, "model": "x"}), ErrorCode.MODEL_NOT_FOUND),
    ],
)
async def test_bad_jobs_get_a_job_error(job: Job | str, code: ErrorCode) -> None:
    """An invalid body, an unknown kind of job or an unknown model ends the job with a coded error."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, StubEngine())
    await queen.send(job)
    frame = await queen.next_frame()
    stop.set()
    await task
    await queen.stop()
    assert isinstance(frame, JobError)
    assert frame.request_id == "r"
    assert frame.code is code


async def test_cancel_stops_the_job() -> None:
    """A cancel frame stops generation and the job ends with a cancelled error."""
    queen = await FakeQueen().start()
    engine = StubEngine(chunks=1000, delay=0.01)
    _, stop, task = await start(queen, engine)
    await queen.send(chat_job("r1", CHAT))
    await asyncio.wait_for(engine.started.wait(), 10)
    await queen.send(Cancel(request_id="r1"))
    chunks = 0
    while isinstance(frame := await queen.next_frame(), Chunk):
        chunks += 1
    stop.set()
    await task
    await queen.stop()
    assert isinstance(frame, JobError)
    assert frame.code is ErrorCode.CANCELLED
    assert frame.usage == Usage(prompt_tokens=1, completion_tokens=chunks, total_tokens=1 + chunks)


async def test_unauthorized_is_fatal_and_not_retried() -> None:
    """A queen that refuses the worker's token stops the worker after one attempt."""
    queen = await FakeQueen(
        refuse_with=ProtocolError(code=ErrorCode.UNAUTHORIZED, message="bad token")
    ).start()
    engine = StubEngine()
    connection = WorkerConnection(queen.url, engine, lambda: registration(engine), reconnect_max_delay=0.05)
    with pytest.raises(QueenRefused, match="bad token"):
        await asyncio.wait_for(connection.run(asyncio.Event()), 10)
    await queen.stop()
    assert len(queen.registrations) == 1


async def test_stop_drains_in_flight_jobs_first() -> None:
    """On stop the worker announces draining, finishes the running job, refuses new ones, then leaves."""
    queen = await FakeQueen().start()
    engine = StubEngine(chunks=20, delay=0.01)
    _, stop, task = await start(queen, engine)
    await queen.send(chat_job("r1", CHAT))
    await asyncio.wait_for(engine.started.wait(), 10)
    stop.set()
    frames = []

    def seen(kind: type, request_id: str) -> bool:
        return any(isinstance(frame, kind) and frame.request_id == request_id for frame in frames)

    while not (seen(Result, "r1") and seen(JobError, "late")):
        frame = await queen.next_frame()
        frames.append(frame)
        if isinstance(frame, Draining):
            await queen.send(chat_job("late", CHAT))
    [late] = [frame for frame in frames if isinstance(frame, JobError)]
    await task
    await queen.stop()
    assert any(isinstance(frame, Draining) for frame in frames)
    assert sum(isinstance(frame, Chunk) and frame.request_id == "r1" for frame in frames) == 20
    assert isinstance(late, JobError)
    assert late.code is ErrorCode.OVERLOADED


async def test_a_chunk_too_big_for_the_queen_ends_its_request_with_an_error() -> None:
    """A chunk over the queen's limit is never sent: its request gets internal_error, the connection stays."""
    queen = await FakeQueen(max_frame_bytes=MIN_FRAME_BYTES).start()
    engine = StubEngine(chunks=3, text="x" * MIN_FRAME_BYTES)
    _, stop, task = await start(queen, engine)
    await queen.send(chat_job("big", CHAT))
    error = await queen.next_frame()
    engine.text = None
    await queen.send(chat_job("small", CHAT))
    after = [await queen.next_frame() for _ in range(4)]
    stop.set()
    await task
    await queen.stop()
    assert isinstance(error, JobError)
    assert error.request_id == "big"
    assert error.code is ErrorCode.INTERNAL_ERROR
    assert "exceeded the queen's limit" in error.message
    assert engine.stopped_early.is_set()
    assert [type(frame) for frame in after] == [Chunk, Chunk, Chunk, Result]
    assert queen.largest_frame <= MIN_FRAME_BYTES
    assert len(queen.registrations) == 1


async def test_a_whole_response_too_big_for_one_frame_goes_in_parts() -> None:
    """A response over the queen's limit arrives as result_part slices that reassemble into it."""
    queen = await FakeQueen(max_frame_bytes=MIN_FRAME_BYTES).start()
    text = 'é"\n' * MIN_FRAME_BYTES  # characters JSON escapes or encodes in several bytes
    _, stop, task = await start(queen, StubEngine(text=text))
    await queen.send(chat_job("r1", {**CHAT, "stream": False}))
    frames = []
    while not isinstance(frame := await queen.next_frame(), Result):
        frames.append(frame)
    stop.set()
    await task
    await queen.stop()
    assert len(frames) > 3
    assert all(isinstance(part, ResultPart) and part.request_id == "r1" for part in frames)
    assert frame.parts == len(frames)
    assert frame.response is None
    response = assemble_response([part.data for part in frames])
    assert response["choices"][0]["message"]["content"] == text
    assert queen.largest_frame <= MIN_FRAME_BYTES


async def test_the_worker_states_and_enforces_its_own_frame_limit() -> None:
    """The registration states the worker's limit; a bigger frame from the queen closes that connection."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, StubEngine(chunks=1), max_frame_bytes=MIN_FRAME_BYTES)
    [first] = queen.registrations
    assert first.max_frame_bytes == MIN_FRAME_BYTES
    queen.connected.clear()
    huge = {**CHAT, "messages": [{"role": "user", "content": "x" * MIN_FRAME_BYTES}]}
    await queen.send(chat_job("huge", huge))
    await asyncio.wait_for(queen.connected.wait(), 10)  # the worker came back on a new connection
    await queen.send(chat_job("r1", CHAT))
    chunk = await queen.next_frame()
    stop.set()
    await task
    await queen.stop()
    assert queen.connections[0].close_code == 1009  # message too big
    assert len(queen.registrations) == 2
    assert isinstance(chunk, Chunk)
    assert chunk.request_id == "r1"


@pytest.fixture(scope="module")
def embedding_engine() -> Iterator[LlamaEngine]:
    """SmolLM2 with an embeddings context."""
    model = BatchedModel.load(
        ModelConfig(id="smol", path=smollm2_path(), n_ctx=256, embeddings=True), parallel=1, threads=1
    )
    engine = LlamaEngine({"smol": model})
    yield engine
    engine.close()


async def test_a_big_embeddings_answer_reassembles_to_the_unsplit_one(embedding_engine: LlamaEngine) -> None:
    """Forty real embeddings under a 64 KiB queen limit arrive in parts that make the direct answer."""
    # Forty, not hundreds: each embedding costs tens of milliseconds on a shared CI core, and forty
    # already make some thirty parts.
    body = {"model": "smol", "input": [f"sentence number {index}" for index in range(40)]}
    usage, direct = await embedding_engine.embed(EmbeddingRequest.model_validate(body), threading.Event())
    queen = await FakeQueen(max_frame_bytes=MIN_FRAME_BYTES).start()
    _, stop, task = await start(queen, embedding_engine)
    await queen.send(Job(request_id="e1", request=EmbeddingJob(body=EmbeddingRequest.model_validate(body))))
    parts = []
    while not isinstance(frame := await queen.next_frame(timeout=60), Result):
        if not isinstance(frame, CacheSummary):  # what the model's (empty) caches hold, on connecting
            parts.append(frame)
    stop.set()
    await task
    await queen.stop()
    assert all(isinstance(part, ResultPart) for part in parts)
    assert frame.parts == len(parts) > 20
    assert frame.usage == usage
    assert assemble_response([part.data for part in parts]) == direct
    assert len(direct["data"]) == 40
    assert queen.largest_frame <= MIN_FRAME_BYTES


@pytest.fixture(scope="module")
def chat_engine() -> Iterator[LlamaEngine]:
    """SmolLM2 batching two streams."""
    model = BatchedModel.load(ModelConfig(id="smol", path=smollm2_path(), n_ctx=512), parallel=2, threads=1)
    engine = LlamaEngine({"smol": model})
    yield engine
    engine.close()


async def test_one_steps_chunks_of_several_streams_leave_in_one_batch(chat_engine: LlamaEngine) -> None:
    """Two streams on the real engine: each step's tokens for both leave as one batch message, and every
    request's frames still arrive complete and in order (its chunks, then its result)."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, chat_engine)
    body = {"model": "smol", "stream": True, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    for request_id, topic in (("r1", "rivers"), ("r2", "mountains")):
        messages = [{"role": "user", "content": f"Write about {topic}."}]
        await queen.send(chat_job(request_id, {**body, "messages": messages}))
    frames: dict[str, list[Any]] = {"r1": [], "r2": []}
    while not all(items and isinstance(items[-1], Result) for items in frames.values()):
        frame = await queen.next_frame(timeout=60)
        if isinstance(frame, Chunk | Delta | Result):
            frames[frame.request_id].append(frame)
    stop.set()
    await task
    await queen.stop()
    for items in frames.values():
        assert all(isinstance(item, Chunk | Delta) for item in items[:-1])
        # The role chunk carries the fingerprint, the text after it goes as deltas (protocol 6), and the
        # finish is a chunk again.
        role, *text, finish, _ = items
        assert isinstance(role, Chunk)
        assert isinstance(finish, Chunk)
        assert text
        assert all(isinstance(item, Delta) for item in text)
        assert sum(item.tokens for item in items[:-1]) == items[-1].usage.completion_tokens == 12
    streams = [
        {frame.request_id for frame in batch if isinstance(frame, Chunk | Delta)} for batch in queen.batches
    ]
    shared = [ids for ids in streams if ids == {"r1", "r2"}]
    assert len(shared) >= 5, streams


def make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A self-signed CA and a server certificate it signed for localhost: (ca, cert, key)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make test certificates")
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    extensions = folder / "server.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    commands = [
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "2", "-subj", "/CN=bee CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", extensions],
    ]  # fmt: skip
    for command in commands:
        subprocess.run([str(part) for part in command], check=True, capture_output=True, timeout=30)
    return ca, cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """Test certificates, made once for the module."""
    return make_certificates(tmp_path_factory.mktemp("tls"))


def tls_queen(certificates: tuple[Path, Path, Path]) -> FakeQueen:
    """A fake queen serving wss:// with the test CA's certificate for localhost."""
    _, cert, key = certificates
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return FakeQueen(tls=context)


async def test_wss_verifies_the_queen_with_the_system_cas(
    certificates: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over wss:// the worker trusts what the system trusts (SSL_CERT_FILE here) and registers."""
    monkeypatch.setenv("SSL_CERT_FILE", str(certificates[0]))
    queen = await tls_queen(certificates).start()
    assert queen.url.startswith("wss://")
    _, stop, task = await start(queen, StubEngine(chunks=1))
    await queen.send(chat_job("r1", CHAT))
    chunk = await queen.next_frame()
    stop.set()
    await task
    await queen.stop()
    assert isinstance(chunk, Chunk)


async def test_wss_refuses_a_queen_it_cannot_verify(
    certificates: tuple[Path, Path, Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A certificate from a CA the system does not trust never gets the registration (or its token)."""
    queen = await tls_queen(certificates).start()
    engine = StubEngine()
    connection = WorkerConnection(queen.url, engine, lambda: registration(engine), reconnect_max_delay=0.05)
    stop = asyncio.Event()
    task = asyncio.create_task(connection.run(stop))
    try:
        await eventually(lambda: "CERTIFICATE_VERIFY_FAILED" in caplog.text)
    finally:
        stop.set()
        await task
        await queen.stop()
    assert queen.registrations == []
