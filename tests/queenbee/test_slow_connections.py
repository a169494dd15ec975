"""Idle and slow connections: the header deadline closes them, the connection cap answers 503."""

from __future__ import annotations

import asyncio
import resource
import selectors
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from fake_worker import FakeWorker, answer
from servers import TIME_UNIT, QueenServer, wait_until

from protocol import Job
from queenbee.settings import QueenSettings

HEADER_TIMEOUT = 1.0 * TIME_UNIT
HALF_A_HEADER = b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-"
SLOW_HEADER = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 60
"""A valid request to drip: at no byte does it become malformed, which would close it for that instead."""
CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
IDLE_SOCKETS = 1000


@contextmanager
def running(tmp_path: Path, **options: Any) -> Iterator[QueenServer]:
    """A queen with `options`, stopped on the way out."""
    settings = QueenSettings(db=tmp_path / "ledger.db", queue_timeout=5.0, **options)
    queen = QueenServer(settings).start()
    try:
        yield queen
    finally:
        queen.stop()


def connect(queen: QueenServer, first_bytes: bytes = b"") -> socket.socket:
    """A raw TCP connection to the queen that sends `first_bytes` and nothing more."""
    sock = socket.create_connection(("127.0.0.1", queen.port), timeout=10 * TIME_UNIT)
    if first_bytes:
        sock.sendall(first_bytes)
    return sock


def wait_closed(sock: socket.socket, timeout: float) -> float:
    """Block until the queen closes `sock` (EOF); the monotonic time it did. Fails after `timeout`."""
    sock.settimeout(timeout)
    while data := sock.recv(4096):
        assert not data.startswith(b"HTTP/1.1 2"), data
    return time.monotonic()


def all_closed(socks: list[socket.socket], timeout: float) -> bool:
    """Whether the queen closes every one of `socks` within `timeout` seconds."""
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        open_ = len(socks)
        while open_ and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=deadline - time.monotonic()):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(4096)
                except ConnectionResetError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    open_ -= 1
        return open_ == 0


def raise_fd_limit(needed: int) -> None:
    """Let this process hold `needed` more descriptors (both ends of each connection live here)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed + 256:
        if hard != resource.RLIM_INFINITY and hard < needed + 256:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {needed} connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed + 256, hard))


def test_silent_and_half_sent_headers_are_closed_at_the_deadline(tmp_path: Path) -> None:
    """A connection that sends nothing, or half a header, is closed header_timeout after connecting."""
    with running(tmp_path, header_timeout=HEADER_TIMEOUT) as queen:
        opened = time.monotonic()
        silent, half = connect(queen), connect(queen, HALF_A_HEADER)
        closed = [wait_closed(sock, 10 * HEADER_TIMEOUT) for sock in (silent, half)]
        silent.close()
        half.close()
    # Not before the deadline (less a little for the event loop's clock), and well within 10 of them.
    assert min(closed) - opened >= 0.9 * HEADER_TIMEOUT


def test_dripping_headers_does_not_extend_the_deadline(tmp_path: Path) -> None:
    """Bytes trickling in do not reset the clock: the next request's headers are due after the response."""
    with running(tmp_path, header_timeout=HEADER_TIMEOUT) as queen:
        sock = connect(queen, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        response = b""
        while not response.endswith(b"}"):
            response += sock.recv(4096)
        responded = time.monotonic()
        assert response.startswith(b"HTTP/1.1 200")
        # A slowloris: one byte of the next request's headers every tenth of the deadline, for 10 of them.
        sock.setblocking(False)
        closed_at = None
        with selectors.DefaultSelector() as selector:
            selector.register(sock, selectors.EVENT_READ)
            deadline = responded + 10 * HEADER_TIMEOUT
            for byte in SLOW_HEADER[:100]:
                try:
                    if selector.select(timeout=HEADER_TIMEOUT / 10) and sock.recv(4096) == b"":
                        closed_at = time.monotonic()
                        break
                    sock.send(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    closed_at = time.monotonic()
                    break
                assert time.monotonic() < deadline
        sock.close()
    assert closed_at is not None, "the queen kept a dripping connection open"
    # The clock started as the response was sent, a moment before it was read here: a loose lower bound.
    assert closed_at - responded >= 0.5 * HEADER_TIMEOUT


async def test_a_request_slower_than_the_header_deadline_is_not_cut(tmp_path: Path) -> None:
    """Once its headers are in, a request may take longer than header_timeout to answer."""
    release = asyncio.Event()

    async def slow(worker: FakeWorker, job: Job) -> None:
        await release.wait()
        await answer(worker, job)

    with running(tmp_path, header_timeout=HEADER_TIMEOUT) as queen:
        worker = await FakeWorker(queen.worker_url, behaviour=slow).connect()
        idle = connect(queen)
        async with httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT) as client:
            pending = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
            # The idle connection's close shows the deadline has passed for the chat's connection too.
            await asyncio.to_thread(wait_closed, idle, 10 * HEADER_TIMEOUT)
            release.set()
            response = await pending
        registered = worker.worker_id in queen.hive.workers
        idle.close()
        await worker.close()
    assert response.status_code == 200
    assert registered


async def test_beyond_max_connections_new_requests_get_503(tmp_path: Path) -> None:
    """At the cap an HTTP request and a websocket upgrade get 503; once connections go, service resumes."""
    with running(tmp_path, max_connections=4, header_timeout=60.0) as queen:
        assert queen.server is not None
        state = queen.server.server_state
        idle = [connect(queen) for _ in range(4)]
        wait_until(lambda: len(state.connections) >= 4)
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            refused = await client.get("/health")
            with pytest.raises(websockets.InvalidStatus) as upgrade:
                await websockets.connect(queen.worker_url)
            for sock in idle:
                sock.close()
            wait_until(lambda: len(state.connections) == 0)
            served = await client.get("/health")
    assert refused.status_code == 503
    assert refused.text == "Service Unavailable"
    assert upgrade.value.response.status_code == 503
    assert served.status_code == 200


async def test_a_thousand_idle_sockets_neither_block_service_nor_stay(tmp_path: Path) -> None:
    """1,000 silent or half-sent connections: clients and workers are served, and the 1,000 are closed."""
    raise_fd_limit(2 * IDLE_SOCKETS + 64)
    with running(tmp_path, header_timeout=2 * HEADER_TIMEOUT) as queen:
        idle = [connect(queen, HALF_A_HEADER if n % 2 else b"") for n in range(IDLE_SOCKETS)]
        try:
            async with httpx.AsyncClient(base_url=queen.base_url, timeout=10 * TIME_UNIT) as client:
                models = await client.get("/v1/models")
                worker = await FakeWorker(queen.worker_url).connect()
                chat = await client.post("/v1/chat/completions", json=CHAT)
                closed = await asyncio.to_thread(all_closed, idle, 20 * HEADER_TIMEOUT)
                # The worker's websocket and the client's kept-alive connection outlived the deadline.
                again = await client.post("/v1/chat/completions", json=CHAT)
            await worker.close()
        finally:
            for sock in idle:
                sock.close()
    assert models.status_code == 200
    assert chat.status_code == 200
    assert closed, "idle connections were still open long after the header deadline"
    assert again.status_code == 200
