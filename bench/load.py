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

    @property
    def tokens(self) -> int:
        """Output tokens of all requests that completed."""
        return sum(result.tokens for result in self.results if result.error is None)

    @property
    def throughput(self) -> float:
        """Aggregate output tokens per second over the run."""
        return self.tokens / (self.ended - self.started)

    @property
    def errors(self) -> list[str]:
        """The errors, if any."""
        return [result.error for result in self.results if result.error is not None]


async def _one(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> RequestResult:
    started = time.perf_counter()
    first: float | None = None
    chunks = 0
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
                        started, first, time.perf_counter(), chunks, error=str(chunk["error"])
                    )
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", ()):
                    content = choice["delta"].get("content")
                    if content:
                        first = first or time.perf_counter()
                        chunks += 1
                        text.append(content)
    except httpx.HTTPError as exc:
        return RequestResult(started, first, time.perf_counter(), chunks, error=repr(exc))
    # Servers that report usage in the stream are counted exactly; others send one chunk per token.
    tokens = usage_tokens if usage_tokens is not None else chunks
    return RequestResult(started, first, time.perf_counter(), tokens, "".join(text))


async def run_load(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> LoadRun:
    """Send `bodies` from `concurrency` clients, each sending its next request when the last ends."""
    url = f"{base_url}/v1/chat/completions"
    pending = list(enumerate(bodies))
    results: list[RequestResult | None] = [None] * len(bodies)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def client_loop() -> None:
            while pending:
                index, body = pending.pop(0)
                results[index] = await _one(client, url, body)

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(client_loop())
        ended = time.perf_counter()
    return LoadRun([result for result in results if result is not None], started, ended)
