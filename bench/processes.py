"""The servers a benchmark talks to, each in a process of its own: queen, workers, llama_cpp.server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil


class ServiceError(Exception):
    """A benchmark server did not start."""


def free_port() -> int:
    """A port nothing listens on right now (the kernel's choice)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Service:
    """A server process, its address, and where its output goes."""

    name: str
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    headers: dict[str, str] = field(default_factory=dict)
    """What a client sends with every request (the API key)."""

    def cpu_seconds(self) -> float:
        """CPU time the process has used so far (user + system, threads included)."""
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def rss_bytes(self) -> int:
        """Resident memory of the process now."""
        return int(psutil.Process(self.process.pid).memory_info().rss)

    def check_alive(self) -> None:
        """Raise ServiceError, with the end of its log, if the process has exited."""
        if self.process.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise ServiceError(f"{self.name} exited with {self.process.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not exit within 30 s."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _start(name: str, command: Sequence[str], base_url: str, logs: Path, cpus: set[int] | None) -> Service:
    log_path = logs / f"{name}.log"
    preexec: Callable[[], None] | None = None
    if cpus is not None:
        pinned = set(cpus)

        def preexec() -> None:
            os.sched_setaffinity(0, pinned)

    with log_path.open("wb") as log:
        process = subprocess.Popen(
            list(command), stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec, start_new_session=True
        )
    return Service(name, process, base_url, log_path)


def wait_until(service: Service, ready: Callable[[], bool], timeout: float) -> None:
    """Poll `ready` until it holds; ServiceError if the process dies or the deadline passes."""
    deadline = time.monotonic() + timeout
    while True:
        service.check_alive()
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise ServiceError(f"{service.name} was not ready within {timeout:g} s")
        time.sleep(0.2)


def start_queen(
    logs: Path, *, cpus: set[int] | None = None, api_key: str | None = None, options: Sequence[str] = ()
) -> Service:
    """A queen on a free port with a throwaway ledger (on disk), logging warnings only; with `api_key`,
    clients must send it; `options` are more command-line options."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "queenbee",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--db",
        str(logs / f"ledger-{port}.db"),
        "--queue-timeout",
        "600",
        "--first-token-timeout",
        "600",
        "--max-connections",
        "20000",
        *options,
    ]
    headers = {}
    if api_key is not None:
        command += ["--api-key", api_key]
        headers["Authorization"] = f"Bearer {api_key}"
    queen = _start("queen", command, f"http://127.0.0.1:{port}", logs, cpus)
    url = f"{queen.base_url}/v1/models"
    wait_until(queen, lambda: httpx.get(url, headers=headers).status_code == 200, 60)
    queen.headers = headers
    return queen


def served_models(queen: Service) -> list[str]:
    """Model ids the queen lists now."""
    response = httpx.get(f"{queen.base_url}/v1/models", headers=queen.headers)
    return [model["id"] for model in response.json()["data"]]


def start_worker(
    queen: Service, model: Path, *, parallel: int, threads: int | None, logs: Path, alias: str | None = None
) -> Service:
    """A workerbee process serving `model` (as `alias`) to `queen`; returns once the queen lists it.

    `threads` None leaves the count to the worker; it then logs at info level what it chose and why.
    """
    queen_ws = queen.base_url.replace("http://", "ws://") + "/worker"
    command = [
        sys.executable,
        "-m",
        "workerbee",
        "--queen-url",
        queen_ws,
        "--model",
        str(model),
        "--parallel",
        str(parallel),
        "--ctx-size",
        "2048",
        "--log-level",
        "info" if threads is None else "warning",
    ]
    if threads is not None:
        command += ["--threads", str(threads)]
    if alias is not None:
        command += ["--alias", alias]
    name = alias or model.stem
    worker = _start(f"workerbee-{name}", command, queen.base_url, logs, None)
    wait_until(worker, lambda: name in served_models(queen), 180)
    return worker


def start_llama_server(model: Path, *, threads: int, logs: Path) -> Service:
    """llama-cpp-python's OpenAI server on `model`; requests queue behind each other, none is cut off."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        model.stem,
        "--n_threads",
        str(threads),
        "--n_threads_batch",
        str(threads),
        "--n_ctx",
        "2048",
        "--port",
        str(port),
        # The default lets every new request cut off the stream in progress; a server for several
        # clients must not, so the comparison uses what such a user would set.
        "--interrupt_requests",
        "False",
        "--verbose",
        "False",
    ]
    server = _start("llama_cpp.server", command, f"http://127.0.0.1:{port}", logs, None)
    wait_until(server, lambda: httpx.get(f"{server.base_url}/v1/models").status_code == 200, 120)
    return server


def start_instant_worker(
    queen: Service,
    *,
    parallel: int,
    logs: Path,
    cpus: set[int] | None,
    chunks: int = 2,
    batched: bool = True,
    deltas: bool = True,
) -> Service:
    """A scripted worker (bench/instant_worker.py) that answers every job at once, with `chunks`
    content chunks when streamed; `batched` False sends one chunk frame per message (a bare relay needs
    that), `deltas` False sends the content as chunk frames instead of delta frames."""
    queen_ws = queen.base_url.replace("http://", "ws://") + "/worker"
    command = [sys.executable, "-m", "bench.instant_worker", queen_ws, str(parallel), str(chunks)]
    if not batched or queen.name == "bare-relay":
        command.append("--one-per-message")
    elif not deltas:
        command.append("--chunks-only")
    worker = _start(f"instant-worker-{free_port()}", command, queen.base_url, logs, cpus)
    if queen.name == "bare-relay":
        time.sleep(1.5)  # the bare relay has no /v1/models to watch
        worker.check_alive()
    else:
        wait_until(worker, lambda: "instant" in served_models(queen), 30)
    return worker


def start_bare(mode: str, logs: Path, *, cpus: set[int] | None, chunks: int = 2) -> Service:
    """bench/bare_relay.py in `mode` "instant" (answers at once) or "relay" (passes worker frames on)."""
    port = free_port()
    command = [sys.executable, "-m", "bench.bare_relay", mode, str(port), str(chunks)]
    server = _start(f"bare-{mode}", command, f"http://127.0.0.1:{port}", logs, cpus)

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(server, listening, 30)
    return server


def start_llama_cpp_server(
    binary: Path, model: Path, *, threads: int, parallel: int, n_ctx_seq: int, logs: Path
) -> Service:
    """llama.cpp's own llama-server on `model`: `parallel` slots of `n_ctx_seq` tokens, `threads` threads.

    Flash attention is off, as in the worker; everything else is llama-server's default (continuous
    batching, its unified KV cache).
    """
    port = free_port()
    command = [
        str(binary),
        "--model",
        str(model),
        "--alias",
        model.stem,
        "--threads",
        str(threads),
        "--threads-batch",
        str(threads),
        "--parallel",
        str(parallel),
        "--ctx-size",
        str(parallel * n_ctx_seq),
        "--flash-attn",
        "off",
        "--no-webui",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    server = _start("llama-server", command, f"http://127.0.0.1:{port}", logs, None)
    wait_until(server, lambda: httpx.get(f"{server.base_url}/health").status_code == 200, 120)
    return server
