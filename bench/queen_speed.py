"""The queen's own speed, each figure beside its baseline from the same run (successor of queen_alone).

`python -m bench.queen_speed [--seconds 8] [--workers 10000]` runs, with the server under test pinned
to CPU 0 and the load generator (Debian's `wrk`) and the scripted workers on the other CPUs:

- requests: the queen (client keys on, the ledger on disk with synchronous=FULL) in front of an instant
  worker, against the instant upstream alone (bench/bare_relay.py `instant`: the same answers straight
  from the same HTTP stack) and the bare relay in front of the same worker (bench/bare_relay.py
  `relay`: the HTTP and websocket hops with nothing else); requests per second at 32 connections, p50
  and p99 at one connection, and the server's CPU per request; "added" is the queen's latency minus
  the baseline's;
- relay: streams of 200 chunks at 16 connections through the queen, against the bare websocket-to-SSE
  relay (bench/bare_relay.py `relay`) in front of the same instant worker: chunks per second and CPU
  per chunk; the queen three times, its worker sending one chunk frame per message (what the bare relay
  reads, and what workers sent before protocol 5), batches of chunk frames (before protocol 6), and as
  workerbee sends them: a turn's frames in one batch, text as delta frames;
- scale: `--workers` scripted workers connected at once (bench/many_workers.py), the queen's RSS with
  them and per worker, its latency at one connection with all of them serving the model against one
  worker alone (what choosing among them costs), and its RSS per request held in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench import wrk
from bench.processes import Service, start_bare, start_instant_worker, start_queen
from bench.scheduling import make_workers
from queenbee.hive import Hive
from queenbee.settings import QueenSettings

KEY = "sk-bench-queen-speed"
RELAY_CHUNKS = 200


def _body(streamed: bool) -> str:
    body: dict[str, object] = {"model": "instant", "messages": [{"role": "user", "content": "hi"}]}
    if streamed:
        body["stream"] = True
    return json.dumps(body)


@dataclass(frozen=True)
class Load:
    """One wrk run against one server, with the server's CPU seconds over it."""

    run: wrk.WrkRun
    cpu_seconds: float

    @property
    def cpu_per_request(self) -> float:
        """Server CPU seconds per completed request."""
        return self.cpu_seconds / max(1, self.run.requests)


def load(server: Service, path: str, body: str, connections: int, seconds: float, cpus: set[int]) -> Load:
    """Drive `server` with wrk; the server's CPU is read before and after."""
    before = server.cpu_seconds()
    key = server.headers.get("Authorization", "").removeprefix("Bearer ") or None
    run = wrk.run(server.base_url + path, body, connections=connections, seconds=seconds, key=key, cpus=cpus)
    return Load(run, server.cpu_seconds() - before)


def _requests(server: Service, seconds: float, cpus: set[int]) -> dict[str, Load]:
    figures: dict[str, Load] = {}
    for streamed in (False, True):
        mode = "streamed" if streamed else "whole"
        load(server, "/v1/chat/completions", _body(streamed), 8, 1, cpus)  # warm-up
        figures[f"{mode} c1"] = load(server, "/v1/chat/completions", _body(streamed), 1, seconds, cpus)
        figures[f"{mode} c32"] = load(server, "/v1/chat/completions", _body(streamed), 32, seconds, cpus)
    return figures


def _start_many(
    server: Service, count: int, delay: float, logs: Path, cpus: set[int]
) -> subprocess.Popen[str]:
    url = server.base_url.replace("http://", "ws://") + "/worker"
    process = subprocess.Popen(
        [sys.executable, "-m", "bench.many_workers", url, str(count), str(delay)],
        stdout=subprocess.PIPE,
        stderr=(logs / f"many-workers-{count}.log").open("w"),
        text=True,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        start_new_session=True,
    )
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], 600)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("connected"):
        process.kill()
        raise RuntimeError(f"the scripted workers did not connect: {line!r}")
    return process


