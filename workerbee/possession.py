"""Possession challenges: the SHA-256 of a byte range of a model's GGUF file(s), read off the event loop.

The queen asks for a random range and compares the answer with a trusted copy's, so a worker that
claims a file's hash without holding the file is found out. A split GGUF is one range over its parts
in order.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from protocol import ChallengeJob, ErrorCode, Usage
from protocol.verification import ChallengeReport
from workerbee.errors import EngineError

_READ_BYTES = 2**20


def range_sha256(parts: Sequence[Path], offset: int, length: int) -> ChallengeReport:
    """The hash of `length` bytes from `offset` over the concatenated parts (blocking).

    A range that runs past the end is an EngineError: the queen only asks for ranges inside the file.
    """
    sizes = [part.stat().st_size for part in parts]
    total = sum(sizes)
    if offset + length > total:
        raise EngineError(
            ErrorCode.INVALID_REQUEST,
            f"the range {offset}+{length} runs past the end of the model ({total} bytes)",
            "offset",
        )
    hasher = hashlib.sha256()
    left, position = length, offset
    for part, size in zip(parts, sizes, strict=True):
        if position >= size:
            position -= size
            continue
        with part.open("rb") as file:
            file.seek(position)
            while left and (block := file.read(min(_READ_BYTES, left))):
                hasher.update(block)
                left -= len(block)
        position = 0
        if not left:
            break
    return ChallengeReport(sha256=hasher.hexdigest(), size_bytes=total)


class Possession:
    """Answers challenges for the models this worker serves, from their files."""

    def __init__(self, files: dict[str, list[Path]]) -> None:
        self._files = files

    async def answer(self, job: ChallengeJob) -> tuple[Usage, dict[str, Any]]:
        """The Result of a challenge: no usage, the ChallengeReport as the response."""
        parts = self._files.get(job.model)
        if parts is None:
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"this worker does not serve '{job.model}'", "model")
        report = await asyncio.to_thread(range_sha256, parts, job.offset, job.length)
        return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), report.model_dump(mode="json")
