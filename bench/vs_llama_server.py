"""The worker against llama.cpp's own `llama-server`, side by side: `python -m bench.vs_llama_server`.

A queen with one workerbee process (A) and llama-server built from the llama.cpp that the pinned
llama-cpp-python vendors (B, see bench/llama_server.py) serve the bundled model with the same threads
(--threads 1: see docs/benchmarks.md), slots (--parallel 8) and context per slot. Each round runs, for
1, 4 and 8 concurrent streams, a run on A and a run on B, in alternating order (A B, then B A), so that
the machine's shared load hits both; a figure is the median over rounds of the per-round ratio (tokens per
second, and the time to first token p50 of A over B's).

Then, on A alone, also alternating within each round: 4 concurrent streams of tool calls, JSON-schema
answers and logprobs requests against 4 plain chats, and one request with n = 4 against 4 separate
concurrent requests. Every request is greedy and streamed; plain ones generate exactly --max-tokens.
A run's rate is taken while all its streams are in flight (LoadRun.steady_throughput): until the first
client finds no request left, counting requests still running by the chunks they have received. The
mixed kinds end where their JSON closes, at different lengths, so without that the last of them would
run alone for a while and the figure would measure the queue's tail, not the engine at 4 streams.
Each run's prompts carry a tag of their own, so that neither side answers from a prompt cached in an
earlier run.

Prints the results and writes them between the markers in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.llama_server import build
from bench.load import LoadRun, run_load
from bench.processes import Service, start_llama_cpp_server, start_queen, start_worker
from bench.run import DOC, TOPICS, machine, messages

BEGIN, END = "<!-- vs-llama-server:begin -->", "<!-- vs-llama-server:end -->"
LEVELS = (1, 4, 8)
PARALLEL = 8
N_CTX = 2048
STORY = {
    "type": "object",
    "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
    "required": ["title", "story"],
}
LONG_STORY = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "story": {"type": "string", "minLength": 1000},
    },
    "required": ["title", "story"],
}
"""A schema whose answers run to any --max-tokens of this bench: the story is 1,000 characters at least."""


def tool(schema: dict[str, Any]) -> dict[str, Any]:
    """The tool the tool-call requests name."""
    return {
        "type": "function",
        "function": {"name": "save_story", "description": "Save a story.", "parameters": schema},
    }


def plain(model: str, topic: str, max_tokens: int) -> dict[str, Any]:
    """A streamed greedy chat that generates exactly max_tokens tokens (both servers know ignore_eos)."""
    return {
        "model": model,
        "messages": messages(topic),
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def kind(
    model: str, topic: str, max_tokens: int, index: int, schema: dict[str, Any] = STORY
) -> dict[str, Any]:
    """The index-th of the mixed kinds: a named tool call, a JSON-schema answer, a logprobs request.

    With STORY the JSON answers end where the model closes them (about 25 tokens for this model); with
    LONG_STORY they run to max_tokens, as the plain ones do.
    """
    body = plain(model, topic, max_tokens)
    which = index % 3
    if which == 0:
        del body["ignore_eos"]  # a grammar ends the answer itself
        body["tools"] = [tool(schema)]
        body["tool_choice"] = {"type": "function", "function": {"name": "save_story"}}
    elif which == 1:
        del body["ignore_eos"]
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "story", "schema": schema}}
    else:
        body["logprobs"] = True
        body["top_logprobs"] = 3
    return body


def p50_ttft(run: LoadRun) -> float:
    """Median time to first content token over a run's requests."""
    return statistics.median(result.ttft for result in run.results if result.error is None)


def check(run: LoadRun, what: str) -> LoadRun:
    """The run, or an error naming what failed."""
    if run.errors:
        raise RuntimeError(f"{what}: {run.errors[0]}")
    return run


