"""How the worker reaches its queen: TLS for wss:// URLs, and whether a ws:// URL leaves this machine."""

from __future__ import annotations

import ipaddress
import ssl
from urllib.parse import urlsplit


def ssl_context(queen_url: str) -> ssl.SSLContext | None:
    """The TLS context for `queen_url`: the system's CAs with host name checks for wss://, None for ws://.

    Made afresh for each connection, so it honours SSL_CERT_FILE / SSL_CERT_DIR as they are then.
    """
    if urlsplit(queen_url).scheme != "wss":
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    # create_default_context already does this; stated so that no later change can quietly drop it.
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def is_loopback(queen_url: str) -> bool:
    """Whether `queen_url`'s host is this machine (localhost, 127.0.0.0/8, ::1)."""
    host = urlsplit(queen_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plaintext_token_warning(queen_url: str, auth_key: str) -> str | None:
    """The warning for sending `auth_key` unencrypted over the network, or None if it does not leave."""
    if not auth_key or urlsplit(queen_url).scheme != "ws" or is_loopback(queen_url):
        return None
    return (
        f"the auth key goes to {queen_url} as plain text over the network: anyone on the path can read "
        "it; use a wss:// URL"
    )
