"""Cache-aware routing: the prefix index, the load guard, sessions, and cached tokens end to end.

Scripted workers over real websockets say what their caches hold (CacheSummary) and hold requests
open, so that where each request went can be counted; real workers on the bundled model show that the
next turn of a conversation goes where it is cached and that the SDK reads the tokens it reused.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anthropic
import httpx
import openai
import pytest
from fake_worker import FakeWorker, answer, completion
from servers import (
    BUNDLED_MODEL_ID,
    TIME_UNIT,
    QueenServer,
    eventually,
    start_worker,
    stop_process,
    wait_until,
)

from protocol import CacheSummary, Job, PromptTokensDetails, Result, Usage
from protocol.openai import ChatCompletionRequest
from protocol.prefix import chat_hashes
from queenbee.prefix_index import DEFAULT_PREFILL_RATE, CacheRouter, PrefixIndex, prefix_query
from queenbee.settings import QueenSettings

SYSTEM = "You answer questions about the history of bread, briefly and without inventing facts. " * 24
HOT = {
    "model": "fake-model",
    "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who baked first?"}],
}


def hashes_of(body: dict[str, Any]) -> list[int]:
    """The prefix chain the queen computes for a chat body."""
    return chat_hashes(ChatCompletionRequest.model_validate(body))


class Held:
    """A worker behaviour that keeps every job open until released, then answers it."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, worker: FakeWorker, job: Job) -> None:
        await self.release.wait()
        await answer(worker, job)


@pytest.fixture
def queen_settings() -> QueenSettings:
    """A lax load guard unless a test says otherwise."""
    return QueenSettings(queue_timeout=5.0, first_token_timeout=10.0, token_timeout=10.0, cache_load_guard=10)


async def holding_prefix(queen: QueenServer, held: Held, *, parallel: int) -> tuple[FakeWorker, FakeWorker]:
    """Two workers; the first says it holds HOT's whole prefix, and the queen has indexed that."""
    warm = await FakeWorker(queen.worker_url, parallel=parallel, behaviour=held).connect()
    cold = await FakeWorker(queen.worker_url, parallel=parallel, behaviour=held).connect()
    await warm.send(CacheSummary(model="fake-model", prefixes=[(hashes_of(HOT)[-1], 700)]))
    await eventually(lambda: queen.hive.cache.index.entries("fake-model") == 1)
    return warm, cold


async def send_held(
    client: httpx.AsyncClient, body: dict[str, Any], count: int, workers: tuple[FakeWorker, ...]
) -> list[asyncio.Task[Any]]:
    """Start `count` requests one after another, each on its worker before the next is sent."""
    tasks = []
    for _ in range(count):
        before = sum(len(worker.jobs) for worker in workers)
        tasks.append(asyncio.create_task(client.post("/v1/chat/completions", json=body)))
        await eventually(lambda before=before: sum(len(worker.jobs) for worker in workers) > before)  # type: ignore[misc]
    return tasks


def client_for(queen: QueenServer) -> httpx.AsyncClient:
    """An HTTP client of the queen."""
    return httpx.AsyncClient(base_url=queen.base_url, timeout=30 * TIME_UNIT)


async def test_requests_go_to_the_worker_holding_their_prefix(queen: QueenServer) -> None:
    """With room in the guard, every request for a hot prefix goes to the worker that holds it."""
    held = Held()
    warm, cold = await holding_prefix(queen, held, parallel=4)
    async with client_for(queen) as client:
        tasks = await send_held(client, HOT, 4, (warm, cold))
        assert (len(warm.jobs), len(cold.jobs)) == (4, 0)
        held.release.set()
        responses = await asyncio.gather(*tasks)
    assert all(response.status_code == 200 for response in responses)
    await warm.close()
    await cold.close()


@pytest.mark.parametrize("queen_settings", [QueenSettings(queue_timeout=5.0, cache_load_guard=0.25)])
async def test_the_load_guard_spreads_a_hot_prefix(queen: QueenServer) -> None:
    """A hot prefix piles onto its worker only while that worker is at most a quarter of its slots
    busier than the other: eight requests split five to three or four to four, never all on one."""
    held = Held()
    warm, cold = await holding_prefix(queen, held, parallel=8)
    async with client_for(queen) as client:
        tasks = await send_held(client, HOT, 8, (warm, cold))
        counts = (len(warm.jobs), len(cold.jobs))
        held.release.set()
        await asyncio.gather(*tasks)
    assert counts in ((5, 3), (4, 4)), counts
    assert counts[0] >= counts[1]
    await warm.close()
    await cold.close()


