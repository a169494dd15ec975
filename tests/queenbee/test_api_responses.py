"""The Responses API: translation both ways as pure functions, then the real openai and Agents SDKs
against a queen with a scripted worker, every object and event checked against OpenAI's schemas.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from contextlib import closing
from pathlib import Path
from typing import Any

import agents
import httpx
import openai
import pytest
from agents.models.openai_provider import OpenAIProvider
from fake_worker import FakeWorker, content_chunk, reply
from pydantic import BaseModel, SecretStr
from schemas.openai_schemas import AsyncValidatingTransport, validate
from servers import QueenServer

from protocol import ChatJob, Chunk, ErrorCode, Job
from queenbee.api import responses
from queenbee.errors import InvalidRequest, UpstreamError
from queenbee.settings import QueenSettings

KEY = "sk-responses-one"
OTHER_KEY = "sk-responses-two"
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


class Person(BaseModel):
    """A structured output."""

    name: str
    age: int


# The translations, as pure functions.


def test_a_string_input_follows_the_instructions_as_a_user_message() -> None:
    """instructions become the system message, a string input the user's."""
    body = responses.parse({"model": "m", "input": "Hi", "instructions": "Be brief.", "max_output_tokens": 9})
    chat = responses.chat_request(body, responses.normalize_input(body), [])
    assert [(message.role, message.text()) for message in chat.messages] == [
        ("system", "Be brief."),
        ("user", "Hi"),
    ]
    assert chat.max_completion_tokens == 9
    assert chat.stream is False


def test_function_calls_and_their_outputs_become_tool_calls_and_tool_messages() -> None:
    """A function_call item is an assistant tool call; its function_call_output the tool message."""
    body = responses.parse(
        {
            "model": "m",
            "tools": [WEATHER_TOOL],
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
                {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            ],
        }
    )
    chat = responses.chat_request(body, responses.normalize_input(body), [])
    user, assistant, tool = chat.messages
    assert user.text() == "Weather?"
    assert assistant.tool_calls is not None
    assert assistant.tool_calls[0].id == "c1"
    assert assistant.tool_calls[0].function.name == "get_weather"
    assert (tool.role, tool.tool_call_id, tool.text()) == ("tool", "c1", "sunny")
    assert chat.tools is not None
    assert chat.tools[0].function.parameters == WEATHER_TOOL["parameters"]


def test_history_comes_before_the_new_input() -> None:
    """A previous response's conversation precedes this request's input; its instructions do not carry."""
    first = responses.parse({"model": "m", "input": "One"})
    history = [*responses.normalize_input(first), responses.message_item("msg_1", "Reply one", "completed")]
    body = responses.parse({"model": "m", "input": "Two"})
    chat = responses.chat_request(body, responses.normalize_input(body), history)
    assert [(message.role, message.text()) for message in chat.messages] == [
        ("user", "One"),
        ("assistant", "Reply one"),
        ("user", "Two"),
    ]


