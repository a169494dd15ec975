"""Who this worker is to the queen: a stable instance id kept on disk, and the token it registers with.

The instance id is made once and kept in a file, so the worker is the same worker to the queen across
restarts and reconnections. Several workers on one machine (one per GPU, say) share the directory: each
holds an advisory lock on the file it uses for as long as it runs, and a second worker takes the next free
file (`instance_id.2`, ...), so no two running workers ever claim the same id.
"""

from __future__ import annotations

import logging
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

log = logging.getLogger("workerbee.identity")

INSTANCE_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-]{8,64}")
"""What Register.instance_id accepts."""
MAX_ID_FILES: Final = 64
"""Id files tried before giving up on a free one: more workers than this on one machine is a mistake."""


class IdentityError(Exception):
    """A secret or identity file that cannot be used; the message is one line for the user."""


def default_instance_id_file() -> Path:
    """$XDG_CONFIG_HOME/workerbee/instance_id (~/.config when XDG_CONFIG_HOME is unset)."""
    config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config_home) / "workerbee" / "instance_id"


def new_instance_id() -> str:
    """A fresh random instance id."""
    return "wb-" + uuid.uuid4().hex


@dataclass
class InstanceId:
    """The id this process registers with; `lock` is the open, locked file that reserves it, if any."""

    value: str
    path: Path | None
    lock: IO[str] | None = None

    def release(self) -> None:
        """Give the id file back (the lock goes with the process anyway)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None


def _try_lock(handle: IO[str]) -> bool:
    try:
        import fcntl
    except ImportError:  # not POSIX: no locks, and workers sharing a directory share the id
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _claim(path: Path) -> InstanceId | None:
    """The id kept in `path` (made and written if the file is new or holds no valid id), or None if locked."""
    try:
        handle = path.open("a+", encoding="utf-8")
    except PermissionError:
        if not path.is_file():
            raise
        handle = path.open(encoding="utf-8")  # a read-only file still names the worker
    try:
        if not _try_lock(handle):
            handle.close()
            return None
        handle.seek(0)
        text = handle.read().strip()
        if INSTANCE_ID_PATTERN.fullmatch(text) is None:
            if text:
                log.warning("%s does not hold a valid instance id; replacing it with a new one", path)
            if not handle.writable():
                raise PermissionError(13, "the file is read-only and holds no valid id")
            text = new_instance_id()
            handle.seek(0)
            handle.truncate()
            handle.write(text + "\n")
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        handle.close()
        raise
    return InstanceId(text, path, handle)


def load_instance_id(path: Path) -> InstanceId:
    """The worker's stable id, from `path` or the first free sibling; made and saved on first use.

    If no file can be written, the id lives in memory for this run only, with one warning: the queen then
    sees a new worker after each restart.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for number in range(1, MAX_ID_FILES + 1):
            candidate = path if number == 1 else path.with_name(f"{path.name}.{number}")
            claimed = _claim(candidate)
            if claimed is not None:
                return claimed
        reason = f"all {MAX_ID_FILES} id files are in use by running workers"
    except OSError as exc:
        reason = f"{exc.strerror or exc}"
    value = new_instance_id()
    log.warning(
        "cannot keep an instance id in %s (%s): using %s for this run only, so the queen will see a new "
        "worker after a restart",
        path,
        reason,
        value,
    )
    return InstanceId(value, None)


def read_secret_file(path: Path) -> str:
    """The first line of `path`, without surrounding whitespace; IdentityError if unreadable or empty."""
    try:
        with path.open(encoding="utf-8") as handle:
            first = handle.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise IdentityError(f"cannot read the auth key file {path}: {message}") from None
    if not first:
        raise IdentityError(f"the auth key file {path} is empty: its first line must be the token")
    return first