async def test_a_worker_that_leaves_drops_out_of_the_index_at_once(queen: QueenServer) -> None:
    """Once a worker is gone from the hive, nothing it held is left in the prefix index."""
    held = Held()
    warm, cold = await holding_prefix(queen, held, parallel=2)
    assert queen.hive.cache.index.entries("fake-model") == 1
    warm_id = warm.worker_id
    await warm.abort()
    await eventually(lambda: warm_id not in queen.hive.workers)
    assert queen.hive.cache.index.entries("fake-model") == 0
    held.release.set()
    async with client_for(queen) as client:
        response = await client.post("/v1/chat/completions", json=HOT)
    assert response.status_code == 200
    assert len(cold.jobs) == 1
    await cold.close()


async def test_a_summary_replaces_the_last_one_and_unknown_models_are_ignored(queen: QueenServer) -> None:
    """A worker's new summary for a model replaces its old one; one for a model it does not serve is
    dropped; a malformed one is a protocol error that leaves the connection up."""
    worker = await FakeWorker(queen.worker_url).connect()
    await worker.send(CacheSummary(model="fake-model", prefixes=[(1, 10), (2, 20)]))
    await eventually(lambda: queen.hive.cache.index.entries("fake-model") == 2)
    await worker.send(CacheSummary(model="fake-model", prefixes=[(3, 30)]))
    await eventually(lambda: queen.hive.cache.index.entries("fake-model") == 1)
    await worker.send(CacheSummary(model="other-model", prefixes=[(4, 40)]))
    await worker.send_raw('{"type": "cache_summary", "model": "fake-model", "prefixes": [[-1, 5]]}')
    async with client_for(queen) as client:
        response = await client.post("/v1/chat/completions", json=HOT)
    assert response.status_code == 200
    assert queen.hive.cache.index.entries("other-model") == 0
    assert queen.hive.cache.index.entries("fake-model") == 1
    await worker.close()


def test_stale_summaries_expire() -> None:
    """A summary older than the TTL matches nothing and is purged; a fresh one matches its prefix."""
    index = PrefixIndex(ttl=60)
    index.update("w1", CacheSummary(model="m", prefixes=[(11, 100), (12, 200)]), now=0)
    index.update("w2", CacheSummary(model="m", prefixes=[(11, 100)]), now=50)
    assert index.matches("m", [11, 12, 13], now=59) == {"w1": (1, 200), "w2": (0, 100)}
    assert index.matches("m", [11, 12, 13], now=61) == {"w2": (0, 100)}
    assert index.entries("m") == 1
    assert index.matches("m", [11], now=111) == {}
    assert not index.holds_any("m")


@pytest.mark.parametrize("field", ["prompt_cache_key", "user"])
async def test_a_session_stays_on_its_worker_before_any_prefix_is_shared(
    queen: QueenServer, field: str
) -> None:
    """Requests with the same prompt_cache_key (or user) follow the session's first worker even while
    it is the busier one; a request without one goes to the least loaded worker."""
    held = Held()
    first = await FakeWorker(queen.worker_url, parallel=2, behaviour=held).connect()
    second = await FakeWorker(queen.worker_url, parallel=2, behaviour=held).connect()
    session = {field: "conversation-42"}
    turns = [
        {"model": "fake-model", "messages": [{"role": "user", "content": f"Turn {n}"}], **session}
        for n in (1, 2)
    ]
    async with client_for(queen) as client:
        tasks = await send_held(client, turns[0], 1, (first, second))
        home, other = (first, second) if first.jobs else (second, first)
        tasks += await send_held(client, turns[1], 1, (first, second))
        tasks += await send_held(
            client,
            {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]},
            1,
            (first, second),
        )
        assert len(home.jobs) == 2
        assert len(other.jobs) == 1
        held.release.set()
        responses = await asyncio.gather(*tasks)
    assert [response.status_code for response in responses] == [200, 200, 200]
    await first.close()
    await second.close()


