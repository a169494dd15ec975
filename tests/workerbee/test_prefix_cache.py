"""What the worker reports of its caches, on the real SmolLM2 model: cached tokens and prefix names.

`cached_tokens` must be what the scheduler actually skipped, the prefixes a slot holds must be named
as the queen names the next turn's prompt, and --cache-ram must bring an evicted conversation back.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from servers import eventually, smollm2_path

from protocol import Usage
from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.prefix import chat_hashes, text_hashes
from workerbee.batching import BatchedModel
from workerbee.cache_ram import HostCache, SavedState
from workerbee.prefix_cache import summarize
from workerbee.prompts import ModelConfig
from workerbee.scheduler import HOLD_MIN_TOKENS

CONFIG = ModelConfig(id="smol", path=smollm2_path(), n_ctx=1024)
SYSTEM = "You are a patient tutor of geography. Answer in one sentence and name one river each time. " * 3


def chat(messages: list[dict[str, Any]]) -> ChatCompletionRequest:
    """A short greedy chat request."""
    return ChatCompletionRequest.model_validate(
        {"model": "smol", "messages": messages, "temperature": 0, "max_tokens": 8}
    )


async def nothing(chunk: dict[str, Any], tokens: int) -> None:
    """A chunk sink for whole answers."""


async def run(model: BatchedModel, request: ChatCompletionRequest) -> tuple[Usage, str, int]:
    """The usage and text of a whole answer, and the prompt tokens the scheduler reused for it."""
    before = model.scheduler.stats.reused_tokens
    usage, response = await model.chat(request, threading.Event(), nothing)
    assert response is not None
    return usage, response["choices"][0]["message"]["content"], model.scheduler.stats.reused_tokens - before


@pytest.fixture(scope="module")
def model() -> Iterator[BatchedModel]:
    """The engine's model with two slots."""
    backend = BatchedModel.load(CONFIG, parallel=2, threads=1)
    yield backend
    backend.close()


async def test_cached_tokens_are_what_the_scheduler_skipped(model: BatchedModel) -> None:
    """Turn 2 reports as cached exactly the prompt tokens the scheduler did not decode, which cover
    all of turn 1's prompt; the slot's prefixes carry the next turn's hashes."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Tell me about Peru."}]
    first, text, _ = await run(model, chat(messages))
    follow = [*messages, {"role": "assistant", "content": text}, {"role": "user", "content": "And Chile?"}]
    held = dict(model.cached_prefixes())
    names = chat_hashes(chat(follow))
    assert names[0] in held  # the system prompt
    assert names[2] in held  # the conversation through the answer: the next turn's way in
    assert held[names[2]] >= first.prompt_tokens
    second, _, skipped = await run(model, chat(follow))
    assert second.cached_tokens == skipped
    assert second.cached_tokens >= first.prompt_tokens
    assert second.prompt_tokens > second.cached_tokens


async def test_a_text_prompt_is_named_in_character_blocks(model: BatchedModel) -> None:
    """A completion's prompt is summarised in blocks of characters, each with the tokens it covers,
    and a longer prompt over the same text reports the reuse."""
    text = "The river Amazon flows through Peru, Colombia and Brazil into the Atlantic Ocean. " * 8
    body = {"model": "smol", "prompt": text, "max_tokens": 4, "temperature": 0}
    usage, _ = await model.complete(CompletionRequest.model_validate(body), threading.Event(), nothing)
    held = dict(model.cached_prefixes())
    blocks = text_hashes(text)
    assert len(blocks) == 2
    assert 0 < held[blocks[0]] < held[blocks[1]] <= usage.prompt_tokens
    longer = {**body, "prompt": text + "Which river is longest?"}
    again, _ = await model.complete(CompletionRequest.model_validate(longer), threading.Event(), nothing)
    assert again.cached_tokens >= held[blocks[1]]


async def test_cache_ram_brings_an_evicted_conversation_back() -> None:
    """With one slot, a second conversation evicts the first; with --cache-ram the first comes back
    from host RAM, its prefix counted as cached (without it, it is decoded again) and still named in
    the summary while it is out of the slot."""
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Tell me about {country}."}]
        for country in ("Peru", "Egypt")
    ]
    reused = {}
    for cache_ram in (0, 64):
        model = BatchedModel.load(replace(CONFIG, cache_ram=cache_ram), parallel=1, threads=1)
        try:
            first, text, _ = await run(model, chat(conversations[0]))
            other = [{"role": "user", "content": "Count from one to three in French, please."}]
            await run(model, chat(other))  # shares nothing: takes the one slot
            follow = [
                *conversations[0],
                {"role": "assistant", "content": text},
                {"role": "user", "content": "More?"},
            ]
            held = dict(model.cached_prefixes())
            second, _, skipped = await run(model, chat(follow))
            reused[cache_ram] = second.cached_tokens
            assert second.cached_tokens == skipped
            if cache_ram:
                assert chat_hashes(chat(follow))[2] in held
                assert model.scheduler.stats.restores == 1
                assert second.cached_tokens >= first.prompt_tokens
        finally:
            model.close()
    assert reused[0] == 0


def test_host_cache_keeps_within_its_budget_and_prefers_the_longest() -> None:
    """The host cache drops the oldest states past its budget, a state that extends another replaces
    it, and `best` finds the state sharing most with a prompt."""
    cache = HostCache(capacity=100)
    assert cache.put(SavedState([1, 2, 3], b"x" * 40))
    assert cache.put(SavedState([1, 2, 3, 4], b"y" * 40))  # holds all of the first
    assert len(cache) == 1
    assert cache.put(SavedState([7, 8], b"z" * 40))
    assert cache.put(SavedState([9], b"w" * 40))  # over budget: the oldest goes
    assert len(cache) == 2
    assert cache.used == 80
    assert cache.best([7, 8, 9]) == (2, 2)
    assert cache.best([5]) is None
    assert not cache.put(SavedState([1], b"v" * 101))


def test_summaries_keep_the_longest_claim_per_prefix_within_the_limit() -> None:
    """A prefix held by several caches is listed once, with the most tokens any holds it for."""
    assert summarize([[(1, 10), (2, 30)], [(1, 12)]]) == [(2, 30), (1, 12)]
    assert summarize([[(hash_, hash_ + 1) for hash_ in range(50)]], limit=3) == [(49, 50), (48, 49), (47, 48)]


async def test_a_prefix_being_read_is_read_once() -> None:
    """A request over a long system prompt that another slot is still reading waits for it and copies
    it: the shared part is decoded once and counted as cached (without waiting, the rest of it would
    be read twice)."""
    model = BatchedModel.load(replace(CONFIG, n_ctx=2048), parallel=2, threads=1)
    try:
        system = SYSTEM * 30
        bodies = [
            chat([{"role": "system", "content": system}, {"role": "user", "content": question}])
            for question in ("Tell me about Peru.", "Tell me about Chile.")
        ]
        shared = len(model.prompts.chat_prompt(chat([{"role": "system", "content": system}])))
        stats = model.scheduler.stats
        # Two steps' worth and more: still being read when the second request can join (between steps).
        assert shared > 2 * 512 + HOLD_MIN_TOKENS
        reading = asyncio.ensure_future(run(model, bodies[0]))
        await eventually(lambda: stats.steps >= 1)
        second, _, _ = await run(model, bodies[1])
        first, _, _ = await reading
        assert stats.holds == 1
        assert stats.copies == 1
        assert second.cached_tokens >= shared - 8
        assert stats.prompt_tokens <= first.prompt_tokens + second.prompt_tokens - shared + 8
    finally:
        model.close()
