"""The queenbee command: options from flags over QUEENBEE_* variables, clear errors, documented help."""

from __future__ import annotations

import subprocess
import sys

import pytest

from queenbee.cli import load_settings


def test_flags_override_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """QUEENBEE_* variables set options; command-line flags win over them."""
    monkeypatch.setenv("QUEENBEE_PORT", "9100")
    monkeypatch.setenv("QUEENBEE_QUEUE_SIZE", "7")
    settings = load_settings(["--port", "9200"])
    assert settings.port == 9200
    assert settings.queue_size == 7


def test_invalid_value_exits_2_naming_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad value is one line on stderr naming the option, and exit status 2."""
    with pytest.raises(SystemExit) as raised:
        load_settings(["--port", "70000"])
    assert raised.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("queenbee: error: --port")
    assert len(err.strip().splitlines()) == 1


def test_help_documents_every_option() -> None:
    """--help lists each option with its description and the environment variable scheme."""
    done = subprocess.run(
        [sys.executable, "-m", "queenbee", "--help"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0
    for option in (
        "--host",
        "--port",
        "--queue-size",
        "--queue-timeout",
        "--first-token-timeout",
        "--token-timeout",
        "--request-timeout",
        "--heartbeat-interval",
        "--shutdown-grace",
        "--worker-token-file",
        "--admin-key-file",
        "--stats-key-file",
        "--allowed-host",
        "--worker-origin",
        "--max-connections",
        "--header-timeout",
    ):
        assert option in done.stdout
    assert "QUEENBEE_" in done.stdout
