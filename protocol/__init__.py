"""The queen <-> worker wire protocol: message models and their codec, with no I/O."""

from protocol.codec import (
    MAX_FRAME_BYTES,
    FrameError,
    check_registration,
    decode_queen_frame,
    decode_worker_frame,
    encode,
)
from protocol.errors import ErrorCode, is_client_error
from protocol.messages import (
    PROTOCOL_VERSION,
    Cancel,
    Chunk,
    Draining,
    GpuInfo,
    Job,
    JobError,
    ModelInfo,
    ProtocolError,
    QueenFrame,
    Register,
    Result,
    Usage,
    Welcome,
    WorkerFrame,
)

__all__ = [
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "Cancel",
    "Chunk",
    "Draining",
    "ErrorCode",
    "FrameError",
    "GpuInfo",
    "Job",
    "JobError",
    "ModelInfo",
    "ProtocolError",
    "QueenFrame",
    "Register",
    "Result",
    "Usage",
    "Welcome",
    "WorkerFrame",
    "check_registration",
    "decode_queen_frame",
    "decode_worker_frame",
    "encode",
    "is_client_error",
]
