"""A model's content hash: the file's SHA-256, cached beside it, computed again when the file changes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from workerbee.file_hash import cache_path, file_sha256, model_sha256


def test_the_hash_is_the_files_sha256_and_is_cached(tmp_path: Path) -> None:
    """The digest is SHA-256 of the bytes, and a second call reads it from `<file>.sha256`."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"weights" * 1000)
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert file_sha256(model) == expected
    cached = json.loads(cache_path(model).read_text())
    assert cached["sha256"] == expected
    cache_path(model).write_text(json.dumps({**cached, "sha256": "f" * 64}))
    assert file_sha256(model) == "f" * 64  # trusted while size and mtime stand


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    """A new mtime or size makes the cached digest stale."""
    model = tmp_path / "m.gguf"
    model.write_bytes(b"old")
    file_sha256(model)
    model.write_bytes(b"new weights")
    os.utime(model, ns=(1, 1))
    assert file_sha256(model) == hashlib.sha256(b"new weights").hexdigest()


def test_a_split_model_hashes_its_parts_in_order(tmp_path: Path) -> None:
    """Two parts give the SHA-256 of their digests in order; one part gives its own digest."""
    first, second = tmp_path / "a.gguf", tmp_path / "b.gguf"
    first.write_bytes(b"a")
    second.write_bytes(b"b")
    digests = [hashlib.sha256(b"a").hexdigest(), hashlib.sha256(b"b").hexdigest()]
    assert model_sha256([first]) == digests[0]
    assert model_sha256([first, second]) == hashlib.sha256("".join(digests).encode()).hexdigest()
    assert model_sha256([second, first]) != model_sha256([first, second])
