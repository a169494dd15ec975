"""OpenAI conformance of /v1/chat/completions: every parameter, through the openai SDK, a real queen and a
real worker running SmolLM2. Every response and stream chunk is checked against OpenAI's JSON schemas.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest
from schemas.openai_schemas import ValidatingTransport
from servers import QueenServer, hive_with_worker, smollm2_path
from test_spine import MODEL_ID

QUESTION: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three primary colors."},
]
YES_NO: list[dict[str, Any]] = [{"role": "user", "content": "Is the sky blue? Answer yes or no."}]
WEATHER: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
CITY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": CITY_SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The local time in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}, "utc": {"type": "boolean"}},
                "required": ["city", "utc"],
                "additionalProperties": False,
            },
        },
    },
]


@pytest.fixture(scope="module")
def hive() -> Iterator[QueenServer]:
    """A queen with one real worker serving SmolLM2."""
    with hive_with_worker() as queen:
        yield queen


@pytest.fixture
def client(hive: QueenServer) -> Iterator[openai.OpenAI]:
    """The openai SDK on a transport that checks every response against OpenAI's schemas."""
    transport = ValidatingTransport()
    http = httpx.Client(transport=transport, timeout=120)
    sdk = openai.OpenAI(base_url=hive.openai_url, api_key="unused", max_retries=0, http_client=http)
    yield sdk
    sdk.close()
    assert transport.seen.names, "the test saw no response to validate"


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[Any]:
    """SmolLM2's tokenizer (llama.cpp, vocabulary only), to name tokens in logit_bias."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def token_id(tokenizer: Any, text: str) -> int:
    """The one token `text` is."""
    tokens = tokenizer.tokenize(text.encode(), add_bos=False, special=False)
    assert len(tokens) == 1, tokens
    return int(tokens[0])


def chat(client: openai.OpenAI, messages: list[dict[str, Any]] = QUESTION, **params: Any) -> Any:
    """A non-streamed chat completion with deterministic defaults."""
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL_ID, messages=messages, **params)  # type: ignore[arg-type]


def stream(client: openai.OpenAI, messages: list[dict[str, Any]] = QUESTION, **params: Any) -> list[Any]:
    """A streamed chat completion's chunks, with deterministic defaults."""
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 12)
    return list(client.chat.completions.create(model=MODEL_ID, messages=messages, stream=True, **params))  # type: ignore[arg-type]


def streamed_text(chunks: list[Any], index: int = 0) -> str:
    """The content of one choice of a stream, joined."""
    return "".join(
        choice.delta.content or "" for chunk in chunks for choice in chunk.choices if choice.index == index
    )


