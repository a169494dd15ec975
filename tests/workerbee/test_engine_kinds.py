"""Every request kind in the one batch on the real SmolLM2 model: the same greedy text alone, in a full
batch and beside other kinds; log probabilities against the model's own logits; n choices from one
prompt decode; legacy completions; embeddings batched across requests; real-world JSON schemas.
"""

from __future__ import annotations

import asyncio
import enum
import json
import threading
from collections.abc import Iterator
from typing import Any, Literal

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel, Field
from servers import smollm2_path

from protocol import ErrorCode
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from workerbee.batching import BatchedModel
from workerbee.errors import EngineError
from workerbee.llama_context import MultiSequenceContext, TokenBatch
from workerbee.prompts import ModelConfig

N_CTX = 2048
PARALLEL = 4
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}


@pytest.fixture(scope="module")
def model() -> Iterator[BatchedModel]:
    """SmolLM2 batching four sequences on one thread, with embeddings."""
    config = ModelConfig(id="smol", path=smollm2_path(), n_ctx=N_CTX, embeddings=True)
    loaded = BatchedModel.load(config, parallel=PARALLEL, threads=1)
    yield loaded
    loaded.close()


def chat(content: str, **fields: Any) -> ChatCompletionRequest:
    """A greedy one-message chat request."""
    return ChatCompletionRequest.model_validate(
        {
            "model": "smol",
            "messages": [{"role": "user", "content": content}],
            "temperature": 0,
            "max_tokens": 16,
            **fields,
        }
    )


async def ignore(chunk: dict[str, Any], tokens: int) -> None:
    """Drop streamed chunks."""


async def whole(model: BatchedModel, request: ChatCompletionRequest | CompletionRequest) -> dict[str, Any]:
    """The whole response to a request (streamed requests are assembled from their chunks)."""
    if isinstance(request, CompletionRequest):
        _, response = await model.complete(request, threading.Event(), ignore)
    else:
        _, response = await model.chat(request, threading.Event(), ignore)
    assert response is not None
    return response


