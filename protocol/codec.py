"""Encoding and decoding of frames: JSON text, with a size limit, and errors that say what was wrong."""

from __future__ import annotations

import json
from typing import Any, Final

import pydantic_core
from pydantic import TypeAdapter, ValidationError

from protocol.errors import ErrorCode
from protocol.messages import (
    MAX_BATCH_FRAMES,
    PROTOCOL_VERSION,
    Frame,
    QueenFrame,
    Register,
    Result,
    ResultPart,
    WorkerFrame,
)

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


def encoded_size(text: str) -> int:
    """Size of an encoded frame on the wire, bytes (websocket text frames are UTF-8)."""
    return len(text.encode())


_BATCH_HEAD: Final = '{"type":"batch","frames":['
_BATCH_TAIL: Final = "]}"


def batch_messages(texts: list[str], limit: int) -> list[str]:
    """The websocket messages that carry encoded frames `texts`, in order, each at most `limit` bytes.

    Frames that fit together travel as one Batch (joined as text, not encoded again); a frame alone in
    its message travels as itself. Each text must fit the limit on its own (the sender checks that).
    """
    messages: list[str] = []
    group: list[str] = []
    size = len(_BATCH_HEAD) + len(_BATCH_TAIL)
    for text in texts:
        length = len(text) if text.isascii() else encoded_size(text)
        if group and (size + length + 1 > limit or len(group) == MAX_BATCH_FRAMES):
            messages.append(_joined(group))
            group, size = [], len(_BATCH_HEAD) + len(_BATCH_TAIL)
        group.append(text)
        size += length + 1
    if group:
        messages.append(_joined(group))
    return messages


def _joined(group: list[str]) -> str:
    return group[0] if len(group) == 1 else _BATCH_HEAD + ",".join(group) + _BATCH_TAIL


_PART_OVERHEAD: Final = 1024
"""Bytes of a ResultPart frame besides its data: the type, the request id and JSON punctuation."""


def result_frames(result: Result, limit: int) -> list[ResultPart | Result]:
    """The frames that carry `result` to a peer that accepts frames of at most `limit` bytes.

    A result that fits is sent as it is; a bigger one as ResultPart slices of its response's JSON text,
    each small enough after JSON escaping (at most 4 bytes per character), then a Result with `parts`.
    Token ids too many for that last frame are left out (the answer is then counted within bounds only).
    """
    if result.response is None or encoded_size(encode(result)) <= limit:
        return [result]
    text = pydantic_core.to_json(result.response).decode()
    step = max(1, (limit - _PART_OVERHEAD) // 4)
    parts: list[ResultPart | Result] = [
        ResultPart(request_id=result.request_id, data=text[start : start + step])
        for start in range(0, len(text), step)
    ]
    last = result.model_copy(update={"response": None, "parts": len(parts)})
    if last.token_ids is not None and encoded_size(encode(last)) > limit:
        last = last.model_copy(update={"token_ids": None})
    parts.append(last)
    return parts


def assemble_response(parts: list[str]) -> dict[str, Any]:
    """The response object that ResultPart slices carried; FrameError if they do not make one."""
    try:
        response = json.loads("".join(parts))
    except (json.JSONDecodeError, ValueError) as exc:
        raise FrameError(ErrorCode.INVALID_FRAME, f"result parts do not form a JSON object: {exc}") from None
    if not isinstance(response, dict):
        raise FrameError(ErrorCode.INVALID_FRAME, "result parts do not form a JSON object")
    return response


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
