"""Resuming an answer on the real SmolLM2 model: a resumed choice continues from the relayed token ids.

The reference is the same engine's uninterrupted answer; the resume starts from the ids behind the
first chunks of that answer, as the queen would send them after a worker's death. Both decode their
prompt the same way (from the slot cache the request itself left: `reference` runs it twice), since a
prompt decoded cold and one decoded from a cache can differ at a near-tie (docs/resume.md).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from servers import smollm2_path

from protocol import Resume, ResumedChoice
from protocol.openai import ChatCompletionRequest, CompletionRequest
from workerbee.batching import BatchedModel
from workerbee.decoding import TokenIds
from workerbee.prompts import ModelConfig

CONFIG = ModelConfig(id="smol", path=smollm2_path(), n_ctx=1024)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city", "unit"],
        },
    },
}


@pytest.fixture(scope="module")
def batched() -> Iterator[BatchedModel]:
    """The engine's model, batching two sequences, one thread (greedy text is then reproducible)."""
    backend = BatchedModel.load(CONFIG, parallel=2, threads=1)
    yield backend
    backend.close()


Streamed = list[tuple[dict[str, Any], int]]


def chat(**fields: Any) -> ChatCompletionRequest:
    """A streamed chat request for the test model."""
    body = {"model": "smol", "messages": [{"role": "user", "content": "Describe the sea in two sentences."}]}
    return ChatCompletionRequest.model_validate(
        {**body, "temperature": 0, "max_tokens": 40, "stream": True, **fields}
    )


async def run(backend: BatchedModel, request: Any, resume: Resume | None = None) -> tuple[Streamed, Any]:
    """Stream a request (or continue it): its chunks with their token counts, and its usage."""
    chunks: Streamed = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        chunks.append((chunk, tokens))

    method = backend.chat if isinstance(request, ChatCompletionRequest) else backend.complete
    usage, _ = await method(request, threading.Event(), on_chunk, resume)
    return chunks, usage


async def reference(backend: BatchedModel, request: Any) -> tuple[Streamed, Any]:
    """The uninterrupted answer, its prompt decoded from the cache its first run left, as a resume's is."""
    await run(backend, request)
    return await run(backend, request)


def text_of(chunks: Streamed, index: int = 0) -> str:
    """A choice's streamed content, tool-call arguments or completion text."""
    text = ""
    for chunk, _ in chunks:
        for choice in chunk["choices"]:
            if choice["index"] != index:
                continue
            if "text" in choice:
                text += choice["text"]
                continue
            delta = choice["delta"]
            text += delta.get("content") or ""
            for call in delta.get("tool_calls") or []:
                text += call.get("function", {}).get("arguments", "")
    return text


def relayed(chunks: Streamed, upto: int, index: int = 0) -> tuple[str, list[int]]:
    """The text and token ids of a choice's first `upto` chunks, as the queen relayed them."""
    mine = [(chunk, tokens) for chunk, tokens in chunks if chunk["choices"][0]["index"] == index][:upto]
    ids = [token for _, tokens in mine if isinstance(tokens, TokenIds) for token in tokens.ids]
    return text_of(mine, index), ids


async def test_every_chunk_names_its_tokens(batched: BatchedModel) -> None:
    """Each chunk's count carries exactly that many ids, and they add up to the completion tokens."""
    chunks, usage = await run(batched, chat())
    counted = [tokens for _, tokens in chunks if tokens]
    assert all(isinstance(tokens, TokenIds) and len(tokens.ids) == tokens for tokens in counted)
    assert sum(counted) == usage.completion_tokens