async def test_responses_prompt_cache_key_is_honoured(queen: QueenServer) -> None:
    """The Responses API's prompt_cache_key is accepted, reaches the chat job and keeps the session."""
    held = Held()
    first = await FakeWorker(queen.worker_url, parallel=2, behaviour=held).connect()
    second = await FakeWorker(queen.worker_url, parallel=2, behaviour=held).connect()
    body = {"model": "fake-model", "input": "Hello", "prompt_cache_key": "agent-7", "store": False}
    async with client_for(queen) as client:
        tasks = []
        for count in (1, 2):
            tasks.append(asyncio.create_task(client.post("/v1/responses", json=body)))
            await eventually(lambda count=count: len(first.jobs) + len(second.jobs) == count)  # type: ignore[misc]
        held.release.set()
        responses = await asyncio.gather(*tasks)
    assert [response.status_code for response in responses] == [200, 200]
    home = first if first.jobs else second
    assert len(home.jobs) == 2
    assert all(job.request.body.prompt_cache_key == "agent-7" for job in home.jobs)  # type: ignore[union-attr]
    await first.close()
    await second.close()


@pytest.fixture(scope="module")
def real_hive() -> Iterator[QueenServer]:
    """A queen with two real workers on the bundled model, two slots each."""
    queen = QueenServer(QueenSettings(queue_timeout=60, first_token_timeout=60)).start()
    workers = [start_worker(queen.worker_url, "--parallel", "2", "--ctx-size", "2048") for _ in range(2)]
    try:
        wait_until(lambda: len(queen.hive.serving(BUNDLED_MODEL_ID)) == 2, timeout=180)
        yield queen
    finally:
        for worker in workers:
            stop_process(worker)
        queen.stop()


def test_the_next_turn_finds_its_cache_and_the_sdk_reads_cached_tokens(real_hive: QueenServer) -> None:
    """Turn 2 of a conversation goes to the worker that ran turn 1 and reuses all of turn 1's prompt
    (the least-loaded policy would send it to the other, unmeasured worker, which holds nothing);
    a stream's usage chunk and the Responses API say the same."""
    with (
        openai.OpenAI(base_url=real_hive.openai_url, api_key="unused", max_retries=0) as client,
        anthropic.Anthropic(base_url=real_hive.base_url, api_key="unused", max_retries=0) as claude,
    ):
        system = "You are a terse assistant for a bakery that sells rye, sourdough and croissants. " * 6
        messages: list[Any] = [
            {"role": "system", "content": system},
            {"role": "user", "content": "What do you sell?"},
        ]
        stream = client.chat.completions.create(
            model=BUNDLED_MODEL_ID,
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        first = chunks[-1].usage
        assert first is not None
        assert first.prompt_tokens_details is not None
        assert first.prompt_tokens_details.cached_tokens == 0
        text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "And on Sunday?"}]
        second = client.chat.completions.create(
            model=BUNDLED_MODEL_ID, messages=messages, max_tokens=12, temperature=0
        )
        assert second.usage is not None
        assert second.usage.prompt_tokens_details is not None
        assert second.usage.prompt_tokens_details.cached_tokens >= first.prompt_tokens
        assert second.usage.prompt_tokens_details.cached_tokens < second.usage.prompt_tokens

        response = client.responses.create(
            model=BUNDLED_MODEL_ID, instructions=system, input="Hi", max_output_tokens=8
        )
        follow_up = client.responses.create(  # instructions do not carry over: they are sent again
            model=BUNDLED_MODEL_ID,
            instructions=system,
            input="Anything else?",
            previous_response_id=response.id,
            max_output_tokens=8,
        )
        assert response.usage is not None
        assert follow_up.usage is not None
        assert follow_up.usage.input_tokens_details.cached_tokens >= response.usage.input_tokens

        # Anthropic's Messages API counts the prompt in two parts: read from the cache, and decoded.
        turn = [{"role": "user", "content": "What do you sell?"}]
        cold = claude.messages.create(model=BUNDLED_MODEL_ID, system=system, messages=turn, max_tokens=8)
        warm = claude.messages.create(model=BUNDLED_MODEL_ID, system=system, messages=turn, max_tokens=8)
        with claude.messages.stream(
            model=BUNDLED_MODEL_ID, system=system, messages=turn, max_tokens=8
        ) as events:
            streamed = events.get_final_message()
        assert warm.usage.cache_read_input_tokens is not None
        assert warm.usage.cache_read_input_tokens > 0
        assert warm.usage.cache_creation_input_tokens == 0
        whole_prompt = cold.usage.input_tokens + (cold.usage.cache_read_input_tokens or 0)
        for usage in (warm.usage, streamed.usage):
            assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == whole_prompt
            assert usage.input_tokens >= 1  # the last prompt token is always decoded again
        assert streamed.usage.cache_read_input_tokens == warm.usage.cache_read_input_tokens


