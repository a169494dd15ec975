"""The worker's connection: registration, job dispatch, cancels, bad frames, refusals, draining."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from fake_queen import FakeQueen

from protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Draining,
    ErrorCode,
    Job,
    JobError,
    ModelInfo,
    ProtocolError,
    Register,
    Result,
    Usage,
)
from protocol.openai import ChatCompletionRequest
from workerbee.connection import QueenRefused, WorkerConnection
from workerbee.engine import Cancelled, EngineError

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


class StubEngine:
    """Streams a few chunks per request, slowly enough to be cancelled, without llama.cpp."""

    def __init__(self, *, chunks: int = 3, delay: float = 0.0) -> None:
        self.chunks = chunks
        self.delay = delay
        self.started = asyncio.Event()

    def model_infos(self) -> list[ModelInfo]:
        """One model, m."""
        return [ModelInfo(id="m", n_ctx=512)]

    async def chat(self, chat: ChatCompletionRequest, cancel: threading.Event, on_chunk: Any) -> Any:
        """Emit `chunks` pieces, honouring the cancel flag between them."""
        if chat.model != "m":
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, "no such model", "model")
        self.started.set()
        for index in range(self.chunks):
            if cancel.is_set():
                raise Cancelled
            await on_chunk(
                {"choices": [{"index": 0, "delta": {"content": str(index)}, "finish_reason": None}]}
            )
            await asyncio.sleep(self.delay)
        return Usage(prompt_tokens=1, completion_tokens=self.chunks, total_tokens=1 + self.chunks), None


def registration(engine: StubEngine) -> Register:
    """A minimal registration for the stub engine's models."""
    return Register(
        protocol_version=PROTOCOL_VERSION,
        worker_version="t",
        cpu_count=1,
        disk_space=1,
        vram=0,
        models=engine.model_infos(),
    )


async def start(
    queen: FakeQueen, engine: StubEngine
) -> tuple[WorkerConnection, asyncio.Event, asyncio.Task[None]]:
    """Run a worker connection against the fake queen until the test stops it."""
    connection = WorkerConnection(
        queen.url,
        engine,
        lambda: registration(engine),
        reconnect_max_delay=0.1,
        shutdown_grace=5,  # type: ignore[arg-type]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(connection.run(stop))
    await asyncio.wait_for(queen.connected.wait(), 10)
    return connection, stop, task


async def test_job_streams_chunks_then_a_result() -> None:
    """A job becomes chunk frames with its request id, then a result with usage."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, StubEngine())
    await queen.send(Job(request_id="r1", openai_url="/v1/chat/completions", openai_req=CHAT))
    frames = [await queen.next_frame() for _ in range(4)]
    stop.set()
    await task
    await queen.stop()
    assert [type(frame) for frame in frames] == [Chunk, Chunk, Chunk, Result]
    assert {frame.request_id for frame in frames} == {"r1"}
    assert frames[-1].usage.completion_tokens == 3


async def test_garbage_from_the_queen_gets_a_protocol_error_and_is_survived() -> None:
    """Invalid frames are answered with protocol_error; the next valid job still runs."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, StubEngine(chunks=1))
    await queen.send("{not json")
    await queen.send('{"type": "job", "request_id": "r0"}')
    first, second = await queen.next_frame(), await queen.next_frame()
    await queen.send(Job(request_id="r1", openai_url="/v1/chat/completions", openai_req=CHAT))
    chunk, result = await queen.next_frame(), await queen.next_frame()
    stop.set()
    await task
    await queen.stop()
    assert isinstance(first, ProtocolError)
    assert first.code is ErrorCode.INVALID_FRAME
    assert isinstance(second, ProtocolError)
    assert isinstance(chunk, Chunk)
    assert isinstance(result, Result)


@pytest.mark.parametrize(
    ("job", "code"),
    [
        (
            Job(request_id="r", openai_url="/v1/chat/completions", openai_req={"model": "m"}),
            ErrorCode.INVALID_REQUEST,
        ),
        (Job(request_id="r", openai_url="/v1/teleport", openai_req=CHAT), ErrorCode.INVALID_REQUEST),
        (
            Job(request_id="r", openai_url="/v1/chat/completions", openai_req={**CHAT, "model": "x"}),
            ErrorCode.MODEL_NOT_FOUND,
        ),
    ],
)
async def test_bad_jobs_get_a_job_error(job: Job, code: ErrorCode) -> None:
    """An invalid body, an unknown path or an unknown model ends the job with a coded error."""
    queen = await FakeQueen().start()
    _, stop, task = await start(queen, StubEngine())
    await queen.send(job)
    frame = await queen.next_frame()
    stop.set()
    await task
    await queen.stop()
    assert isinstance(frame, JobError)
    assert frame.code is code


async def test_cancel_stops_the_job() -> None:
    """A cancel frame stops generation and the job ends with a cancelled error."""
    queen = await FakeQueen().start()
    engine = StubEngine(chunks=1000, delay=0.01)
    _, stop, task = await start(queen, engine)
    await queen.send(Job(request_id="r1", openai_url="/v1/chat/completions", openai_req=CHAT))
    await asyncio.wait_for(engine.started.wait(), 10)
    await queen.send(Cancel(request_id="r1"))
    while True:
        frame = await queen.next_frame()
        if not isinstance(frame, Chunk):
            break
    stop.set()
    await task
    await queen.stop()
    assert isinstance(frame, JobError)
    assert frame.code is ErrorCode.CANCELLED


async def test_unauthorized_is_fatal_and_not_retried() -> None:
    """A queen that refuses the worker's token stops the worker after one attempt."""
    queen = await FakeQueen(
        refuse_with=ProtocolError(code=ErrorCode.UNAUTHORIZED, message="bad token")
    ).start()
    engine = StubEngine()
    connection = WorkerConnection(queen.url, engine, lambda: registration(engine), reconnect_max_delay=0.05)  # type: ignore[arg-type]
    with pytest.raises(QueenRefused, match="bad token"):
        await asyncio.wait_for(connection.run(asyncio.Event()), 10)
    await queen.stop()
    assert len(queen.registrations) == 1


async def test_stop_drains_in_flight_jobs_first() -> None:
    """On stop the worker announces draining, finishes the running job, refuses new ones, then leaves."""
    queen = await FakeQueen().start()
    engine = StubEngine(chunks=20, delay=0.01)
    _, stop, task = await start(queen, engine)
    await queen.send(Job(request_id="r1", openai_url="/v1/chat/completions", openai_req=CHAT))
    await asyncio.wait_for(engine.started.wait(), 10)
    stop.set()
    frames = []

    def seen(kind: type, request_id: str) -> bool:
        return any(isinstance(frame, kind) and frame.request_id == request_id for frame in frames)

    while not (seen(Result, "r1") and seen(JobError, "late")):
        frame = await queen.next_frame()
        frames.append(frame)
        if isinstance(frame, Draining):
            await queen.send(Job(request_id="late", openai_url="/v1/chat/completions", openai_req=CHAT))
    [late] = [frame for frame in frames if isinstance(frame, JobError)]
    await task
    await queen.stop()
    assert any(isinstance(frame, Draining) for frame in frames)
    assert sum(isinstance(frame, Chunk) and frame.request_id == "r1" for frame in frames) == 20
    assert isinstance(late, JobError)
    assert late.code is ErrorCode.OVERLOADED