def test_text_format_json_schema_becomes_the_response_format() -> None:
    """text.format json_schema is the chat response_format, with its name, schema and strictness."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = responses.parse(
        {
            "model": "m",
            "input": "x",
            "text": {"format": {"type": "json_schema", "name": "thing", "schema": schema, "strict": True}},
        }
    )
    chat = responses.chat_request(body, responses.normalize_input(body), [])
    assert chat.response_format is not None
    assert chat.response_format.model_dump(by_alias=True, exclude_none=True) == {
        "type": "json_schema",
        "json_schema": {"name": "thing", "schema": schema, "strict": True},
    }


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"model": "m", "input": "x", "modalities": ["audio"]}, "modalities"),
        ({"model": "m", "input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        (
            {
                "model": "m",
                "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}],
            },
            "input[0].content[0]",
        ),
        ({"model": "m", "input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"model": "m", "input": "x", "metadata": {"k": "v" * 513}}, "metadata.k"),
    ],
)
def test_what_cannot_be_served_is_refused_by_name(body: dict[str, Any], param: str) -> None:
    """Unknown parameters, other tools and non-text content are 400s naming the parameter."""

    def translate() -> None:
        parsed = responses.parse(body)
        responses.chat_request(parsed, responses.normalize_input(parsed), [])

    with pytest.raises(InvalidRequest) as caught:
        translate()
    assert caught.value.param == param


def _completion(message: dict[str, Any], finish_reason: str) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "chat.completion",
        "created": 7,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6},
    }


def test_a_whole_answer_becomes_a_response_object() -> None:
    """Text and tool calls become message and function_call items; usage is Responses usage."""
    body = responses.parse({"model": "m", "input": "x", "tools": [WEATHER_TOOL]})
    call = {
        "id": "c9",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
    }
    message = {"role": "assistant", "content": "Let me look.", "tool_calls": [call]}
    response = responses.response_object(_completion(message, "tool_calls"), body, "resp_1", store=True)
    validate("Response", response)
    text, function_call = response["output"]
    assert text["content"][0]["text"] == "Let me look."
    assert (function_call["call_id"], function_call["arguments"]) == ("c9", '{"city":"Oslo"}')
    assert response["status"] == "completed"
    assert response["usage"]["input_tokens"] == 4
    assert response["usage"]["output_tokens"] == 2


def test_a_cut_answer_is_incomplete_for_max_output_tokens() -> None:
    """finish_reason length: status incomplete, incomplete_details.reason max_output_tokens."""
    body = responses.parse({"model": "m", "input": "x", "max_output_tokens": 2})
    message = {"role": "assistant", "content": "Two words"}
    response = responses.response_object(_completion(message, "length"), body, "resp_1", store=False)
    validate("Response", response)
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}


def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def test_chunks_become_the_full_event_sequence() -> None:
    """Text then a tool call streams every event clients rely on, numbered from 0, all valid."""
    body = responses.parse({"model": "m", "input": "x", "tools": [WEATHER_TOOL], "stream": True})
    translator = responses.ResponseEvents(body, "resp_1", 7, store=True)
    opening = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    chunks = [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hel"}),
        _chunk({"content": "lo"}),
        _chunk({"tool_calls": [opening]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Rome"}'}}]}),
        _chunk({}, "tool_calls"),
    ]
    events = [event for chunk in chunks for event in translator.chunk(chunk)]
    events += translator.finish({"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5})
    for event in events:
        validate("ResponseStreamEvent", event)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert [event["type"] for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[6]["text"] == "Hello"
    assert events[12]["arguments"] == '{"city":"Rome"}'
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["message", "function_call"]
    assert final["usage"]["total_tokens"] == 5


def test_a_failure_mid_stream_is_response_failed() -> None:
    """A worker failure ends the stream with response.failed carrying the error."""
    body = responses.parse({"model": "m", "input": "x", "stream": True})
    translator = responses.ResponseEvents(body, "resp_1", 7, store=True)
    events = translator.chunk(_chunk({"content": "Hi"}))
    events += translator.fail(UpstreamError("The worker went away."))
    for event in events:
        validate("ResponseStreamEvent", event)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"] == {"code": "server_error", "message": "The worker went away."}


# The real SDKs against a queen with a scripted worker.


async def scripted(worker: FakeWorker, job: Job) -> None:
    """Calls the first tool if tools are on and no result is in, answers a result, fills in a schema,
    or says how many messages the conversation has."""
    assert isinstance(job.request, ChatJob)
    chat = job.request.body
    last = chat.messages[-1]
    if last.role == "tool":
        await reply(worker, job, f"The tool said {last.text()}")
    elif chat.tool_mode != "none" and chat.tools:
        name = chat.tool_mode if chat.tool_mode not in ("auto", "required") else chat.tools[0].function.name
        await reply(worker, job, tool_call=(name, '{"city": "Paris"}'))
    elif chat.response_format is not None and chat.response_format.type == "json_schema":
        await reply(worker, job, '{"name": "Ada", "age": 36}')
    else:
        await reply(worker, job, f"Answer to {len(chat.messages)} messages")


@pytest.fixture
def queen_settings(tmp_path: Path) -> QueenSettings:
    """A queen with two client keys and a ledger of its own."""
    return QueenSettings(
        queue_timeout=2.0, db=tmp_path / "queen.db", api_key=[SecretStr(KEY), SecretStr(OTHER_KEY)]
    )


@pytest.fixture
async def worker(queen: QueenServer) -> AsyncIterator[FakeWorker]:
    """A scripted worker connected to the queen."""
    worker = await FakeWorker(queen.worker_url, behaviour=scripted).connect()
    yield worker
    await worker.close()


@pytest.fixture
async def transport() -> AsyncIterator[AsyncValidatingTransport]:
    """Validates every answer against the schemas."""
    transport = AsyncValidatingTransport()
    yield transport
    await transport.aclose()


def sdk(queen: QueenServer, transport: AsyncValidatingTransport, key: str = KEY) -> openai.AsyncOpenAI:
    """The openai SDK pointed at the queen, through the validating transport."""
    http = httpx.AsyncClient(transport=transport, timeout=30)
    return openai.AsyncOpenAI(base_url=queen.openai_url, api_key=key, max_retries=0, http_client=http)


async def test_create_answers_a_response(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """responses.create: a completed response whose output_text is the worker's answer."""
    response = await sdk(queen, transport).responses.create(
        model="fake-model", input="Hi", instructions="Be brief."
    )
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.output_text == "Answer to 2 messages"
    assert response.usage is not None
    assert response.usage.output_tokens == 4
    assert transport.seen.names == ["Response"]


