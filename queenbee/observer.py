"""What the queen tells the rest of the world about each request once it has ended.

The forwarding path builds one `RequestRecord` per client request and hands it to the observers (the
usage ledger, metrics, the request log) before the client receives the end of its response.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Protocol

log = logging.getLogger("queenbee.requests")

Outcome = Literal["success", "error", "cancelled"]


@dataclass(frozen=True)
class WorkerSegment:
    """A worker an answer moved away from mid-stream, and the completion tokens it is credited with."""

    worker_id: str
    ln_url: str
    completion_tokens: int


@dataclass(frozen=True)
class RequestRecord:
    """One finished client request: who asked, who served, what it cost, how it ended."""

    request_id: str
    path: str
    model: str
    started_at: float
    """Wall-clock time the request arrived (seconds since the epoch)."""
    outcome: Outcome
    status: int
    """HTTP status sent, or that the stream would have had (200 for streams that began)."""
    api_key_id: str | None = None
    worker_id: str | None = None
    ln_url: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft: float | None = None
    """Seconds from arrival to the worker's first output."""
    duration: float = 0.0
    attempts: int = 0
    """Workers tried; more than one means the request was retried."""
    error_code: str | None = None
    streamed: bool = False
    worker_prompt_tokens: int | None = None
    """Prompt tokens the worker is credited with; None: the same as `prompt_tokens`."""
    worker_completion_tokens: int | None = None
    """Completion tokens the worker is credited with (what it generated, even if the client left before
    it was relayed); None: the same as `completion_tokens`, what the client is billed."""
    usage_violation: str | None = None
    """Why the worker's reported usage was not believed (the figures were bounded), or None."""
    resumes: int = 0
    """Times the answer moved to another worker after output."""
    segments: tuple[WorkerSegment, ...] = ()
    """The workers it moved away from, in order; `worker_id` is the one that finished it."""
    cached_tokens: int = 0
    """Prompt tokens the worker took from its cache rather than computing them (they may be priced
    differently); part of `prompt_tokens`."""

    @property
    def credited_prompt_tokens(self) -> int:
        """Prompt tokens credited to the worker."""
        return self.prompt_tokens if self.worker_prompt_tokens is None else self.worker_prompt_tokens

    @property
    def credited_completion_tokens(self) -> int:
        """Completion tokens credited to the worker."""
        return (
            self.completion_tokens if self.worker_completion_tokens is None else self.worker_completion_tokens
        )


class RequestObserver(Protocol):
    """Something that wants to know about every finished request."""

    async def request_finished(self, record: RequestRecord) -> None:
        """Called once per request, before the client gets the end of its response."""


class RequestLog:
    """One INFO line per request, with no prompt or completion text in it."""

    async def request_finished(self, record: RequestRecord) -> None:
        """Log the record."""
        log.info(
            "request %s %s model=%s worker=%s outcome=%s status=%d prompt_tokens=%d completion_tokens=%d "
            "ttft=%s duration=%.3fs attempts=%d resumes=%d",
            record.request_id,
            record.path,
            record.model,
            record.worker_id or "-",
            record.outcome,
            record.status,
            record.prompt_tokens,
            record.completion_tokens,
            f"{record.ttft:.3f}s" if record.ttft is not None else "-",
            record.duration,
            record.attempts,
            record.resumes,
            # The same facts as fields, for --log-json; never the prompt or the answer.
            extra={
                "request_id": record.request_id,
                "path": record.path,
                "model": record.model,
                "worker_id": record.worker_id,
                "outcome": record.outcome,
                "status": record.status,
                "prompt_tokens": record.prompt_tokens,
                "completion_tokens": record.completion_tokens,
                "ttft": record.ttft,
                "duration": record.duration,
                "attempts": record.attempts,
                "resumes": record.resumes,
            },
        )


class Observers:
    """Fans a record out to several observers; one failing observer does not stop the others.

    The first observer is the one of record (the usage ledger): if it fails, the others still hear of
    the request, and then its error is raised, so that the request is not served as if recorded.
    """

    def __init__(self, observers: list[RequestObserver]) -> None:
        self.observers = observers

    async def request_finished(self, record: RequestRecord) -> None:
        """Tell every observer; re-raise the first observer's failure once all were told."""
        failure: Exception | None = None
        for position, observer in enumerate(self.observers):
            try:
                await observer.request_finished(record)
            except Exception as exc:
                if position == 0:
                    failure = exc
                log.exception("observer %s failed on request %s", type(observer).__name__, record.request_id)
        if failure is not None:
            raise failure