def _stop(process: subprocess.Popen[str]) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _scale(
    logs: Path, workers: int, seconds: float, queen_cpu: set[int], others: set[int]
) -> dict[str, float]:
    queen = start_queen(logs, cpus=queen_cpu, api_key=KEY)
    figures: dict[str, float] = {}
    try:
        one = start_instant_worker(queen, parallel=256, logs=logs, cpus=others)
        alone = load(queen, "/v1/chat/completions", _body(False), 1, seconds, others)
        one.stop()
        time.sleep(1)
        empty = queen.rss_bytes()
        many = _start_many(queen, workers, 0.0, logs, others)
        try:
            time.sleep(2)
            held = queen.rss_bytes()
            figures["rss_with_workers_mib"] = held / 2**20
            figures["rss_per_worker_kib"] = (held - empty) / workers / 2**10
            crowded = load(queen, "/v1/chat/completions", _body(False), 1, seconds, others)
        finally:
            _stop(many)
        decisions = scheduling_times(workers)
        figures["scheduling_p50_us"] = decisions[len(decisions) // 2] * 1e6
        figures["scheduling_p99_us"] = decisions[int(len(decisions) * 0.99)] * 1e6
        figures["p50_one_worker_ms"] = alone.run.p50 * 1e3
        figures["p99_one_worker_ms"] = alone.run.p99 * 1e3
        figures["p50_many_workers_ms"] = crowded.run.p50 * 1e3
        figures["p99_many_workers_ms"] = crowded.run.p99 * 1e3
    finally:
        queen.stop()
    # Requests in flight, on a queen of their own (memory the workers above left free would hide them):
    # workers that answer after a while, and that many requests held open.
    queen = start_queen(logs, cpus=queen_cpu, api_key=KEY)
    try:
        in_flight = 1000
        slow = _start_many(queen, in_flight // 4, 30.0, logs, others)
        try:
            time.sleep(1)
            before = queen.rss_bytes()
            figures["rss_per_request_kib"] = (_hold_requests(queen, in_flight) - before) / in_flight / 2**10
        finally:
            _stop(slow)
    finally:
        queen.stop()
    return figures


def scheduling_times(workers: int, decisions: int = 5000) -> list[float]:
    """Seconds per routing decision of the queen's own Hive.acquire (choose and reserve, then release)
    with `workers` socket-less sessions connected, each serving the model with 4 slots; sorted."""

    async def decide() -> list[float]:
        hive = Hive(QueenSettings())
        for session in make_workers(workers):
            session._on_slot_free = hive.slot_freed
            hive.add(session)
        times = []
        for step in range(decisions):
            started = time.perf_counter()
            worker, _ = await hive.acquire("m", f"r{step}")
            times.append(time.perf_counter() - started)
            worker.release(f"r{step}")
        return sorted(times)

    return asyncio.run(decide())


def _hold_requests(queen: Service, count: int) -> int:
    """Start `count` streamed requests that the slow workers hold; the queen's RSS once all are in."""

    async def hold() -> int:
        limits = httpx.Limits(max_connections=count + 10)
        async with httpx.AsyncClient(
            base_url=queen.base_url, headers=queen.headers, limits=limits, timeout=120
        ) as client:

            async def one() -> None:
                headers = {"Content-Type": "application/json"}
                body = _body(True)
                async with client.stream(
                    "POST", "/v1/chat/completions", content=body, headers=headers
                ) as response:
                    if response.status_code != 200:
                        raise RuntimeError(f"a held request was refused: {response.status_code}")
                    async for _ in response.aiter_bytes():
                        pass

            tasks = [asyncio.create_task(one()) for _ in range(count)]
            await asyncio.sleep(15)  # all sent and waiting on the workers' 30 s delay
            failed = [task for task in tasks if task.done()]
            if failed:
                raise RuntimeError(f"{len(failed)} held requests ended early: {failed[0].exception()!r}")
            rss = queen.rss_bytes()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return rss

    return asyncio.run(hold())


def _server(name: str, logs: Path, cpus: set[int]) -> Service:
    """The bare relay ("bare"), or the queen with client keys on and its ledger on disk."""
    if name == "bare":
        return start_bare("relay", logs, cpus=cpus)
    return start_queen(logs, cpus=cpus, api_key=KEY)


def measure(seconds: float, workers: int) -> dict[str, object]:
    """Every figure, baselines first."""
    cpus = os.sched_getaffinity(0)
    server_cpu = {min(cpus)}
    others = (cpus - server_cpu) or server_cpu
    os.sched_setaffinity(0, others)
    logs = Path(tempfile.mkdtemp(prefix="queen-speed-"))
    results: dict[str, object] = {"logs": str(logs)}

    upstream = start_bare("instant", logs, cpus=server_cpu)
    try:
        results["upstream"] = _requests(upstream, seconds, others)
    finally:
        upstream.stop()
    for name in ("bare", "queen"):  # the same instant worker behind the bare relay, then the queen
        server = _server(name, logs, server_cpu)
        worker = start_instant_worker(server, parallel=256, logs=logs, cpus=others)
        try:
            results[name] = _requests(server, seconds, others)
        finally:
            worker.stop()
            server.stop()

    relays: dict[str, Load] = {}
    # "queen single": the worker sends one chunk frame per message, as before protocol 5's batches;
    # "queen chunks": batches of chunk frames, as before protocol 6's deltas; "queen": as workerbee sends.
    for name in ("bare", "queen single", "queen chunks", "queen"):
        server = _server(name, logs, server_cpu)
        worker = start_instant_worker(
            server,
            parallel=256,
            logs=logs,
            cpus=others,
            chunks=RELAY_CHUNKS,
            batched=name != "queen single",
            deltas=name == "queen",
        )
        try:
            load(server, "/v1/chat/completions", _body(True), 4, 1, others)  # warm-up
            relays[name] = load(server, "/v1/chat/completions", _body(True), 16, seconds, others)
        finally:
            worker.stop()
            server.stop()
    results["relay"] = relays
    if workers:
        results["scale"] = _scale(logs, workers, seconds, server_cpu, others)
    return results


def _ms(value: float) -> str:
    return f"{value * 1e3:.2f} ms"


def report(results: dict[str, object]) -> str:
    """The figures as markdown tables."""
    upstream: dict[str, Load] = results["upstream"]  # type: ignore[assignment]
    bare: dict[str, Load] = results["bare"]  # type: ignore[assignment]
    queen: dict[str, Load] = results["queen"]  # type: ignore[assignment]
    lines = [
        "| | upstream alone | bare relay | queen | queen / upstream | queen / bare relay |",
        "|---|---|---|---|---|---|",
    ]
    for mode in ("whole", "streamed"):
        c1, c32 = f"{mode} c1", f"{mode} c32"
        up, ba, qu = (figures[c32].run.requests_per_second for figures in (upstream, bare, queen))
        lines.append(
            f"| {mode}: req/s at 32 connections | {up:,.0f} | {ba:,.0f} | {qu:,.0f} | {qu / up:.2f}x | "
            f"{qu / ba:.2f}x |"
        )
        for name in ("p50", "p99"):
            up, ba, qu = (getattr(figures[c1].run, name) for figures in (upstream, bare, queen))
            lines.append(
                f"| {mode}: {name} at 1 connection | {_ms(up)} | {_ms(ba)} | {_ms(qu)} | "
                f"added {_ms(qu - up)} | added {_ms(qu - ba)} |"
            )
        up, ba, qu = (figures[c32].cpu_per_request for figures in (upstream, bare, queen))
        lines.append(
            f"| {mode}: server CPU per request (32 conn.) | {_ms(up)} | {_ms(ba)} | {_ms(qu)} | "
            f"{qu / up:.2f}x | {qu / ba:.2f}x |"
        )
    failures = sum(figure.run.failures for figures in (upstream, bare, queen) for figure in figures.values())
    relay: dict[str, Load] = results["relay"]  # type: ignore[assignment]
    chunks = {name: figure.run.requests_per_second * (RELAY_CHUNKS + 2) for name, figure in relay.items()}
    per_chunk = {
        name: figure.cpu_seconds / max(1, figure.run.requests * (RELAY_CHUNKS + 2))
        for name, figure in relay.items()
    }
    lines += [
        "",
        "| relay, 200-chunk streams at 16 connections | bare relay | queen, a chunk frame per message | "
        "queen, batched chunk frames | queen, batched deltas | queen / bare |",
        "|---|---|---|---|---|---|",
        f"| chunks per second | {chunks['bare']:,.0f} | {chunks['queen single']:,.0f} | "
        f"{chunks['queen chunks']:,.0f} | {chunks['queen']:,.0f} | {chunks['queen'] / chunks['bare']:.2f}x |",
        f"| server CPU per chunk | {per_chunk['bare'] * 1e6:.1f} µs | "
        f"{per_chunk['queen single'] * 1e6:.1f} µs | {per_chunk['queen chunks'] * 1e6:.1f} µs | "
        f"{per_chunk['queen'] * 1e6:.1f} µs | {per_chunk['queen'] / per_chunk['bare']:.2f}x |",
    ]
    failures += sum(figure.run.failures for figure in relay.values())
    scale = results.get("scale")
    if isinstance(scale, dict):
        lines += [
            "",
            "| scale | figure |",
            "|---|---|",
            f"| queen RSS with the workers connected | {scale['rss_with_workers_mib']:.0f} MiB |",
            f"| RSS per connected worker | {scale['rss_per_worker_kib']:.1f} KiB |",
            f"| RSS per request in flight | {scale['rss_per_request_kib']:.1f} KiB |",
            f"| a routing decision (Hive.acquire), p50 / p99 | {scale['scheduling_p50_us']:.1f} / "
            f"{scale['scheduling_p99_us']:.1f} µs |",
            f"| p50 / p99 at 1 connection, one worker | {scale['p50_one_worker_ms']:.2f} / "
            f"{scale['p99_one_worker_ms']:.2f} ms |",
            f"| p50 / p99 at 1 connection, all of them serving the model | "
            f"{scale['p50_many_workers_ms']:.2f} / {scale['p99_many_workers_ms']:.2f} ms |",
        ]
    lines += ["", f"Failed requests over the run: {failures}."]
    return "\n".join(lines)


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="Seconds per wrk run.")
    parser.add_argument(
        "--workers", type=int, default=10000, help="Scripted workers for the scale figures (0: skip)."
    )
    args = parser.parse_args()
    print(report(measure(args.seconds, args.workers)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
