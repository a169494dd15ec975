"""Fixtures shared by every test: real queens on ephemeral ports, scripted workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from servers import QueenServer

from queenbee.settings import QueenSettings


@pytest.fixture
def queen_settings() -> QueenSettings:
    """Settings for a test queen; override the fixture to change them."""
    return QueenSettings(queue_timeout=2.0, first_token_timeout=10.0, token_timeout=10.0)


@pytest.fixture
def queen(queen_settings: QueenSettings) -> Iterator[QueenServer]:
    """A running queen on 127.0.0.1 with a port of its own."""
    server = QueenServer(queen_settings).start()
    yield server
    server.stop()
