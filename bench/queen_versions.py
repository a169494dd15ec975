"""The queen alone, two versions side by side: this checkout against an earlier commit, interleaved.

`python -m bench.queen_versions BASELINE_COMMIT [--rounds 8]` checks the baseline out into a temporary
git worktree and starts both versions at once, each a queen with its own instant worker from its own
tree (so that each speaks its own protocol), both queens on CPU 0 and the workers and this client on
the others. Only one is driven at a time: round by round, mode by mode, the two take turns (A B, then
B A), so that both see the same machine and both are warm. Each turn sends `--requests` requests at
concurrency 1 and 32, whole and streamed, from a Python client (httpx, a closed loop: each connection
sends its next request when the last ends), and reads the queen's CPU seconds from /proc before and
after. The table gives, per mode and concurrency, the medians over rounds of queen CPU per request and
of client latency, and the median of the per-round ratios new / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from bench.load import LoadRun, run_load
from bench.queen_alone import _bodies

ROOT = Path(__file__).resolve().parent.parent

# Run inside each version's own tree: its queen and its instant worker, until stdin closes.
_SERVE = """
import json, os, sys, tempfile
from pathlib import Path
from bench.processes import start_instant_worker, start_queen
cpus = os.sched_getaffinity(0)
queen_cpu = {min(cpus)}
others = (cpus - queen_cpu) or queen_cpu
logs = Path(tempfile.mkdtemp())
queen = start_queen(logs, cpus=queen_cpu)
worker = start_instant_worker(queen, parallel=256, logs=logs, cpus=others)
print(json.dumps({"url": queen.base_url, "pid": queen.process.pid}), flush=True)
sys.stdin.read()
worker.stop()
queen.stop()
"""

LOADS = ((False, 1), (False, 32), (True, 1), (True, 32))
"""(streamed, concurrency) of every turn."""


@dataclass
class Version:
    """One version's queen, started from its tree."""

    name: str
    process: subprocess.Popen[str]
    url: str
    queen_pid: int

    @classmethod
    def start(cls, name: str, tree: Path) -> Version:
        process = subprocess.Popen(
            [sys.executable, "-c", _SERVE],
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {name} queen did not start")
        started = json.loads(line)
        return cls(name, process, started["url"], started["pid"])

    def queen_cpu_seconds(self) -> float:
        with open(f"/proc/{self.queen_pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


@dataclass(frozen=True)
class Turn:
    """One version's run of one load."""

    cpu_per_request: float
    p50: float
    p99: float
    errors: int


def drive(version: Version, streamed: bool, concurrency: int, requests: int) -> Turn:
    """Send the requests; the queen's CPU per request and the client's latencies."""
    before = version.queen_cpu_seconds()
    run: LoadRun = asyncio.run(run_load(version.url, _bodies(requests, streamed), concurrency))
    cpu = version.queen_cpu_seconds() - before
    latencies = sorted(result.latency for result in run.results)
    return Turn(
        cpu / max(1, len(run.results)),
        _percentile(latencies, 0.5),
        _percentile(latencies, 0.99),
        len(run.errors),
    )


def _percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]


def main(argv: list[str] | None = None) -> int:
    """Measure both versions in interleaved rounds and print the comparison as a Markdown table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("baseline", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--requests", type=int, default=400, help="requests per version, load and round")
    args = parser.parse_args(argv)
    cpus = os.sched_getaffinity(0)
    own = cpus
    turns: dict[tuple[str, bool, int], list[Turn]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline], check=True
        )
        versions: list[Version] = []
        try:
            versions = [Version.start("baseline", tree), Version.start("new", ROOT)]
            os.sched_setaffinity(0, (cpus - {min(cpus)}) or cpus)
            for version in versions:  # warm-up
                for streamed, concurrency in LOADS:
                    drive(version, streamed, concurrency, 100)
            for number in range(args.rounds):
                order = versions if number % 2 == 0 else versions[::-1]
                for streamed, concurrency in LOADS:
                    for version in order:
                        turn = drive(version, streamed, concurrency, args.requests)
                        turns.setdefault((version.name, streamed, concurrency), []).append(turn)
                print(f"round {number + 1} of {args.rounds} done", file=sys.stderr, flush=True)
        finally:
            os.sched_setaffinity(0, own)
            for version in versions:
                version.stop()
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False)
    print(
        "| mode | conc | queen CPU/req, baseline | new | new/baseline (median of rounds) "
        "| p50, baseline | new | p99, baseline | new | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for streamed, concurrency in LOADS:
        old = turns["baseline", streamed, concurrency]
        new = turns["new", streamed, concurrency]
        ratios = [n.cpu_per_request / o.cpu_per_request for n, o in zip(new, old, strict=True)]

        def median(values: list[float]) -> float:
            return statistics.median(values) * 1e3

        print(
            f"| {'streamed' if streamed else 'whole'} | {concurrency} "
            f"| {median([t.cpu_per_request for t in old]):.2f} ms "
            f"| {median([t.cpu_per_request for t in new]):.2f} ms "
            f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
            f"| {median([t.p50 for t in old]):.1f} ms | {median([t.p50 for t in new]):.1f} ms "
            f"| {median([t.p99 for t in old]):.1f} ms | {median([t.p99 for t in new]):.1f} ms "
            f"| {sum(t.errors for t in old + new)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
