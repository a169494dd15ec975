"""Protocol 5's batch frame: a worker's frames of one moment in one message, split to fit the limit."""

from __future__ import annotations

import json

import pytest

from protocol import (
    MIN_FRAME_BYTES,
    Batch,
    Chunk,
    Draining,
    ErrorCode,
    FrameError,
    JobError,
    Result,
    Usage,
    batch_messages,
    decode_worker_frame,
    encode,
)
from protocol.messages import MAX_BATCH_FRAMES

USAGE = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)


def chunk(request_id: str, text: str = "hi") -> str:
    """An encoded chunk frame carrying `text`."""
    return encode(Chunk(request_id=request_id, chunk={"choices": [{"delta": {"content": text}}]}, tokens=1))


def test_frames_of_one_moment_travel_as_one_batch_and_decode_in_order() -> None:
    texts = [chunk("a"), chunk("b"), encode(Result(request_id="a", usage=USAGE)), encode(Draining())]
    [message] = batch_messages(texts, MIN_FRAME_BYTES)
    frame = decode_worker_frame(message)
    assert isinstance(frame, Batch)
    assert [inner.model_dump() for inner in frame.frames] == [
        decode_worker_frame(text).model_dump() for text in texts
    ]


def test_a_frame_alone_travels_as_itself() -> None:
    text = chunk("a")
    assert batch_messages([text], MIN_FRAME_BYTES) == [text]
    assert batch_messages([], MIN_FRAME_BYTES) == []


def test_messages_stay_within_the_limit_and_keep_the_order() -> None:
    """Frames that together pass the limit are split over several messages, none bigger than it, each
    frame in exactly one, in the order given; multi-byte text is measured in bytes, not characters."""
    texts = [chunk(f"r{number}", "é" * 300) for number in range(40)]
    limit = 2_000
    messages = batch_messages(texts, limit)
    assert len(messages) > 1
    assert all(len(message.encode()) <= limit for message in messages)
    received: list[str] = []
    for message in messages:
        frame = decode_worker_frame(message)
        inner = frame.frames if isinstance(frame, Batch) else [frame]
        received += [item.request_id for item in inner if isinstance(item, Chunk)]
    assert received == [f"r{number}" for number in range(40)]


def test_a_batch_holds_at_most_max_batch_frames() -> None:
    texts = [encode(Draining())] * (MAX_BATCH_FRAMES + 5)
    messages = batch_messages(texts, 2**30)
    assert len(messages) == 2
    first = decode_worker_frame(messages[0], limit=2**30)
    assert isinstance(first, Batch)
    assert len(first.frames) == MAX_BATCH_FRAMES


@pytest.mark.parametrize(
    ("inner", "what"),
    [
        ([], "frames"),
        ([{"type": "batch", "frames": [{"type": "draining"}]}], "frames.0"),
        ([{"type": "register"}], "frames.0"),
        ([{"type": "chunk", "request_id": "a", "chunk": {}}, {"type": "chunk", "chunk": {}}], "frames.1"),
    ],
    ids=["empty", "nested batch", "registration inside", "one bad frame"],
)
def test_a_bad_batch_is_refused_whole_with_what_is_wrong(inner: list[object], what: str) -> None:
    with pytest.raises(FrameError) as caught:
        decode_worker_frame(json.dumps({"type": "batch", "frames": inner}))
    assert caught.value.code is ErrorCode.INVALID_FRAME
    assert what in caught.value.message


def test_a_batch_over_the_frame_limit_is_refused() -> None:
    message = batch_messages([chunk("a", "x" * 40_000), chunk("b", "x" * 40_000)], 2**20)[0]
    with pytest.raises(FrameError) as caught:
        decode_worker_frame(message, limit=MIN_FRAME_BYTES)
    assert caught.value.code is ErrorCode.FRAME_TOO_LARGE


def test_job_errors_travel_in_batches_too() -> None:
    error = JobError(request_id="a", code=ErrorCode.CANCELLED, message="cancelled")
    [message] = batch_messages([chunk("a"), encode(error)], MIN_FRAME_BYTES)
    frame = decode_worker_frame(message)
    assert isinstance(frame, Batch)
    assert frame.frames[1] == error
