"""The worker's instance id kept on disk, and the auth key read from a file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from protocol import PROTOCOL_VERSION, ModelInfo, Register
from workerbee.identity import (
    IdentityError,
    default_instance_id_file,
    load_instance_id,
    read_secret_file,
)


def register(instance_id: str) -> Register:
    """A registration with this id: the protocol accepts what the worker makes."""
    return Register(
        protocol_version=PROTOCOL_VERSION,
        worker_version="t",
        instance_id=instance_id,
        max_frame_bytes=2**20,
        cpu_count=1,
        disk_space=1,
        vram=0,
        models=[ModelInfo(id="m", n_ctx=16)],
    )


def test_the_id_is_made_once_and_kept(tmp_path: Path) -> None:
    """The first run writes a new id; a later run (after the first let go) reads the same one back."""
    path = tmp_path / "workerbee" / "instance_id"
    first = load_instance_id(path)
    first.release()
    second = load_instance_id(path)
    second.release()
    assert first.value == second.value
    assert path.read_text().strip() == first.value
    assert register(first.value).instance_id == first.value


def test_running_workers_never_share_an_id(tmp_path: Path) -> None:
    """While one worker holds the id file, another takes the next one; each keeps its own after."""
    path = tmp_path / "instance_id"
    first, second = load_instance_id(path), load_instance_id(path)
    assert first.value != second.value
    assert second.path == tmp_path / "instance_id.2"
    first.release()
    second.release()
    again = load_instance_id(path)
    again.release()
    assert again.value == first.value


def test_an_unwritable_place_gives_a_one_run_id_and_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If no file can be written, the id lives in memory, with a single warning that says so."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, "workerbee.identity"):
        identity = load_instance_id(blocker / "workerbee" / "instance_id")
    assert identity.path is None
    assert register(identity.value).instance_id == identity.value
    [record] = caplog.records
    assert "for this run only" in record.getMessage()


def test_an_invalid_id_file_is_replaced(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file that holds no valid id (say, a forged log line) gets a fresh id, with a warning."""
    path = tmp_path / "instance_id"
    path.write_text("bad id\nwith a newline")
    identity = load_instance_id(path)
    identity.release()
    assert identity.value != "bad id"
    assert path.read_text().strip() == identity.value
    assert "does not hold a valid instance id" in caplog.text


def test_a_read_only_id_file_is_still_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An id file the worker may read but not write still names it."""
    path = tmp_path / "instance_id"
    path.write_text("kept-by-the-admin\n")
    opened = Path.open

    def read_only(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        # As for a file owned by another user: root would write through a chmod, so refuse here.
        if self == path and mode != "r":
            raise PermissionError(13, "Permission denied", str(self))
        return opened(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", read_only)
    identity = load_instance_id(path)
    identity.release()
    assert identity.value == "kept-by-the-admin"
    assert path.read_text() == "kept-by-the-admin\n"


def test_the_default_place_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """$XDG_CONFIG_HOME/workerbee/instance_id, or ~/.config when it is unset."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert default_instance_id_file() == tmp_path / "workerbee" / "instance_id"
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_instance_id_file() == tmp_path / "home" / ".config" / "workerbee" / "instance_id"


def test_the_secret_is_the_first_line(tmp_path: Path) -> None:
    """Only the first line counts, without its surrounding whitespace."""
    path = tmp_path / "key"
    path.write_text("  s3cret \nnot the key\n")
    assert read_secret_file(path) == "s3cret"


@pytest.mark.parametrize("content", [None, "", "\n\nkey"], ids=["missing", "empty", "blank first line"])
def test_an_unusable_secret_file_is_an_error(tmp_path: Path, content: str | None) -> None:
    """A missing file or an empty first line is refused, naming the file."""
    path = tmp_path / "key"
    if content is not None:
        path.write_text(content)
    with pytest.raises(IdentityError, match="auth key file"):
        read_secret_file(path)
