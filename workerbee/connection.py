"""The worker's side of the websocket: connect, register, run jobs, and reconnect with backoff.

One reader per connection dispatches the queen's frames; every job runs in a task of its own, so the
connection keeps answering (pings, cancels) while models generate.

Frame limits are agreed at registration: the worker accepts frames up to its own `max_frame_bytes` and
never sends one bigger than the queen's (from Welcome). A whole response that is too big travels as
ResultPart slices; any other frame that would be too big (a giant chunk) ends its request with a JobError
instead, so the queen never sees a frame it would refuse and the connection stays up.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets
from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection

from protocol import (
    MAX_FRAME_BYTES,
    MIN_FRAME_BYTES,
    CacheSummary,
    Cancel,
    Chunk,
    Delta,
    Draining,
    ErrorCode,
    FrameError,
    Job,
    JobError,
    LoadModelJob,
    ProtocolError,
    Register,
    Result,
    ResultPart,
    Usage,
    Welcome,
    decode_queen_frame,
    encode,
    encoded_size,
    result_frames,
)
from protocol.messages import Frame
from workerbee.answer_ids import token_ids_of
from workerbee.cache_reports import REFRESH_SECONDS, CacheReporter, CacheReports
from workerbee.chunk_frames import StreamFrames
from workerbee.engine import Cancelled, Engine, EngineError
from workerbee.outbox import Outbox
from workerbee.tokens import count_tokens
from workerbee.transport import ssl_context

log = logging.getLogger("workerbee.connection")

FATAL_CODES = frozenset({ErrorCode.UNAUTHORIZED, ErrorCode.UNSUPPORTED_PROTOCOL_VERSION})
"""Refusals that retrying cannot fix: the worker stops instead of hammering the queen."""


ChunkSink = Callable[[dict[str, Any], int], Awaitable[None]]
Runner = Callable[[Engine, Any, threading.Event, ChunkSink], Awaitable[tuple[Usage, dict[str, Any] | None]]]

RUNNERS: dict[str, Runner] = {
    "chat": lambda engine, request, cancel, on_chunk: (
        engine.chat(request.body, cancel, on_chunk, request.resume)
        if request.resume is not None
        else engine.chat(request.body, cancel, on_chunk)
    ),
    "completion": lambda engine, request, cancel, on_chunk: (
        engine.complete(request.body, cancel, on_chunk, request.resume)
        if request.resume is not None
        else engine.complete(request.body, cancel, on_chunk)
    ),
    "embedding": lambda engine, request, cancel, on_chunk: engine.embed(request.body, cancel),
    "count_tokens": lambda engine, request, cancel, on_chunk: count_tokens(engine, request.body),
}
"""How each kind of job runs on the engine: the request kind is the key, the typed request the argument
(a resume is passed on only when there is one)."""

SideJob = Callable[[Any], Awaitable[tuple[Usage, dict[str, Any]]]]
"""A job kind that does not run on the engine's batch (an audit, a possession challenge): its request
in, the Result's usage and response out."""

TrainingRunner = Callable[[Any, threading.Event, ChunkSink], Awaitable[tuple[Usage, dict[str, Any]]]]
"""Runs a `train` job (workerbee/training.py): its progress goes out as chunks, and once it succeeds
the worker serves a new model, so the connection registers again to say so."""


class QueenRefused(Exception):
    """The queen refused this worker for a reason that retrying will not fix."""


class OutputTooLarge(Exception):
    """A frame of a request's output is bigger than the queen accepts; the request ends with a JobError."""

    def __init__(self, kind: str, size: int, limit: int) -> None:
        super().__init__(
            f"the output frame ({kind}, {size} bytes) exceeded the queen's limit of {limit} bytes"
        )


@dataclass
class Backoff:
    """Exponential backoff with full jitter, reset after a good connection."""

    base: float = 0.5
    cap: float = 30.0
    attempt: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt."""
        delay = self.rng.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start over after a connection that worked."""
        self.attempt = 0


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{exc.__class__.__name__}: {text}" if text else exc.__class__.__name__