def test_max_tokens_limits_the_answer(client: openai.OpenAI) -> None:
    """max_tokens caps the completion; the answer says it was cut by length."""
    response = chat(client, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 3


def test_max_completion_tokens_limits_the_answer(client: openai.OpenAI) -> None:
    """max_completion_tokens, OpenAI's newer name, caps the completion the same way."""
    response = client.chat.completions.create(
        model=MODEL_ID,
        messages=QUESTION,
        temperature=0,
        max_completion_tokens=4,  # type: ignore[arg-type]
    )
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 4


def test_temperature_zero_is_deterministic(client: openai.OpenAI) -> None:
    """Greedy decoding gives the same text twice, streamed or not."""
    first, second = chat(client), chat(client)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert streamed_text(stream(client)) == first.choices[0].message.content


def test_seed_reproduces_a_sampled_answer(client: openai.OpenAI) -> None:
    """The same seed and parameters give the same text at temperature 1, with the same fingerprint."""
    first = chat(client, temperature=1.0, seed=1234, max_tokens=16)
    second = chat(client, temperature=1.0, seed=1234, max_tokens=16)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert first.system_fingerprint == second.system_fingerprint
    assert first.system_fingerprint


def test_tiny_top_p_samples_the_most_likely_token(client: openai.OpenAI) -> None:
    """top_p keeps only the nucleus: with a tiny top_p, sampling at temperature 1 is greedy."""
    greedy = chat(client)
    nucleus = chat(client, temperature=1.0, top_p=1e-9, seed=5)
    assert nucleus.choices[0].message.content == greedy.choices[0].message.content


@pytest.mark.parametrize("penalty", ["presence_penalty", "frequency_penalty"])
def test_penalties_reduce_repetition(client: openai.OpenAI, penalty: str) -> None:
    """A repetition-prone prompt repeats less with a presence or frequency penalty."""
    messages = [
        {"role": "user", "content": "Repeat after me: hello hello hello hello hello hello hello hello"}
    ]
    plain = chat(client, messages, max_tokens=16).choices[0].message.content
    penalized = chat(client, messages, max_tokens=16, **{penalty: 2.0}).choices[0].message.content
    assert penalized.lower().count("hello") < plain.lower().count("hello")


def test_logit_bias_forces_and_bans_tokens(client: openai.OpenAI, tokenizer: Any) -> None:
    """A +100 bias makes a token the answer; a -100 bias keeps the greedy first token out."""
    maybe = token_id(tokenizer, "Maybe")
    forced = chat(client, YES_NO, max_tokens=1, logit_bias={str(maybe): 100})
    assert forced.choices[0].message.content == "Maybe"
    greedy = chat(client, YES_NO, max_tokens=1).choices[0].message.content
    banned = chat(client, YES_NO, max_tokens=1, logit_bias={str(token_id(tokenizer, greedy)): -100})
    assert banned.choices[0].message.content != greedy


# Requests with logprobs also pair each token with its log probabilities (scheduler.py): stops hold for both.
@pytest.mark.parametrize("extra", [{}, {"logprobs": True}], ids=["plain", "logprobs"])
@pytest.mark.parametrize("stop", ["blue", ["yellow", "blue"]])
def test_stop_text_never_appears(client: openai.OpenAI, stop: str | list[str], extra: dict[str, Any]) -> None:
    """The answer ends before the stop sequence, which is not in the text, streamed or not."""
    full = chat(client, max_tokens=24).choices[0].message.content
    assert "blue" in full
    response = chat(client, max_tokens=24, stop=stop, **extra)
    text = response.choices[0].message.content
    assert text == full[: full.index("blue")]
    assert response.choices[0].finish_reason == "stop"
    chunks = stream(client, max_tokens=24, stop=stop, **extra)
    assert streamed_text(chunks) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_n_gives_n_indexed_choices(client: openai.OpenAI) -> None:
    """n=3 gives three choices indexed 0..2; usage counts the prompt once and every choice's tokens."""
    response = chat(client, temperature=1.0, seed=42, n=3, max_tokens=6)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert all(choice.message.content for choice in response.choices)
    single = chat(client, temperature=1.0, seed=42, max_tokens=6)
    assert response.usage is not None
    assert single.usage is not None
    assert response.usage.prompt_tokens == single.usage.prompt_tokens
    assert response.usage.completion_tokens <= 18
    assert response.choices[0].message.content == single.choices[0].message.content


def test_n_streamed_carries_each_choice_index(client: openai.OpenAI) -> None:
    """A streamed n=2 answer has chunks for index 0 and 1 that join to the non-streamed choices."""
    whole = chat(client, temperature=1.0, seed=9, n=2, max_tokens=6)
    chunks = stream(
        client, temperature=1.0, seed=9, n=2, max_tokens=6, stream_options={"include_usage": True}
    )
    for index in (0, 1):
        assert streamed_text(chunks, index) == whole.choices[index].message.content
        roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].index == index]
        assert roles[0] == "assistant"
    finishes = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert sorted(choice.index for choice in finishes) == [0, 1]
    assert chunks[-1].usage is not None
    assert whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_user_is_accepted(client: openai.OpenAI) -> None:
    """The user field (an end-user id for abuse monitoring) is accepted."""
    assert chat(client, user="user-1234", max_tokens=2).choices[0].message.content


