"""Scheduling cost against hive size: the queen's worker index vs. the reference linear scan.

Run: python -m bench.scheduling
Each row times one routing decision (choose, reserve, release) for the same workload with both
implementations of the same policy, side by side in this process, and reports their ratio.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, ModelInfo, Register
from queenbee.scheduling import WorkerIndex, choose_worker
from queenbee.worker_session import WorkerSession

DECISIONS = 2000


def make_workers(count: int) -> list[WorkerSession]:
    """`count` socket-less sessions serving model m with 4 slots each."""
    registration = Register(
        protocol_version=PROTOCOL_VERSION,
        instance_id="bench-" + uuid.uuid4().hex[:12],
        max_frame_bytes=MAX_FRAME_BYTES,
        worker_version="bench",
        cpu_count=1,
        disk_space=1,
        vram=0,
        models=[ModelInfo(id="m", n_ctx=512)],
        parallel=4,
    )
    socket: Any = None
    return [
        WorkerSession(
            f"w{i}", socket, registration, on_slot_free=lambda _: None, cancel_grace=1, max_frame_bytes=1
        )
        for i in range(count)
    ]


def time_scan(workers: list[WorkerSession]) -> float:
    """Microseconds per decision with the reference linear scan."""
    start = time.perf_counter()
    for step in range(DECISIONS):
        worker = choose_worker(workers, "m", now=0.0)
        assert worker is not None
        worker.reserve(f"r{step}", "m")
        worker.release(f"r{step}")
    return (time.perf_counter() - start) / DECISIONS * 1e6


def time_index(workers: list[WorkerSession]) -> float:
    """Microseconds per decision with the queen's heap index."""
    index = WorkerIndex()
    for worker in workers:
        index.update(worker)
    start = time.perf_counter()
    for step in range(DECISIONS):
        chosen = index.choose("m", now=0.0)
        assert chosen is not None
        chosen.reserve(f"r{step}", "m")
        index.update(chosen)
        chosen.release(f"r{step}")
        index.update(chosen)
    return (time.perf_counter() - start) / DECISIONS * 1e6


def main() -> None:
    """Print the table."""
    print("| workers | linear scan (µs/decision) | index (µs/decision) | index / scan |")
    print("| ---: | ---: | ---: | ---: |")
    for count in (10, 100, 1000, 10000):
        scan = time_scan(make_workers(count))
        indexed = time_index(make_workers(count))
        print(f"| {count} | {scan:.1f} | {indexed:.1f} | {indexed / scan:.3f}x |")


if __name__ == "__main__":
    main()
