"""The queen alone, two versions side by side: this checkout against an earlier commit, alternating.

`python -m bench.queen_versions BASELINE_COMMIT [--rounds 3]` checks the baseline out into a temporary
git worktree and runs `bench.queen_alone` of each version (its own queen and its own instant worker,
which speak that version's protocol) in turn, A B A B, then prints one table: per mode and concurrency,
the median over rounds of queen CPU per request and client latency, and the ratio new / baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

_MEASURE = """
import json, sys, tempfile
from pathlib import Path
from bench.queen_alone import measure_queen
logs = Path(tempfile.mkdtemp())
runs = measure_queen(logs, latency_requests=int(sys.argv[1]), throughput_requests=int(sys.argv[2]))
print(json.dumps([
    {
        "streamed": run.streamed,
        "concurrency": run.concurrency,
        "cpu_per_request": run.cpu_per_request,
        "requests_per_second": run.requests_per_second,
        "latencies": sorted(result.latency for result in run.run.results),
        "errors": sum(result.error is not None for result in run.run.results),
    }
    for run in runs
]))
"""


def measure(source: Path, latency_requests: int, throughput_requests: int) -> list[dict[str, Any]]:
    """One queen-alone measurement of the code in `source`."""
    environment = {**os.environ, "PYTHONPATH": str(source)}
    output = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(latency_requests), str(throughput_requests)],
        cwd=source,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
        timeout=1800,
    ).stdout
    result: list[dict[str, Any]] = json.loads(output.strip().splitlines()[-1])
    return result


def _percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(fraction * len(values)))]


def main(argv: list[str] | None = None) -> int:
    """Measure both versions in alternating rounds and print the comparison as a Markdown table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("baseline", help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--latency-requests", type=int, default=300)
    parser.add_argument("--throughput-requests", type=int, default=2000)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        baseline = Path(scratch) / "baseline"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline), args.baseline], check=True
        )
        try:
            rounds: dict[str, list[list[dict[str, Any]]]] = {"baseline": [], "new": []}
            for number in range(args.rounds):
                for name, source in (("baseline", baseline), ("new", ROOT)):
                    print(f"round {number + 1}: {name}", file=sys.stderr, flush=True)
                    rounds[name].append(measure(source, args.latency_requests, args.throughput_requests))
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)], check=False
            )
    print(
        "| mode | conc | queen CPU/req, baseline | new | new/baseline "
        "| p50 latency, baseline | new | p99, baseline | new | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for index, first in enumerate(rounds["new"][0]):
        row: dict[str, dict[str, float]] = {}
        for name in ("baseline", "new"):
            runs = [measured[index] for measured in rounds[name]]
            row[name] = {
                "cpu": statistics.median(run["cpu_per_request"] for run in runs),
                "p50": statistics.median(_percentile(run["latencies"], 0.5) for run in runs),
                "p99": statistics.median(_percentile(run["latencies"], 0.99) for run in runs),
                "errors": sum(run["errors"] for run in runs),
            }
        mode = "streamed" if first["streamed"] else "whole"
        old, new = row["baseline"], row["new"]
        print(
            f"| {mode} | {first['concurrency']} | {old['cpu'] * 1e3:.2f} ms | {new['cpu'] * 1e3:.2f} ms | "
            f"{new['cpu'] / old['cpu']:.2f}x | {old['p50'] * 1e3:.1f} ms | {new['p50'] * 1e3:.1f} ms | "
            f"{old['p99'] * 1e3:.1f} ms | {new['p99'] * 1e3:.1f} ms | {int(old['errors'] + new['errors'])} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