def test_include_usage_ends_the_stream_with_usage(client: openai.OpenAI) -> None:
    """With include_usage every chunk has usage null but the last, which has no choices."""
    chunks = stream(client, max_tokens=5, stream_options={"include_usage": True})
    assert all(chunk.usage is None for chunk in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 5
    assert last.usage.total_tokens == last.usage.prompt_tokens + 5


def test_logprobs_in_openai_shape(client: openai.OpenAI) -> None:
    """logprobs lists every generated token with its bytes and top alternatives, most likely first."""
    response = chat(client, max_tokens=6, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    assert choice.logprobs is not None
    content = choice.logprobs.content
    assert content is not None
    assert len(content) == 6
    assert "".join(entry.token for entry in content) == choice.message.content
    for entry in content:
        assert entry.logprob <= 0
        assert bytes(entry.bytes or []) == entry.token.encode()
        assert len(entry.top_logprobs) == 3
        ranked = [top.logprob for top in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
        # Greedy decoding picks the most likely token.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_logprobs_streamed(client: openai.OpenAI) -> None:
    """Streamed chunks carry the log probabilities of the tokens they hold, matching the whole answer."""
    whole = chat(client, max_tokens=6, logprobs=True, top_logprobs=1)
    chunks = stream(client, max_tokens=6, logprobs=True, top_logprobs=1)
    entries = [
        entry
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for entry in c.choices[0].logprobs.content or []
    ]
    assert whole.choices[0].logprobs is not None
    expected = whole.choices[0].logprobs.content or []
    assert [(e.token, round(e.logprob, 4)) for e in entries] == [
        (e.token, round(e.logprob, 4)) for e in expected
    ]


def test_unused_fields_are_present_as_null(client: openai.OpenAI) -> None:
    """message.refusal and choices[].logprobs are null when unused; created and a fingerprint are set."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL_ID,
        messages=QUESTION,
        temperature=0,
        max_tokens=2,  # type: ignore[arg-type]
    )
    body = json.loads(raw.text)
    choice = body["choices"][0]
    assert choice["message"]["refusal"] is None
    assert choice["logprobs"] is None
    assert "tool_calls" not in choice["message"]
    assert isinstance(body["created"], int)
    assert body["system_fingerprint"].startswith("fp_")
    assert body["id"].startswith("chatcmpl-")


def test_stream_id_is_stable(client: openai.OpenAI) -> None:
    """Every chunk of one stream has the same id, created and model."""
    chunks = stream(client, max_tokens=4, stream_options={"include_usage": True})
    assert len({(chunk.id, chunk.created, chunk.model) for chunk in chunks}) == 1


def test_json_object_response_format(client: openai.OpenAI) -> None:
    """response_format json_object makes the answer a JSON object."""
    response = chat(
        client,
        [{"role": "user", "content": "Give me a JSON object with one key, color, for the sky."}],
        max_tokens=48,
        response_format={"type": "json_object"},
    )
    assert isinstance(json.loads(response.choices[0].message.content), dict)


def test_json_schema_response_format(client: openai.OpenAI) -> None:
    """response_format json_schema makes the answer JSON that matches the schema."""
    schema = {
        "type": "object",
        "properties": {
            "colors": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 3},
            "count": {"type": "integer"},
        },
        "required": ["colors", "count"],
        "additionalProperties": False,
    }
    response = chat(
        client,
        max_tokens=48,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "colors", "schema": schema, "strict": True},
        },
    )
    jsonschema.validate(json.loads(response.choices[0].message.content), schema)


def check_call(call: Any, name: str) -> dict[str, Any]:
    """A tool call's shape, and its arguments, valid for the function's parameters schema."""
    assert call.type == "function"
    assert call.id.startswith("call_")
    assert call.function.name == name
    arguments: dict[str, Any] = json.loads(call.function.arguments)
    parameters = next(tool["function"]["parameters"] for tool in TOOLS if tool["function"]["name"] == name)
    jsonschema.validate(arguments, parameters)
    return arguments


def test_tool_choice_required_calls_a_tool(client: openai.OpenAI) -> None:
    """tool_choice required gives a tool_calls message with valid arguments and finish_reason tool_calls."""
    response = chat(client, WEATHER, max_tokens=40, tools=TOOLS, tool_choice="required")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    check_call(call, call.function.name)


def test_named_tool_choice_calls_that_function(client: openai.OpenAI) -> None:
    """A named tool_choice makes the model call that function, whatever it would have preferred."""
    response = chat(
        client,
        WEATHER,
        max_tokens=40,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    arguments = check_call(choice.message.tool_calls[0], "get_time")
    assert set(arguments) == {"city", "utc"}


def test_streamed_tool_call_uses_the_delta_shape(client: openai.OpenAI) -> None:
    """A streamed call comes as tool_calls deltas: id, type and name first, then argument pieces."""
    chunks = stream(
        client,
        WEATHER,
        max_tokens=40,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    deltas = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or []]
    assert deltas[0].id is not None
    assert deltas[0].id.startswith("call_")
    assert deltas[0].type == "function"
    assert deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
    assert all(delta.index == 0 for delta in deltas)
    assert all(delta.id is None for delta in deltas[1:])
    arguments = "".join(delta.function.arguments or "" for delta in deltas if delta.function)
    jsonschema.validate(json.loads(arguments), CITY_SCHEMA)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    whole = chat(
        client,
        WEATHER,
        max_tokens=40,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert whole.choices[0].message.tool_calls is not None
    assert whole.choices[0].message.tool_calls[0].function.arguments == arguments


def test_tool_choice_auto_answers_with_text_or_a_valid_call(client: openai.OpenAI) -> None:
    """With tool_choice auto the model chooses: plain text, or a call that is valid if made."""
    for messages in (WEATHER, YES_NO):
        choice = chat(client, messages, max_tokens=40, tools=TOOLS, tool_choice="auto").choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason == "tool_calls"
            check_call(choice.message.tool_calls[0], choice.message.tool_calls[0].function.name)
        else:
            assert choice.message.content
            assert choice.finish_reason in {"stop", "length"}


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    """tool_choice none: tools are sent but the answer is text."""
    choice = chat(client, WEATHER, max_tokens=8, tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.tool_calls is None
    assert choice.message.content
    assert choice.finish_reason in {"stop", "length"}


def test_tool_results_are_accepted(client: openai.OpenAI) -> None:
    """A conversation with the assistant's call and a role tool result gets an answer."""
    messages = [
        *WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 degrees Celsius."},
    ]
    response = chat(client, messages, max_tokens=16, tools=TOOLS)
    choice = response.choices[0]
    assert choice.message.content or choice.message.tool_calls


def test_content_parts_and_developer_role(client: openai.OpenAI) -> None:
    """Content as a list of text parts reads as the joined string; developer is taken as system."""
    as_parts = [
        {
            "role": "developer",
            "content": [{"type": "text", "text": "You are a terse "}, {"type": "text", "text": "assistant."}],
        },
        {"role": "user", "content": [{"type": "text", "text": "Name three primary colors."}]},
    ]
    assert chat(client, as_parts).choices[0].message.content == chat(client).choices[0].message.content


def test_ignore_eos_generates_max_tokens(client: openai.OpenAI) -> None:
    """ignore_eos (sent by benchmark tools) generates exactly max_tokens, past the natural end."""
    natural = chat(client, YES_NO, max_tokens=8)
    assert natural.choices[0].finish_reason == "stop"
    response = chat(client, YES_NO, max_tokens=8, extra_body={"ignore_eos": True})
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None
    assert response.usage.completion_tokens == 8


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
        ),
        (
            # A schema the grammar cannot express is the client's error, refused by the worker.
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
            "response_format.json_schema.schema",
        ),
        (
            {
                "tools": [
                    *TOOLS,
                    {
                        "type": "function",
                        "function": {
                            "name": "endless",
                            "parameters": {
                                "type": "object",
                                "properties": {"x": {"$ref": "#"}},
                                "required": ["x"],
                            },
                        },
                    },
                ],
                "tool_choice": "required",
            },
            f"tools[{len(TOOLS)}].function.parameters",
        ),
        ({"n": 0}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"temperature": 3}, "temperature"),
        ({"max_tokens": 100000}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content[0].type",
        ),
    ],
)
def test_what_cannot_be_honoured_is_a_400_naming_it(
    client: openai.OpenAI, params: dict[str, Any], param: str
) -> None:
    """Invalid or unsupported parameters are refused with a 400 whose param names the field."""
    body: dict[str, Any] = {"messages": QUESTION, "max_tokens": 4, **params}
    messages = body.pop("messages")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL_ID, messages=messages, extra_body=body)  # type: ignore[arg-type]
    assert raised.value.status_code == 400
    assert raised.value.param == param


def test_prompt_too_long_is_refused_before_generation(client: openai.OpenAI) -> None:
    """A prompt longer than the context is a 400 with code context_length_exceeded, naming messages."""
    with pytest.raises(openai.BadRequestError) as raised:
        chat(client, [{"role": "user", "content": "word " * 5000}], max_tokens=4)
    assert raised.value.code == "context_length_exceeded"
    assert raised.value.param == "messages"


def test_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    """A model no worker serves is a 404 model_not_found naming the model parameter."""
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="no-such-model", messages=QUESTION)  # type: ignore[arg-type]
    assert raised.value.code == "model_not_found"
    assert raised.value.param == "model"
