"""One connected worker: its registration, the requests it is running, and the reader of its socket.

A single reader task owns the websocket's receiving side and hands each frame to the request it belongs
to, through one queue per request. Senders share the socket under a lock.

What a worker can make the queen hold is bounded per request: chunks waiting for a client that does not
read (`max_buffer_bytes`) and the parts of a whole response (`max_response_bytes`). Past either bound
the request is cancelled on the worker and ends with `BufferOverflow`; its later frames are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.types import Message
from starlette.websockets import WebSocketDisconnect

from protocol import (
    Batch,
    CacheSummary,
    Cancel,
    Chunk,
    Delta,
    Draining,
    ErrorCode,
    FrameError,
    Job,
    JobError,
    ProtocolError,
    Register,
    Result,
    ResultPart,
    WorkerFrame,
    decode_worker_frame,
    encode,
)
from protocol.messages import BatchedFrame, Frame

log = logging.getLogger("queenbee.worker_session")


class FrameSocket(Protocol):
    """What a session needs of its connection: Starlette's WebSocket, or another replica's link to a
    worker connected there (queenbee/remote_worker.py)."""

    async def send_text(self, data: str) -> None:
        """Send one text frame."""

    async def receive(self) -> Message:
        """The next ASGI websocket message."""

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Close the connection."""


@dataclass(frozen=True)
class WorkerGone:
    """Put on a request's queue when its worker disconnected or was dropped."""

    reason: str


@dataclass(frozen=True)
class BufferOverflow:
    """Put on a request's queue when the worker sent more than the queen holds for it."""

    reason: str


RequestEvent = Chunk | Delta | Result | JobError | WorkerGone | BufferOverflow


class RequestStream:
    """The frames of one request, in order, as the worker sends them, and how many bytes wait unread."""

    def __init__(self, request_id: str, model: str) -> None:
        self.request_id = request_id
        self.model = model
        self.started = time.monotonic()
        self.slots = 1
        """Slots of its worker the request holds: one per sequence it generates at once."""
        self.buffered_bytes = 0
        """Bytes of chunks delivered and not yet taken by `next`."""
        self.parts: list[str] = []
        """ResultPart data received so far (a whole response too big for one frame)."""
        self.part_bytes = 0
        self.on_overflow: Callable[[], None] | None = None
        """Called once when the request overflows its buffer (the client stopped reading)."""
        self.overflowed = False
        """The request overflowed its buffer: the queen stopped holding its output."""
        self._queue: asyncio.Queue[tuple[RequestEvent, int]] = asyncio.Queue()
        self.on_event: Callable[[RequestEvent], None] | None = None
        """Takes every event as it comes, instead of `next` (a job relayed for another replica)."""

    def put(self, event: RequestEvent, size: int = 0) -> None:
        """Deliver an event of `size` bytes on the wire (called by the session's reader)."""
        if self.on_event is not None:
            self.on_event(event)
            return
        self.buffered_bytes += size
        self._queue.put_nowait((event, size))

    async def next(self, timeout: float) -> RequestEvent:
        """The next event; raises TimeoutError if none comes within `timeout` seconds."""
        if self._queue.empty():
            async with asyncio.timeout(timeout):
                event, size = await self._queue.get()
        else:  # already here: no timer to arm
            event, size = self._queue.get_nowait()
        self.buffered_bytes -= size
        return event

    def next_nowait(self) -> RequestEvent | None:
        """The next event if one is already here, else None."""
        if self._queue.empty():
            return None
        event, size = self._queue.get_nowait()
        self.buffered_bytes -= size
        return event


@dataclass
class ModelSpeed:
    """The queen's own measurements of a worker on one model, as exponential moving averages."""

    ttft: float | None = None
    tokens_per_second: float | None = None
    samples: int = 0

    def record(self, ttft: float | None, tokens: int, duration: float, alpha: float = 0.3) -> None:
        """Fold one finished request into the averages."""
        if ttft is not None:
            self.ttft = ttft if self.ttft is None else (1 - alpha) * self.ttft + alpha * ttft
        generating = duration - (ttft or 0.0)
        if tokens > 1 and generating > 0:
            tps = (tokens - 1) / generating
            self.tokens_per_second = (
                tps if self.tokens_per_second is None else (1 - alpha) * self.tokens_per_second + alpha * tps
            )
        self.samples += 1