KINDS: dict[str, ChatCompletionRequest | CompletionRequest] = {
    "plain": chat("Name three primary colors."),
    "json_schema": chat(
        "Where is the Eiffel tower? Answer in JSON.",
        max_tokens=24,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}},
    ),
    "named_tool": chat(
        "What is the weather in Paris?",
        max_tokens=24,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    ),
    "logprobs": chat("Write a haiku about the sea.", logprobs=True, top_logprobs=3),
    "completion": CompletionRequest.model_validate(
        {"model": "smol", "prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    ),
}


def answer_of(response: dict[str, Any]) -> Any:
    """What a choice says: text, or the tool call's name and arguments, with log probabilities if any."""
    [choice] = response["choices"]
    if "text" in choice:
        return choice["text"]
    message = choice["message"]
    if message.get("tool_calls"):
        call = message["tool_calls"][0]["function"]
        return call["name"], call["arguments"]
    logprobs = choice["logprobs"]
    return message["content"], None if logprobs is None else [
        (entry["token"], round(entry["logprob"], 4)) for entry in logprobs["content"]
    ]


async def test_every_kind_answers_the_same_alone_and_beside_other_kinds(model: BatchedModel) -> None:
    """At temperature 0 each kind gives the same answer alone and in a full batch of mixed kinds."""
    alone = {name: answer_of(await whole(model, request)) for name, request in KINDS.items()}
    assert json.loads(alone["json_schema"][0])["city"]
    assert alone["named_tool"][0] == "get_weather"
    mixed = ["json_schema", "logprobs", "plain", "named_tool"]
    together = await asyncio.gather(*(whole(model, KINDS[name]) for name in mixed))
    assert {name: answer_of(response) for name, response in zip(mixed, together, strict=True)} == {
        name: alone[name] for name in mixed
    }
    assert model.scheduler.stats.max_running == PARALLEL
    # A full batch of one kind, and the fifth kind beside it (queued for a free slot).
    for name in ("json_schema", "completion"):
        batch = await asyncio.gather(
            *(whole(model, KINDS[name]) for _ in range(PARALLEL)), whole(model, KINDS["plain"])
        )
        assert [answer_of(response) for response in batch] == [alone[name]] * PARALLEL + [alone["plain"]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """The log probabilities of a logits row, in float64."""
    raw = logits.astype(np.float64)
    peak = raw.max()
    result: np.ndarray = raw - (peak + np.log(np.exp(raw - peak).sum()))
    return result


def reference_logprobs(model: BatchedModel, prompt: list[int], steps: int) -> list[tuple[int, np.ndarray]]:
    """Greedy decoding one token at a time on a context of its own: each token and its log-softmax row."""
    context = MultiSequenceContext(model.weights, n_seq=1, n_ctx_seq=N_CTX, n_batch=512, threads=1)
    batch = TokenBatch(512)
    rows: list[tuple[int, np.ndarray]] = []
    try:
        for position, token in enumerate(prompt):
            batch.add(token, position, 0, position == len(prompt) - 1)
        context.decode(batch)
        index = len(prompt) - 1
        for step in range(steps):
            row = log_softmax(context.logits_row(len(batch) - 1))
            token = int(np.argmax(row))
            rows.append((token, row))
            batch.clear()
            batch.add(token, index + 1 + step, 0, True)
            context.decode(batch)
    finally:
        batch.close()
        context.close()
    return rows


async def test_logprobs_are_the_log_softmax_of_the_models_logits(model: BatchedModel) -> None:
    """Each token's logprob and its top_logprobs equal log-softmax of the model's logits row."""
    request = chat(
        "Write a haiku about the sea.", logprobs=True, top_logprobs=3, max_tokens=10, ignore_eos=True
    )
    neighbours = [whole(model, KINDS["plain"]) for _ in range(PARALLEL - 1)]
    response, *_ = await asyncio.gather(whole(model, request), *neighbours)
    entries = response["choices"][0]["logprobs"]["content"]
    rows = reference_logprobs(model, model.prompts.chat_prompt(request), 10)
    assert len(entries) == len(rows) == 10
    for entry, (token, row) in zip(entries, rows, strict=True):
        assert bytes(entry["bytes"]) == model.weights.vocab.piece(token)
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-3)
        best = np.argsort(-row)[:3]
        assert [top["logprob"] for top in entry["top_logprobs"]] == pytest.approx(
            [float(row[t]) for t in best], abs=1e-3
        )
        assert [bytes(top["bytes"]) for top in entry["top_logprobs"]] == [
            model.weights.vocab.piece(int(t)) for t in best
        ]


async def test_n_choices_with_a_seed_are_reproducible_distinct_and_decode_the_prompt_once(
    model: BatchedModel,
) -> None:
    """n=3 with a seed: the same three answers twice, all different, each what seed+i gives alone."""
    request = chat("Invent a name for a cat.", temperature=1.0, seed=42, n=3, max_tokens=12)
    stats = model.scheduler.stats
    before = stats.prompt_tokens
    first = await whole(model, request)
    decoded = stats.prompt_tokens - before
    texts = [choice["message"]["content"] for choice in first["choices"]]
    assert [choice["index"] for choice in first["choices"]] == [0, 1, 2]
    assert decoded <= len(model.prompts.chat_prompt(request))
    assert len(set(texts)) == 3
    second = await whole(model, request)
    assert [choice["message"]["content"] for choice in second["choices"]] == texts
    alone = [
        (await whole(model, request.model_copy(update={"n": 1, "seed": 42 + index})))["choices"][0][
            "message"
        ]["content"]
        for index in range(3)
    ]
    assert alone == texts


async def test_n_beyond_the_slots_runs_in_groups(model: BatchedModel) -> None:
    """A request for more choices than slots still answers every one of them."""
    response = await whole(model, chat("Say hi.", n=PARALLEL + 2, max_tokens=4))
    assert [choice["index"] for choice in response["choices"]] == list(range(PARALLEL + 2))
    assert len({choice["message"]["content"] for choice in response["choices"]}) == 1


async def test_streamed_n_choices_carry_their_index(model: BatchedModel) -> None:
    """A streamed n=2 request interleaves chunks of both choices, each ending with its finish reason."""
    chunks: list[dict[str, Any]] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        chunks.append(chunk["choices"][0])

    await model.chat(chat("Name a fruit.", n=2, stream=True, max_tokens=6), threading.Event(), on_chunk)
    for index in (0, 1):
        mine = [choice for choice in chunks if choice["index"] == index]
        assert mine[0]["delta"]["role"] == "assistant"
        assert mine[-1]["finish_reason"] in {"stop", "length"}


async def test_completions_take_prompt_lists_token_ids_echo_and_logprobs(model: BatchedModel) -> None:
    """Legacy completions: a list of prompts (one as token ids) times n, echoed, with logprobs."""
    text = "The capital of France is"
    tokens = model.weights.tokenize(text, add_bos=model.weights.add_bos)
    request = CompletionRequest.model_validate(
        {
            "model": "smol",
            "prompt": [text],
            "max_tokens": 6,
            "temperature": 0,
            "echo": True,
            "logprobs": 2,
            "n": 2,
        }
    )
    by_ids = request.model_copy(update={"prompt": [tokens]})
    usage, response = await model.complete(request, threading.Event(), ignore)
    _, response_ids = await model.complete(by_ids, threading.Event(), ignore)
    assert response is not None
    assert response_ids is not None
    choices = response["choices"]
    assert [choice["index"] for choice in choices] == [0, 1]
    assert choices[0]["text"] == choices[1]["text"]
    assert choices[0]["text"].startswith(text)
    generated = choices[0]["text"][len(text) :]
    assert generated
    assert response_ids["choices"][0]["text"].endswith(generated)
    logprobs = choices[0]["logprobs"]
    assert "".join(logprobs["tokens"]) == generated
    assert all(len(top) == 2 for top in logprobs["top_logprobs"])
    assert usage.prompt_tokens == len(tokens)
    two = request.model_copy(update={"prompt": [text, "Water boils at"], "n": 1, "echo": False})
    _, response_two = await model.complete(two, threading.Event(), ignore)
    assert response_two is not None
    assert response_two["choices"][0]["text"] == generated
    assert len(response_two["choices"]) == 2


async def test_embeddings_of_several_requests_share_a_decode(model: BatchedModel) -> None:
    """Inputs of concurrent requests are embedded together, and each vector is what it is alone."""
    assert model.embedder is not None
    words = ["apple", "a red fruit", "the stock market", "interest rates"]
    requests = [EmbeddingRequest.model_validate({"model": "smol", "input": words[i : i + 2]}) for i in (0, 2)]
    alone = [(await model.embed(request, threading.Event()))[1] for request in requests]
    before = model.embedder.decodes
    together = await asyncio.gather(*(model.embed(request, threading.Event()) for request in requests))
    assert model.embedder.decodes - before < 4
    for (_, response), reference in zip(together, alone, strict=True):
        for item, expected in zip(response["data"], reference["data"], strict=True):
            assert item["embedding"] == pytest.approx(expected["embedding"], abs=1e-4)
    vectors = [np.array(item["embedding"]) for _, response in together for item in response["data"]]
    assert all(float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5) for vector in vectors)


