"""The wire protocol: every frame round-trips, and every bad frame gets a clear, typed error."""

from __future__ import annotations

import json

import pydantic
import pytest

import protocol
from protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Cancel,
    ChatJob,
    Chunk,
    EmbeddingJob,
    ErrorCode,
    FrameError,
    GpuInfo,
    Job,
    JobError,
    ModelInfo,
    ProtocolError,
    Register,
    Result,
    Resume,
    ResumedChoice,
    Usage,
    Welcome,
    check_registration,
    decode_queen_frame,
    decode_worker_frame,
    encode,
)
from protocol.openai import ChatCompletionRequest, ChatMessage, EmbeddingRequest

CHAT_MESSAGE = ChatMessage(role="user", content="hi")


def registration(**overrides: object) -> Register:
    """A valid registration with the original design's fields filled in."""
    fields: dict[str, object] = {
        "protocol_version": PROTOCOL_VERSION,
        "worker_version": "0.1.0",
        "instance_id": "test-instance-1",
        "max_frame_bytes": MAX_FRAME_BYTES,
        "ln_url": "bee@getalby.com",
        "cpu_count": 8,
        "memory": 32000,
        "disk_space": 500_000,
        "vram": 11441,
        "nv_gpu_count": 1,
        "nv_driver_version": "465.19.01",
        "nv_gpus": [GpuInfo(name="NVIDIA Tesla K80", memory=11441, memory_free=11000, uuid="GPU-1", index=0)],
        "models": [ModelInfo(id="m", n_ctx=4096)],
        "parallel": 2,
    }
    fields.update(overrides)
    return Register.model_validate(fields)


USAGE = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)
WORKER_FRAMES = [
    registration(),
    Chunk(request_id="r1", chunk={"choices": [{"index": 0, "delta": {"content": "hi"}}]}),
    Chunk(
        request_id="r1",
        chunk={"choices": [{"index": 0, "delta": {"content": "hi"}}]},
        tokens=1,
        token_ids=[7],
    ),
    registration(models=[ModelInfo(id="m", n_ctx=4096, sha256="0f" * 32)]),
    Result(request_id="r1", usage=USAGE),
    Result(request_id="r1", usage=USAGE, response={"choices": []}),
    JobError(request_id="r1", code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, message="too long", param="messages"),
    ProtocolError(code=ErrorCode.INVALID_FRAME, message="bad"),
]
QUEEN_FRAMES = [
    Welcome(worker_id="w1", max_frame_bytes=MAX_FRAME_BYTES),
    Job(request_id="r1", request=ChatJob(body=ChatCompletionRequest(model="m", messages=[CHAT_MESSAGE]))),
    Job(request_id="r2", request=EmbeddingJob(body=EmbeddingRequest(model="m", input="hi"))),
    Job(
        request_id="r3",
        request=ChatJob(
            body=ChatCompletionRequest(model="m", messages=[CHAT_MESSAGE]),
            resume=Resume(choices=[ResumedChoice(index=0, token_ids=[1, 2], budget=5)]),
        ),
    ),
    Cancel(request_id="r1"),
    ProtocolError(code=ErrorCode.UNAUTHORIZED, message="no"),
]


@pytest.mark.parametrize("frame", WORKER_FRAMES, ids=lambda frame: frame.type)
def test_worker_frames_round_trip(frame: protocol.messages.Frame) -> None:
    """Every worker frame decodes to an equal frame of the same class."""
    assert decode_worker_frame(encode(frame)) == frame


@pytest.mark.parametrize("frame", QUEEN_FRAMES, ids=lambda frame: frame.type)
def test_queen_frames_round_trip(frame: protocol.messages.Frame) -> None:
    """Every queen frame decodes to an equal frame of the same class."""
    assert decode_queen_frame(encode(frame)) == frame


