"""The load generator: closed-loop clients streaming OpenAI chat requests, timing every token stream."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it (times from time.perf_counter)."""

    started: float
    first_content: float | None
    """When the first chunk with content arrived: the role chunk does not count."""
    ended: float
    tokens: int
    text: str = ""
    error: str | None = None
    chunk_times: tuple[float, ...] = ()
    """When each streamed chunk with generated output (content or tool-call arguments) arrived."""

    def tokens_until(self, moment: float) -> float:
        """The share of its tokens that had arrived by `moment`, pro rata by its chunks."""
        if self.error is not None:
            return 0.0
        if not self.chunk_times:
            return float(self.tokens) if self.ended <= moment else 0.0
        arrived = sum(1 for time_ in self.chunk_times if time_ <= moment)
        return self.tokens * arrived / len(self.chunk_times)

    @property
    def ttft(self) -> float:
        """Time to the first content token, seconds."""
        return (self.first_content or self.ended) - self.started

    @property
    def latency(self) -> float:
        """Time to the last byte, seconds."""
        return self.ended - self.started

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first, seconds."""
        if self.first_content is None or self.tokens < 2:
            return None
        return (self.ended - self.first_content) / (self.tokens - 1)


@dataclass(frozen=True)
class LoadRun:
    """Every request of one run, and when the run started and ended."""

    results: list[RequestResult]
    started: float
    ended: float
    drained: float | None = None
    """When a client first found no request left to send: from then on fewer than `concurrency` ran."""

    @property
    def tokens(self) -> int:
        """Output tokens of all requests that completed."""
        return sum(result.tokens for result in self.results if result.error is None)

    @property
    def throughput(self) -> float:
        """Aggregate output tokens per second over the run."""
        return self.tokens / (self.ended - self.started)

    @property
    def steady_throughput(self) -> float:
        """Output tokens per second while every client had a request in flight (from the start until
        the queue ran dry), requests then running counted by the chunks they had received: the rate
        at the run's concurrency, without the tail where the last requests run with fewer beside them."""
        until = self.drained if self.drained is not None else self.ended
        tokens = sum(result.tokens_until(until) for result in self.results)
        return tokens / (until - self.started)

    @property
    def errors(self) -> list[str]:
        """The errors, if any."""
        return [result.error for result in self.results if result.error is not None]


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    started = time.perf_counter()
    first: float | None = None
    chunks: list[float] = []
    usage_tokens: int | None = None
    text: list[str] = []
    if not body.get("stream"):
        response = await client.post(url, json=body)
        ended = time.perf_counter()
        if response.status_code != 200:
            return RequestResult(
                started, None, ended, 0, error=f"HTTP {response.status_code}: {response.text}"
            )
        data = response.json()
        return RequestResult(started, ended, ended, data["usage"]["completion_tokens"])
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestResult(
                    started,
                    None,
                    time.perf_counter(),
                    0,
                    error=f"HTTP {response.status_code}: {response.text}",
                )
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(
                        started, first, time.perf_counter(), len(chunks), error=str(chunk["error"])
                    )
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", ()):
                    delta = choice["delta"]
                    content = delta.get("content")
                    arguments = "".join(
                        (call.get("function") or {}).get("arguments") or ""
                        for call in delta.get("tool_calls") or ()
                    )
                    if content or arguments:
                        now = time.perf_counter()
                        first = first or now
                        chunks.append(now)
                        text.append(content or arguments)
    except httpx.HTTPError as exc:
        return RequestResult(started, first, time.perf_counter(), len(chunks), error=repr(exc))
    # Servers that report usage in the stream are counted exactly; others send one chunk per token.
    tokens = usage_tokens if usage_tokens is not None else len(chunks)
    return RequestResult(started, first, time.perf_counter(), tokens, "".join(text), None, tuple(chunks))


async def run_load(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> LoadRun:
    """Send `bodies` from `concurrency` clients, each sending its next request when the last ends.

    Every request has a connection of its own (a loopback connect costs microseconds against requests of
    seconds): llama-server closes a kept-alive connection after five requests, and a request already on
    its way on it fails, which a client cannot tell from a server failure.
    """
    url = f"{base_url}/v1/chat/completions"
    pending = list(enumerate(bodies))
    results: list[RequestResult | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)

    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:
        drained: list[float] = []

        async def client_loop() -> None:
            while pending:
                index, body = pending.pop(0)
                results[index] = await _one(client, url, body)
            drained.append(time.perf_counter())

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(client_loop())
        ended = time.perf_counter()
    return LoadRun([result for result in results if result is not None], started, ended, min(drained))
