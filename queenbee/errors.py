"""The queen's exception tree, and the one place where errors become OpenAI (or Anthropic) error bodies.

QueenError                    any error a client sees
├── InvalidRequest            400 invalid_request_error (malformed JSON, bad or unsupported field)
├── ContextLengthExceeded     400 invalid_request_error, code context_length_exceeded
├── RequestTimeout            408 invalid_request_error, code request_timeout (the body was too slow)
├── RequestTooLarge           413 invalid_request_error, code request_too_large
├── UnsupportedMediaType      415 invalid_request_error, code unsupported_media_type
├── AuthenticationError       401 invalid_request_error, code invalid_api_key, with WWW-Authenticate
├── ModelNotFound             404 invalid_request_error, code model_not_found
├── NotFound                  404 invalid_request_error, code not_found (a stored response)
├── RateLimited               429 requests or tokens, code rate_limit_exceeded, with Retry-After
├── NoCapacity                503 service_unavailable, with Retry-After
├── LedgerUnavailable         503 service_unavailable: the request could not be recorded
├── UpstreamError             502 upstream_error: the worker failed or went away
└── UpstreamTimeout           504 timeout: the worker did not answer in time
"""

from __future__ import annotations

from typing import Any

from protocol import ErrorCode


class QueenError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    status: int = 500
    type: str = "internal_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def anthropic_body(self) -> dict[str, Any]:
        """Anthropic's error object, for the Messages API: {"type": "error", "error": {"type", "message"}}."""
        return anthropic_error(self.status, self.message)

    def headers(self) -> dict[str, str]:
        """Extra response headers."""
        return {}


class InvalidRequest(QueenError):
    """The request is malformed or asks for something that cannot be honoured."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextLengthExceeded(InvalidRequest):
    """The prompt does not fit in the model's context."""

    code = "context_length_exceeded"


class RequestTimeout(InvalidRequest):
    """The client did not send its whole body in time."""

    status = 408
    code = "request_timeout"


class RequestTooLarge(InvalidRequest):
    """The body, or the job it would make, is bigger than the queen or the chosen worker accepts."""

    status = 413
    code = "request_too_large"


class UnsupportedMediaType(InvalidRequest):
    """The body is not declared as JSON."""

    status = 415
    code = "unsupported_media_type"


class AuthenticationError(QueenError):
    """The request carries no API key, or one the queen does not know."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        """Name the scheme the client should use (RFC 6750)."""
        return {"WWW-Authenticate": "Bearer"}


class RateLimited(QueenError):
    """The API key used up its requests or tokens for the minute."""

    status = 429
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after: int) -> None:
        super().__init__(message)
        # OpenAI names the exhausted limit in the type: "requests" or "tokens".
        self.type = limit
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """Tell the client when to try again."""
        return {"Retry-After": str(self.retry_after)}


class ModelNotFound(QueenError):
    """No connected worker serves the model."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(QueenError):
    """A stored object (a response) does not exist, or belongs to another key."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class NoCapacity(QueenError):
    """Every worker for the model is busy, and the wait is over."""

    status = 503
    type = "service_unavailable"
    code = "no_capacity"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        """Tell the client when to try again."""
        return {"Retry-After": str(self.retry_after)}


class LedgerUnavailable(NoCapacity):
    """The usage ledger could not record the request, durably or at all: it is not served unrecorded."""

    code = "ledger_unavailable"


class UpstreamError(QueenError):
    """The worker failed or disconnected while running the request."""

    status = 502
    type = "upstream_error"
    code = "worker_failed"


class UpstreamTimeout(QueenError):
    """The worker did not answer within a deadline."""

    status = 504
    type = "timeout"
    code = "worker_timeout"


def from_job_error(code: ErrorCode, message: str, param: str | None) -> QueenError:
    """Translate a worker's JobError into the error the client sees."""
    if code is ErrorCode.CONTEXT_LENGTH_EXCEEDED:
        return ContextLengthExceeded(message, param=param or "messages")
    if code is ErrorCode.INVALID_REQUEST:
        return InvalidRequest(message, param=param)
    if code is ErrorCode.MODEL_NOT_FOUND:
        return ModelNotFound(message, param=param or "model")
    return UpstreamError(f"the worker failed: {message}", code=code.value)


ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}
"""Anthropic's error type for each status; other statuses take their class's (4xx or 5xx) type."""


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """Anthropic's error object for a status and a message."""
    kind = ANTHROPIC_ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}
