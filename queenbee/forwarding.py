"""The data path of one client request: pick a worker, forward the job, relay the answer, record it.

One loop over attempts: a worker that fails before its first output is replaced by another, never the
same one twice (by identity, so a worker that reconnects is still the one that failed); one that dies,
goes silent past the token deadline or fails after output is replaced too, by a worker serving the same
model file (by content hash), which resumes the answer from the token ids behind the chunks already
relayed (`protocol.Resume`), so that the client sees one unbroken stream. Only when no such worker is
left, or `max_resumes` is spent, or the deadline passes, does a stream end with an error event (never
silently). A job is only sent to workers whose frame limit it fits.

How the answer reaches the client is the call's `Presenter`: chat chunks and chat responses as they
are (`ChatPresenter`, for the OpenAI endpoints), or translated into another API's events and objects
(queenbee/api/): the relay loop, its retries and its records are the same for every API.

Every request ends with exactly one RequestRecord for the observers, however it ends: a client that
leaves mid-stream is billed for what was relayed while the worker is credited for what it generated
(its cancel confirmation says how much), and the usage a worker reports is checked against bounds
from the request and the answer (`usage_check`) before anyone is credited or billed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

from starlette.requests import Request
from starlette.responses import Response

from protocol import (
    Chunk,
    CompletionJob,
    Delta,
    ErrorCode,
    FrameError,
    Job,
    JobError,
    PromptTokensDetails,
    Result,
    Resume,
    Usage,
    assemble_response,
    encode,
    encoded_size,
    is_client_error,
)
from protocol.openai import ChatCompletionRequest, CompletionRequest
from queenbee.attempts import Attempt, Failure, Handover, Silent, worker_failure
from queenbee.deltas import DeltaChunks
from queenbee.endpoints import Endpoint, OpenAIRequest
from queenbee.errors import (
    LedgerUnavailable,
    QueenError,
    RequestTooLarge,
    UpstreamError,
    UpstreamTimeout,
    from_job_error,
)
from queenbee.hive import Hive
from queenbee.ledger import LedgerError
from queenbee.observer import Outcome, RequestObserver, RequestRecord, WorkerSegment
from queenbee.prefix_index import PrefixQuery, prefix_query
from queenbee.presenters import ChatPresenter, Presenter
from queenbee.ratelimit import Lease
from queenbee.resume import AnswerSoFar
from queenbee.settings import QueenSettings
from queenbee.streaming import SSE_HEADERS, JsonBody, RelayResponse, StreamEnd
from queenbee.usage_check import UsageBounds, check_usage, counted_by_ids, text_bytes
from queenbee.whole_answers import whole_answer
from queenbee.worker_session import (
    BufferOverflow,
    RequestEvent,
    RequestStream,
    WorkerGone,
    WorkerSession,
)

log = logging.getLogger("queenbee.forwarding")

_WATCH_AFTER = 0.02
"""Seconds a request waits for its answer to begin before a task watches for its client leaving."""

_COALESCE_EVENTS = 64
"""At most this many SSE events that are already waiting are joined into one write to the client."""


@dataclass
class ForwardedCall:
    """One client call, from the validated body to its last byte."""

    hive: Hive
    settings: QueenSettings
    observer: RequestObserver
    endpoint: Endpoint
    model: str
    request: OpenAIRequest
    """The validated request, as the worker runs it."""
    bounds: UsageBounds
    """What the request may use, for checking the worker's usage."""
    stream: bool = False
    include_usage: bool = False
    api_key_id: str | None = None
    lease: Lease | None = None
    """The key's hold on its limits, settled when the request is recorded."""
    presenter: Presenter | None = None
    """How the answer is shown to the client; None: a ChatPresenter. It holds `backref()`."""
    on_delivered: Callable[[ForwardedCall, WorkerSession, Usage, AnswerSoFar], None] | None = None
    """Told of every answer that reached its client whole, after its record (audits sample them)."""
    worker_filter: Callable[[WorkerSession], bool] | None = None
    """Only workers it accepts may run the request (a key whose prompts go to trusted workers only)."""
    request_id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.monotonic)
    started_at: float = field(default_factory=time.time)
    attempts: int = 0
    fingerprint: str | None = None
    """The worker's system_fingerprint, as its last chunk gave it (for the usage chunk)."""
    relayed_tokens: int = 0
    """Completion tokens whose text reached the client (as the chunks carried them, bounded)."""
    relayed_text_bytes: int = 0
    resumes: int = 0
    """Times the answer moved to another worker after output."""
    segments: list[WorkerSegment] = field(default_factory=list)
    """The workers the answer moved away from, with the tokens each is credited for."""
    _tried: set[str] = field(default_factory=set)
    """Identities of the workers tried: none is tried twice."""
    _model_hash: str | None = None
    """Content hash of the first worker's model file: resumes go only to the same file."""
    _so_far: AnswerSoFar = field(default_factory=AnswerSoFar)
    """The token ids the client has, per choice: where a resume starts."""
    _first_at: float | None = None
    _handed_over: bool = False
    """A draining worker's stream was offered to others once (it stays if none took it)."""
    _recorded: bool = False
    _running: tuple[WorkerSession, RequestStream] | None = None
    _client_left: bool = False
    _prefix: PrefixQuery | None = None
    """The request's prefix chain and session, for cache-aware routing (made at the first attempt)."""
    _alone: bool = False
    """The last attempt's worker had no other request when it took this one: its TTFT is its speed."""
    _deltas: DeltaChunks | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"{self.endpoint.id_prefix}{os.urandom(16).hex()}"  # uuid4's entropy, faster
        if self.lease is not None:
            self.lease.handed_over = True
        if self.presenter is None:
            self.presenter = ChatPresenter(self.backref())

    def backref(self) -> ForwardedCall:
        """This call, for what it owns to refer back to without keeping it alive (a weak proxy).

        A presenter that held the call itself would make a reference cycle of the two, and with them
        everything the call holds (its request, stream, lease and answer, some 30 objects) would wait
        for the cyclic garbage collector instead of being freed when the request ends.
        """
        return cast(ForwardedCall, weakref.proxy(self))

    @property
    def shown(self) -> Presenter:
        """The presenter (set by __post_init__)."""
        assert self.presenter is not None
        return self.presenter

    @property
    def deadline(self) -> float:
        """Monotonic time by which the whole request must end."""
        return self.started + self.settings.request_timeout

    def remaining(self) -> float:
        """Seconds left before the request deadline."""
        return max(0.0, self.deadline - time.monotonic())

    async def respond(self, request: Request) -> Response:
        """Run the call and build the client's response (a stream or a JSON body)."""
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        watcher: asyncio.Task[None] | None = None

        def watch() -> None:
            nonlocal watcher
            watcher = loop.create_task(self._cancel_if_client_leaves(request, task))

        # Most answers begin within milliseconds: only a request still waiting then gets a watcher task.
        watch_soon = loop.call_later(_WATCH_AFTER, watch)
        try:
            attempt = await self.start()
        except QueenError as exc:
            try:
                await self.record("error", exc.status, error_code=exc.code)
            except LedgerUnavailable:
                log.error("request %s: its failure could not be recorded in the ledger", self.request_id)
            raise
        except asyncio.CancelledError:
            self._abandon()
            if not self._client_left or task is None:
                raise  # the queen is stopping
            task.uncancel()
            log.info("request %s: client disconnected before the answer began", self.request_id)
            return Response(status_code=499)
        finally:
            watch_soon.cancel()
            if watcher is not None:
                watcher.cancel()
        if self.stream:
            response = RelayResponse(self.relay(attempt), media_type="text/event-stream", headers=SSE_HEADERS)
            attempt.stream.on_overflow = response.abort
            return response
        return await self.whole(attempt, request)

    async def _cancel_if_client_leaves(self, request: Request, task: asyncio.Task[Any] | None) -> None:
        """Cancel the request's task if its client disconnects while the request waits or starts."""
        await _wait_disconnect(request)
        self._client_left = True
        if task is not None:
            task.cancel()

    def _exclusions(self, job_bytes: int) -> frozenset[str]:
        """Workers this attempt may not use: ones tried before (by identity), ones the job is too big for."""
        limits = self.hive.limits(self.model)
        if limits is None:
            return frozenset()  # nobody serves the model: acquire says so
        if job_bytes > limits.largest_job_bytes:
            raise RequestTooLarge(
                f"The request makes a job of {job_bytes} bytes; the workers for '{self.model}' accept "
                f"at most {limits.largest_job_bytes} bytes. Send a shorter request.",
            )
        accepts = self.worker_filter
        if not self._tried and job_bytes <= limits.smallest_job_bytes and accepts is None:
            return frozenset()  # the usual case, known without looking at every worker
        return frozenset(
            worker.id
            for worker in self.hive.serving(self.model)
            if worker.identity in self._tried
            or worker.max_job_bytes < job_bytes
            or (accepts is not None and not accepts(worker))
        )

    async def start(self, resume: Resume | None = None) -> Attempt:
        """Run the job on a worker until it produces its first event, retrying on worker failures.

        With `resume`, the job continues the answer so far, and only workers with the same model file
        qualify. Raises the last worker's failure when every attempt failed.
        """
        request = self.endpoint.job_request(self.request, resume)
        job = encode(Job(request_id=self.request_id, request=request))
        job_bytes = encoded_size(job)
        last_error: QueenError = UpstreamError("No worker could run the request.")
        for _ in range(self.settings.max_attempts):
            try:
                worker, stream = await self.hive.acquire(
                    self.model,
                    self.request_id,
                    exclude=self._exclusions(job_bytes),
                    embeddings=self.endpoint.embeddings,
                    model_hash=self._model_hash if resume is not None else None,
                    prefix=self._prefix_query(),
                    sequences=self._sequences(resume),
                )
            except QueenError:
                if not self._tried:
                    raise
                # Nowhere left to retry: the client should learn what went wrong, not that nobody is free.
                raise last_error from None
            self._tried.add(worker.identity)
            self._alone = worker.in_flight == 1
            self.attempts += 1
            self._running = (worker, stream)
            await worker.send_job(job, self.request_id)
            # A streamed answer must start within the first-token deadline; a whole answer only comes at
            # the end, so it has the rest of the request's time (heartbeats still catch a dead worker).
            timeout = (
                min(self.settings.first_token_timeout, self.remaining()) if self.stream else self.remaining()
            )
            try:
                event = await stream.next(timeout)
            except TimeoutError:
                worker.cancel(self.request_id)
                self._running = None
                worker.health.record_failure(time.monotonic())
                last_error = UpstreamTimeout(f"The worker sent nothing for {timeout:g} s.")
                log.warning(
                    "request %s: worker %s timed out before its first output", self.request_id, worker.id
                )
                if self.remaining() <= 0:
                    break
                continue
            if isinstance(event, Chunk | Delta | Result):
                if resume is None:
                    self._model_hash = worker.model_hashes.get(self.model)
                    self._first_at = time.monotonic()
                return Attempt(worker, stream, event, time.monotonic())
            self._running = None
            if isinstance(event, JobError) and is_client_error(event.code):
                raise from_job_error(event.code, event.message, event.param)
            if not (isinstance(event, JobError) and event.code is ErrorCode.OVERLOADED):
                # A full or draining worker did nothing wrong: try another without holding it against it.
                worker.health.record_failure(time.monotonic())
            elif worker.replica is not None:
                # Another replica's client took its slot first: it may take this request once one frees.
                self._tried.discard(worker.identity)
            last_error = worker_failure(event)
            log.warning(
                "request %s: worker %s failed before its first output (attempt %d): %s",
                self.request_id,
                worker.id,
                self.attempts,
                last_error.message,
            )
        raise last_error

    def _sequences(self, resume: Resume | None) -> int:
        """Sequences the worker generates at once: one per choice (and prompt), or per choice resumed."""
        if resume is not None:
            return len(resume.choices)
        request = self.request
        return request.sequences if isinstance(request, ChatCompletionRequest | CompletionRequest) else 1

    def _prefix_query(self) -> PrefixQuery | None:
        """What cache-aware routing needs of the request; hashed only when some worker holds a prefix
        of the model, or the request names a session."""
        if self._prefix is None and self.endpoint.generates and not self.endpoint.embeddings:
            request = self.request
            named = isinstance(request, ChatCompletionRequest | CompletionRequest) and bool(
                getattr(request, "prompt_cache_key", None) or request.user
            )
            if named or self.hive.cache.index.holds_any(self.model):
                self._prefix = prefix_query(request, self.bounds.prompt_estimate, self.api_key_id)
        return self._prefix

    async def resume(self, attempt: Attempt, event: Failure) -> Attempt | None:
        """Continue the answer on another worker with the same model file; None where that is not allowed
        (a client error, no resumes left, no time left, an answer without token ids) or no worker took it.
        """
        if isinstance(event, JobError) and is_client_error(event.code):
            return None
        if self.resumes >= self.settings.max_resumes or self.remaining() <= 0:
            return None
        state = None  # a whole answer: nothing reached the client, the request simply runs again
        if self.stream:
            request = self.request
            if not (
                self.endpoint.resumable
                and self._model_hash is not None
                and isinstance(request, ChatCompletionRequest | CompletionRequest)
            ):
                return None
            state = self._so_far.resume(request)
            if state is None:
                return None
        log.warning(
            "request %s: worker %s %s; %s on another worker",
            self.request_id,
            attempt.worker.id,
            "is shutting down"
            if isinstance(event, Handover)
            else f"failed mid-answer ({worker_failure(event).message})",
            "running it again" if state is None else f"resuming {len(state.choices)} choice(s)",
        )
        try:
            resumed = await self.start(state)
        except QueenError as exc:
            log.warning("request %s: could not resume: %s", self.request_id, exc.message)
            return None
        # Only now: a draining worker whose stream nobody else could take goes on with it.
        attempt.worker.cancel(self.request_id)
        if not isinstance(event, Handover):
            attempt.worker.health.record_failure(time.monotonic())
        self.resumes += 1
        if attempt.relayed_tokens:
            self.segments.append(
                WorkerSegment(
                    worker_id=attempt.worker.id,
                    ln_url=attempt.worker.registration.ln_url,
                    completion_tokens=attempt.relayed_tokens,
                )
            )
        return resumed

    def chunk(self, event: Chunk) -> dict[str, Any]:
        """A worker's chunk with the queen's identity fields; counts what it relays, and the token ids."""
        payload = event.chunk
        self._count_relayed(text_bytes(payload), event.tokens)
        self.fingerprint = payload.get("system_fingerprint", self.fingerprint)
        self._so_far.relayed(event)
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

    def delta(self, event: Delta) -> None:
        """Count a worker's Delta as `chunk` counts a chunk (its text is the chunk's only text)."""
        text = event.text
        self._count_relayed(len(text) if text.isascii() else len(text.encode()), event.tokens)
        self._so_far.relayed_text(event)

    def _count_relayed(self, size: int, claimed: int) -> None:
        """Count `size` bytes of relayed text and the tokens claimed for it: at most one a byte, plus one."""
        self.relayed_text_bytes += size
        self.relayed_tokens += min(claimed, size + 1)

    @property
    def deltas(self) -> DeltaChunks:
        """The chunks this call's Delta frames stand for (made at the first one)."""
        if self._deltas is None:
            self._deltas = DeltaChunks(
                request_id=self.request_id,
                chunk_object=self.endpoint.chunk_object,
                created=self.created,
                model=self.model,
                chat=self.endpoint.job is not CompletionJob,
                include_usage=self.include_usage,
            )
        return self._deltas

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk of a stream when stream_options.include_usage is set."""
        return {
            "id": self.request_id,
            "object": self.endpoint.chunk_object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [],
            "usage": usage.model_dump(exclude_none=True),
        }

    def completion(self, response: dict[str, Any], usage: Usage) -> dict[str, Any]:
        """The worker's whole response with the queen's identity fields and the checked usage."""
        if self.endpoint.embeddings:
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
            "usage": usage.model_dump(exclude_none=True),
        }

    async def record(
        self,
        outcome: Outcome,
        status: int,
        *,
        worker: WorkerSession | None = None,
        ttft: float | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        worker_prompt_tokens: int | None = None,
        worker_completion_tokens: int | None = None,
        usage_violation: str | None = None,
        error_code: str | None = None,
        cached_tokens: int = 0,
    ) -> None:
        """Tell the observers how the request ended (once), and settle the key's lease.

        The observers run in a task of their own that this one only waits for: a client whose task is
        cancelled at the worst moment cannot stop its request from being recorded. Raises
        LedgerUnavailable if the ledger could keep the record nowhere.
        """
        if self._recorded:
            return
        self._recorded = True
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
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            ttft=ttft,
            duration=time.monotonic() - self.started,
            attempts=self.attempts,
            error_code=error_code,
            streamed=self.stream,
            worker_prompt_tokens=worker_prompt_tokens,
            worker_completion_tokens=worker_completion_tokens,
            usage_violation=usage_violation,
            resumes=self.resumes,
            segments=tuple(self.segments),
            cached_tokens=cached_tokens,
        )
        if self.lease is not None:
            self.lease.settle(prompt_tokens + completion_tokens)
        task = self.hive.spawn(self.observer.request_finished(record))
        try:
            await asyncio.shield(task)
        except LedgerError as exc:
            raise LedgerUnavailable(
                "The request could not be recorded in the usage ledger; it is not served unrecorded.",
                retry_after=5,
            ) from exc

    def _ttft(self, attempt: Attempt) -> float | None:
        """Time to the first worker's first output; unknown for whole answers, which arrive in one piece."""
        first_at = attempt.first_at if self._first_at is None else self._first_at
        return first_at - self.started if self.stream else None

    def checked(
        self, attempt: Attempt, usage: Usage, generated_text_bytes: int | None
    ) -> tuple[Usage, str | None]:
        """The worker's usage within the request's bounds; a worker caught inflating it is benched."""
        checked = check_usage(usage, self.bounds, generated_text_bytes=generated_text_bytes)
        if usage.cached_tokens > checked.prompt_tokens:
            # No more of the prompt can have come from a cache than the prompt holds.
            details = PromptTokensDetails(cached_tokens=checked.prompt_tokens)
            usage = usage.model_copy(update={"prompt_tokens_details": details})
        if checked.violation is None:
            return usage, None
        log.warning(
            "request %s: worker %s reported impossible usage (%s); benched, figures bounded",
            self.request_id,
            attempt.worker.id,
            checked.violation,
        )
        attempt.worker.health.bench(time.monotonic())
        fixed = Usage(
            prompt_tokens=checked.prompt_tokens,
            completion_tokens=checked.completion_tokens,
            total_tokens=checked.prompt_tokens + checked.completion_tokens,
            prompt_tokens_details=usage.prompt_tokens_details,
        )
        return fixed, checked.violation

    def unverifiable(self, attempt: Attempt) -> str:
        """A whole answer without one list of token ids per choice (protocol 4 requires them): it cannot
        be counted by its ids or audited, so the worker is benched like one inflating its usage, and
        its figures stay the bounded ones."""
        violation = "the whole answer did not name the token ids of each of its choices"
        log.warning(
            "request %s: worker %s: %s; benched, figures bounded",
            self.request_id,
            attempt.worker.id,
            violation,
        )
        attempt.worker.health.bench(time.monotonic())
        return violation

    async def succeeded(self, attempt: Attempt, usage: Usage, violation: str | None) -> Usage:
        """Credit the worker with a good request and record it; returns what the client is billed.

        The client pays for the prompt once and for every completion token once: the last worker's,
        and those relayed from the workers the answer moved away from (credited to them, `segments`).
        """
        earlier = sum(segment.completion_tokens for segment in self.segments)
        cached = min(usage.cached_tokens, usage.prompt_tokens)
        billed = Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens + earlier,
            total_tokens=usage.total_tokens + earlier,
            # Only from workers that say what they reused (a worker of protocol 2's time does not).
            prompt_tokens_details=None
            if usage.prompt_tokens_details is None
            else PromptTokensDetails(cached_tokens=cached),
        )
        if violation is None:
            attempt.worker.health.record_success()
        # An embedding or a token count has no first token nor generation speed: timing it would skew
        # the worker's.
        if self.endpoint.generates and not self.segments:  # a resumed answer's timing is no one worker's
            self.hive.record_speed(
                attempt.worker,
                self.model,
                ttft=self._ttft(attempt),
                tokens=usage.completion_tokens,
                duration=time.monotonic() - self.started,
            )
            ttft = self._ttft(attempt)
            if ttft is not None and self._alone:
                self.hive.cache.record_prefill(attempt.worker, self.model, usage.prompt_tokens - cached, ttft)
        await self.record(
            "success",
            200,
            worker=attempt.worker,
            ttft=self._ttft(attempt),
            cached_tokens=cached,
            prompt_tokens=billed.prompt_tokens,
            completion_tokens=billed.completion_tokens,
            worker_completion_tokens=usage.completion_tokens if self.segments else None,
            usage_violation=violation,
        )
        if self.on_delivered is not None:
            self.on_delivered(self, attempt.worker, usage, self._so_far)
        return billed

    async def failed(self, attempt: Attempt, event: Failure, error: QueenError) -> None:
        """Hold a failure against the worker unless the client caused it, and record it."""
        if not (isinstance(event, JobError) and is_client_error(event.code)):
            attempt.worker.health.record_failure(time.monotonic())
        await self.record(
            "error", error.status, worker=attempt.worker, ttft=self._ttft(attempt), error_code=error.code
        )

    async def relay(self, attempt: Attempt) -> AsyncIterator[bytes]:
        """The SSE stream: the worker's chunks as they arrive, then usage and [DONE].

        A worker that fails mid-stream is replaced by one that resumes the answer (`resume`); only a
        failure that cannot be resumed ends the stream with an error.
        """
        event: RequestEvent | Silent = attempt.first
        ready: list[bytes] = []
        try:
            while True:
                if ready and not isinstance(event, Delta | Chunk):  # coalesced chunks go before the rest
                    yield b"".join(ready)
                    ready = []
                if isinstance(event, Delta | Chunk):
                    before = self.relayed_tokens
                    if isinstance(event, Delta):
                        self.delta(event)
                        ready += self.shown.text(event.index, event.text)
                    else:
                        ready += self.shown.chunk(self.chunk(event))
                    attempt.relayed_tokens += self.relayed_tokens - before
                    # Chunks that are already here go out in one write: a busy queen makes fewer, larger
                    # writes instead of falling behind, and a chunk never waits for one that is not here.
                    following = attempt.stream.next_nowait() if len(ready) < _COALESCE_EVENTS else None
                    if following is not None:
                        event = following
                        continue
                    yield b"".join(ready)
                    ready = []
                elif isinstance(event, Result):
                    usage, violation = self.checked(attempt, event.usage, self.relayed_text_bytes)
                    if not self.segments:
                        usage = counted_by_ids(usage, self._so_far)
                    try:
                        billed = await self.succeeded(attempt, usage, violation)
                    except LedgerUnavailable as exc:
                        yield StreamEnd(b"".join(self.shown.failed(exc)))
                        return
                    yield StreamEnd(b"".join(await self.shown.done(billed)))
                    return
                elif isinstance(event, BufferOverflow):
                    # The client stopped reading: what it was sent is what it pays for.
                    self._settle_cancelled(attempt.worker, attempt.stream, attempt, "client_too_slow")
                    yield StreamEnd(b"".join(self.shown.cut()))
                    return
                else:
                    resumed = await self.resume(attempt, event)
                    if resumed is not None:
                        attempt, event = resumed, resumed.first
                        continue
                    error = worker_failure(event)
                    log.warning("request %s: stream ended with an error: %s", self.request_id, error.message)
                    await self._fail_quietly(attempt, event, error)
                    yield StreamEnd(b"".join(self.shown.failed(error)))
                    return
                attempt, event = await self._next(attempt)
        finally:
            if not self._recorded:
                # The client went away mid-stream, or stopped reading and the queen gave up on it (its
                # response aborted while blocked in a write): free the worker's slot, and record the
                # cancellation from a task of its own, since this one is being cancelled.
                reason = "client_too_slow" if attempt.stream.overflowed else None
                log.info(
                    "request %s: %s; cancelling on worker %s",
                    self.request_id,
                    "client too slow" if reason else "client disconnected",
                    attempt.worker.id,
                )
                self._settle_cancelled(attempt.worker, attempt.stream, attempt, reason)

    async def _next(self, attempt: Attempt) -> tuple[Attempt, RequestEvent | Silent]:
        """The stream's next event, within the token deadline; a draining worker's stream moves on to
        another worker once its grace is over (and stays, if none takes it)."""
        while True:
            timeout = min(self.settings.token_timeout, self.remaining())
            since = attempt.worker.draining_since
            handover = None
            if since is not None and not self._handed_over:
                handover = max(0.0, since + self.settings.drain_handover - time.monotonic())
                timeout = min(timeout, handover)
            try:
                return attempt, await attempt.stream.next(timeout)
            except TimeoutError:
                if handover is not None and handover <= timeout:
                    self._handed_over = True
                    resumed = await self.resume(attempt, Handover())
                    if resumed is not None:
                        return resumed, resumed.first
                    continue
                attempt.worker.cancel(self.request_id)
                return attempt, Silent(timeout)

    async def _fail_quietly(self, attempt: Attempt, event: Failure, error: QueenError) -> None:
        # The stream is already failing: a ledger that cannot record it changes nothing for the client.
        try:
            await self.failed(attempt, event, error)
        except LedgerUnavailable:
            log.error("request %s: its failure could not be recorded in the ledger", self.request_id)

    async def whole(self, attempt: Attempt, request: Request) -> Response:
        """Wait for the worker's whole answer, cancelling it if the client disconnects first.

        A worker that fails on the way is replaced (`resume`: the request runs again elsewhere).
        """
        event: RequestEvent | Silent = attempt.first
        while True:
            try:
                while isinstance(event, Chunk):  # a worker may stream even a non-streamed request: skip on
                    event = await self._next_or_disconnect(attempt, request)
            except asyncio.CancelledError:
                self._settle_cancelled(attempt.worker, attempt.stream, attempt, None)
                raise
            if isinstance(event, Result | BufferOverflow):
                break
            rerun = await self.resume(attempt, event)
            if rerun is None:
                break
            attempt, event = rerun, rerun.first
        if isinstance(event, Result):
            response = event.response
            if event.parts:
                try:
                    response = await self._assemble(attempt, event)
                except FrameError as exc:
                    broken = UpstreamError(f"The worker sent a broken response: {exc.message}")
                    await self.failed(attempt, WorkerGone(exc.message), broken)
                    raise broken from None
            if response is not None:
                generated = None if self.endpoint.embeddings else text_bytes(response)
                usage, violation = self.checked(attempt, event.usage, generated)
                if self.endpoint.generates:
                    # Counted by the ids behind it, as a stream is, and audited from them.
                    self._so_far = whole_answer(response, event.token_ids)
                    usage = counted_by_ids(usage, self._so_far)
                    if not self._so_far.resumable and not event.parts and violation is None:
                        # (A split answer may leave out ids too many for its last frame: protocol.codec.)
                        violation = self.unverifiable(attempt)
                await self.succeeded(attempt, usage, violation)
                return JsonBody(await self.shown.whole(self.completion(response, usage)))
        if isinstance(event, BufferOverflow):
            error: QueenError = UpstreamError(f"The worker's response was too large: {event.reason}.")
        elif isinstance(event, Result):
            error = UpstreamError("The worker ended the request without a response.")
        else:
            error = worker_failure(event)
        await self.failed(attempt, event, error)
        raise error

    async def _assemble(self, attempt: Attempt, result: Result) -> dict[str, Any]:
        parts = attempt.stream.parts
        if len(parts) != result.parts:
            raise FrameError(
                ErrorCode.INVALID_FRAME, f"the result announced {result.parts} parts but {len(parts)} came"
            )
        attempt.stream.parts = []
        # Parsing a response of many MiB would hold up every other client: it runs in a thread.
        return await asyncio.to_thread(assemble_response, parts)

    def _abandon(self) -> None:
        """The request's task was cancelled before the answer began: cancel the job and record that."""
        if self._recorded:
            return
        if self._running is None:
            self._record_soon(self._record_quietly("cancelled", 499, error_code="client_disconnected"))
            return
        worker, stream = self._running
        self._settle_cancelled(worker, stream, None, None)

    def _settle_cancelled(
        self, worker: WorkerSession, stream: RequestStream, attempt: Attempt | None, reason: str | None
    ) -> None:
        """Cancel the job on the worker and record the request once the worker says what it used.

        The client is billed for the prompt and the completion tokens it was sent; the worker is
        credited for what it generated, as its cancel confirmation reports it (within the bounds).
        Runs in a task of its own: the caller is usually being cancelled.
        """
        if self._recorded:
            return
        self._recorded = True  # claimed now, recorded by the task
        worker.cancel(self.request_id)

        async def settle() -> None:
            generated: Usage | None = None
            try:
                async with asyncio.timeout(self.settings.cancel_grace + 1):
                    while True:
                        event = await stream.next(self.settings.cancel_grace + 1)
                        if isinstance(event, Result | JobError):
                            generated = event.usage
                            break
                        if isinstance(event, WorkerGone):
                            break
            except TimeoutError:
                pass
            prompt = completion = 0
            violation = None
            if generated is not None:
                checked = check_usage(generated, self.bounds, generated_text_bytes=None)
                prompt, completion, violation = (
                    checked.prompt_tokens,
                    checked.completion_tokens,
                    checked.violation,
                )
            elif self.relayed_tokens or attempt is not None:
                prompt = self.bounds.prompt_estimate
            billed_completion = min(self.relayed_tokens, self.bounds.max_completion_tokens)
            self._recorded = False
            try:
                await self.record(
                    "cancelled",
                    499,
                    worker=worker,
                    ttft=self._ttft(attempt) if attempt is not None else None,
                    prompt_tokens=prompt,
                    completion_tokens=billed_completion,
                    worker_prompt_tokens=prompt,
                    worker_completion_tokens=max(completion, billed_completion),
                    usage_violation=violation,
                    error_code=reason or "client_disconnected",
                )
            except LedgerUnavailable:
                log.error("request %s: its cancellation could not be recorded in the ledger", self.request_id)

        self._record_soon(settle())

    async def _record_quietly(self, outcome: Outcome, status: int, *, error_code: str) -> None:
        try:
            await self.record(outcome, status, error_code=error_code)
        except LedgerUnavailable:
            log.error("request %s: its end could not be recorded in the ledger", self.request_id)

    def _record_soon(self, coroutine: Any) -> None:
        self.hive.spawn(coroutine)

    async def _next_or_disconnect(self, attempt: Attempt, request: Request) -> RequestEvent | Silent:
        timeout = min(self.settings.token_timeout, self.remaining())
        next_event = asyncio.ensure_future(attempt.stream.next(timeout))
        disconnect = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({next_event, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not next_event.done():
                next_event.cancel()
        if not next_event.done() or next_event.cancelled():
            raise asyncio.CancelledError("client disconnected")
        try:
            return next_event.result()
        except TimeoutError:
            attempt.worker.cancel(self.request_id)
            return Silent(timeout)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