# Real-world schemas, as pydantic writes them: nested and listed models, optional fields, enums, unions.


class Color(enum.StrEnum):
    """A color."""

    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    """A postal address."""

    street: str = Field(max_length=30)
    city: str = Field(max_length=20)
    zip: str | None = Field(default=None, pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    """A person, with addresses and an optional manager (a recursive model)."""

    name: str = Field(min_length=1, max_length=20)
    age: int = Field(ge=0, le=150)
    favourite: Color
    addresses: list[Address] = Field(max_length=2)
    manager: Person | None = None


class Cat(BaseModel):
    """A cat."""

    kind: Literal["cat"]
    indoor: bool


class Dog(BaseModel):
    """A dog."""

    kind: Literal["dog"]
    tricks: int = Field(ge=0, le=9)


class Pet(BaseModel):
    """A discriminated union of models."""

    name: str = Field(max_length=12)
    animal: Cat | Dog = Field(discriminator="kind")


class Order(BaseModel):
    """allOf/const/nullable/additionalProperties: false, as OpenAI's strict mode writes."""

    model_config = {"extra": "forbid"}
    id: int
    status: Literal["open", "closed"]
    # Bounded: a model this small may never end a free string.
    note: str | None = Field(max_length=40)


SCHEMAS: dict[str, dict[str, Any]] = {
    "person": Person.model_json_schema(),
    "pet": Pet.model_json_schema(),
    "order": Order.model_json_schema(),
    "all_of": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}, "required": ["a"]},
            {"type": "object", "properties": {"b": {"enum": [1, 2, 3]}}, "required": ["b"]},
        ]
    },
}
QUESTION = "Make up an example."


