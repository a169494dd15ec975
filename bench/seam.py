"""The seam's cost: how long a client waits for its next token when the worker under its stream dies.

Two workers serve the bundled model to a queen; one greedy stream at a time runs on one of them, and
after `--cut` tokens that worker is SIGKILLed (a crash: the socket closes at once) or SIGSTOPped (a
hang: only the token deadline shows it). The seam is the time from the signal to the next content
chunk at the client, which the other worker produces after it has decoded the prompt and replayed the
relayed tokens one a step (workerbee/scheduler.py). The killed worker is started again between runs.

    python -m bench.seam --kills 20 --cut 16 --cut 64
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.processes import Service, _start, free_port, start_worker, wait_until


def start_queen(logs: Path, token_timeout: float) -> Service:
    """A queen whose token deadline (the silence that reads as a dead worker) is `token_timeout`."""
    port = free_port()
    command = [
        sys.executable, "-m", "queenbee", "--port", str(port), "--log-level", "warning",
        "--db", str(logs / "ledger.db"), "--token-timeout", str(token_timeout),
    ]  # fmt: skip
    queen = _start("queen", command, f"http://127.0.0.1:{port}", logs, None)
    wait_until(queen, lambda: httpx.get(f"{queen.base_url}/v1/models").status_code == 200, 60)
    return queen


def workers_connected(queen: Service) -> int:
    """Workers the queen has now."""
    return len(httpx.get(f"{queen.base_url}/v1/workers").json()["data"])


def busiest(workers: list[Service]) -> Service:
    """The worker using the most CPU over a short window: the one generating."""
    processes = [psutil.Process(worker.process.pid) for worker in workers]
    before = [sum(p.cpu_times()[:2]) for p in processes]
    time.sleep(0.1)
    used = [sum(p.cpu_times()[:2]) - start for p, start in zip(processes, before, strict=True)]
    return workers[used.index(max(used))]


def one_seam(
    queen: Service, workers: list[Service], model: str, cut: int, how: signal.Signals
) -> tuple[float, float, Service]:
    """Stream one answer, signal its worker after `cut` content chunks: seconds from the signal to the
    next worker's first chunk, and the median time between chunks."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "Describe the sea at length."}],
        "temperature": 0,
        "max_tokens": cut + 24,
        "ignore_eos": True,
        "stream": True,
    }
    seen = 0
    killed_at: float | None = None
    arrivals: list[float] = []
    victim: Service | None = None
    with httpx.stream("POST", f"{queen.base_url}/v1/chat/completions", json=body, timeout=600) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[len("data: ") :])
            if "error" in event:
                raise RuntimeError(f"the stream failed: {event['error']['message']}")
            if not any(choice["delta"].get("content") for choice in event["choices"]):
                continue
            seen += 1
            if killed_at is not None:
                arrivals.append(time.perf_counter())
            if seen == cut:
                victim = busiest(workers)
                killed_at = time.perf_counter()
                victim.process.send_signal(how)
    if killed_at is None or victim is None or not arrivals:
        raise RuntimeError("the stream ended before the seam")
    # Chunks the dead worker made before it died may still be on their way; the seam ends at the first
    # chunk after the longest pause, the first the next worker made.
    times = [killed_at, *arrivals]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    resumed_at = times[gaps.index(max(gaps)) + 1]
    return resumed_at - killed_at, statistics.median(gaps), victim


def main(argv: list[str] | None = None) -> int:
    """Measure the seam over many kills and print p50/p99 per cut as JSON lines."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--cut", type=int, action="append", help="relayed tokens before the kill")
    parser.add_argument("--signal", choices=["kill", "stop"], default="kill")
    parser.add_argument("--token-timeout", type=float, default=2.0)
    args = parser.parse_args(argv)
    from workerbee.cli import bundled_model

    model_path = Path(bundled_model() or "")
    how = signal.SIGKILL if args.signal == "kill" else signal.SIGSTOP
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        queen = start_queen(logs, args.token_timeout)
        workers = [start_worker(queen, model_path, parallel=1, threads=1, logs=logs) for _ in range(2)]
        wait_until(queen, lambda: workers_connected(queen) == 2, 120)
        try:
            for cut in args.cut or [16]:
                seams = []
                steps = []
                for _ in range(args.kills):
                    seam, step, victim = one_seam(queen, workers, model_path.stem, cut, how)
                    seams.append(seam)
                    steps.append(step)
                    victim.process.send_signal(signal.SIGKILL)
                    victim.process.wait()
                    workers.remove(victim)
                    wait_until(queen, lambda: workers_connected(queen) == 1, 60)
                    workers.append(start_worker(queen, model_path, parallel=1, threads=1, logs=logs))
                    wait_until(queen, lambda: workers_connected(queen) == 2, 120)
                seams.sort()
                print(
                    json.dumps(
                        {
                            "signal": args.signal,
                            "cut_tokens": cut,
                            "kills": len(seams),
                            "token_timeout_s": args.token_timeout,
                            "seam_p50_s": round(statistics.median(seams), 4),
                            "seam_p99_s": round(seams[min(len(seams) - 1, int(0.99 * len(seams)))], 4),
                            "seam_max_s": round(seams[-1], 4),
                            "token_gap_p50_s": round(statistics.median(steps), 4),
                        }
                    ),
                    flush=True,
                )
        finally:
            for worker in workers:
                worker.stop()
            queen.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
