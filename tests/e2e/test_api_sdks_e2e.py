"""End to end: the openai SDK's Responses API, the Agents SDK and the anthropic SDK -> a real queen -> a
real workerbee serving SmolLM2 -> back, every object and event checked against the published schemas.

The model is tiny, so structured output and tool calls rely on the grammar-constrained paths (a JSON
schema, a named or required tool), which hold whatever it would rather say.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import agents
import anthropic
import httpx
import httpx2
import openai
import pytest
from agents.models.openai_provider import OpenAIProvider
from pydantic import BaseModel
from schemas.openai_schemas import AsyncValidatingTransport, Httpx2ValidatingTransport, ValidatingTransport
from servers import BUNDLED_MODEL_ID, QueenServer, hive_with_worker

WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


class Color(BaseModel):
    """A structured answer."""

    name: str


@pytest.fixture(scope="module")
def hive() -> Iterator[QueenServer]:
    """A queen with one real worker serving SmolLM2."""
    with hive_with_worker() as queen:
        yield queen


@pytest.fixture
def client(hive: QueenServer) -> Iterator[openai.OpenAI]:
    """The openai SDK through a validating transport."""
    http = httpx.Client(transport=ValidatingTransport(), timeout=120)
    yield openai.OpenAI(base_url=hive.openai_url, api_key="unused", max_retries=0, http_client=http)
    http.close()


def test_responses_create_and_stream(client: openai.OpenAI) -> None:
    """A whole and a streamed response from the real model: text, usage, and the same final object."""
    response = client.responses.create(
        model=BUNDLED_MODEL_ID, input="Name a primary color.", max_output_tokens=12, temperature=0
    )
    assert response.output_text.strip()
    assert response.usage is not None
    assert 0 < response.usage.output_tokens <= 12
    stream = client.responses.create(
        model=BUNDLED_MODEL_ID,
        input="Name a primary color.",
        max_output_tokens=12,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    final = last.response  # type: ignore[union-attr]
    assert "".join(deltas) == final.output_text == response.output_text
    continued = client.responses.create(
        model=BUNDLED_MODEL_ID, input="Another one.", previous_response_id=final.id, max_output_tokens=8
    )
    assert continued.usage is not None
    assert continued.usage.input_tokens > response.usage.input_tokens


def test_responses_parse_and_a_named_function_call(client: openai.OpenAI) -> None:
    """A pydantic text_format and a forced function both come back well-formed from the grammar."""
    # Greedy, so the answer is the same every run: sampled, a small model may ramble in a string until
    # the budget cuts the JSON short.
    parsed = client.responses.parse(
        model=BUNDLED_MODEL_ID,
        input="Name a primary color as JSON.",
        text_format=Color,
        max_output_tokens=64,
        temperature=0,
    )
    assert isinstance(parsed.output_parsed, Color)
    called = client.responses.create(
        model=BUNDLED_MODEL_ID,
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        temperature=0,
    )
    calls = [item for item in called.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["get_weather"]
    assert isinstance(json.loads(calls[0].arguments)["city"], str)


async def test_an_agent_answers_through_the_queen(hive: QueenServer) -> None:
    """The Agents SDK with its default Responses model runs an agent on the real worker."""
    transport = AsyncValidatingTransport()
    http = httpx.AsyncClient(transport=transport, timeout=120)
    sdk = openai.AsyncOpenAI(base_url=hive.openai_url, api_key="unused", max_retries=0, http_client=http)
    config = agents.RunConfig(model_provider=OpenAIProvider(openai_client=sdk), tracing_disabled=True)
    agent = agents.Agent(
        name="terse",
        instructions="Answer in one word.",
        model=BUNDLED_MODEL_ID,
        model_settings=agents.ModelSettings(max_tokens=96, temperature=0),
    )
    result = await agents.Runner.run(agent, "Name a primary color.", run_config=config)
    await http.aclose()
    assert isinstance(result.final_output, str)
    assert result.final_output.strip()
    assert transport.seen.names == ["Response"]


async def test_anthropic_messages_stream_tool_and_count(hive: QueenServer) -> None:
    """messages.create, a forced tool call streamed as input_json_delta, and count_tokens."""
    transport = Httpx2ValidatingTransport()
    http = httpx2.AsyncClient(transport=transport, timeout=120)
    client = anthropic.AsyncAnthropic(
        base_url=hive.base_url, api_key="unused", max_retries=0, http_client=http
    )
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    message = await client.messages.create(
        model=BUNDLED_MODEL_ID, max_tokens=12, messages=[{"role": "user", "content": "Say hello."}]
    )
    assert message.content[0].type == "text"
    assert message.stop_reason in ("end_turn", "max_tokens")
    hello = [{"role": "user", "content": "Say hello."}]
    # This SDK's create() has no temperature argument; the queen takes Anthropic's field all the same.
    greedy = await client.messages.create(
        model=BUNDLED_MODEL_ID,
        max_tokens=12,
        extra_body={"temperature": 0},
        messages=hello,  # type: ignore[arg-type]
    )
    said = greedy.content[0].text  # type: ignore[union-attr]
    stop = said[len(said) // 2 : len(said) // 2 + 3]
    cut = await client.messages.create(
        model=BUNDLED_MODEL_ID,
        max_tokens=12,
        extra_body={"temperature": 0},
        stop_sequences=[stop],
        messages=hello,  # type: ignore[arg-type]
    )
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)
    tool = {"name": "get_weather", "input_schema": WEATHER_TOOL["parameters"]}
    async with client.messages.stream(
        model=BUNDLED_MODEL_ID,
        max_tokens=64,
        extra_body={"temperature": 0},  # greedy: a sampled small model may outrun the budget mid-JSON
        tools=[tool],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=question,  # type: ignore[arg-type]
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_message()
    pieces = [
        event.delta.partial_json
        for event in events
        if event.type == "content_block_delta" and event.delta.type == "input_json_delta"
    ]
    [block] = [block for block in final.content if block.type == "tool_use"]
    assert json.loads("".join(pieces)) == block.input
    assert final.stop_reason == "tool_use"
    # With a system prompt of our own: SmolLM2's template adds a long default one to a conversation
    # without one.
    short = await client.messages.count_tokens(
        model=BUNDLED_MODEL_ID,
        system="Be brief.",
        messages=question,  # type: ignore[arg-type]
    )
    follow_up = [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "And Rome?"}]
    longer = await client.messages.count_tokens(
        model=BUNDLED_MODEL_ID,
        system="Be brief.",
        messages=[*question, *follow_up],  # type: ignore[list-item]
    )
    await http.aclose()
    assert 0 < short.input_tokens < longer.input_tokens
    assert set(transport.seen.names) == {"AnthropicMessage", "AnthropicStreamEvent", "AnthropicTokenCount"}
