"""The data path of one client request: pick a worker, forward the job, relay the answer, record it.

Failures before the first output are retried on another worker; after it, a stream ends with an error
event (never silently). Every request ends with exactly one RequestRecord for the observers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from protocol import Chunk, ErrorCode, Job, JobError, Result, is_client_error
from queenbee.errors import QueenError, UpstreamError, UpstreamTimeout, from_job_error
from queenbee.hive import Hive
from queenbee.observer import Outcome, RequestObserver, RequestRecord
from queenbee.settings import QueenSettings
from queenbee.streaming import SSE_DONE, SSE_HEADERS, sse_event
from queenbee.worker_session import RequestEvent, RequestStream, WorkerGone, WorkerSession

log = logging.getLogger("queenbee.forwarding")


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI endpoint the queen forwards, and the names its response objects carry."""

    path: str
    object_name: str
    chunk_object: str
    id_prefix: str
    embeddings: bool = False
    """Served only by workers that run the model with embeddings; its answers carry no id or created."""


CHAT_COMPLETIONS = Endpoint("/v1/chat/completions", "chat.completion", "chat.completion.chunk", "chatcmpl-")
COMPLETIONS = Endpoint("/v1/completions", "text_completion", "text_completion", "cmpl-")
EMBEDDINGS = Endpoint("/v1/embeddings", "list", "list", "embd-", embeddings=True)


@dataclass
class Attempt:
    """A request running on one worker, with the first event it produced."""

    worker: WorkerSession
    stream: RequestStream
    first: Chunk | Result
    first_at: float


