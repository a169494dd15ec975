"""The cyclic garbage collector at 10,000 workers, with the collector guard and without, in one run.

`python -m bench.gc_pauses [--workers 10000] [--seconds 20] [--rounds 2]` starts, in alternating rounds,
a queen with its default `--gc-freeze` and one with `--no-gc-freeze`, connects `--workers` scripted
workers to it (bench/many_workers.py, 4 slots each, all serving the model), then drives it at one
connection with wrk for `--seconds`. It reports, from the queen's own `queenbee_gc_pause_seconds`, the
full (generation 2) collections and their total pause while the workers registered and during the
load, and wrk's p50 and p99.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.processes import Service, start_queen
from bench.queen_speed import KEY, _body, _start_many, _stop, load

_FULL = re.compile(r'^queenbee_gc_pause_seconds_(count|sum)\{generation="2"\} (\S+)$', re.MULTILINE)


@dataclass(frozen=True)
class FullCollections:
    """Generation 2 collections so far, and their pauses' sum in seconds."""

    count: int
    seconds: float

    def __sub__(self, other: FullCollections) -> FullCollections:
        return FullCollections(self.count - other.count, self.seconds - other.seconds)


def full_collections(queen: Service) -> FullCollections:
    """What the queen's /metrics says about its full collections."""
    text = httpx.get(f"{queen.base_url}/metrics", headers=queen.headers, timeout=60).text
    values = dict(_FULL.findall(text))
    return FullCollections(int(float(values.get("count", 0))), float(values.get("sum", 0.0)))


@dataclass(frozen=True)
class Round:
    """One queen's figures."""

    freeze: bool
    registering: FullCollections
    loaded: FullCollections
    p50: float
    p99: float
    requests: int


def one_round(freeze: bool, workers: int, seconds: float, logs: Path) -> Round:
    cpus = os.sched_getaffinity(0)
    queen_cpu = {min(cpus)}
    others = (cpus - queen_cpu) or queen_cpu
    options = [] if freeze else ["--no-gc-freeze"]
    queen = start_queen(logs, cpus=queen_cpu, api_key=KEY, options=options)
    try:
        start = full_collections(queen)
        many = _start_many(queen, workers, 0.0, logs, others)
        try:
            time.sleep(3)  # the last registrations, and the guard's freeze after them
            registered = full_collections(queen)
            run = load(queen, "/v1/chat/completions", _body(False), 1, seconds, others)
            loaded = full_collections(queen)
        finally:
            _stop(many)
    finally:
        queen.stop()
    return Round(freeze, registered - start, loaded - registered, run.run.p50, run.run.p99, run.run.requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="gc-pauses-"))
    rounds: list[Round] = []
    for index in range(args.rounds):
        for freeze in (True, False) if index % 2 == 0 else (False, True):
            result = one_round(freeze, args.workers, args.seconds, logs)
            rounds.append(result)
            print(
                f"round {index} {'guard' if freeze else 'no guard'}: registering {result.registering.count} "
                f"full collections, {result.registering.seconds:.2f} s; under load "
                f"{result.loaded.count}, {result.loaded.seconds:.2f} s; p50 {result.p50 * 1e3:.2f} ms, "
                f"p99 {result.p99 * 1e3:.2f} ms, {result.requests} requests",
                flush=True,
            )
    print(
        f"\n{args.workers} workers, {args.seconds:.0f} s at one connection, {args.rounds} rounds (medians):\n"
    )
    print("| | full collections while registering | their pause | under load | their pause | p50 | p99 |")
    print("|---|---|---|---|---|---|---|")
    for freeze in (False, True):
        mine = [r for r in rounds if r.freeze is freeze]
        print(
            f"| {'--gc-freeze (default)' if freeze else '--no-gc-freeze'} "
            f"| {statistics.median(r.registering.count for r in mine):.0f} "
            f"| {statistics.median(r.registering.seconds for r in mine):.2f} s "
            f"| {statistics.median(r.loaded.count for r in mine):.0f} "
            f"| {statistics.median(r.loaded.seconds for r in mine):.3f} s "
            f"| {statistics.median(r.p50 for r in mine) * 1e3:.2f} ms "
            f"| {statistics.median(r.p99 for r in mine) * 1e3:.2f} ms |"
        )
    print(f"\n(logs: {logs})")


if __name__ == "__main__":
    main()
