"""Fixtures shared by every test: real queens on ephemeral ports, scripted workers."""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres_server import PostgresServer, running_postgres
from servers import QueenServer

from queenbee.settings import QueenSettings

# Set when this file is imported, before any test module is collected: settings built at collection
# (a parametrize argument, a module constant) must not reach the real home either.
_PREVIOUS_HOMES = {name: os.environ.get(name) for name in ("XDG_DATA_HOME", "XDG_CONFIG_HOME")}
_PRIVATE_HOME = Path(tempfile.mkdtemp(prefix="queenbee-tests-"))
os.environ["XDG_DATA_HOME"] = str(_PRIVATE_HOME / "data-home")
os.environ["XDG_CONFIG_HOME"] = str(_PRIVATE_HOME / "config-home")


@pytest.fixture(autouse=True, scope="session")
def private_data_home() -> Iterator[None]:
    """Queens and workers started by tests (in-process or not) keep their ledgers and instance ids in a
    temporary directory, never in the real home; it goes at the end of the session."""
    yield
    for name, value in _PREVIOUS_HOMES.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(_PRIVATE_HOME, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def collect_the_modules_garbage() -> Iterator[None]:
    """Collect each module's cyclic garbage as it ends: a socket a module left unclosed is then reported
    there (filterwarnings = error), not in whichever later test the collector happens to run."""
    yield
    gc.collect()


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


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole session, on a free loopback port (tests/postgres_server.py)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> str:
    """The URL of a new, empty database of its own on the session's PostgreSQL."""
    return postgres.create_database()
