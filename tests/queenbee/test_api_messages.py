"""Anthropic's Messages API: translation both ways as pure functions, then the real anthropic SDK
against a queen with a scripted worker, every object and event checked against Anthropic's schemas.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import pytest
from fake_worker import FakeWorker, content_chunk, reply
from pydantic import SecretStr
from schemas.openai_schemas import Httpx2ValidatingTransport, validate
from servers import QueenServer

from protocol import ChatJob, Chunk, ErrorCode, Job, Result, TokenCountJob, Usage
from queenbee.api import messages
from queenbee.errors import InvalidRequest, NoCapacity, RateLimited
from queenbee.settings import QueenSettings

KEY = "sk-messages-one"
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


# The translations, as pure functions.


def test_system_text_tool_use_and_tool_result_become_chat_messages() -> None:
    """system is the system message, tool_use an assistant tool call, tool_result a tool message."""
    body = messages.parse(
        messages.MessagesRequest,
        {
            "model": "m",
            "max_tokens": 50,
            "system": [{"type": "text", "text": "Be brief."}],
            "tools": [WEATHER_TOOL],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Looking."},
                        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Rome"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t1",
                            "content": [{"type": "text", "text": "sun"}],
                        },
                        {"type": "text", "text": "And tomorrow?"},
                    ],
                },
            ],
            "stop_sequences": ["END"],
            "top_k": 5,
        },
    )
    chat = messages.chat_request(body)
    roles = [(message.role, message.text()) for message in chat.messages]
    assert roles == [
        ("system", "Be brief."),
        ("user", "Weather?"),
        ("assistant", "Looking."),
        ("tool", "sun"),
        ("user", "And tomorrow?"),
    ]
    assert chat.messages[2].tool_calls is not None
    assert chat.messages[2].tool_calls[0].function.arguments == '{"city": "Rome"}'
    assert chat.messages[3].tool_call_id == "t1"
    assert (chat.max_tokens, chat.stop, chat.top_k) == (50, ["END"], 5)
    assert chat.tools is not None
    assert chat.tools[0].function.parameters == WEATHER_TOOL["input_schema"]


@pytest.mark.parametrize(
    ("choice", "mode"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "tool", "name": "get_weather"}, "get_weather"),
        ({"type": "none"}, "none"),
    ],
)
def test_tool_choice_maps_onto_the_chat_tool_modes(choice: dict[str, Any], mode: str) -> None:
    """auto, any, tool and none are the chat auto, required, a named function and none."""
    body = messages.parse(
        messages.MessagesRequest,
        {
            "model": "m",
            "max_tokens": 5,
            "tools": [WEATHER_TOOL],
            "tool_choice": choice,
            "messages": [{"role": "user", "content": "x"}],
        },
    )
    assert messages.chat_request(body).tool_mode == mode


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
        ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
            },
            "messages.0.content.0",
        ),
        (
            {
                "model": "m",
                "max_tokens": 5,
                "tools": [{"type": "web_search_20250305", "name": "web_search"}],
                "messages": [{"role": "user", "content": "x"}],
            },
            "tools.0",
        ),
    ],
)
def test_what_cannot_be_served_is_refused_by_name(body: dict[str, Any], param: str) -> None:
    """A missing max_tokens, unknown fields, images and server tools are 400s naming the field."""

    def translate() -> None:
        messages.chat_request(messages.parse(messages.MessagesRequest, body))

    with pytest.raises(InvalidRequest) as caught:
        translate()
    assert caught.value.param == param


def _completion(message: dict[str, Any], finish_reason: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }


@pytest.mark.parametrize(
    ("finish_reason", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use")],
)
def test_a_whole_answer_becomes_a_message(finish_reason: str, stop_reason: str) -> None:
    """Text and tool calls become text and tool_use blocks; the finish reason Anthropic's stop_reason."""
    function = {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    call = {"id": "c9", "type": "function", "function": function}
    message = messages.message_object(
        _completion({"role": "assistant", "content": "Looking.", "tool_calls": [call]}, finish_reason)
    )
    validate("AnthropicMessage", message)
    assert message["content"] == [
        {"type": "text", "text": "Looking."},
        {"type": "tool_use", "id": "c9", "name": "get_weather", "input": {"city": "Oslo"}},
    ]
    assert message["stop_reason"] == stop_reason
    assert message["usage"] == {
        "input_tokens": 4,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


@pytest.mark.parametrize(("cached", "read"), [(30, 30), (0, 0), (99, 40), (-3, 0)])
def test_cached_prompt_tokens_are_read_from_the_cache_in_anthropic_terms(cached: int, read: int) -> None:
    """Anthropic splits the prompt: `input_tokens` decoded, `cache_read_input_tokens` reused; together
    the whole prompt. A cached count beyond the prompt (or below zero) is clamped, never passed on."""
    completion = _completion({"role": "assistant", "content": "Hi"}, "stop")
    completion["usage"] = {
        "prompt_tokens": 40,
        "completion_tokens": 2,
        "total_tokens": 42,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
    message = messages.message_object(completion)
    validate("AnthropicMessage", message)
    assert message["usage"] == {
        "input_tokens": 40 - read,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": read,
    }
    events = messages.MessageEvents("msg_1", "m").finish(completion["usage"])
    assert events[-2]["usage"] == message["usage"]


def test_a_stop_sequence_that_ended_the_answer_is_named() -> None:
    """The worker's `stop_reason` on the chat choice becomes Anthropic's stop_sequence, whole and streamed."""
    completion = _completion({"role": "assistant", "content": "One, two"}, "stop")
    completion["choices"][0]["stop_reason"] = "three"
    message = messages.message_object(completion)
    validate("AnthropicMessage", message)
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "three")
    translator = messages.MessageEvents("msg_2", "m")
    finish = _chunk({}, "stop")
    finish["choices"][0]["stop_reason"] = "three"
    events = translator.chunk(_chunk({"content": "One"})) + translator.chunk(finish)
    events += translator.finish({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    [delta] = [event for event in events if event["type"] == "message_delta"]
    validate("AnthropicStreamEvent", delta)
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "three"}
    plain = messages.message_object(_completion({"role": "assistant", "content": "Hi"}, "stop"))
    assert (plain["stop_reason"], plain["stop_sequence"]) == ("end_turn", None)


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def test_chunks_become_anthropic_stream_events() -> None:
    """Text then a tool call: message_start, ping, a text block, a tool_use block, message_delta, stop."""
    translator = messages.MessageEvents("msg_1", "m")
    opening = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hi"}),
        _chunk({"tool_calls": [opening]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({}, "tool_calls"),
    ]
    events = [event for chunk in chunks for event in translator.chunk(chunk)]
    events += translator.finish({"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5})
    for event in events:
        validate("AnthropicStreamEvent", event)
    assert [(event["type"], event.get("index")) for event in events] == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("message_delta", None),
        ("message_stop", None),
    ]
    assert events[6]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":'}
    assert events[8]["delta"]["stop_reason"] == "tool_use"
    assert events[8]["usage"] == {
        "input_tokens": 3,
        "output_tokens": 2,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (InvalidRequest("bad"), "invalid_request_error"),
        (RateLimited("slow down", limit="requests", retry_after=1), "rate_limit_error"),
        (NoCapacity("busy"), "overloaded_error"),
    ],
)
def test_errors_take_anthropic_shape(error: Any, kind: str) -> None:
    """A queen error in Anthropic's shape: type error, and the error type for its status."""
    body = error.anthropic_body()
    validate("AnthropicError", body)
    assert body == {"type": "error", "error": {"type": kind, "message": error.message}}


# The real anthropic SDK against a queen with a scripted worker.


async def scripted(worker: FakeWorker, job: Job) -> None:
    """Counts tokens, calls the forced tool, answers a tool result, or says how many messages it saw."""
    if isinstance(job.request, TokenCountJob):
        count = {"input_tokens": 10 * len(job.request.body.messages)}
        await worker.send(
            Result(
                request_id=job.request_id,
                usage=Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0),
                response=count,
            )
        )
        return
    assert isinstance(job.request, ChatJob)
    chat = job.request.body
    last = chat.messages[-1]
    if last.role == "tool":
        await reply(worker, job, f"The tool said {last.text()}")
    elif chat.tool_mode not in ("none", "auto") and chat.tools:
        name = chat.tool_mode if chat.tool_mode != "required" else chat.tools[0].function.name
        await reply(worker, job, tool_call=(name, '{"city": "Paris"}'))
    else:
        await reply(worker, job, f"Answer to {len(chat.messages)} messages")


@pytest.fixture
def queen_settings(tmp_path: Path) -> QueenSettings:
    """A queen with a client key."""
    return QueenSettings(queue_timeout=2.0, db=tmp_path / "queen.db", api_key=[SecretStr(KEY)])


@pytest.fixture
async def worker(queen: QueenServer) -> AsyncIterator[FakeWorker]:
    """A scripted worker connected to the queen."""
    worker = await FakeWorker(queen.worker_url, behaviour=scripted).connect()
    yield worker
    await worker.close()


@pytest.fixture
async def transport() -> AsyncIterator[Httpx2ValidatingTransport]:
    """Validates every answer against the schemas."""
    transport = Httpx2ValidatingTransport()
    yield transport
    await transport.aclose()


def sdk(queen: QueenServer, transport: Httpx2ValidatingTransport, key: str = KEY) -> anthropic.AsyncAnthropic:
    """The anthropic SDK pointed at the queen (x-api-key, anthropic-version), through the transport."""
    http = httpx2.AsyncClient(transport=transport, timeout=30)
    return anthropic.AsyncAnthropic(base_url=queen.base_url, api_key=key, max_retries=0, http_client=http)


async def test_messages_create(
    queen: QueenServer, worker: FakeWorker, transport: Httpx2ValidatingTransport
) -> None:
    """messages.create: a message with one text block, end_turn, and the worker's usage."""
    message = await sdk(queen, transport).messages.create(
        model="fake-model", max_tokens=50, system="Be brief.", messages=[{"role": "user", "content": "Hi"}]
    )
    assert message.id.startswith("msg_")
    assert message.content[0].type == "text"
    assert message.content[0].text == "Answer to 2 messages"
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 4)
    assert transport.seen.names == ["AnthropicMessage"]


async def test_messages_stream_text(
    queen: QueenServer, worker: FakeWorker, transport: Httpx2ValidatingTransport
) -> None:
    """messages.stream: text deltas as they come, and the final message at the end."""
    async with sdk(queen, transport).messages.stream(
        model="fake-model", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "Answer to 1 messages"
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 4
    assert transport.seen.streams == 1


async def test_messages_stream_a_forced_tool_call(
    queen: QueenServer, worker: FakeWorker, transport: Httpx2ValidatingTransport
) -> None:
    """tool_choice tool: the stream carries the call as input_json_delta pieces that make its input."""
    async with sdk(queen, transport).messages.stream(
        model="fake-model",
        max_tokens=50,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    pieces = [
        event.delta.partial_json
        for event in events
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
    ]
    assert len(pieces) > 1
    assert "".join(pieces) == '{"city": "Paris"}'
    [block] = final.content
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("get_weather", {"city": "Paris"})
    assert final.stop_reason == "tool_use"
    assert isinstance(worker.jobs[0].request, ChatJob)
    assert worker.jobs[0].request.body.tool_mode == "get_weather"


async def test_a_tool_result_round_trip(
    queen: QueenServer, worker: FakeWorker, transport: Httpx2ValidatingTransport
) -> None:
    """A tool_use comes back; the tool_result sent after it gets the answer."""
    client = sdk(queen, transport)
    question = {"role": "user", "content": "Weather in Paris?"}
    first = await client.messages.create(
        model="fake-model",
        max_tokens=50,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "any"},
        messages=[question],  # type: ignore[list-item]
    )
    [call] = first.content
    assert call.type == "tool_use"
    second = await client.messages.create(
        model="fake-model",
        max_tokens=50,
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        messages=[
            question,  # type: ignore[list-item]
            {"role": "assistant", "content": first.content},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert second.content[0].type == "text"
    assert second.content[0].text == "The tool said sunny"
    assert isinstance(worker.jobs[1].request, ChatJob)
    assistant = worker.jobs[1].request.body.messages[1]
    assert assistant.tool_calls is not None
    assert assistant.tool_calls[0].id == call.id


async def test_count_tokens_asks_the_worker(
    queen: QueenServer, worker: FakeWorker, transport: Httpx2ValidatingTransport
) -> None:
    """count_tokens runs a count_tokens job on a worker and answers its count."""
    count = await sdk(queen, transport).messages.count_tokens(
        model="fake-model",
        system="Be brief.",
        messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    )
    assert count.input_tokens == 30
    assert isinstance(worker.jobs[0].request, TokenCountJob)
    assert transport.seen.names == ["AnthropicTokenCount"]


async def test_errors_take_anthropic_shape_and_chat_statuses(
    queen: QueenServer, worker: FakeWorker, transport: Httpx2ValidatingTransport
) -> None:
    """A wrong key is a 401, an unknown model a 404, a bad request a 400: all in Anthropic's shape."""
    with pytest.raises(anthropic.AuthenticationError) as unauthorized:
        await sdk(queen, transport, "sk-wrong").messages.create(
            model="fake-model", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert unauthorized.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        await sdk(queen, transport).messages.create(
            model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "x"}]
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError):
        await sdk(queen, transport).messages.create(
            model="fake-model",
            max_tokens=5,
            messages=[{"role": "robot", "content": "x"}],  # type: ignore[misc, list-item]
        )
    assert set(transport.seen.names) == {"AnthropicError"}


async def test_the_same_keys_work_as_a_bearer_token(
    queen: QueenServer, worker: FakeWorker, transport: Httpx2ValidatingTransport
) -> None:
    """Authorization: Bearer works for /v1/messages as x-api-key does, and x-api-key for chat."""
    async with httpx2.AsyncClient(base_url=queen.base_url, transport=transport) as client:
        body = {"model": "fake-model", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
        bearer = await client.post(
            "/v1/messages",
            json=body,
            headers={"authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"},
        )
        chat = {"model": "fake-model", "messages": [{"role": "user", "content": "x"}]}
        keyed = await client.post("/v1/chat/completions", json=chat, headers={"x-api-key": KEY})
        anonymous = await client.post("/v1/messages", json=body)
    assert bearer.status_code == 200
    assert keyed.status_code == 200
    assert anonymous.status_code == 401
    assert anonymous.json()["type"] == "error"


async def fails_mid_stream(worker: FakeWorker, job: Job) -> None:
    """Streams a word, then fails."""
    await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("Hel", role=True), tokens=1))
    await worker.fail(job, ErrorCode.INTERNAL_ERROR, "the GPU fell off")


async def test_a_failure_mid_stream_ends_with_an_error_event(
    queen: QueenServer, transport: Httpx2ValidatingTransport
) -> None:
    """A worker that fails after the first token: the stream's last event is an Anthropic error."""
    worker = await FakeWorker(queen.worker_url, behaviour=fails_mid_stream).connect()
    texts: list[str] = []

    async def read() -> None:
        async with sdk(queen, transport).messages.stream(
            model="fake-model", max_tokens=50, messages=[{"role": "user", "content": "Hi"}]
        ) as stream:
            async for text in stream.text_stream:
                texts.append(text)

    with pytest.raises(anthropic.APIStatusError) as caught:
        await read()
    await worker.close()
    assert texts == ["Hel"]
    assert caught.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    assert "the GPU fell off" in caught.value.body["error"]["message"]  # type: ignore[index]
