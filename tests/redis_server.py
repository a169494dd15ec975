"""A real `redis-server` for tests: its own process, a free loopback port, a temporary directory.

`RedisServer.start(tmp_path)` starts one and waits until it answers PING; `stop` / `kill` end it, and
`restart` brings it back on the same port (a Redis outage under traffic). Test modules use the
`redis_server` fixture by importing it: `from redis_server import redis_server`.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from servers import TIME_UNIT, bound_socket, wait_until

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _free_port() -> int:
    sock = bound_socket()
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@dataclass
class RedisServer:
    """One redis-server process, without persistence, on 127.0.0.1."""

    directory: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @classmethod
    def start(cls, tmp_path: Path) -> RedisServer:
        """A fresh redis-server in `tmp_path/redis`; fails saying how to install one if it is missing."""
        assert Path(REDIS_SERVER).exists(), "redis-server is missing: run scripts/install (Debian's package)"
        directory = tmp_path / "redis"
        directory.mkdir(exist_ok=True)
        server = cls(directory, _free_port())
        server.launch()
        return server

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0"""
        return f"redis://127.0.0.1:{self.port}/0"

    def launch(self) -> None:
        """Run the server on its port and wait until it answers."""
        command = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "no",
        ]
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: _answers(self.port) or self.process is None or self.process.poll() is not None)
        assert self.process.poll() is None, (self.directory / "redis.log").read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the server (an outage: every connection drops at once)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=10 * TIME_UNIT)

    def restart(self) -> None:
        """Start it again on the same port (empty: nothing was persisted)."""
        self.kill()
        self.launch()

    def stop(self) -> None:
        """Stop the server."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10 * TIME_UNIT)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own, stopped at the end."""
    server = RedisServer.start(tmp_path)
    try:
        yield server
    finally:
        server.stop()
