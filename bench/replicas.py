"""A hive of queen replicas on Redis against one queen, side by side in the same run.

`python -m bench.replicas [--seconds 8] [--chunks 50]` starts its own redis-server (temporary directory,
free loopback port) and measures, with Debian's `wrk` as the client:

- latency: replicas A and B (`--redis-url`), one instant worker (bench/instant_worker.py) on A; p50 and
  p99 at one connection of a request to A (served by its own worker) and of the same request to B
  (dispatched to A's worker over Redis and relayed back), whole and streamed, and the CPU A, B and
  Redis spent per request; "added" is B's minus A's;
- throughput: streamed answers of `--chunks` chunks at 16 connections per queen: one queen on its own
  (no Redis) with one instant worker, against replicas A and B each with one instant worker and a wrk
  of its own, run at once; chunks per second, the ratio of the hive's to the one queen's, the queens'
  CPU per chunk (what a replica costs beside a queen on its own) and the share of answers dispatched
  to the other replica.

On this machine's two cores the queens, the workers and wrk share the CPUs: in the one-queen run the
queen has a core to itself, in the hive each replica shares one with its worker and its wrk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from bench import wrk
from bench.processes import Service, free_port, served_models, start_instant_worker, wait_until


@dataclass(frozen=True)
class RedisProcess:
    """The bench's redis-server."""

    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """CPU time it has used so far."""
        times = psutil.Process(self.pid).cpu_times()
        return float(times.user + times.system)


