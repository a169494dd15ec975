"""Fixtures shared by every test: real queens on ephemeral ports, scripted workers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from servers import QueenServer

from queenbee.settings import QueenSettings


@pytest.fixture(autouse=True, scope="session")
def private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Queens and workers started by tests (in-process or not) keep their ledgers and instance ids in a
    temporary directory, never in the real home."""
    previous = {name: os.environ.get(name) for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME")}
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    os.environ["XDG_CONFIG_HOME"] = str(tmp_path_factory.mktemp("config-home"))
    yield
    for name, value in previous.items():
        if value is None:
            del os.environ[name]
        else:
            os.environ[name] = value


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
