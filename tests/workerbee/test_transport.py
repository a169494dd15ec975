"""How the worker reaches the queen: TLS for wss://, and the warning for a token sent in plain text."""

from __future__ import annotations

import ssl

import pytest

from workerbee.transport import is_loopback, plaintext_token_warning, ssl_context


def test_wss_gets_a_verifying_context_with_the_system_cas() -> None:
    """A wss:// URL gets certificate and host name checks; ws:// gets no TLS."""
    context = ssl_context("wss://queen.example/worker")
    assert context is not None
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.check_hostname
    assert ssl_context("ws://queen.example/worker") is None


@pytest.mark.parametrize(
    ("url", "loopback"),
    [
        ("ws://127.0.0.1:8000/worker", True),
        ("ws://127.8.9.10/worker", True),
        ("ws://localhost:8000/worker", True),
        ("ws://[::1]:8000/worker", True),
        ("ws://10.0.0.5:8000/worker", False),
        ("ws://queen.example:8000/worker", False),
        ("ws://localhost.queen.example/worker", False),
    ],
)
def test_loopback_hosts(url: str, loopback: bool) -> None:
    """Only this machine's own addresses count as loopback."""
    assert is_loopback(url) is loopback


@pytest.mark.parametrize(
    ("url", "key", "warns"),
    [
        ("ws://queen.example:8000/worker", "s3cret", True),
        ("ws://192.168.1.20:8000/worker", "s3cret", True),
        ("ws://queen.example:8000/worker", "", False),
        ("wss://queen.example/worker", "s3cret", False),
        ("ws://127.0.0.1:8000/worker", "s3cret", False),
    ],
)
def test_plaintext_token_warning(url: str, key: str, warns: bool) -> None:
    """Only a token sent unencrypted to another machine is warned about, and the warning hides the token."""
    warning = plaintext_token_warning(url, key)
    assert (warning is not None) is warns
    if warning is not None:
        assert "plain text" in warning
        assert key not in warning