@dataclass
class ForwardedCall:
    """One client call, from the validated body to its last byte."""

    hive: Hive
    settings: QueenSettings
    observer: RequestObserver
    endpoint: Endpoint
    model: str
    body: dict[str, Any]
    """The validated OpenAI request body, as sent to the worker."""
    stream: bool = False
    include_usage: bool = False
    api_key_id: str | None = None
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    attempts: int = 0
    fingerprint: str | None = None
    """The worker's system_fingerprint, as its last chunk gave it (for the usage chunk)."""
    _recorded: bool = False

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"{self.endpoint.id_prefix}{uuid.uuid4().hex}"

    @property
    def deadline(self) -> float:
        """Monotonic time by which the whole request must end."""
        return self.started + self.settings.request_timeout

    def remaining(self) -> float:
        """Seconds left before the request deadline."""
        return max(0.0, self.deadline - time.monotonic())

    async def respond(self, request: Request) -> Response:
        """Run the call and build the client's response (a stream or a JSON body)."""
        try:
            attempt = await self.start()
        except QueenError as exc:
            await self.record("error", exc.status, error_code=exc.code)
            raise
        if self.stream:
            return StreamingResponse(self.relay(attempt), media_type="text/event-stream", headers=SSE_HEADERS)
        return await self.whole(attempt, request)

    async def start(self) -> Attempt:
        """Run the job on a worker until it produces its first event, retrying on worker failures."""
        job = Job(request_id=self.request_id, openai_url=self.endpoint.path, openai_req=self.body)
        tried: set[str] = set()
        last_error: QueenError = UpstreamError("No worker could run the request.")
        for _ in range(self.settings.max_attempts):
            try:
                worker, stream = await self.hive.acquire(
                    self.model, self.request_id, exclude=frozenset(tried), embeddings=self.endpoint.embeddings
                )
            except QueenError:
                if not tried:
                    raise
                # Nowhere left to retry: the client should learn what went wrong, not that nobody is free.
                raise last_error from None
            tried.add(worker.id)
            self.attempts += 1
            await worker.send_job(job)
            # A streamed answer must start within the first-token deadline; a whole answer only comes at
            # the end, so it has the rest of the request's time (heartbeats still catch a dead worker).
            timeout = (
                min(self.settings.first_token_timeout, self.remaining()) if self.stream else self.remaining()
            )
            try:
                event = await stream.next(timeout)
            except TimeoutError:
                worker.cancel(self.request_id)
                worker.health.record_failure(time.monotonic())
                last_error = UpstreamTimeout(f"The worker sent nothing for {timeout:g} s.")
                log.warning(
                    "request %s: worker %s timed out before its first output", self.request_id, worker.id
                )
                if self.remaining() <= 0:
                    break
                continue
            if isinstance(event, Chunk | Result):
                return Attempt(worker, stream, event, time.monotonic())
            if isinstance(event, JobError) and is_client_error(event.code):
                raise from_job_error(event.code, event.message, event.param)
            if not (isinstance(event, JobError) and event.code is ErrorCode.OVERLOADED):
                # A full or draining worker did nothing wrong: try another without holding it against it.
                worker.health.record_failure(time.monotonic())
            last_error = worker_failure(event)
            log.warning(
                "request %s: worker %s failed before its first output (attempt %d): %s",
                self.request_id,
                worker.id,
                self.attempts,
                last_error.message,
            )
        raise last_error

    def chunk(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A worker's chunk with the queen's identity fields."""
        self.fingerprint = payload.get("system_fingerprint", self.fingerprint)
        chunk = {
            **payload,
            "id": self.request_id,
            "object": self.endpoint.chunk_object,
            "created": self.created,
            "model": self.model,
        }
        if self.include_usage:
            chunk.setdefault("usage", None)
        return chunk

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        """The last chunk of a stream when stream_options.include_usage is set."""
        return {
            "id": self.request_id,
            "object": self.endpoint.chunk_object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [],
            "usage": result.usage.model_dump(),
        }

    def completion(self, result: Result) -> dict[str, Any]:
        """The worker's whole response with the queen's identity fields."""
        response = result.response or {}
        if self.endpoint.embeddings:
            usage = result.usage
            return {
                **response,
                "object": self.endpoint.object_name,
                "model": self.model,
                "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.total_tokens},
            }
        return {
            **response,
            "id": self.request_id,
            "object": self.endpoint.object_name,
            "created": self.created,
            "model": self.model,
            "usage": result.usage.model_dump(),
        }

    async def record(
        self,
        outcome: Outcome,
        status: int,
        *,
        attempt: Attempt | None = None,
        result: Result | None = None,
        error_code: str | None = None,
    ) -> None:
        """Tell the observers how the request ended (once)."""
        if self._recorded:
            return
        self._recorded = True
        worker = attempt.worker if attempt is not None else None
        record = RequestRecord(
            request_id=self.request_id,
            path=self.endpoint.path,
            model=self.model,
            started_at=self.started_at,
            outcome=outcome,
            status=status,
            api_key_id=self.api_key_id,
            worker_id=worker.id if worker is not None else None,
            ln_url=worker.registration.ln_url if worker is not None else None,
            prompt_tokens=result.usage.prompt_tokens if result is not None else 0,
            completion_tokens=result.usage.completion_tokens if result is not None else 0,
            ttft=self._ttft(attempt),
            duration=time.monotonic() - self.started,
            attempts=self.attempts,
            error_code=error_code,
            streamed=self.stream,
        )
        await self.observer.request_finished(record)

    def _ttft(self, attempt: Attempt | None) -> float | None:
        """Time to the worker's first output; unknown for whole answers, which arrive in one piece."""
        if attempt is None or not self.stream:
            return None
        return attempt.first_at - self.started

    async def succeeded(self, attempt: Attempt, result: Result) -> None:
        """Credit the worker with a good request and record it."""
        attempt.worker.health.record_success()
        # An embedding has no first token nor generation speed: timing it would skew the worker's.
        if not self.endpoint.embeddings:
            self.hive.record_speed(
                attempt.worker,
                self.model,
                ttft=self._ttft(attempt),
                tokens=result.usage.completion_tokens,
                duration=time.monotonic() - self.started,
            )
        await self.record("success", 200, attempt=attempt, result=result)

    async def failed(self, attempt: Attempt, event: RequestEvent, error: QueenError) -> None:
        """Hold a failure against the worker unless the client caused it, and record it."""
        if not (isinstance(event, JobError) and is_client_error(event.code)):
            attempt.worker.health.record_failure(time.monotonic())
        await self.record("error", error.status, attempt=attempt, error_code=error.code)

    async def relay(self, attempt: Attempt) -> AsyncIterator[bytes]:
        """The SSE stream: the worker's chunks as they arrive, then usage and [DONE]; errors end it."""
        event: RequestEvent = attempt.first
        try:
            while True:
                if isinstance(event, Chunk):
                    yield sse_event(self.chunk(event.chunk))
                elif isinstance(event, Result):
                    await self.succeeded(attempt, event)
                    if self.include_usage:
                        yield sse_event(self.usage_chunk(event))
                    yield SSE_DONE
                    return
                else:
                    error = worker_failure(event)
                    log.warning("request %s: stream ended with an error: %s", self.request_id, error.message)
                    await self.failed(attempt, event, error)
                    yield sse_event(error.body())
                    yield SSE_DONE
                    return
                timeout = min(self.settings.token_timeout, self.remaining())
                try:
                    event = await attempt.stream.next(timeout)
                except TimeoutError:
                    attempt.worker.cancel(self.request_id)
                    error = UpstreamTimeout(f"The worker stopped sending output for {timeout:g} s.")
                    event = WorkerGone(error.message)
                    log.warning("request %s: %s", self.request_id, error.message)
                    await self.failed(attempt, event, error)
                    yield sse_event(error.body())
                    yield SSE_DONE
                    return
        finally:
            if not self._recorded:
                # The client went away mid-stream: free the worker's slot, and record the cancellation
                # from a task of its own, since this one is being cancelled.
                log.info(
                    "request %s: client disconnected; cancelling on worker %s",
                    self.request_id,
                    attempt.worker.id,
                )
                attempt.worker.cancel(self.request_id)
                self._record_soon("cancelled", 499, attempt)

    async def whole(self, attempt: Attempt, request: Request) -> Response:
        """Wait for the worker's whole answer, cancelling it if the client disconnects first."""
        event: RequestEvent = attempt.first
        try:
            while isinstance(
                event, Chunk
            ):  # a worker may stream even a non-streamed request: skip to the end
                event = await self._next_or_disconnect(attempt, request)
        except asyncio.CancelledError:
            self._record_soon("cancelled", 499, attempt)
            raise
        except QueenError as exc:
            await self.failed(attempt, WorkerGone(exc.message), exc)
            raise
        if isinstance(event, Result) and event.response is not None:
            await self.succeeded(attempt, event)
            return JSONResponse(self.completion(event))
        error = (
            UpstreamError("The worker ended the request without a response.")
            if isinstance(event, Result)
            else worker_failure(event)
        )
        await self.failed(attempt, event, error)
        raise error

    def _record_soon(self, outcome: Outcome, status: int, attempt: Attempt) -> None:
        self.hive.spawn(self.record(outcome, status, attempt=attempt))

    async def _next_or_disconnect(self, attempt: Attempt, request: Request) -> RequestEvent:
        timeout = min(self.settings.token_timeout, self.remaining())
        next_event = asyncio.ensure_future(attempt.stream.next(timeout))
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({next_event, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not next_event.done():
                next_event.cancel()
                attempt.worker.cancel(self.request_id)
        if not next_event.done() or next_event.cancelled():
            raise asyncio.CancelledError("client disconnected")
        try:
            return next_event.result()
        except TimeoutError:
            attempt.worker.cancel(self.request_id)
            raise UpstreamTimeout(f"The worker stopped answering for {timeout:g} s.") from None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def worker_failure(event: RequestEvent) -> QueenError:
    """The client-facing error for a worker's failure event."""
    if isinstance(event, WorkerGone):
        return UpstreamError(f"The worker went away: {event.reason}.")
    if isinstance(event, JobError):
        return from_job_error(event.code, event.message, event.param)
    return UpstreamError("The worker sent an unexpected frame.")
