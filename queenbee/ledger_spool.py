"""The ledger's spool: usage rows the database could not take, kept in a file beside it until it can.

One JSON object per line in `<db>.spool`. An append is one `write` with O_APPEND followed by `fsync`
(and, when it creates the file, an `fsync` of the directory first), so a row in the spool is as durable
as a committed one when `append` returns. A crash during an append leaves a torn last line: readers
skip lines that are not whole JSON objects, and the next append starts on a fresh line so that it never
runs on into the torn one. The ledger replays the lines into the database (idempotently, since request
ids are unique) and then removes the file.

Only the ledger's writer thread appends, replays and removes; anyone may read (a report in the queen or
`queenbee usage` in another process), and a reader that races an append at most misses the row being
appended, whose request has not finished yet.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

SUFFIX: Final = ".spool"


def spool_path(db: Path) -> Path:
    """Where the spool of the ledger at `db` lives: the same name with `.spool` added."""
    return db.with_name(db.name + SUFFIX)


@dataclass
class SpoolRead:
    """Lines read from a spool: the JSON objects, the lines that were not, and where reading stopped."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: list[bytes] = field(default_factory=list)
    end: int = 0
    """Byte offset just past the last line read: the next read starts here."""
    size: int = 0
    """The file's size when it was read (0 if there was no file)."""


def append(path: Path, objects: Sequence[dict[str, Any]]) -> None:
    """Append one line per object, durable when this returns; on OSError the file is left as it was."""
    data = b"".join(json.dumps(obj, separators=(",", ":")).encode() + b"\n" for obj in objects)
    created = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        if created:
            # The directory entry must be durable before any row relies on it.
            _fsync_directory(path.parent)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a torn line from a crash: start ours on a line of its own
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except OSError:
            # A partial append (EFBIG, ENOSPC) would replay rows whose requests were failed: take it back.
            with suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def read(path: Path, offset: int = 0, max_lines: int | None = None) -> SpoolRead:
    """The whole lines from `offset` on (at most `max_lines`); no file reads as empty.

    A last line without its newline is torn (or still being appended): it is reported as bad and, if
    `max_lines` did not stop the read first, consumed.
    """
    result = SpoolRead(end=offset)
    try:
        spool = path.open("rb")
    except FileNotFoundError:
        return result
    with spool:
        result.size = os.fstat(spool.fileno()).st_size
        spool.seek(offset)
        while max_lines is None or len(result.objects) + len(result.bad_lines) < max_lines:
            line = spool.readline()
            if not line:
                break
            result.end += len(line)
            if line == b"\n":
                continue  # the newline an append put after a torn line
            obj = _parse(line) if line.endswith(b"\n") else None
            if obj is None:
                result.bad_lines.append(line)
            else:
                result.objects.append(obj)
    return result


def remove(path: Path) -> None:
    """Delete the spool (once every row in it is in the database); no file is not an error."""
    # No directory fsync: if a crash brings the file back, its rows replay again, harmlessly.
    with suppress(FileNotFoundError):
        path.unlink()


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
