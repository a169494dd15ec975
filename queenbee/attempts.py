"""One request's runs on workers, and how each can fail: what the relay loop of forwarding.py acts on."""

from __future__ import annotations

from dataclasses import dataclass

from protocol import Chunk, Delta, JobError, Result
from queenbee.errors import QueenError, UpstreamError, UpstreamTimeout, from_job_error
from queenbee.worker_session import BufferOverflow, RequestEvent, RequestStream, WorkerGone, WorkerSession


@dataclass
class Attempt:
    """A request running on one worker, with the first event it produced."""

    worker: WorkerSession
    stream: RequestStream
    first: Chunk | Delta | Result
    first_at: float
    relayed_tokens: int = 0
    """Completion tokens relayed from this worker (what a worker replaced mid-answer is credited)."""


@dataclass(frozen=True)
class Silent:
    """The worker sent nothing for `seconds` within a stream: taken as dead."""

    seconds: float


@dataclass(frozen=True)
class Handover:
    """The worker is shutting down and its grace for this stream is over: the stream moves on."""


Failure = RequestEvent | Silent | Handover


def worker_failure(event: Failure) -> QueenError:
    """The client-facing error for a worker's failure event."""
    if isinstance(event, Silent):
        return UpstreamTimeout(f"The worker stopped sending output for {event.seconds:g} s.")
    if isinstance(event, Handover):
        return UpstreamError("The worker shut down.")
    if isinstance(event, WorkerGone):
        return UpstreamError(f"The worker went away: {event.reason}.")
    if isinstance(event, BufferOverflow):
        return UpstreamError(f"The worker sent too much: {event.reason}.")
    if isinstance(event, JobError):
        return from_job_error(event.code, event.message, event.param)
    return UpstreamError("The worker sent an unexpected frame.")