@pytest.mark.parametrize("cut", [1, 5, 17])
async def test_greedy_resume_continues_token_for_token(batched: BatchedModel, cut: int) -> None:
    """Resumed after `cut` chunks, the rest is exactly what the uninterrupted answer went on with."""
    whole, usage = await reference(batched, chat())
    sent, ids = relayed(whole, cut)
    rest, rest_usage = await run(batched, chat(), Resume(choices=[ResumedChoice(index=0, token_ids=ids)]))
    assert sent + text_of(rest) == text_of(whole)
    assert "role" not in json.dumps([chunk for chunk, _ in rest])
    assert rest[-1][0]["choices"][0]["finish_reason"] == whole[-1][0]["choices"][0]["finish_reason"]
    assert len(ids) + rest_usage.completion_tokens == usage.completion_tokens


async def test_resume_respects_the_budget_left(batched: BatchedModel) -> None:
    """The relayed tokens count towards max_tokens: the resumed choice stops where the whole one did."""
    whole, _ = await reference(batched, chat(max_tokens=12))
    _, ids = relayed(whole, 4)
    rest, usage = await run(
        batched, chat(max_tokens=12), Resume(choices=[ResumedChoice(index=0, token_ids=ids)])
    )
    assert len(ids) + usage.completion_tokens == 12
    assert rest[-1][0]["choices"][0]["finish_reason"] == "length"


async def test_tool_call_resumes_mid_arguments(batched: BatchedModel) -> None:
    """A forced tool call cut inside its arguments continues under the grammar into the same JSON."""
    request = chat(
        messages=[{"role": "user", "content": "What is the weather in Reykjavik, in celsius?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=60,
    )
    whole, _ = await reference(batched, request)
    arguments = text_of(whole)
    assert json.loads(arguments)["unit"] in {"c", "f"}
    sent, ids = relayed(whole, 4)
    assert 0 < len(sent) < len(arguments)
    rest, _ = await run(batched, request, Resume(choices=[ResumedChoice(index=0, token_ids=ids)]))
    assert sent + text_of(rest) == arguments
    assert rest[-1][0]["choices"][0]["finish_reason"] == "tool_calls"


async def test_each_unfinished_choice_resumes(batched: BatchedModel) -> None:
    """With n=2 both choices resume, each from its own tokens, into the seeded uninterrupted answer."""
    request = chat(n=2, temperature=0.8, seed=7, max_tokens=24)
    whole, _ = await reference(batched, request)
    resume = []
    sent = {}
    for index in (0, 1):
        sent[index], ids = relayed(whole, 3, index)
        resume.append(ResumedChoice(index=index, token_ids=ids))
    rest, _ = await run(batched, request, Resume(choices=resume))
    for index in (0, 1):
        assert sent[index] + text_of(rest, index) == text_of(whole, index)


async def test_logprobs_continue(batched: BatchedModel) -> None:
    """A resumed choice reports log probabilities for its new tokens only, the same as the whole one's."""
    request = chat(logprobs=True, top_logprobs=2, max_tokens=16)
    whole, _ = await reference(batched, request)
    _, ids = relayed(whole, 3)

    def entries(chunks: Streamed) -> list[Any]:
        return [
            e
            for chunk, _ in chunks
            for c in chunk["choices"]
            for e in (c["logprobs"] or {}).get("content") or []
        ]

    rest, _ = await run(batched, request, Resume(choices=[ResumedChoice(index=0, token_ids=ids)]))
    assert [e["token"] for e in entries(whole)][-len(entries(rest)) :] == [e["token"] for e in entries(rest)]
    assert len(entries(whole)) == len(ids) + len(entries(rest))


async def test_text_completion_resumes(batched: BatchedModel) -> None:
    """A legacy completion resumes the same way."""
    request = CompletionRequest.model_validate(
        {
            "model": "smol",
            "prompt": "The three primary colors are",
            "temperature": 0,
            "max_tokens": 20,
            "stream": True,
        }
    )
    whole, _ = await reference(batched, request)
    sent, ids = relayed(whole, 6)
    rest, _ = await run(batched, request, Resume(choices=[ResumedChoice(index=0, token_ids=ids)]))
    assert sent + text_of(rest) == text_of(whole)