class WorkerConnection:
    """Keeps this worker registered with its queen and runs the jobs the queen sends."""

    def __init__(
        self,
        queen_url: str | Sequence[str],
        engine: Engine,
        registration: Callable[[], Register],
        *,
        reconnect_max_delay: float = 30.0,
        shutdown_grace: float = 30.0,
        handshake_timeout: float = 10.0,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        side_jobs: dict[str, SideJob] | None = None,
        trainer: TrainingRunner | None = None,
        loader: SideJob | None = None,
    ) -> None:
        self.trainer = trainer
        """Runs `train` jobs on a worker started with --train; None elsewhere."""
        self.loader = loader
        """Runs `load_model` jobs (serve a fine-tuned model from the queen) on a --train worker."""
        self.queen_urls = [queen_url] if isinstance(queen_url, str) else list(queen_url)
        """The queens to try, in turn: the replicas of one hive (or one queen)."""
        self.queen_url = self.queen_urls[0]
        """The one this worker connects to now; the next is tried whenever the connection is lost."""
        self.side_jobs = side_jobs or {}
        """Job kinds beside the engine's, by kind: `challenge` on every worker, `audit` on auditors."""
        self.engine = engine
        self.registration = registration
        self.backoff = Backoff(cap=reconnect_max_delay)
        self.shutdown_grace = shutdown_grace
        self.handshake_timeout = handshake_timeout
        self.worker_id: str | None = None
        self.max_frame_bytes = max_frame_bytes
        """Largest frame this worker accepts (it must be what the registration says)."""
        self.send_limit = MIN_FRAME_BYTES
        """Largest frame the queen accepts, from its Welcome."""
        self.connected = asyncio.Event()
        self.cache_refresh = REFRESH_SECONDS
        """Seconds between summaries of caches that did not change."""
        self._reports: CacheReports | None = None
        self._draining = False
        self._jobs: dict[str, tuple[asyncio.Task[None], threading.Event]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set, reconnecting whenever the queen is lost.

        Raises QueenRefused if the queen refuses this worker for good.
        """
        while not stop.is_set():
            try:
                await self._serve_once(stop)
            except QueenRefused:
                raise
            except (OSError, TimeoutError, websockets.WebSocketException, FrameError) as exc:
                if stop.is_set():
                    break
                lost = self.queen_url
                # Another replica of the hive may be up where this one is not.
                self.queen_url = self.queen_urls[(self.queen_urls.index(lost) + 1) % len(self.queen_urls)]
                delay = self.backoff.next_delay()
                log.warning(
                    "cannot reach the queen at %s (%s); retrying in %.1f s at %s",
                    lost,
                    _describe(exc),
                    delay,
                    self.queen_url,
                )
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                except TimeoutError:
                    pass

    async def _serve_once(self, stop: asyncio.Event) -> None:
        async with websockets.connect(
            self.queen_url,
            ssl=ssl_context(self.queen_url),
            max_size=self.max_frame_bytes,
            open_timeout=self.handshake_timeout,
            ping_interval=15,
            ping_timeout=20,
            compression=None,  # small frames as they come: deflate costs more CPU than it saves
        ) as websocket:
            await self._register(websocket)
            self.backoff.reset()
            self.connected.set()
            outbox = Outbox(websocket.send, lambda: self.send_limit)
            reader = asyncio.create_task(self._read(websocket, outbox))
            stopper = asyncio.create_task(stop.wait())
            reporter = self._start_reports(outbox)
            try:
                await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
                if stop.is_set():
                    await self._drain(outbox)
                    reader.cancel()
                    await websocket.close(1001, "worker shutting down")
                else:
                    reader.result()  # re-raise why the connection ended
            finally:
                self.connected.clear()
                stopper.cancel()
                reader.cancel()
                if reporter is not None:
                    reporter.cancel()
                for task, cancel in self._jobs.values():
                    cancel.set()
                    task.cancel()
                self._jobs.clear()

    def _start_reports(self, outbox: Outbox) -> asyncio.Task[None] | None:
        """Start telling the queen what the engine's caches hold (engines that can say so)."""
        if not isinstance(self.engine, CacheReporter):
            return None
        if self._reports is None:
            self._reports = CacheReports(self.engine, asyncio.get_running_loop())
        self._reports.reset()

        async def send(frame: CacheSummary) -> None:
            await self._send(outbox, frame)

        return asyncio.create_task(self._reports.run(send, lambda: self.send_limit, self.cache_refresh))

    async def _register(self, websocket: ClientConnection) -> None:
        # Probing hardware can block (NVML, disk): keep it off the event loop.
        registration = await asyncio.to_thread(self.registration)
        if registration.max_frame_bytes != self.max_frame_bytes:
            raise ValueError(
                f"the registration states {registration.max_frame_bytes} bytes as the frame limit, but the "
                f"connection accepts {self.max_frame_bytes}"
            )
        await websocket.send(encode(registration))
        async with asyncio.timeout(self.handshake_timeout):
            reply = decode_queen_frame(await websocket.recv())
        if isinstance(reply, ProtocolError):
            if reply.code in FATAL_CODES:
                raise QueenRefused(f"the queen refused this worker: {reply.message}")
            raise FrameError(reply.code, f"the queen refused the registration: {reply.message}")
        if not isinstance(reply, Welcome):
            raise FrameError(ErrorCode.INVALID_FRAME, f"expected 'welcome', got {reply.type!r}")
        self.worker_id = reply.worker_id
        self.send_limit = reply.max_frame_bytes
        for model_id, why in reply.refused_models.items():
            log.warning("the queen will not route '%s' to this worker: %s", model_id, why)
        log.info(
            "registered with the queen at %s as %s, serving %s",
            self.queen_url,
            reply.worker_id,
            ", ".join(model.id for model in registration.models),
        )

    async def _read(self, websocket: ClientConnection, outbox: Outbox) -> None:
        async for message in websocket:
            try:
                frame = decode_queen_frame(message, limit=self.max_frame_bytes)
            except FrameError as exc:
                request_id = _job_request_id(message)
                if request_id is None:
                    log.warning("the queen sent a bad frame: %s", exc.message)
                    await self._send(outbox, ProtocolError(code=exc.code, message=exc.message))
                else:
                    # The job, not the connection, is at fault: the queen can end that one request.
                    log.warning("the queen sent a job that cannot be read (%s): %s", request_id, exc.message)
                    error = JobError(
                        request_id=request_id, code=ErrorCode.INVALID_REQUEST, message=exc.message[:4000]
                    )
                    await self._send(outbox, error)
                continue
            if isinstance(frame, Job):
                self._start_job(websocket, outbox, frame)
            elif isinstance(frame, Cancel):
                running = self._jobs.get(frame.request_id)
                if running is not None:
                    running[1].set()
            elif isinstance(frame, ProtocolError):
                log.warning("the queen reports a protocol error: %s: %s", frame.code, frame.message)

    def _start_job(self, websocket: ClientConnection, outbox: Outbox, job: Job) -> None:
        cancel = threading.Event()
        task = asyncio.create_task(self._run_job(websocket, outbox, job, cancel))
        self._jobs[job.request_id] = (task, cancel)
        task.add_done_callback(lambda _: self._jobs.pop(job.request_id, None))

    async def _run_job(
        self, websocket: ClientConnection, outbox: Outbox, job: Job, cancel: threading.Event
    ) -> None:
        request_id = job.request_id
        renew = False
        try:
            if self._draining:
                raise EngineError(ErrorCode.OVERLOADED, "the worker is shutting down")

            frames = StreamFrames(request_id)

            async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
                frame = frames.frame(chunk, tokens)
                await self._send_output(outbox, frame)

            kind = job.request.kind
            side = self.side_jobs.get(kind)
            if kind in RUNNERS:
                usage, response = await RUNNERS[kind](self.engine, job.request, cancel, on_chunk)
            elif side is not None:
                usage, response = await side(job.request)
            elif kind == "train" and self.trainer is not None:
                usage, response = await self.trainer(job.request, cancel, on_chunk)
                renew = True
            elif kind == "load_model" and self.loader is not None:
                served = frozenset(model.id for model in self.engine.model_infos())
                usage, response = await self.loader(job.request)
                renew = isinstance(job.request, LoadModelJob) and job.request.model not in served
            else:
                raise EngineError(ErrorCode.INVALID_REQUEST, f"this worker does not run {kind} jobs", "kind")
            if self._reports is not None:
                # Before the Result: the client's next turn must find its prefix where it now is.
                for summary in self._reports.pending(self.send_limit):
                    await self._send(outbox, summary)
            result = Result(
                request_id=request_id, usage=usage, response=response, token_ids=token_ids_of(response)
            )
            for frame in result_frames(result, self.send_limit):
                await self._send_output(outbox, frame)
            if renew:
                # A new model to serve: no new jobs on this registration, the others finished (up to the
                # shutdown grace), then register again with it.
                await self._send(outbox, Draining())
                others = [task for task, _ in self._jobs.values() if task is not asyncio.current_task()]
                if others:
                    await asyncio.wait(others, timeout=self.shutdown_grace)
                await websocket.close(1012, "registering again with a fine-tuned model")
        except Cancelled as exc:
            cancelled = JobError(
                request_id=request_id, code=ErrorCode.CANCELLED, message="cancelled", usage=exc.usage
            )
            await self._send(outbox, cancelled)
        except OutputTooLarge as exc:
            log.error("request %s: %s", request_id, exc)
            await self._send(
                outbox, JobError(request_id=request_id, code=ErrorCode.INTERNAL_ERROR, message=str(exc))
            )
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"])
            message = f"invalid request: {where + ': ' if where else ''}{first['msg']}"[:4000]
            await self._send(
                outbox, JobError(request_id=request_id, code=ErrorCode.INVALID_REQUEST, message=message)
            )
        except EngineError as exc:
            await self._send(
                outbox,
                JobError(request_id=request_id, code=exc.code, message=exc.message, param=exc.param),
            )
        except websockets.ConnectionClosed:
            cancel.set()
        except Exception as exc:
            log.exception("request %s failed", request_id)
            await self._send(
                outbox,
                JobError(request_id=request_id, code=ErrorCode.INTERNAL_ERROR, message=_describe(exc)[:4000]),
            )

    async def _drain(self, outbox: Outbox) -> None:
        """Stop taking jobs and let the ones in flight finish, up to the grace period."""
        self._draining = True
        await self._send(outbox, Draining())
        tasks = [task for task, _ in self._jobs.values()]
        if not tasks:
            return
        log.info(
            "shutting down: waiting up to %g s for %d request(s) in flight", self.shutdown_grace, len(tasks)
        )
        _, pending = await asyncio.wait(tasks, timeout=self.shutdown_grace)
        if pending:
            log.warning("shutting down: cancelling %d request(s) still running after the grace", len(pending))
            for _, cancel in list(self._jobs.values()):
                cancel.set()
            await asyncio.wait(pending, timeout=5)

    async def _send_output(self, outbox: Outbox, frame: Chunk | Delta | ResultPart | Result) -> None:
        """Send a frame of a request's output; OutputTooLarge if the queen would refuse it."""
        text = encode(frame)
        size = encoded_size(text)
        if size > self.send_limit:
            raise OutputTooLarge(frame.type, size, self.send_limit)
        await self._send_text(outbox, text, frame.type)

    @classmethod
    async def _send(cls, outbox: Outbox, frame: Frame) -> None:
        """Send a control frame (bounded in size: smaller than any limit a queen may state)."""
        await cls._send_text(outbox, encode(frame), frame.__class__.__name__)

    @staticmethod
    async def _send_text(outbox: Outbox, text: str, kind: str) -> None:
        try:
            await outbox.send(text)
        except websockets.ConnectionClosed:
            log.debug("could not send %s: the connection is closed", kind)


def _job_request_id(message: str | bytes) -> str | None:
    """The request id of a job frame that failed to decode, if it can be read and is a valid id."""
    try:
        data = json.loads(message)
    except (ValueError, RecursionError):
        return None
    if not isinstance(data, dict) or data.get("type") != "job":
        return None
    request_id = data.get("request_id")
    if not isinstance(request_id, str):
        return None
    try:
        # The protocol's own rule for ids: short, printable.
        JobError(request_id=request_id, code=ErrorCode.INVALID_REQUEST, message="")
    except ValidationError:
        return None
    return request_id