@dataclass(frozen=True)
class Timed:
    """A wrk run, with the CPU the queens and Redis spent per request over it."""

    run: wrk.WrkRun
    cpu_per_request: float


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisProcess]:
    """A redis-server without persistence on a free loopback port."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise SystemExit("redis-server is not installed: run scripts/install")
    port = free_port()
    command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(directory)]
    log = (directory / "redis.log").open("wb")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit(f"redis-server did not start: see {directory / 'redis.log'}")
            time.sleep(0.05)
        yield RedisProcess(f"redis://127.0.0.1:{port}/0", process.pid)
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()


def start_replica(logs: Path, name: str, extra: Sequence[str], cpus: set[int] | None) -> Service:
    """A queen on a free port (a replica named `name` if `extra` holds --redis-url)."""
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "queenbee",
        *("--port", str(port), "--log-level", "warning", "--db", str(logs / f"{name}.db")),
        *("--queue-timeout", "600", "--first-token-timeout", "600", "--max-connections", "20000"),
        *extra,
    ]
    log_path = logs / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
        )
    queen = Service(name, process, f"http://127.0.0.1:{port}", log_path)
    wait_until(queen, lambda: httpx.get(f"{queen.base_url}/v1/models").status_code == 200, 60)
    return queen


def _body(streamed: bool) -> str:
    body: dict[str, object] = {"model": "instant", "messages": [{"role": "user", "content": "hi"}]}
    if streamed:
        body["stream"] = True
    return json.dumps(body)


def _run(queen: Service, streamed: bool, connections: int, seconds: float, cpus: set[int]) -> wrk.WrkRun:
    url = f"{queen.base_url}/v1/chat/completions"
    return wrk.run(url, _body(streamed), connections=connections, seconds=seconds, cpus=cpus)


def latency(logs: Path, redis: RedisProcess, seconds: float, cpus: set[int]) -> dict[str, dict[str, Timed]]:
    """p50 / p99 at one connection: a request to A (its own worker) and to B (A's worker, over Redis),
    with what A, B and Redis spent on each."""
    hive = ("--redis-url", redis.url, "--replica-lease", "3")
    a = start_replica(logs, "a", (*hive, "--replica-id", "a"), None)
    b = start_replica(logs, "b", (*hive, "--replica-id", "b"), None)
    worker = start_instant_worker(a, parallel=64, logs=logs, cpus=None)
    figures: dict[str, dict[str, Timed]] = {"local": {}, "cross": {}}

    def spent() -> float:
        return a.cpu_seconds() + b.cpu_seconds() + redis.cpu_seconds()

    try:
        wait_until(b, lambda: "instant" in served_models(b), 30)
        for streamed in (False, True):
            mode = "streamed" if streamed else "whole"
            for queen in (a, b):
                _run(queen, streamed, 1, 1, cpus)  # warm-up
            # Alternated in halves, so that a drift of the machine's speed lands on both sides alike.
            halves: dict[str, list[wrk.WrkRun]] = {"local": [], "cross": []}
            cpu = {"local": 0.0, "cross": 0.0}
            for _ in range(2):
                for queen, where in ((a, "local"), (b, "cross")):
                    before = spent()
                    halves[where].append(_run(queen, streamed, 1, seconds / 2, cpus))
                    cpu[where] += spent() - before
            for where, runs in halves.items():
                requests = max(1, sum(run.requests for run in runs))
                figures[where][mode] = Timed(min(runs, key=lambda run: run.p50), cpu[where] / requests)
    finally:
        worker.stop()
        b.stop()
        a.stop()
    return figures


@dataclass(frozen=True)
class Throughput:
    """The relay runs: one queen on its own, then two replicas driven at once."""

    one: wrk.WrkRun
    """One queen with a core of its own (its worker and wrk on the other)."""
    shared: wrk.WrkRun
    """One queen sharing one core with its worker and wrk, as each replica of the two does."""
    two: list[wrk.WrkRun]
    queen_cpu_one: float
    """CPU seconds the one queen spent over its run."""
    queen_cpu_two: float
    """CPU seconds the two replicas spent over theirs, together."""
    crossed: int
    """Answers one replica dispatched to the other's worker (warm-up included)."""


def throughput(logs: Path, redis: RedisProcess, seconds: float, chunks: int, cpus: list[int]) -> Throughput:
    """Streamed answers at 16 connections per queen: one queen alone, then two replicas at once."""
    first, second = {cpus[0]}, {cpus[-1]}
    alone = start_replica(logs, "alone", (), first)
    worker = start_instant_worker(alone, parallel=64, logs=logs, cpus=second, chunks=chunks)
    try:
        _run(alone, True, 4, 1, second)  # warm-up
        before = alone.cpu_seconds()
        one = _run(alone, True, 16, seconds, second)
        cpu_one = alone.cpu_seconds() - before
    finally:
        worker.stop()
        alone.stop()
    sharing = start_replica(logs, "sharing", (), first)
    worker = start_instant_worker(sharing, parallel=64, logs=logs, cpus=first, chunks=chunks)
    try:
        _run(sharing, True, 4, 1, first)  # warm-up
        shared = _run(sharing, True, 16, seconds, first)
    finally:
        worker.stop()
        sharing.stop()
    hive = ("--redis-url", redis.url, "--replica-lease", "3")
    queens = [
        start_replica(logs, "ta", (*hive, "--replica-id", "ta"), first),
        start_replica(logs, "tb", (*hive, "--replica-id", "tb"), second),
    ]
    workers = [
        start_instant_worker(queen, parallel=64, logs=logs, cpus=cpu, chunks=chunks)
        for queen, cpu in zip(queens, (first, second), strict=True)
    ]
    try:
        for queen in queens:
            wait_until(queen, lambda queen=queen: len(_workers(queen)) == 2, 30)  # type: ignore[misc]
            _run(queen, True, 4, 1, second)  # warm-up
        runs: list[wrk.WrkRun | None] = [None, None]

        def drive(index: int, cpu: set[int]) -> None:
            runs[index] = _run(queens[index], True, 16, seconds, cpu)

        threads = [
            threading.Thread(target=drive, args=(index, cpu)) for index, cpu in enumerate((first, second))
        ]
        before = sum(queen.cpu_seconds() for queen in queens)
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        cpu_two = sum(queen.cpu_seconds() for queen in queens) - before
        text = httpx.get(f"{queens[0].base_url}/metrics").text
        crossed = sum(
            float(line.rpartition(" ")[2])
            for line in text.splitlines()
            if line.startswith("queenbee_replica_jobs_run_total{")
        )
    finally:
        for process in workers:
            process.stop()
        for queen in queens:
            queen.stop()
    return Throughput(one, shared, [run for run in runs if run is not None], cpu_one, cpu_two, int(crossed))


def _workers(queen: Service) -> list[object]:
    data: list[object] = httpx.get(f"{queen.base_url}/v1/workers").json()["data"]
    return data


def _ms(value: float) -> str:
    return f"{value * 1e3:.2f} ms"


def report(lat: dict[str, dict[str, Timed]], through: Throughput, chunks: int) -> str:
    """The figures as markdown tables."""
    lines = [
        "| one connection | local (client on A) | cross-replica (client on B) | added |",
        "|---|---|---|---|",
    ]
    for mode in ("whole", "streamed"):
        local, cross = lat["local"][mode].run, lat["cross"][mode].run
        lines.append(f"| {mode}: p50 | {_ms(local.p50)} | {_ms(cross.p50)} | {_ms(cross.p50 - local.p50)} |")
        lines.append(f"| {mode}: p99 | {_ms(local.p99)} | {_ms(cross.p99)} | {_ms(cross.p99 - local.p99)} |")
        cpu_local, cpu_cross = lat["local"][mode].cpu_per_request, lat["cross"][mode].cpu_per_request
        lines.append(
            f"| {mode}: CPU of the queens and Redis per request | {_ms(cpu_local)} | {_ms(cpu_cross)} | "
            f"{_ms(cpu_cross - cpu_local)} |"
        )
    per_answer = chunks + 2
    one = through.one.requests_per_second * per_answer
    two = sum(run.requests_per_second for run in through.two) * per_answer
    answers = sum(run.requests for run in through.two)
    share = through.crossed / answers if answers else 0.0
    cpu_one = through.queen_cpu_one / max(1, through.one.requests * per_answer)
    cpu_two = through.queen_cpu_two / max(1, answers * per_answer)
    failures = through.one.failures + sum(run.failures for run in through.two)
    failures += sum(timed.run.failures for figures in lat.values() for timed in figures.values())
    shared = through.shared.requests_per_second * per_answer
    failures += through.shared.failures
    lines += [
        "",
        f"| {chunks}-chunk streams, 16 connections per queen | one queen | two replicas | two / one |",
        "|---|---|---|---|",
        f"| chunks per second | {one:,.0f} | {two:,.0f} | {two / one:.2f}x |",
        f"| chunks per second, the one queen sharing a core with its worker and wrk as each replica does "
        f"| {shared:,.0f} | {two:,.0f} | {two / shared:.2f}x |",
        f"| queen CPU per chunk | {cpu_one * 1e6:.1f} µs | {cpu_two * 1e6:.1f} µs | "
        f"{cpu_two / cpu_one:.2f}x |",
        f"| answers dispatched to the other replica | | {share:.1%} | |",
        "",
        f"Failed requests over the run: {failures}.",
    ]
    return "\n".join(lines)


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="Seconds per wrk run.")
    parser.add_argument("--chunks", type=int, default=50, help="Content chunks per streamed answer.")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))
    logs = Path(tempfile.mkdtemp(prefix="replicas-"))
    with redis_server(logs) as redis:
        lat = latency(logs, redis, args.seconds, {cpus[-1]})
        through = throughput(logs, redis, args.seconds, args.chunks, cpus)
    print(report(lat, through, args.chunks))
    print(f"\nlogs: {logs}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