@dataclass
class WorkerHealth:
    """Failures that count against a worker, and the bench it sits on after too many."""

    consecutive_failures: int = 0
    benched_until: float = 0.0
    bench_count: int = 0

    def benched(self, now: float) -> bool:
        """Whether the worker is out of rotation at `now` (monotonic seconds)."""
        return now < self.benched_until

    def record_success(self) -> None:
        """A request went well: the failure streak is over."""
        self.consecutive_failures = 0

    def bench(self, now: float, *, base: float = 5.0, cap: float = 300.0) -> None:
        """Take the worker out of rotation now, for longer each time (a proven misdeed, not a streak)."""
        self.benched_until = now + min(cap, base * 2**self.bench_count)
        self.bench_count += 1
        self.consecutive_failures = 0

    def record_failure(
        self, now: float, *, threshold: int = 3, base: float = 5.0, cap: float = 300.0
    ) -> bool:
        """A request failed through the worker's fault; returns True if that benched the worker.

        After `threshold` failures in a row the worker sits out `base` seconds, doubling with every
        bench up to `cap`, like outlier ejection in service meshes.
        """
        self.consecutive_failures += 1
        if self.consecutive_failures < threshold:
            return False
        self.benched_until = now + min(cap, base * 2**self.bench_count)
        self.bench_count += 1
        self.consecutive_failures = 0
        return True


