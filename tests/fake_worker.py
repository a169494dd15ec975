"""A scripted worker: a real websocket client whose answers a test controls frame by frame."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from protocol import (
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Delta,
    ErrorCode,
    Job,
    JobError,
    ModelInfo,
    ProtocolError,
    Register,
    Result,
    Usage,
    Welcome,
    decode_queen_frame,
    encode,
    result_frames,
)
from protocol.messages import Frame

Behaviour = Callable[["FakeWorker", Job], Awaitable[None]]


def content_chunk(text: str, *, role: bool = False, finish_reason: str | None = None) -> dict[str, Any]:
    """An OpenAI chunk body (without the identity fields the queen adds)."""
    delta: dict[str, Any] = {"role": "assistant"} if role else {}
    if text:
        delta["content"] = text
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}


def completion(text: str) -> dict[str, Any]:
    """An OpenAI chat.completion body (without the identity fields the queen adds)."""
    return {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ]
    }


async def answer(worker: FakeWorker, job: Job, words: tuple[str, ...] = ("Hello", " there")) -> None:
    """The default behaviour: a short, well-formed answer, streamed or whole as the job asks.

    Each word is one token, sent as a Delta as workerbee sends text; a whole answer too big for the
    queen's frames goes in parts.
    """
    usage = Usage(prompt_tokens=3, completion_tokens=len(words), total_tokens=3 + len(words))
    if job.stream:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        for word in words:
            await worker.send(Delta(request_id=job.request_id, text=word, tokens=1))
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", finish_reason="stop")))
        await worker.send(Result(request_id=job.request_id, usage=usage))
    else:
        result = Result(request_id=job.request_id, usage=usage, response=completion("".join(words)))
        for frame in result_frames(result, worker.queen_max_frame_bytes):
            await worker.send(frame)


async def reply(
    worker: FakeWorker,
    job: Job,
    text: str = "",
    *,
    tool_call: tuple[str, str] | None = None,
    finish_reason: str | None = None,
    prompt_tokens: int = 3,
) -> None:
    """Answer a chat job with `text`, or with one call of the function `tool_call` (name, arguments).

    Streamed in pieces (a word, or a few characters of arguments, a chunk) or whole, as the job asks.
    """
    request_id = job.request_id
    pieces = [word for word in text.split(" ")] if text else []
    pieces = [piece if index == 0 else " " + piece for index, piece in enumerate(pieces)]
    arguments = tool_call[1] if tool_call is not None else ""
    argument_pieces = [arguments[start : start + 5] for start in range(0, len(arguments), 5)]
    completion_tokens = len(pieces) + len(argument_pieces)
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    finish = finish_reason or ("tool_calls" if tool_call is not None else "stop")
    call_id = "call_" + uuid.uuid4().hex[:12]
    if not job.stream:
        message: dict[str, Any] = {"role": "assistant", "content": text or None, "refusal": None}
        if tool_call is not None:
            message["tool_calls"] = [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": tool_call[0], "arguments": arguments},
                }
            ]
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        await worker.send(Result(request_id=request_id, usage=usage, response={"choices": [choice]}))
        return
    await worker.send(Chunk(request_id=request_id, chunk=content_chunk("", role=True)))
    for piece in pieces:
        await worker.send(Chunk(request_id=request_id, chunk=content_chunk(piece), tokens=1))
    if tool_call is not None:
        opening = {
            "index": 0,
            "id": call_id,
            "type": "function",
            "function": {"name": tool_call[0], "arguments": ""},
        }
        deltas = [opening] + [{"index": 0, "function": {"arguments": piece}} for piece in argument_pieces]
        for number, delta in enumerate(deltas):
            choice = {"index": 0, "delta": {"tool_calls": [delta]}, "finish_reason": None, "logprobs": None}
            await worker.send(
                Chunk(request_id=request_id, chunk={"choices": [choice]}, tokens=int(number > 0))
            )
    await worker.send(Chunk(request_id=request_id, chunk=content_chunk("", finish_reason=finish)))
    await worker.send(Result(request_id=request_id, usage=usage))


FAKE_TOKEN = 42
"""The token id a fake worker names for every token of its whole answers."""


class FakeWorker:
    """Connects to a queen, registers, and runs `behaviour` for every job it gets."""

    def __init__(
        self,
        url: str,
        *,
        models: tuple[str, ...] = ("fake-model",),
        parallel: int = 1,
        behaviour: Behaviour = answer,
        auth_key: str = "",
        ln_url: str = "",
        instance_id: str | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        n_ctx: int = 2048,
        sha256: str | None = None,
        names_ids: bool = True,
    ) -> None:
        self.url = url
        self.names_ids = names_ids
        """Whether whole answers name their token ids (protocol 4 requires it; off to test a worker that
        leaves them out)."""
        self.sha256 = sha256
        """The content hash it reports for its models (None: none, so its answers are never resumed)."""
        self.instance_id = instance_id or "fake-" + uuid.uuid4().hex[:12]
        self.max_frame_bytes = max_frame_bytes
        self.n_ctx = n_ctx
        self.models = models
        self.parallel = parallel
        self.behaviour = behaviour
        self.auth_key = auth_key
        self.ln_url = ln_url
        self.jobs: list[Job] = []
        self.cancels: list[str] = []
        self.cancelled = asyncio.Event()
        self.protocol_errors: list[ProtocolError] = []
        """What the queen said of frames it refused."""
        self.worker_id: str | None = None
        self.queen_max_frame_bytes = MIN_FRAME_BYTES
        """The largest frame the queen accepts, from its Welcome."""
        self._websocket: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def registration(self) -> Register:
        """The registration this fake sends."""
        return Register(
            protocol_version=PROTOCOL_VERSION,
            instance_id=self.instance_id,
            max_frame_bytes=self.max_frame_bytes,
            worker_version="fake",
            ln_url=self.ln_url,
            auth_key=self.auth_key,
            cpu_count=1,
            disk_space=1,
            vram=0,
            models=[ModelInfo(id=model, n_ctx=self.n_ctx, sha256=self.sha256) for model in self.models],
            parallel=self.parallel,
        )

    async def connect(self) -> FakeWorker:
        """Connect and register; returns once the queen has welcomed it."""
        self._websocket = await websockets.connect(self.url)
        await self._websocket.send(encode(self.registration()))
        welcome = decode_queen_frame(await asyncio.wait_for(self._websocket.recv(), 10))
        assert isinstance(welcome, Welcome), welcome
        self.worker_id = welcome.worker_id
        self.queen_max_frame_bytes = welcome.max_frame_bytes
        self._reader = asyncio.create_task(self._read())
        return self

    async def send(self, frame: Frame) -> None:
        """Send a frame to the queen; a whole answer without token ids gets them (see `names_ids`)."""
        assert self._websocket is not None
        await self._websocket.send(encode(self.with_ids(frame)))

    def with_ids(self, frame: Frame) -> Frame:
        """A Result of a whole answer with `token_ids` as protocol 4 requires (the first choice holds the
        usage's completion tokens, as ids of FAKE_TOKEN), unless it has some or `names_ids` is off."""
        if not (self.names_ids and isinstance(frame, Result) and frame.token_ids is None):
            return frame
        choices = frame.response.get("choices") if isinstance(frame.response, dict) else None
        if not isinstance(choices, list) or not choices:
            return frame
        generated = min(frame.usage.completion_tokens, 2**16)  # a choice names at most 2**16 ids
        ids = [[FAKE_TOKEN] * (generated if index == 0 else 0) for index in range(len(choices))]
        return frame.model_copy(update={"token_ids": ids})

    async def send_raw(self, data: str | bytes) -> None:
        """Send arbitrary text or bytes to the queen."""
        assert self._websocket is not None
        await self._websocket.send(data)

    async def fail(self, job: Job, code: ErrorCode = ErrorCode.INTERNAL_ERROR, message: str = "boom") -> None:
        """End a job with an error frame."""
        await self.send(JobError(request_id=job.request_id, code=code, message=message))

    async def close(self) -> None:
        """Close the connection cleanly."""
        for task in self._tasks:
            task.cancel()
        if self._websocket is not None:
            await self._websocket.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)

    def freeze(self) -> None:
        """Stop reading from the socket, so pings go unanswered, as a hung worker's would."""
        assert self._websocket is not None
        self._websocket.transport.pause_reading()

    async def abort(self) -> None:
        """Drop the TCP connection without a closing handshake, as a crashed worker would."""
        assert self._websocket is not None
        self._websocket.transport.abort()
        await self.close()

    async def _read(self) -> None:
        assert self._websocket is not None
        try:
            async for message in self._websocket:
                frame = decode_queen_frame(message)
                if isinstance(frame, Job):
                    self.jobs.append(frame)
                    task = asyncio.create_task(self.behaviour(self, frame))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif isinstance(frame, Cancel):
                    self.cancels.append(frame.request_id)
                    self.cancelled.set()
                elif isinstance(frame, ProtocolError):
                    self.protocol_errors.append(frame)
        except websockets.ConnectionClosed:
            pass
