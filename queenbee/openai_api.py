"""The OpenAI-compatible HTTP edge: request validation, routing to a worker, relaying the answer."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from protocol import Chunk, Job, JobError, Result, is_client_error
from protocol.openai import CHAT_COMPLETIONS_PATH, ChatCompletionRequest, unsupported_parameter
from queenbee.errors import InvalidRequest, QueenError, UpstreamError, UpstreamTimeout, from_job_error
from queenbee.hive import Hive
from queenbee.settings import QueenSettings
from queenbee.streaming import SSE_DONE, SSE_HEADERS, sse_event
from queenbee.worker_session import ModelSpeed, RequestEvent, RequestStream, WorkerGone, WorkerSession

log = logging.getLogger("queenbee.requests")


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest saying what is wrong with it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequest(f"The request body exceeds {max_bytes} bytes.")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise InvalidRequest(f"The request body exceeds {max_bytes} bytes.")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _param_of(loc: tuple[str | int, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in {"str", "list[TextPart]", "function-after[_content_required(), ChatMessage]"}:
            continue
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts)


def parse_chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """Validate a chat completion body into the shared request model, or raise a 400 naming the field."""
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param_of(first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = f"Invalid value for '{param}': {first['msg']}" if param else first["msg"]
        raise InvalidRequest(message, param=param) from None
    refused = unsupported_parameter(chat)
    if refused is not None:
        name, reason = refused
        raise InvalidRequest(f"Unsupported parameter '{name}': {reason}.", param=name)
    return chat


@dataclass
class Attempt:
    """A request running on one worker, with the first event it produced."""

    worker: WorkerSession
    stream: RequestStream
    first: Chunk | Result
    first_at: float


@dataclass
class ChatCall:
    """One client call of /v1/chat/completions, from validation to its last byte."""

    hive: Hive
    settings: QueenSettings
    chat: ChatCompletionRequest
    request_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)

    @property
    def deadline(self) -> float:
        """Monotonic time by which the whole request must end."""
        return self.started + self.settings.request_timeout

    def remaining(self) -> float:
        """Seconds left before the request deadline."""
        return max(0.0, self.deadline - time.monotonic())

    async def start(self) -> Attempt:
        """Run the job on a worker until it produces its first event, retrying on worker failures."""
        job = Job(
            request_id=self.request_id,
            openai_url=CHAT_COMPLETIONS_PATH,
            openai_req=self.chat.model_dump(mode="json", exclude_unset=True, by_alias=True),
        )
        tried: set[str] = set()
        last_error: QueenError = UpstreamError("No worker could run the request.")
        for attempt in range(self.settings.max_attempts):
            worker, stream = await self.hive.acquire(
                self.chat.model, self.request_id, exclude=frozenset(tried)
            )
            tried.add(worker.id)
            await worker.send_job(job)
            timeout = min(self.settings.first_token_timeout, self.remaining())
            try:
                event = await stream.next(timeout)
            except TimeoutError:
                worker.cancel(self.request_id)
                worker.health.record_failure(time.monotonic())
                last_error = UpstreamTimeout(f"The worker sent nothing for {timeout:g} s.")
                log.warning(
                    "request %s: worker %s timed out before the first token", self.request_id, worker.id
                )
                if self.remaining() <= 0:
                    break
                continue
            if isinstance(event, Chunk | Result):
                return Attempt(worker, stream, event, time.monotonic())
            if isinstance(event, JobError) and is_client_error(event.code):
                raise from_job_error(event.code, event.message, event.param)
            worker.health.record_failure(time.monotonic())
            last_error = _worker_failure(event)
            log.warning(
                "request %s: worker %s failed before the first token (attempt %d): %s",
                self.request_id,
                worker.id,
                attempt + 1,
                last_error.message,
            )
        raise last_error

    def chunk(self, payload: dict[str, Any]) -> dict[str, Any]:
        """A worker's chunk with the queen's identity fields."""
        chunk = {
            **payload,
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.chat.model,
        }
        if self.chat.include_usage:
            chunk.setdefault("usage", None)
        return chunk

    def usage_chunk(self, result: Result) -> dict[str, Any]:
        """The last chunk of a stream when stream_options.include_usage is set."""
        return {
            "id": self.request_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.chat.model,
            "system_fingerprint": None,
            "choices": [],
            "usage": result.usage.model_dump(),
        }

    def completion(self, result: Result) -> dict[str, Any]:
        """The worker's whole response with the queen's identity fields."""
        response = result.response or {}
        return {
            **response,
            "id": self.request_id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.chat.model,
            "usage": result.usage.model_dump(),
        }

    def finished(self, attempt: Attempt, result: Result) -> None:
        """Credit the worker with a good request and log it."""
        duration = time.monotonic() - self.started
        ttft = attempt.first_at - self.started
        attempt.worker.health.record_success()
        attempt.worker.speed.setdefault(self.chat.model, ModelSpeed()).record(
            ttft, result.usage.completion_tokens, duration
        )
        log.info(
            "request %s model=%s worker=%s prompt_tokens=%d completion_tokens=%d ttft=%.3fs duration=%.3fs",
            self.request_id,
            self.chat.model,
            attempt.worker.id,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            ttft,
            duration,
        )

    async def relay(self, attempt: Attempt) -> AsyncIterator[bytes]:
        """The SSE stream: the worker's chunks as they arrive, then usage and [DONE]; errors end it."""
        event: RequestEvent = attempt.first
        done = False
        try:
            while True:
                if isinstance(event, Chunk):
                    yield sse_event(self.chunk(event.chunk))
                elif isinstance(event, Result):
                    done = True
                    self.finished(attempt, event)
                    if self.chat.include_usage:
                        yield sse_event(self.usage_chunk(event))
                    yield SSE_DONE
                    return
                else:
                    done = True
                    error = _worker_failure(event)
                    if not (isinstance(event, JobError) and is_client_error(event.code)):
                        attempt.worker.health.record_failure(time.monotonic())
                    log.warning("request %s: stream ended with an error: %s", self.request_id, error.message)
                    yield sse_event(error.body())
                    yield SSE_DONE
                    return
                timeout = min(self.settings.token_timeout, self.remaining())
                try:
                    event = await attempt.stream.next(timeout)
                except TimeoutError:
                    done = True
                    attempt.worker.cancel(self.request_id)
                    attempt.worker.health.record_failure(time.monotonic())
                    error = UpstreamTimeout(f"The worker stopped sending tokens for {timeout:g} s.")
                    log.warning("request %s: %s", self.request_id, error.message)
                    yield sse_event(error.body())
                    yield SSE_DONE
                    return
        finally:
            if not done:
                # The client went away mid-stream: free the worker's slot.
                log.info(
                    "request %s: client disconnected; cancelling on worker %s",
                    self.request_id,
                    attempt.worker.id,
                )
                attempt.worker.cancel(self.request_id)

    async def whole(self, attempt: Attempt, request: Request) -> Response:
        """Wait for the worker's whole answer, cancelling it if the client disconnects first."""
        event: RequestEvent = attempt.first
        while isinstance(event, Chunk):  # a worker may stream even a non-streamed request; skip to the end
            event = await self._next_or_disconnect(attempt, request)
        if isinstance(event, Result) and event.response is not None:
            self.finished(attempt, event)
            return JSONResponse(self.completion(event))
        if isinstance(event, Result):
            attempt.worker.health.record_failure(time.monotonic())
            raise UpstreamError("The worker ended the request without a response.")
        if not (isinstance(event, JobError) and is_client_error(event.code)):
            attempt.worker.health.record_failure(time.monotonic())
        raise _worker_failure(event)

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
            attempt.worker.health.record_failure(time.monotonic())
            raise UpstreamTimeout(f"The worker stopped answering for {timeout:g} s.") from None


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _worker_failure(event: RequestEvent) -> QueenError:
    if isinstance(event, WorkerGone):
        return UpstreamError(f"The worker went away: {event.reason}.")
    if isinstance(event, JobError):
        return from_job_error(event.code, event.message, event.param)
    return UpstreamError("The worker sent an unexpected frame.")


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    hive: Hive = request.state.hive
    settings: QueenSettings = request.state.settings
    body = await read_json(request, settings.max_body_bytes)
    call = ChatCall(hive, settings, parse_chat_request(body))
    attempt = await call.start()
    if call.chat.stream:
        return StreamingResponse(call.relay(attempt), media_type="text/event-stream", headers=SSE_HEADERS)
    return await call.whole(attempt, request)


async def list_models(request: Request) -> Response:
    """GET /v1/models: what connected workers serve, in OpenAI's list shape."""
    hive: Hive = request.state.hive
    data = [{"id": model, "object": "model", "created": 0, "owned_by": "queenbee"} for model in hive.models()]
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> Response:
    """GET /health: the queen is up; how many workers and models it has."""
    hive: Hive = request.state.hive
    return JSONResponse({"status": "ok", "workers": len(hive.workers), "models": hive.models()})