def measure(args: argparse.Namespace, logs: Path) -> list[str]:
    """Run every round; returns the report's lines."""
    binary = build()
    model = Path(args.model)
    name = model.stem
    queen = start_queen(logs)
    services: list[Service] = [queen]
    try:
        services.append(start_worker(queen, model, parallel=PARALLEL, threads=args.threads, logs=logs))
        server = start_llama_cpp_server(
            binary, model, threads=args.threads, parallel=PARALLEL, n_ctx_seq=N_CTX, logs=logs
        )
        services.append(server)
        sides = {"A": queen.base_url, "B": server.base_url}
        ratios: dict[int, list[float]] = {level: [] for level in LEVELS}
        ttft: dict[tuple[str, int], list[float]] = {(side, level): [] for side in sides for level in LEVELS}
        rates: dict[tuple[str, int], list[float]] = {(side, level): [] for side in sides for level in LEVELS}
        mixed: list[float] = []
        mixed_long: list[float] = []
        several: list[float] = []

        def go(url: str, bodies: list[dict[str, Any]], concurrency: int, what: str) -> LoadRun:
            run = asyncio.run(run_load(url, bodies, concurrency))
            if run.errors:
                # A dropped connection (see run_load) fails the run: run it once more.
                print(f"{what}: {run.errors[0]}; running it again", flush=True)
                for service in services:
                    service.check_alive()
                run = asyncio.run(run_load(url, bodies, concurrency))
            return check(run, what)

        takes = itertools.count(1)
        # One warm-up request each: the first request pays for allocations on both.
        for url in sides.values():
            go(url, [plain(name, TOPICS[0], 8)], 1, "warm-up")
        for round_index in range(args.rounds):
            order = list(sides) if round_index % 2 == 0 else list(reversed(sides))
            for level in LEVELS:
                count = max(3, 2 * level)
                # Tagged per run: neither side has these prompts cached from an earlier run.
                take = next(takes)
                topics = [
                    f"{TOPICS[(round_index * 7 + i) % len(TOPICS)]} (take {take})" for i in range(count)
                ]
                runs: dict[str, LoadRun] = {}
                for side in order:
                    bodies = [plain(name, topic, args.max_tokens) for topic in topics]
                    runs[side] = go(sides[side], bodies, level, f"{side} at {level}")
                    rates[side, level].append(runs[side].steady_throughput)
                    ttft[side, level].append(p50_ttft(runs[side]))
                ratios[level].append(runs["A"].steady_throughput / runs["B"].steady_throughput)
                print(
                    f"round {round_index} conc {level}: A {runs['A'].steady_throughput:6.1f} tok/s, "
                    f"B {runs['B'].steady_throughput:6.1f} tok/s, ratio {ratios[level][-1]:.2f}; "
                    f"TTFT p50 A {ttft['A', level][-1]:.2f} s, B {ttft['B', level][-1]:.2f} s",
                    flush=True,
                )
            base = [TOPICS[(round_index * 5 + i) % len(TOPICS)] for i in range(12)]
            pair: dict[str, float] = {}
            tasks: dict[str, Callable[[list[str]], LoadRun]] = {
                "mixed": lambda ts: go(
                    queen.base_url, [kind(name, t, args.max_tokens, i) for i, t in enumerate(ts)], 4, "mixed"
                ),
                "mixed_long": lambda ts: go(
                    queen.base_url,
                    [kind(name, t, args.max_tokens, i, LONG_STORY) for i, t in enumerate(ts)],
                    4,
                    "mixed, long answers",
                ),
                "plain": lambda ts: go(
                    queen.base_url, [plain(name, t, args.max_tokens) for t in ts], 4, "plain"
                ),
                "n4": lambda ts: go(
                    queen.base_url, [{**plain(name, t, args.max_tokens), "n": 4} for t in ts[:3]], 1, "n=4"
                ),
                "separate": lambda ts: go(
                    queen.base_url,
                    [plain(name, t, args.max_tokens) for t in ts[:3] for _ in range(4)],
                    4,
                    "separate",
                ),
            }
            keys = list(tasks) if round_index % 2 == 0 else ["plain", "mixed_long", "mixed", "separate", "n4"]
            for key in keys:
                take = next(takes)
                pair[key] = tasks[key]([f"{topic} (take {take})" for topic in base]).steady_throughput
            mixed.append(pair["mixed"] / pair["plain"])
            mixed_long.append(pair["mixed_long"] / pair["plain"])
            several.append(pair["n4"] / pair["separate"])
            print(
                f"round {round_index}: mixed {pair['mixed']:.1f} vs plain {pair['plain']:.1f} tok/s "
                f"({mixed[-1]:.2f}), with long answers {pair['mixed_long']:.1f} ({mixed_long[-1]:.2f}); "
                f"n=4 {pair['n4']:.1f} vs 4 separate {pair['separate']:.1f} "
                f"({several[-1]:.2f})",
                flush=True,
            )
    finally:
        for service in reversed(services):
            service.stop()
    med = statistics.median
    lines = [
        "Measured with `python -m bench.vs_llama_server "
        f"--rounds {args.rounds} --max-tokens {args.max_tokens}`:",
        "A = queen + one workerbee (`--parallel 8 --threads "
        f"{args.threads}`), B = llama-server ({binary.parent.parent.parent.name}'s vendored llama.cpp, "
        f"`-np 8 -t {args.threads} -fa off`, {N_CTX} tokens per slot), rounds alternating A B / B A.",
        "",
        *(f"- {line}" for line in machine()),
        "",
        "| concurrent streams | A tok/s | B tok/s | A / B (median of per-round ratios) "
        "| TTFT p50 A | TTFT p50 B | TTFT A / B (median of per-round ratios) |",
        "|---|---|---|---|---|---|---|",
    ]
    ttft_ratios = {
        level: [a / b for a, b in zip(ttft["A", level], ttft["B", level], strict=True)] for level in LEVELS
    }
    for level in LEVELS:
        lines.append(
            f"| {level} | {med(rates['A', level]):.1f} | {med(rates['B', level]):.1f} | "
            f"**{med(ratios[level]):.2f}x** | {med(ttft['A', level]):.2f} s | "
            f"{med(ttft['B', level]):.2f} s | **{med(ttft_ratios[level]):.2f}x** |"
        )
    lines += [
        "",
        "| on A alone, 4 streams | ratio (median of rounds) |",
        "|---|---|",
        "| tool calls, JSON-schema answers and logprobs requests / 4 plain chats, tok/s "
        f"| **{med(mixed):.2f}x** |",
        "| the same, every answer running to max_tokens (a schema with a 1,000-character story) / 4 plain "
        f"chats, tok/s | **{med(mixed_long):.2f}x** |",
        f"| one request with n = 4 / 4 separate concurrent requests, tok/s | **{med(several):.2f}x** |",
        "",
        "Per-round ratios: "
        + "; ".join(f"{level} streams {', '.join(f'{r:.2f}' for r in ratios[level])}" for level in LEVELS)
        + "; TTFT "
        + "; ".join(f"{n} streams {', '.join(f'{r:.2f}' for r in ttft_ratios[n])}" for n in LEVELS)
        + f"; mixed {', '.join(f'{r:.2f}' for r in mixed)}"
        + f"; mixed, long answers {', '.join(f'{r:.2f}' for r in mixed_long)}"
        + f"; n=4 {', '.join(f'{r:.2f}' for r in several)}.",
    ]
    return lines


def write(lines: list[str]) -> None:
    """Put the report between the markers of docs/benchmarks.md (appended with them if absent)."""
    text = DOC.read_text()
    block = "\n".join([BEGIN, *lines, END])
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n## Against llama.cpp's llama-server\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    """Parse the arguments, measure, print and write the report."""
    from workerbee.cli import bundled_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=bundled_model())
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-vs-") as logs:
        lines = measure(args, Path(logs))
    print("\n".join(lines))
    print(f"({time.perf_counter() - started:.0f} s)")
    if not args.no_write:
        write(lines)


if __name__ == "__main__":
    main()
