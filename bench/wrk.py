"""Debian's `wrk` as the load generator: POSTs of one JSON body, with the latency distribution parsed.

wrk is written in C and drives many connections from one thread, so it is not the bottleneck of a
Python server on the next core. A Lua script sets the method, headers and body.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("WRK_BODY")
local key = os.getenv("WRK_KEY")
if key ~= nil and key ~= "" then wrk.headers["Authorization"] = "Bearer " .. key end
"""

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


class WrkError(Exception):
    """wrk is missing or its output could not be read."""


@dataclass(frozen=True)
class WrkRun:
    """One wrk run: how many requests completed, how many failed, and the latency percentiles (s)."""

    requests: int
    seconds: float
    failures: int
    p50: float
    p99: float

    @property
    def requests_per_second(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds


def available() -> bool:
    """Whether wrk is installed."""
    return shutil.which("wrk") is not None


def _duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise WrkError(f"cannot read the duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(output: str) -> WrkRun:
    """The figures of wrk's --latency output."""
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
    if done is None or p50 is None or p99 is None:
        raise WrkError(f"cannot read wrk's output:\n{output}")
    failures = 0
    if (non_2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", output)) is not None:
        failures += int(non_2xx.group(1))
    if errors := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output):
        failures += sum(int(value) for value in errors.groups())
    return WrkRun(
        requests=int(done.group(1)),
        seconds=float(done.group(2)) * _UNITS[done.group(3)],
        failures=failures,
        p50=_duration(p50.group(1)),
        p99=_duration(p99.group(1)),
    )


def run(
    url: str,
    body: str,
    *,
    connections: int,
    seconds: float,
    key: str | None = None,
    cpus: set[int] | None = None,
) -> WrkRun:
    """POST `body` to `url` from `connections` connections for `seconds`, on `cpus` if given."""
    if not available():
        raise WrkError("wrk is not installed (scripts/install installs it from Debian)")
    with tempfile.TemporaryDirectory() as directory:
        script = Path(directory) / "post.lua"
        script.write_text(_SCRIPT)
        command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-s", str(script), url]
        if cpus is not None:
            command = ["taskset", "-c", ",".join(str(cpu) for cpu in sorted(cpus)), *command]
        environment = {**os.environ, "WRK_BODY": body, "WRK_KEY": key or ""}
        done = subprocess.run(
            command, env=environment, capture_output=True, text=True, timeout=seconds + 60, check=False
        )
    if done.returncode != 0:
        raise WrkError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse(done.stdout)