async def test_create_streamed_sends_every_event(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """stream=True: created, in_progress, the item and part events, text deltas, then completed."""
    stream = await sdk(queen, transport).responses.create(model="fake-model", input="Hi", stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "Answer to 1 messages"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert transport.seen.streams == 1


async def test_responses_stream_gives_the_final_response(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """responses.stream(...): text deltas as they come, and the final response at the end."""
    async with sdk(queen, transport).responses.stream(model="fake-model", input="Hi") as stream:
        deltas = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert "".join(deltas) == "Answer to 1 messages"
    assert final.output_text == "Answer to 1 messages"
    assert final.status == "completed"


async def test_parse_fills_a_pydantic_text_format(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """responses.parse(text_format=Person) sends a strict json_schema and parses the answer."""
    parsed = await sdk(queen, transport).responses.parse(model="fake-model", input="Who?", text_format=Person)
    assert parsed.output_parsed == Person(name="Ada", age=36)
    assert isinstance(worker.jobs[0].request, ChatJob)
    response_format = worker.jobs[0].request.body.response_format
    assert response_format is not None
    assert response_format.type == "json_schema"


async def test_a_function_tool_round_trip(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """A function_call comes back; its function_call_output, sent with the call, gets the answer."""
    client = sdk(queen, transport)
    first = await client.responses.create(
        model="fake-model",
        input="Weather in Paris?",
        tools=[WEATHER_TOOL],
        tool_choice="required",  # type: ignore[list-item]
    )
    [call] = first.output
    assert call.type == "function_call"
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    second = await client.responses.create(
        model="fake-model",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"},
        ],
    )
    assert second.output_text == "The tool said sunny, 21 C"
    assert isinstance(worker.jobs[1].request, ChatJob)
    assistant = worker.jobs[1].request.body.messages[1]
    assert assistant.tool_calls is not None
    assert assistant.tool_calls[0].id == call.call_id


async def test_previous_response_id_continues_over_three_turns(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """Each turn sends only its new input; the worker sees the whole conversation."""
    client = sdk(queen, transport)
    first = await client.responses.create(model="fake-model", input="One")
    second = await client.responses.create(model="fake-model", input="Two", previous_response_id=first.id)
    third = await client.responses.create(model="fake-model", input="Three", previous_response_id=second.id)
    assert third.output_text == "Answer to 5 messages"
    assert third.previous_response_id == second.id
    assert isinstance(worker.jobs[2].request, ChatJob)
    conversation = [(message.role, message.text()) for message in worker.jobs[2].request.body.messages]
    assert conversation == [
        ("user", "One"),
        ("assistant", "Answer to 1 messages"),
        ("user", "Two"),
        ("assistant", "Answer to 3 messages"),
        ("user", "Three"),
    ]


async def test_a_streamed_response_is_stored_too(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """A streamed response can be retrieved and continued like a whole one."""
    client = sdk(queen, transport)
    async with client.responses.stream(model="fake-model", input="One") as stream:
        final = await stream.get_final_response()
    stored = await client.responses.retrieve(final.id)
    assert stored.output_text == "Answer to 1 messages"
    follow = await client.responses.create(model="fake-model", input="Two", previous_response_id=final.id)
    assert follow.output_text == "Answer to 3 messages"


async def test_retrieve_input_items_and_delete(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """A stored response is retrieved, lists its input items, and is gone once deleted."""
    client = sdk(queen, transport)
    created = await client.responses.create(model="fake-model", input="Hi", metadata={"topic": "greeting"})
    retrieved = await client.responses.retrieve(created.id)
    assert retrieved.id == created.id
    assert retrieved.output_text == created.output_text
    assert retrieved.metadata == {"topic": "greeting"}
    items = await client.responses.input_items.list(created.id)
    assert [(item.type, item.role) for item in items.data] == [("message", "user")]  # type: ignore[union-attr]
    await client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(created.id)
    assert "ResponseItemList" in transport.seen.names
    assert "ResponseDeleted" in transport.seen.names


async def test_another_key_gets_404(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """A response belongs to its key: another key can neither read, continue nor delete it."""
    created = await sdk(queen, transport).responses.create(model="fake-model", input="Hi")
    other = sdk(queen, transport, OTHER_KEY)
    with pytest.raises(openai.NotFoundError):
        await other.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        await other.responses.input_items.list(created.id)
    with pytest.raises(openai.NotFoundError) as caught:
        await other.responses.create(model="fake-model", input="Two", previous_response_id=created.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await other.responses.delete(created.id)
    assert (await sdk(queen, transport).responses.retrieve(created.id)).id == created.id


async def test_store_false_keeps_nothing(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """store=false: the response says so, and cannot be retrieved."""
    created = await sdk(queen, transport).responses.create(model="fake-model", input="Hi", store=False)
    assert created.store is False
    with pytest.raises(openai.NotFoundError):
        await sdk(queen, transport).responses.retrieve(created.id)


async def test_errors_take_openai_shape_and_chat_statuses(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """An unsupported tool or too many output tokens are 400s naming them, an unknown model a 404, a
    wrong key a 401."""
    client = sdk(queen, transport)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.responses.create(model="fake-model", input="x", tools=[{"type": "web_search"}])
    assert bad.value.body["param"] == "tools[0].type"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError) as missing:
        await client.responses.create(model="no-such-model", input="x")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        await client.responses.create(model="fake-model", input="x", max_output_tokens=10**6)
    assert too_long.value.code == "context_length_exceeded"
    assert too_long.value.body["param"] == "max_output_tokens"  # type: ignore[index]
    with pytest.raises(openai.AuthenticationError):
        await sdk(queen, transport, "sk-wrong").responses.create(model="fake-model", input="x")
    assert set(transport.seen.names) == {"ErrorResponse"}


@pytest.mark.parametrize("queen_settings", [QueenSettings(queue_timeout=2.0, responses_retention=1e-6)])
async def test_retention_forgets_old_responses(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """A response older than the retention is not found."""
    client = sdk(queen, transport)
    created = await client.responses.create(model="fake-model", input="Hi")
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(created.id)


# The OpenAI Agents SDK, with its default model (Responses) pointed at the queen.


def run_config(queen: QueenServer, transport: AsyncValidatingTransport) -> agents.RunConfig:
    """Agents SDK settings that reach only the queen: its Responses model on our client, no tracing."""
    provider = OpenAIProvider(openai_client=sdk(queen, transport), use_responses=True)
    return agents.RunConfig(model_provider=provider, tracing_disabled=True)


async def test_an_agent_answers(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """A plain agent's final output is the worker's answer."""
    agent = agents.Agent(name="helper", instructions="Be brief.", model="fake-model")
    result = await agents.Runner.run(agent, "Hi", run_config=run_config(queen, transport))
    assert result.final_output == "Answer to 2 messages"
    assert transport.seen.names == ["Response"]


async def test_an_agent_with_an_output_type(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """output_type=Person: the agent sends a json_schema text format and gets a Person."""
    agent = agents.Agent(name="extractor", model="fake-model", output_type=Person)
    result = await agents.Runner.run(agent, "Who?", run_config=run_config(queen, transport))
    assert result.final_output == Person(name="Ada", age=36)


async def test_an_agent_calls_a_required_function_tool(
    queen: QueenServer, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """tool_choice="required": the agent calls the tool, sends its output back, and answers with it."""
    calls: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls.append(city)
        return f"sunny in {city}"

    agent = agents.Agent(
        name="weather",
        model="fake-model",
        tools=[get_weather],
        model_settings=agents.ModelSettings(tool_choice="required"),
    )
    result = await agents.Runner.run(agent, "Weather?", run_config=run_config(queen, transport))
    assert calls == ["Paris"]
    assert result.final_output == "The tool said sunny in Paris"
    assert isinstance(worker.jobs[0].request, ChatJob)
    assert worker.jobs[0].request.body.tool_mode == "required"


async def fails_mid_stream(worker: FakeWorker, job: Job) -> None:
    """Streams a word, then fails."""
    await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("Hel", role=True), tokens=1))
    await worker.fail(job, ErrorCode.INTERNAL_ERROR, "the GPU fell off")


async def test_a_failure_mid_stream_ends_with_response_failed(
    queen: QueenServer, transport: AsyncValidatingTransport
) -> None:
    """A worker that fails after the first token: the stream ends with response.failed, never silently."""
    worker = await FakeWorker(queen.worker_url, behaviour=fails_mid_stream).connect()
    stream = await sdk(queen, transport).responses.create(model="fake-model", input="Hi", stream=True)
    events = [event async for event in stream]
    await worker.close()
    assert [event.type for event in events][-2:] == ["response.output_text.delta", "response.failed"]
    failed = events[-1].response  # type: ignore[union-attr]
    assert failed.status == "failed"
    assert failed.error is not None
    assert "the GPU fell off" in failed.error.message
    with pytest.raises(openai.NotFoundError):
        await sdk(queen, transport).responses.retrieve(failed.id)


async def test_the_ledger_records_responses_like_chat(
    queen: QueenServer, queen_settings: QueenSettings, worker: FakeWorker, transport: AsyncValidatingTransport
) -> None:
    """A Responses request is one usage row under its own path, with the key and the worker's tokens."""
    await sdk(queen, transport).responses.create(model="fake-model", input="Hi")
    with closing(sqlite3.connect(queen_settings.db)) as connection:
        rows = connection.execute(
            "SELECT path, outcome, api_key_id, prompt_tokens, completion_tokens FROM usage"
        ).fetchall()
    [(path, outcome, key_id, prompt_tokens, completion_tokens)] = rows
    assert (path, outcome, prompt_tokens, completion_tokens) == ("/v1/responses", "success", 3, 4)
    assert key_id is not None
