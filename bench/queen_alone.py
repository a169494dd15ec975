"""The queen's own cost: one queen process on one core, instant scripted workers, many small requests."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from bench.load import LoadRun, run_load
from bench.processes import start_instant_worker, start_queen


@dataclass(frozen=True)
class QueenRun:
    """One load on the queen alone."""

    streamed: bool
    concurrency: int
    run: LoadRun
    queen_cpu_seconds: float

    @property
    def requests_per_second(self) -> float:
        """Completed requests per second of wall time."""
        return len(self.run.results) / (self.run.ended - self.run.started)

    @property
    def cpu_per_request(self) -> float:
        """Queen CPU seconds per request: 1/this is what one fully busy core could serve."""
        return self.queen_cpu_seconds / len(self.run.results)


def _bodies(count: int, streamed: bool) -> list[dict[str, object]]:
    body: dict[str, object] = {"model": "instant", "messages": [{"role": "user", "content": "hi"}]}
    if streamed:
        body["stream"] = True
    return [body] * count


def measure_queen(logs: Path, *, latency_requests: int, throughput_requests: int) -> list[QueenRun]:
    """Latency at concurrency 1 and throughput at concurrency 32, streamed and not.

    The queen is pinned to CPU 0; the instant worker and this client to the other CPUs (if any).
    """
    cpus = os.sched_getaffinity(0)
    queen_cpu = {min(cpus)}
    others = (cpus - queen_cpu) or queen_cpu
    queen = start_queen(logs, cpus=queen_cpu)
    worker = start_instant_worker(queen, parallel=256, logs=logs, cpus=others)
    own = os.sched_getaffinity(0)
    os.sched_setaffinity(0, others)
    runs: list[QueenRun] = []
    try:
        for streamed in (False, True):
            asyncio.run(run_load(queen.base_url, _bodies(50, streamed), 8))  # warm-up
            for concurrency, count in ((1, latency_requests), (32, throughput_requests)):
                before = queen.cpu_seconds()
                run = asyncio.run(run_load(queen.base_url, _bodies(count, streamed), concurrency))
                runs.append(QueenRun(streamed, concurrency, run, queen.cpu_seconds() - before))
    finally:
        os.sched_setaffinity(0, own)
        worker.stop()
        queen.stop()
    return runs