def tool_of(name: str) -> dict[str, Any]:
    """A function whose parameters are one of SCHEMAS."""
    return {"type": "function", "function": {"name": f"make_{name}", "parameters": SCHEMAS[name]}}


# Every schema through response_format, and each through tools in two of the tool modes (a test run
# on two cores is the bound: answers of several hundred tokens each).
MODES = {
    "response_format": list(SCHEMAS),
    "required": ["pet", "order"],
    "named": ["person", "all_of"],
    "auto": ["order", "pet"],
}


@pytest.mark.parametrize("mode", list(MODES))
async def test_real_world_schemas_give_valid_answers_in_every_mode(model: BatchedModel, mode: str) -> None:
    """Schemas through response_format and through tools in required, named and auto modes: each
    answer parses and validates (auto may answer in text, but a call it makes validates)."""
    requests = []
    for name in MODES[mode]:
        if mode == "response_format":
            fields: dict[str, Any] = {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": name, "schema": SCHEMAS[name]},
                }
            }
        else:
            # Two tools are offered, so that wrapping several keeps each one's references resolvable.
            choice: Any = (
                {"type": "function", "function": {"name": f"make_{name}"}} if mode == "named" else mode
            )
            other = "order" if name == "all_of" else "all_of"
            fields = {"tools": [tool_of(name), tool_of(other)], "tool_choice": choice}
        # A text answer in auto mode may run on: it is cut sooner than any call these schemas make.
        limit = 120 if mode == "auto" else 300
        requests.append((name, chat(f"{QUESTION} ({name})", max_tokens=limit, **fields)))
    responses = await asyncio.gather(*(whole(model, request) for _, request in requests))
    for (name, _), response in zip(requests, responses, strict=True):
        [choice] = response["choices"]
        message = choice["message"]
        if mode == "auto" and not message.get("tool_calls"):
            continue  # text: free to say anything, for as long as it likes
        assert choice["finish_reason"] != "length", (name, choice)
        if mode == "response_format":
            jsonschema.validate(json.loads(message["content"]), SCHEMAS[name])
            continue
        [call] = message["tool_calls"]
        called = call["function"]["name"].removeprefix("make_")
        if mode == "named":
            assert called == name
        jsonschema.validate(json.loads(call["function"]["arguments"]), SCHEMAS[called])


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
                }
            },
            "response_format.json_schema.schema",
        ),
        (
            {
                "tools": [
                    WEATHER,
                    {
                        "type": "function",
                        "function": {
                            "name": "loop",
                            "parameters": {
                                "type": "object",
                                "properties": {"next": {"$ref": "#"}},
                                "required": ["next"],
                            },
                        },
                    },
                ],
                "tool_choice": "auto",
            },
            "tools[1].function.parameters",
        ),
    ],
    ids=["not", "endless_recursion"],
)
async def test_a_schema_the_grammar_cannot_express_is_refused_naming_the_parameter(
    model: BatchedModel, fields: dict[str, Any], param: str
) -> None:
    """What the grammar cannot express is the client's error, naming the parameter, before any token."""
    with pytest.raises(EngineError) as raised:
        await whole(model, chat(QUESTION, **fields))
    assert raised.value.code is ErrorCode.INVALID_REQUEST
    assert raised.value.param == param
