"""A queen in a process of its own, started by the real `queenbee` command, for tests that kill it or
read everything it logged."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from servers import TIME_UNIT, wait_until

_LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@dataclass
class QueenProcess:
    """`python -m queenbee --port 0 ...`, with its stdout and stderr in a file."""

    process: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0

    @classmethod
    def start(
        cls,
        tmp_path: Path,
        *args: str,
        log_name: str = "queen.log",
        preexec_fn: Callable[[], None] | None = None,
    ) -> QueenProcess:
        """Start a queen on 127.0.0.1 and a free port; returns once it listens.

        `preexec_fn` runs in the child before the queen starts (to set resource limits, say).
        """
        log_path = tmp_path / log_name
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "queenbee", "--host", "127.0.0.1", "--port", "0", *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=preexec_fn,
            )
        queen = cls(process, log_path)

        def listening() -> bool:
            match = _LISTENING.search(queen.log())
            if match is None and process.poll() is not None:
                raise AssertionError(f"the queen exited with {process.returncode}:\n{queen.log()}")
            if match is not None:
                queen.port = int(match.group(1))
            return match is not None

        try:
            wait_until(listening, timeout=30)
        except BaseException:
            queen.kill()
            raise
        return queen

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    @property
    def worker_url(self) -> str:
        """Where workers connect."""
        return f"ws://127.0.0.1:{self.port}/worker"

    def log(self) -> str:
        """Everything the queen wrote so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self) -> None:
        """SIGKILL: the queen gets no chance to flush or clean up anything."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30 * TIME_UNIT)

    def stop(self) -> int:
        """SIGTERM, and wait for a clean exit; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30 * TIME_UNIT)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
