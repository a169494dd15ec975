"""Error codes carried by `JobError` and `ProtocolError` frames, and what each means for routing."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Why a request or a frame failed."""

    # Frame-level: the connection itself is at fault.
    INVALID_FRAME = "invalid_frame"
    FRAME_TOO_LARGE = "frame_too_large"
    UNSUPPORTED_PROTOCOL_VERSION = "unsupported_protocol_version"
    REGISTRATION_REQUIRED = "registration_required"
    UNAUTHORIZED = "unauthorized"
    # Request-level, caused by the client's request: never held against the worker.
    INVALID_REQUEST = "invalid_request"
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
    MODEL_NOT_FOUND = "model_not_found"
    # Request-level, caused by the worker: the queen may retry elsewhere.
    OVERLOADED = "overloaded"
    INTERNAL_ERROR = "internal_error"
    CANCELLED = "cancelled"


CLIENT_ERRORS = frozenset(
    {ErrorCode.INVALID_REQUEST, ErrorCode.CONTEXT_LENGTH_EXCEEDED, ErrorCode.MODEL_NOT_FOUND}
)
"""Codes that are the client's fault: relayed as 4xx and not counted against the worker."""


def is_client_error(code: ErrorCode) -> bool:
    """Whether `code` blames the request rather than the worker that ran it."""
    return code in CLIENT_ERRORS