def reporting(cached: int) -> Any:
    """A worker behaviour that answers whole, saying it took `cached` of 40 prompt tokens from its cache."""

    async def behaviour(worker: FakeWorker, job: Job) -> None:
        usage = Usage(
            prompt_tokens=40,
            completion_tokens=2,
            total_tokens=42,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )
        await worker.send(Result(request_id=job.request_id, usage=usage, response=completion("Hi there")))

    return behaviour


@pytest.mark.parametrize(("claimed", "kept"), [(30, 30), (90, 40)])
async def test_cached_tokens_reach_the_client_and_the_ledger(tmp_path: Path, claimed: int, kept: int) -> None:
    """What the worker reused is the client's cached_tokens and the ledger's, never more than the prompt."""
    queen = QueenServer(QueenSettings(db=tmp_path / "ledger.db")).start()
    try:
        worker = await FakeWorker(queen.worker_url, behaviour=reporting(claimed)).connect()
        async with client_for(queen) as client:
            response = await client.post("/v1/chat/completions", json=HOT)
        await worker.close()
    finally:
        queen.stop()
    usage = response.json()["usage"]
    assert usage["prompt_tokens_details"] == {"cached_tokens": kept}
    with closing(sqlite3.connect(tmp_path / "ledger.db")) as db:
        rows = db.execute("SELECT prompt_tokens, cached_tokens FROM usage").fetchall()
    assert rows == [(40, kept)]


def test_what_a_worker_still_decodes_is_estimated_past_the_prefix_it_holds() -> None:
    """The queen estimates the tokens past each prefix from the messages' sizes: a worker holding
    more of the conversation has less to decode, one holding none the whole prompt."""
    body = {**HOT, "messages": [*HOT["messages"], {"role": "assistant", "content": "Egyptians."}]}
    body["messages"].append({"role": "user", "content": "When?"})
    query = prefix_query(ChatCompletionRequest.model_validate(body), 10, None)
    assert query is not None
    assert query.hashes == tuple(hashes_of(body))
    assert query.uncached(None) > query.uncached(0) > query.uncached(1) > query.uncached(3) > 0
    assert query.uncached(None) - query.uncached(0) >= len(SYSTEM) // 4  # the system prompt
    assert query.session is None
    keyed = prefix_query(ChatCompletionRequest.model_validate({**body, "user": "u1"}), 10, "key-a")
    assert keyed is not None
    assert keyed.session == ("key-a", "fake-model", "u1")


def test_an_unmeasured_worker_counts_as_the_average_measured_one() -> None:
    """Prefill rates are the worker's own once measured; until then the average of the others."""
    router = CacheRouter(ttl=60, load_guard=0.5)
    fast, slow, new = (SimpleNamespace(id=name, models=frozenset({"m"})) for name in ("fast", "slow", "new"))
    assert router.prefill_rate(new, "m") == DEFAULT_PREFILL_RATE
    router.record_prefill(fast, "m", uncached_tokens=900, ttft=1.0)
    router.record_prefill(slow, "m", uncached_tokens=300, ttft=1.0)
    router.record_prefill(slow, "m", uncached_tokens=8, ttft=1.0)  # too few tokens to tell: ignored
    assert router.prefill_rate(fast, "m") == 900
    assert router.prefill_rate(new, "m") == 600
    router.remove_worker(fast)
    assert router.prefill_rate(new, "m") == 300