def test_registration_keeps_the_original_field_names() -> None:
    """The registration frame carries the ancestor's fields, by their original names."""
    data = json.loads(encode(registration()))
    for name in ("ln_url", "auth_key", "cpu_count", "disk_space", "vram", "nv_gpu_count"):
        assert name in data
    for name in ("nv_driver_version", "nv_gpus", "cl_driver_version", "cl_gpus"):
        assert name in data
    assert data["nv_gpus"][0]["memory"] == 11441
    assert data["protocol_version"] == PROTOCOL_VERSION


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        ("not json", "invalid frame"),
        ('{"type": "teleport"}', "teleport"),
        ('{"no_type": 1}', "type"),
        ('{"type": "chunk"}', "request_id"),
        ('{"type": "chunk", "request_id": "", "chunk": {}}', "request_id"),
        ('{"type": "cancel", "request_id": "r1"}', "cancel"),
        ('{"type": "result", "request_id": "r", "usage": {"prompt_tokens": -1}}', "usage"),
        ('{"type": "job_error", "request_id": "r", "code": "nonsense", "message": "x"}', "code"),
    ],
)
def test_bad_worker_frames_raise_frame_error(data: str, fragment: str) -> None:
    """Invalid, unknown and incomplete frames raise FrameError(invalid_frame) naming what is wrong."""
    with pytest.raises(FrameError) as raised:
        decode_worker_frame(data)
    assert raised.value.code is ErrorCode.INVALID_FRAME
    assert fragment in raised.value.message


def test_oversized_frame_is_refused_before_parsing() -> None:
    """A frame over the limit raises frame_too_large, whatever it holds."""
    with pytest.raises(FrameError) as raised:
        decode_worker_frame("x" * 2048, limit=1024)
    assert raised.value.code is ErrorCode.FRAME_TOO_LARGE
    assert "2048" in raised.value.message


def test_extra_fields_are_refused() -> None:
    """A frame with a field the protocol does not define is invalid, not silently trimmed."""
    with pytest.raises(FrameError):
        decode_queen_frame('{"type": "cancel", "request_id": "r", "surprise": 1}')


def test_frames_are_immutable() -> None:
    """Frames are frozen: a frame cannot change after it was validated."""
    frame = Cancel(request_id="r1")
    with pytest.raises(pydantic.ValidationError):
        frame.request_id = "r2"  # type: ignore[misc]


def test_first_frame_must_be_a_registration() -> None:
    """Anything but a registration as the first frame is registration_required."""
    with pytest.raises(FrameError) as raised:
        check_registration(Result(request_id="r", usage=USAGE))
    assert raised.value.code is ErrorCode.REGISTRATION_REQUIRED


def test_other_protocol_versions_are_refused() -> None:
    """A worker speaking another protocol version is told which one the queen speaks."""
    with pytest.raises(FrameError) as raised:
        check_registration(registration(protocol_version=PROTOCOL_VERSION + 1))
    assert raised.value.code is ErrorCode.UNSUPPORTED_PROTOCOL_VERSION
    assert str(PROTOCOL_VERSION) in raised.value.message


def test_registration_needs_a_model() -> None:
    """A worker that serves nothing cannot register."""
    with pytest.raises(pydantic.ValidationError):
        registration(models=[])


def test_public_names_are_curated() -> None:
    """protocol.__all__ lists exactly the names the package exports, and all of them exist."""
    for name in protocol.__all__:
        assert hasattr(protocol, name)
    assert (
        not {name for name in vars(protocol) if not name.startswith("_")}
        - set(protocol.__all__)
        - {
            "codec",
            "errors",
            "lnurl",
            "messages",
            "openai",
            "prefix",
            "training",
            "verification",
        }
    )


def test_a_model_hash_is_sha256_hex() -> None:
    """A content hash is 64 lowercase hex digits, or absent: nothing else can match another worker's."""
    with pytest.raises(pydantic.ValidationError):
        ModelInfo(id="m", n_ctx=1, sha256="ABC")
