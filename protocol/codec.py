"""Encoding and decoding of frames: JSON text, with a size limit, and errors that say what was wrong."""

from __future__ import annotations

from typing import Final

from pydantic import TypeAdapter, ValidationError

from protocol.errors import ErrorCode
from protocol.messages import PROTOCOL_VERSION, Frame, QueenFrame, Register, WorkerFrame

MAX_FRAME_BYTES: Final = 8 * 2**20
"""Largest frame either side accepts (8 MiB): big enough for long prompts, small enough to bound memory."""

_WORKER_FRAMES: Final[TypeAdapter[WorkerFrame]] = TypeAdapter(WorkerFrame)
_QUEEN_FRAMES: Final[TypeAdapter[QueenFrame]] = TypeAdapter(QueenFrame)


class FrameError(ValueError):
    """A frame that cannot be accepted; `code` says why, the message says what to fix."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def encode(frame: Frame) -> str:
    """Serialize a frame to JSON text."""
    return frame.model_dump_json(exclude_none=False)


def _check_size(data: str | bytes, limit: int) -> None:
    size = len(data) if isinstance(data, bytes) else len(data.encode())
    if size > limit:
        raise FrameError(
            ErrorCode.FRAME_TOO_LARGE, f"frame of {size} bytes exceeds the limit of {limit} bytes"
        )


def _describe(exc: ValidationError) -> str:
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"]) or "frame"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"invalid frame: {where}: {first['msg']}{more}"


def decode_worker_frame(data: str | bytes, *, limit: int = MAX_FRAME_BYTES) -> WorkerFrame:
    """Parse a frame sent by a worker, or raise FrameError."""
    _check_size(data, limit)
    try:
        return _WORKER_FRAMES.validate_json(data)
    except ValidationError as exc:
        raise FrameError(ErrorCode.INVALID_FRAME, _describe(exc)) from None


def decode_queen_frame(data: str | bytes, *, limit: int = MAX_FRAME_BYTES) -> QueenFrame:
    """Parse a frame sent by a queen, or raise FrameError."""
    _check_size(data, limit)
    try:
        return _QUEEN_FRAMES.validate_json(data)
    except ValidationError as exc:
        raise FrameError(ErrorCode.INVALID_FRAME, _describe(exc)) from None


def check_registration(frame: WorkerFrame) -> Register:
    """Ensure the first frame is a registration in a protocol version this side speaks."""
    if not isinstance(frame, Register):
        raise FrameError(
            ErrorCode.REGISTRATION_REQUIRED, f"the first frame must be 'register', not {frame.type!r}"
        )
    if frame.protocol_version != PROTOCOL_VERSION:
        raise FrameError(
            ErrorCode.UNSUPPORTED_PROTOCOL_VERSION,
            f"protocol version {frame.protocol_version} is not supported; "
            f"this queen speaks {PROTOCOL_VERSION}",
        )
    return frame