class WorkerSession:
    """A registered worker connection and the requests in flight on it."""

    def __init__(
        self,
        worker_id: str,
        websocket: FrameSocket,
        registration: Register,
        *,
        on_slot_free: Callable[[WorkerSession], None],
        on_cache_summary: Callable[[WorkerSession, CacheSummary], None] | None = None,
        cancel_grace: float,
        max_frame_bytes: int,
        max_buffer_bytes: int = 4 * 2**20,
        max_response_bytes: int = 64 * 2**20,
        health: WorkerHealth | None = None,
    ) -> None:
        self.id = worker_id
        self.registration = registration
        self.identity = registration.instance_id
        """Who the worker is across reconnections: retries and health records go by this, not `id`."""
        self.models = frozenset(model.id for model in registration.models)
        self.n_ctx = {model.id: model.n_ctx for model in registration.models}
        self.model_hashes = {model.id: model.sha256 for model in registration.models}
        """Each model's content hash as the worker reported it (None: unknown, never resumed onto)."""
        self.parallel = registration.parallel
        self.replica: str | None = None
        """None for a worker connected to this queen; else the replica of the hive it is connected to."""
        self.connected_at = time.time()
        self.speed: dict[str, ModelSpeed] = {}
        self.health = health if health is not None else WorkerHealth()
        self.closed = False
        self.draining = False
        self.draining_since: float | None = None
        """Monotonic time the worker said it is shutting down: its streams move on after a grace."""
        self._websocket = websocket
        self._send_lock = asyncio.Lock()
        self._pending: dict[str, RequestStream] = {}
        self._slots_held = 0
        """Slots the requests in `_pending` hold, together."""
        self._cancelling: dict[str, asyncio.TimerHandle] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._on_slot_free = on_slot_free
        self._on_cache_summary = on_cache_summary
        self._cancel_grace = cancel_grace
        self._max_frame_bytes = max_frame_bytes
        self._max_buffer_bytes = max_buffer_bytes
        self._max_response_bytes = max_response_bytes

    @property
    def max_job_bytes(self) -> int:
        """Largest job frame this worker accepts, as it registered."""
        return self.registration.max_frame_bytes

    @property
    def in_flight(self) -> int:
        """Slots held by requests on this worker, including ones being cancelled (a request with n
        choices holds n)."""
        return self._slots_held

    @property
    def held_here(self) -> int:
        """Slots held by this queen's own requests (`in_flight` of a remote worker counts others' too)."""
        return self._slots_held

    @property
    def free_slots(self) -> int:
        """Slots that can take a new request now."""
        if self.closed or self.draining:
            return 0
        return max(0, self.parallel - self._slots_held)

    def can_take(self, slots: int = 1) -> bool:
        """Whether `slots` are free now."""
        return self.free_slots >= slots

    def reserve(self, request_id: str, model: str, slots: int = 1) -> RequestStream:
        """Take `slots` for a request (one per sequence it generates at once); synchronous so that
        choosing and reserving cannot interleave."""
        if not self.can_take(slots):
            raise RuntimeError(f"worker {self.id} has fewer than {slots} free slots")
        stream = RequestStream(request_id, model)
        stream.slots = slots
        self._pending[request_id] = stream
        self._slots_held += stream.slots
        return stream

    def release(self, request_id: str) -> None:
        """Give back a reserved slot whose job was never sent."""
        self._finish(request_id, None)

    async def send_job(self, job: Job | str, request_id: str | None = None) -> None:
        """Send a job (a frame, or its encoded text) for a reserved slot; a send failure reads as gone."""
        request_id = request_id or (job.request_id if isinstance(job, Job) else "")
        try:
            if isinstance(job, str):
                async with self._send_lock:
                    await self._websocket.send_text(job)
            else:
                await self.send(job)
        except Exception as exc:  # the socket is broken: the reader will clean up the rest
            self._finish(request_id, WorkerGone(f"could not send to worker: {exc!r}"))

    def cancel(self, request_id: str) -> None:
        """Ask the worker to stop a request; its slot is freed when the worker confirms, or after a grace.

        Synchronous, so it can run in cleanup code whose task is being cancelled: the send happens in a
        task of its own.
        """
        if request_id not in self._pending or request_id in self._cancelling:
            return
        loop = asyncio.get_running_loop()
        self._cancelling[request_id] = loop.call_later(
            self._cancel_grace, self._finish, request_id, WorkerGone("cancel was not confirmed in time")
        )
        task = loop.create_task(self._send_quietly(Cancel(request_id=request_id)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run_reader(self) -> str:
        """Receive frames until the worker goes away; returns why it ended."""
        reason = "worker disconnected"
        try:
            while True:
                message = await self._websocket.receive()
                if message["type"] == "websocket.disconnect":
                    code = message.get("code")
                    reason = f"worker disconnected (code {code})"
                    break
                data = message.get("text")
                if data is None:
                    data = message.get("bytes") or b""
                await self._handle(data)
        except WebSocketDisconnect as exc:
            reason = f"worker disconnected (code {exc.code})"
        except Exception as exc:
            reason = f"worker connection failed: {exc!r}"
        finally:
            self.fail_all(reason)
        return reason

    def fail_all(self, reason: str) -> None:
        """End every request in flight with WorkerGone (the worker is not coming back)."""
        self.closed = True
        for request_id in list(self._pending):
            self._finish(request_id, WorkerGone(reason))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close the socket."""
        self.closed = True
        try:
            await self._websocket.close(code=code, reason=reason)
        except Exception:
            log.debug("closing worker %s failed; it was already gone", self.id)

    async def _handle(self, data: str | bytes) -> None:
        try:
            frame = decode_worker_frame(data, limit=self._max_frame_bytes)
        except FrameError as exc:
            log.warning("worker %s sent a bad frame: %s", self.id, exc.message)
            await self._send_quietly(ProtocolError(code=exc.code, message=exc.message))
            return
        if isinstance(frame, Batch):
            # Each frame is charged its share of the message against its client's buffer.
            share = -(-len(data) // len(frame.frames))
            replies = [self._dispatch(inner, share) for inner in frame.frames]
        else:
            replies = [self._dispatch(frame, len(data))]
        for reply in replies:
            if reply is not None:
                await self._send_quietly(reply)

    def _dispatch(self, frame: WorkerFrame | BatchedFrame, size: int) -> ProtocolError | None:
        """Act on one frame of the worker's (`size`: its bytes on the wire); what to answer, if anything."""
        if isinstance(frame, Delta | Chunk):
            stream = self._pending.get(frame.request_id)
            if stream is not None and frame.request_id not in self._cancelling:
                if stream.buffered_bytes + size > self._max_buffer_bytes:
                    self._overflow(stream, f"more than {self._max_buffer_bytes} bytes waited for the client")
                else:
                    stream.put(frame, size)
        elif isinstance(frame, ResultPart):
            stream = self._pending.get(frame.request_id)
            if stream is not None and frame.request_id not in self._cancelling:
                stream.part_bytes += len(frame.data)
                if stream.part_bytes > self._max_response_bytes:
                    self._overflow(stream, f"the response exceeds {self._max_response_bytes} bytes")
                else:
                    stream.parts.append(frame.data)
        elif isinstance(frame, Result | JobError):
            self._finish(frame.request_id, frame)
        elif isinstance(frame, CacheSummary):
            if self._on_cache_summary is not None:
                self._on_cache_summary(self, frame)
        elif isinstance(frame, Draining):
            log.info("worker %s is shutting down: no new requests go to it", self.id)
            self.draining = True
            if self.draining_since is None:
                self.draining_since = time.monotonic()
        elif isinstance(frame, ProtocolError):
            log.warning("worker %s reports a protocol error: %s: %s", self.id, frame.code, frame.message)
        else:
            message = f"unexpected {frame.type!r} frame after registration"
            log.warning("worker %s sent an %s", self.id, message)
            return ProtocolError(code=ErrorCode.INVALID_FRAME, message=message)
        return None

    def _overflow(self, stream: RequestStream, reason: str) -> None:
        """Stop holding a request's output: cancel it on the worker and tell its consumer why."""
        log.warning("request %s on worker %s: %s; cancelling it", stream.request_id, self.id, reason)
        stream.parts.clear()
        stream.overflowed = True
        stream.put(BufferOverflow(reason))
        self.cancel(stream.request_id)
        if stream.on_overflow is not None:
            stream.on_overflow()

    def _finish(self, request_id: str, event: RequestEvent | None) -> None:
        stream = self._pending.pop(request_id, None)
        timer = self._cancelling.pop(request_id, None)
        if timer is not None:
            timer.cancel()
        if stream is None:
            return
        self._slots_held -= stream.slots
        if event is not None:
            # Also after a cancel: whoever settles the request's usage reads the worker's last word.
            stream.put(event)
        self._on_slot_free(self)

    async def send(self, frame: Frame) -> None:
        """Send one frame to the worker (frames never interleave)."""
        async with self._send_lock:
            await self._websocket.send_text(encode(frame))

    async def _send_quietly(self, frame: Frame) -> None:
        try:
            await self.send(frame)
        except Exception:
            log.debug("could not send %s to worker %s", frame.__class__.__name__, self.id)
