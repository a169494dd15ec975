"""Fixtures shared by every test: real queens on ephemeral ports, scripted workers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from servers import QueenServer

from queenbee.settings import QueenSettings


@pytest.fixture(autouse=True, scope="session")
def private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Queens started by tests (in-process or not) keep their usage ledgers in a temporary directory."""
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    yield
    if previous is None:
        del os.environ["XDG_DATA_HOME"]
    else:
        os.environ["XDG_DATA_HOME"] = previous


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
