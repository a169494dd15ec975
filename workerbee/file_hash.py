"""A model's content hash: SHA-256 over its GGUF file(s), computed once and cached beside the file.

The queen resumes an answer only on a worker whose model hash matches (the same weights give the same
next token), so the hash must be of the bytes, not of the name. Hashing a few GiB takes seconds, so
the digest is kept in `<file>.sha256` with the file's size and mtime, and computed again only when
either changes. A cache that cannot be written (a read-only model directory) only costs a rehash.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("workerbee.file_hash")

_READ_BYTES = 8 * 2**20


def cache_path(path: Path) -> Path:
    """Where the digest of `path` is cached."""
    return path.with_name(path.name + ".sha256")


def file_sha256(path: Path) -> str:
    """The SHA-256 of one file, lowercase hex, from its cache when the file has not changed (blocking)."""
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cache = cache_path(path)
    try:
        cached = json.loads(cache.read_text())
        if isinstance(cached, dict) and {k: cached.get(k) for k in stamp} == stamp:
            digest = cached.get("sha256")
            if isinstance(digest, str) and len(digest) == 64:
                return digest
    except (OSError, ValueError):
        pass
    hasher = hashlib.sha256()
    with path.open("rb") as file:
        while block := file.read(_READ_BYTES):
            hasher.update(block)
    digest = hasher.hexdigest()
    try:
        cache.write_text(json.dumps({**stamp, "sha256": digest}))
    except OSError as exc:
        log.info("could not cache the hash of %s: %s", path, exc)
    return digest


def model_sha256(parts: Sequence[Path]) -> str:
    """The hash of a model: its one file's SHA-256, or for a split GGUF the SHA-256 of its parts' ones."""
    digests = [file_sha256(part) for part in parts]
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode("ascii")).hexdigest()
