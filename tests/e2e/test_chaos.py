"""Chaos: concurrent streams across real workers serving the bundled model while one is killed or frozen.

With resumes, no client sees the failure: every stream completes, unbroken, and each answer is token for
token the one the same request gets uninterrupted from workers with cold prompt caches (greedy, and
seeded sampling too). Why the caches must be cold, and what holds exactly: docs/resume.md. Every request
starts with a system message of its own, so that no request decodes its prompt from another's cache.
CI runs the short form; set CHAOS_STREAMS (and CHAOS_TOKENS) for a longer soak.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from servers import (
    BUNDLED_MODEL_ID,
    TIME_UNIT,
    QueenServer,
    eventually,
    start_worker,
    stop_process,
    wait_until,
)

from queenbee.settings import QueenSettings

STREAMS = int(os.environ.get("CHAOS_STREAMS", "8"))
TOKENS = int(os.environ.get("CHAOS_TOKENS", "40"))
QUESTIONS = [
    "Describe the sea.",
    "Describe a forest.",
    "Describe a city at night.",
    "Describe the desert.",
    "Describe a mountain.",
    "Describe a river.",
    "Describe the sky.",
    "Describe a garden.",
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "country": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "country", "unit"],
        },
    },
}


@dataclass
class Hive:
    """A queen and real worker processes serving the bundled model, four sequences each."""

    queen: QueenServer
    workers: list[subprocess.Popen[str]] = field(default_factory=list)

    async def start_workers(self, count: int = 3) -> None:
        """Stop the workers there are and start `count` fresh ones: cold prompt caches."""
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)
            await asyncio.to_thread(stop_process, worker)
        await eventually(lambda: not self.queen.hive.workers, timeout=30)
        self.workers = [
            start_worker(self.queen.worker_url, "--parallel", "4", "--ln-url", f"bee{index}@example.com")
            for index in range(count)
        ]
        await asyncio.to_thread(
            wait_until,
            lambda: len(self.queen.hive.workers) == count or any(w.poll() is not None for w in self.workers),
            120,
        )
        assert all(worker.poll() is None for worker in self.workers)

    def busiest(self) -> subprocess.Popen[str]:
        """The worker process with the most requests in flight."""
        sessions = {w.registration.ln_url: w for w in self.queen.hive.workers.values()}
        return max(self.workers, key=lambda p: sessions[f"bee{self.workers.index(p)}@example.com"].in_flight)

    async def resumes(self) -> float:
        """Resumes the queen has counted so far (GET /metrics)."""
        async with httpx.AsyncClient(base_url=self.queen.base_url) as client:
            text = (await client.get("/metrics")).text
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("queenbee_resumes_total{")
        )


@pytest.fixture
async def hive() -> AsyncIterator[Hive]:
    """Three workers behind a queen whose token deadline (the silence that reads as death) is 4 s and
    which moves a draining worker's streams on after 0.5 s. (At 2 s a surviving worker, taking over the
    lost one's streams on a loaded 2-core machine, was once taken for dead too.)"""
    settings = QueenSettings(
        queue_timeout=120, first_token_timeout=60, token_timeout=4.0, max_resumes=3, drain_handover=0.5
    )
    queen = QueenServer(settings).start()
    running = Hive(queen)
    try:
        await running.start_workers()
        yield running
    finally:
        for worker in running.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGCONT)
            stop_process(worker)
        queen.stop()


@dataclass
class Answer:
    """What a client saw of one streamed answer."""

    ids: set[str] = field(default_factory=set)
    text: dict[int, str] = field(default_factory=dict)
    arguments: dict[int, str] = field(default_factory=dict)
    finish: dict[int, list[str]] = field(default_factory=dict)
    logprobs: list[tuple[str, float]] = field(default_factory=list)
    usage: dict[str, int] | None = None
    errors: list[Any] = field(default_factory=list)
    chunks: int = 0
    done: bool = False


async def stream(
    client: httpx.AsyncClient, body: dict[str, Any], seen: Callable[[Answer], None] | None = None
) -> Answer:
    """Stream a chat request and collect what came, calling `seen` after every chunk."""
    answer = Answer()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: ") :]
            if data == "[DONE]":
                answer.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                answer.errors.append(event["error"])
                continue
            answer.ids.add(event["id"])
            if event.get("usage"):
                answer.usage = event["usage"]
            for choice in event["choices"]:
                index = choice["index"]
                delta = choice["delta"]
                answer.text[index] = answer.text.get(index, "") + (delta.get("content") or "")
                for call in delta.get("tool_calls") or []:
                    piece = call.get("function", {}).get("arguments") or ""
                    answer.arguments[index] = answer.arguments.get(index, "") + piece
                if choice["finish_reason"]:
                    answer.finish.setdefault(index, []).append(choice["finish_reason"])
                for entry in (choice.get("logprobs") or {}).get("content") or []:
                    answer.logprobs.append((entry["token"], entry["logprob"]))
            answer.chunks += 1
            if seen is not None:
                seen(answer)
    return answer


def chat(number: int, question: str, **fields: Any) -> dict[str, Any]:
    """Request `number`: a greedy chat with a system message of its own."""
    messages = [
        {"role": "system", "content": f"Request {number}. You are a writer."},
        {"role": "user", "content": question},
    ]
    return {"model": BUNDLED_MODEL_ID, "messages": messages, "temperature": 0, "max_tokens": TOKENS, **fields}


def assert_unbroken(answer: Answer, reference: Answer) -> None:
    """One id, one finish_reason per choice, no error, [DONE], and the reference's text and usage."""
    assert not answer.errors
    assert answer.done
    assert len(answer.ids) == 1
    assert all(len(reasons) == 1 for reasons in answer.finish.values())
    assert answer.finish == reference.finish
    assert answer.text == reference.text
    assert answer.arguments == reference.arguments
    assert answer.usage == reference.usage


async def killed_mid_stream(
    hive: Hive, bodies: list[dict[str, Any]], how: signal.Signals
) -> tuple[list[Answer], list[Answer]]:
    """The uninterrupted answers to `bodies` (one at a time), then, from fresh workers, the same streamed
    at once while the busiest worker is sent `how` once some stream has shown a few chunks."""
    async with httpx.AsyncClient(base_url=hive.queen.base_url, timeout=300 * TIME_UNIT) as client:
        references = [await stream(client, body) for body in bodies]
        await hive.start_workers()
        started = asyncio.Event()

        def seen(answer: Answer) -> None:
            if answer.chunks >= 4:
                started.set()

        tasks = [asyncio.create_task(stream(client, body, seen)) for body in bodies]
        async with asyncio.timeout(120 * TIME_UNIT):
            await started.wait()
        victim = hive.busiest()
        victim.send_signal(how)
        async with asyncio.timeout(300 * TIME_UNIT):  # nothing may hang
            answers = await asyncio.gather(*tasks)
    if how is signal.SIGKILL:
        assert victim.wait(timeout=30) == -signal.SIGKILL
    elif how is signal.SIGTERM:
        assert victim.wait(timeout=30) == 0
    return references, list(answers)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGSTOP], ids=["killed", "frozen"])
async def test_streams_survive_a_worker_dying_mid_answer(hive: Hive, how: signal.Signals) -> None:
    """8 greedy streams over three workers, one killed (or frozen past the token deadline) mid-stream:
    all 8 complete, unbroken, each exactly the request's uninterrupted answer, usage counted once."""
    bodies = [chat(index, QUESTIONS[index % len(QUESTIONS)], ignore_eos=True) for index in range(STREAMS)]
    before = await hive.resumes()
    references, answers = await killed_mid_stream(hive, bodies, how)
    for answer, reference in zip(answers, references, strict=True):
        assert reference.usage is not None
        assert reference.usage["completion_tokens"] == TOKENS
        assert_unbroken(answer, reference)
    assert await hive.resumes() > before, "the victim was serving streams: some must have resumed"


async def test_tool_calls_seeded_choices_and_logprobs_resume(hive: Hive) -> None:
    """Forced tool calls cut mid-arguments still parse as the same call; n=2 seeded sampled choices each
    resume where they stood; log probabilities continue with the same tokens."""
    weather = "What is the weather in Reykjavik, Iceland, in celsius?"
    bodies = [
        chat(0, weather, tools=[WEATHER], tool_choice="required", max_tokens=96),
        chat(1, weather, tools=[WEATHER], tool_choice="required", max_tokens=96),
        chat(2, QUESTIONS[0], n=2, temperature=0.8, seed=11, ignore_eos=True),
        chat(3, QUESTIONS[1], n=2, temperature=0.8, seed=12, ignore_eos=True),
        chat(4, QUESTIONS[2], logprobs=True, top_logprobs=2, ignore_eos=True),
        chat(5, QUESTIONS[3], logprobs=True, top_logprobs=2, ignore_eos=True),
    ]
    references, answers = await killed_mid_stream(hive, bodies, signal.SIGKILL)
    for number, (answer, reference) in enumerate(zip(answers, references, strict=True)):
        if number in (2, 3):
            # Seeded sampling: exact in the engine's own tests (tests/workerbee/test_engine_resume.py);
            # here a draw near a boundary can fall the other way when a prompt's cells were computed in
            # another batch shape, so only the stream's integrity is asserted (docs/resume.md).
            assert not answer.errors
            assert answer.done
            assert len(answer.ids) == 1
            assert answer.finish == {0: ["length"], 1: ["length"]}
            assert answer.usage == reference.usage
            continue
        assert_unbroken(answer, reference)
        assert [token for token, _ in answer.logprobs] == [token for token, _ in reference.logprobs]
        for (_, got), (_, want) in zip(answer.logprobs, reference.logprobs, strict=True):
            assert got == pytest.approx(want, abs=1e-4)
    for reference in references[:2]:
        assert json.loads(reference.arguments[0])["city"]
    for reference in references[2:4]:
        assert len(reference.finish) == 2


async def test_a_stopping_worker_hands_its_streams_over(hive: Hive) -> None:
    """SIGTERM mid-answer: the worker's streams move on after the grace, unbroken and identical, and the
    worker exits at once instead of finishing long answers."""
    bodies = [chat(index, QUESTIONS[index], ignore_eos=True, max_tokens=160) for index in range(3)]
    before = await hive.resumes()
    references, answers = await killed_mid_stream(hive, bodies, signal.SIGTERM)
    for answer, reference in zip(answers, references, strict=True):
        assert_unbroken(answer, reference)
    assert await hive.resumes() > before, "the stopping worker's streams moved on"
