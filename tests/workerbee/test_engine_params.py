"""How the engine maps OpenAI parameters onto llama.cpp: sampling, seeds, grammars, tool prompts and
calls, and stop, logprob and cancel handling in the batch on the real SmolLM2 model.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import smollm2_path

from protocol import ErrorCode
from protocol.openai import ChatCompletionRequest, ChatMessage, CompletionRequest, Tool
from workerbee import grammars
from workerbee.batching import BatchedModel
from workerbee.decoding import Sampling, choice_seeds, llama_seed
from workerbee.errors import Cancelled, EngineError
from workerbee.prompts import ModelConfig, request_sampling
from workerbee.tool_calls import ToolCallParser, llama_messages, template_knows_tools

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
WEATHER = Tool.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
)


def test_chat_sampling_defaults_are_openai_defaults() -> None:
    """A bare request samples at temperature 1 and top_p 1, with llama.cpp's extras off."""
    sampling = request_sampling(ChatCompletionRequest.model_validate(BASE))
    assert sampling == Sampling(temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repeat_penalty=1.0)


def test_chat_sampling_maps_every_parameter() -> None:
    """Each sampling parameter of the request reaches llama.cpp's sampler."""
    chat = ChatCompletionRequest.model_validate(
        {
            **BASE,
            "temperature": 0.5,
            "top_p": 0.9,
            "top_k": 40,
            "min_p": 0.05,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "repeat_penalty": 1.1,
            "logit_bias": {"42": -100, "7": 5},
            "seed": 3,
            "max_completion_tokens": 9,
            "max_tokens": 100,
            "stop": "END",
            "ignore_eos": True,
            "logprobs": True,
            "top_logprobs": 4,
        }
    )
    assert request_sampling(chat, "root ::= x") == Sampling(
        temperature=0.5,
        top_p=0.9,
        top_k=40,
        min_p=0.05,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repeat_penalty=1.1,
        logit_bias={42: -100, 7: 5},
        seed=3,
        max_tokens=9,
        stop=("END",),
        ignore_eos=True,
        top_logprobs=4,
        grammar="root ::= x",
    )


def test_logprobs_without_top_logprobs_reports_no_alternatives() -> None:
    """logprobs alone asks for the chosen tokens' log probabilities and no alternatives."""
    chat = ChatCompletionRequest.model_validate({**BASE, "logprobs": True})
    assert request_sampling(chat).top_logprobs == 0


def test_choice_seeds() -> None:
    """Choice i of a seeded request uses seed + i; llama.cpp's "random" seed value is never used."""
    assert choice_seeds(10, 3) == [10, 11, 12]
    assert choice_seeds(-1, 1) == [llama_seed(-1)]
    assert llama_seed(0xFFFFFFFF) != 0xFFFFFFFF
    assert all(0 <= seed < 0xFFFFFFFF for seed in choice_seeds(None, 5))


CALL = '{"name": "get_weather", "arguments": {"city": "Pa}ris", "nested": {"x": [1, 2]}} }'


@pytest.mark.parametrize("step", [1, 2, 3, 7, len(CALL)])
def test_tool_call_parser_streams_the_arguments_in_any_split(step: int) -> None:
    """However the text is split, the deltas name the call first and their arguments join to the whole."""
    parser = ToolCallParser(call_id="call_1")
    deltas: list[dict[str, Any]] = []
    for start in range(0, len(CALL), step):
        deltas += parser.feed(CALL[start : start + step])
    deltas += parser.finish()
    assert deltas[0]["id"] == "call_1"
    assert deltas[0]["function"]["name"] == "get_weather"
    assert all("id" not in delta for delta in deltas[1:])
    arguments = "".join(delta["function"].get("arguments", "") for delta in deltas)
    assert json.loads(arguments) == {"city": "Pa}ris", "nested": {"x": [1, 2]}}
    call = parser.tool_call()
    assert call is not None
    assert call["function"]["arguments"] == arguments


def test_tool_call_parser_refuses_a_truncated_call() -> None:
    """A call cut short (max_tokens) is not a tool call."""
    parser = ToolCallParser()
    parser.feed(CALL[:-10])
    assert parser.tool_call() is None
    assert parser.finish() == []


def test_tools_are_described_to_templates_without_tool_support() -> None:
    """Without template support: instructions in the system message, calls as JSON, results as user turns."""
    messages = [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "tool_calls": [
                    {"id": "c1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
                ],
            }
        ),
        ChatMessage(role="tool", content="Sunny", tool_call_id="c1"),
    ]
    converted = llama_messages(messages, tools=[WEATHER], mode="required", native_tools=False)
    assert converted[0]["role"] == "system"
    assert converted[0]["content"].startswith("Be brief.\n\nYou can call these functions")
    assert "You must call one of these functions." in converted[0]["content"]
    assert json.loads(converted[2]["content"]) == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert converted[3] == {"role": "user", "content": "Result of get_weather (call c1):\nSunny"}


def test_tools_go_to_templates_that_support_them() -> None:
    """A tool-aware template gets the calls and results in its own terms, and no extra instructions."""
    messages = [
        ChatMessage.model_validate(
            {
                "role": "assistant",
                "tool_calls": [{"id": "c1", "function": {"name": "f", "arguments": '{"a": 1}'}}],
            }
        ),
        ChatMessage(role="tool", content="2", tool_call_id="c1"),
    ]
    converted = llama_messages(messages, tools=[WEATHER], mode="auto", native_tools=True)
    assert converted[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"a": 1}}
    assert converted[1] == {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "f"}
    assert template_knows_tools("{% if tools %}{{ tools | tojson }}{% endif %}")
    assert not template_knows_tools("{{ messages[0]['content'] }}")


@pytest.fixture(scope="module")
def model() -> Iterator[BatchedModel]:
    """SmolLM2 loaded for the engine, two sequences on one thread."""
    loaded = BatchedModel.load(
        ModelConfig(id="m", path=Path(smollm2_path()), n_ctx=512), parallel=2, threads=1
    )
    yield loaded
    loaded.close()


def parses(model: BatchedModel, grammar: str) -> bool:
    """Whether llama.cpp accepts a GBNF grammar."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(model.weights.vocab.raw, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


@pytest.mark.parametrize("mode", ["auto", "required", "get_weather"])
def test_tool_grammars_parse(model: BatchedModel, mode: str) -> None:
    """The grammar of every tool_choice mode is valid GBNF for llama.cpp."""
    grammar = grammars.tool_grammar([WEATHER], mode)
    assert grammar is not None
    assert parses(model, grammar)
    assert grammars.tool_grammar([WEATHER], "none") is None


def test_json_grammars_parse_and_forbid_raw_control_characters(model: BatchedModel) -> None:
    """JSON grammars parse, and their strings admit only what strict JSON parsers accept."""
    schema_grammar = grammars.json_schema_grammar({"type": "object", "properties": {"a": {"type": "string"}}})
    assert parses(model, schema_grammar)
    assert "\\x00-\\x1F" in schema_grammar
    assert parses(model, grammars.json_object_grammar())


def test_unsupported_schema_is_a_grammar_error() -> None:
    """A schema the converter cannot handle is refused with a GrammarError, not a crash."""
    with pytest.raises(grammars.GrammarError):
        grammars.json_schema_grammar(
            {"type": "object", "properties": {"a": {"$ref": "https://example.com/x"}}}
        )


Streamed = list[tuple[dict[str, Any], int]]


async def run_chat(
    model: BatchedModel, chat: ChatCompletionRequest, cancel: threading.Event | None = None
) -> tuple[Any, dict[str, Any] | None, Streamed]:
    """Run a chat request: usage, whole response (None if streamed), and chunks with their token counts."""
    chunks: Streamed = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        chunks.append((chunk, tokens))

    usage, response = await model.chat(chat, cancel or threading.Event(), on_chunk)
    return usage, response, chunks


def colors(max_tokens: int = 16, **fields: Any) -> ChatCompletionRequest:
    """A greedy, streamed question with a known answer."""
    return ChatCompletionRequest.model_validate(
        {
            **BASE,
            "messages": [{"role": "user", "content": "Name three primary colors."}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "stream": True,
            **fields,
        }
    )


def contents(chunks: Streamed) -> list[str]:
    """The content of each content chunk."""
    return [c["choices"][0]["delta"]["content"] for c, _ in chunks if c["choices"][0]["delta"].get("content")]


async def test_stop_split_across_tokens_is_held_back(model: BatchedModel) -> None:
    """A stop sequence that spans chunks never reaches a streamed chunk, even in part."""
    _, _, chunks = await run_chat(model, colors())
    pieces = contents(chunks)
    text = "".join(pieces)
    boundary = len(pieces[0]) + len(pieces[1])
    stop = text[boundary - 2 : boundary + 3]  # the end of one chunk and the start of the next
    _, _, cut_chunks = await run_chat(model, colors(stop=stop))
    assert "".join(contents(cut_chunks)) == text[: text.index(stop)]
    assert all(stop not in piece for piece in contents(cut_chunks))


async def test_the_stop_sequence_that_ended_a_choice_is_named(model: BatchedModel) -> None:
    """Streamed and whole, a choice cut by a stop sequence says which (vLLM's `stop_reason`)."""
    _, _, chunks = await run_chat(model, colors())
    text = "".join(contents(chunks))
    stop = text[3:6]
    _, _, cut = await run_chat(model, colors(stop=["never-there", stop]))
    [last] = [chunk["choices"][0] for chunk, _ in cut if chunk["choices"][0]["finish_reason"]]
    assert (last["finish_reason"], last["stop_reason"]) == ("stop", stop)
    _, response, _ = await run_chat(model, colors(stop=[stop], stream=False))
    assert response is not None
    assert response["choices"][0]["stop_reason"] == stop
    _, untouched, _ = await run_chat(model, colors(max_tokens=2, stream=False))
    assert untouched is not None
    assert "stop_reason" not in untouched["choices"][0]


async def test_logprobs_match_the_text(model: BatchedModel) -> None:
    """Every token of the text is reported once, with the chunk that completes it."""
    _, _, chunks = await run_chat(model, colors(max_tokens=8, logprobs=True, top_logprobs=2, ignore_eos=True))
    entries = [entry for c, _ in chunks if (lp := c["choices"][0]["logprobs"]) for entry in lp["content"]]
    assert len(entries) == 8
    assert "".join(entry["token"] for entry in entries) == "".join(contents(chunks))
    for chunk, _ in chunks:
        choice = chunk["choices"][0]
        if choice["logprobs"]:
            assert "".join(e["token"] for e in choice["logprobs"]["content"]) == choice["delta"]["content"]
            assert all(len(e["top_logprobs"]) == 2 for e in choice["logprobs"]["content"])


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
        ({"max_tokens": 600}, "max_tokens"),
        ({"max_completion_tokens": 600}, "max_completion_tokens"),
    ],
)
async def test_context_length_is_checked_before_generation(
    model: BatchedModel, change: dict[str, Any], param: str
) -> None:
    """A prompt or token limit past the context is refused, naming the parameter, before any token."""
    chat = ChatCompletionRequest.model_validate({**BASE, "stream": True, **change})
    emitted: list[dict[str, Any]] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        emitted.append(chunk)

    with pytest.raises(EngineError) as raised:
        await model.chat(chat, threading.Event(), on_chunk)
    assert raised.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert raised.value.param == param
    assert emitted == []


async def test_bad_tool_schema_is_refused_by_position(model: BatchedModel) -> None:
    """A function whose parameters schema cannot be enforced is refused, naming which one."""
    bad = {"type": "function", "function": {"name": "g", "parameters": {"$ref": "https://example.com/x"}}}
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "tools": [WEATHER.model_dump(), bad], "tool_choice": "required"}
    )
    with pytest.raises(EngineError) as raised:
        await run_chat(model, chat)
    assert raised.value.code is ErrorCode.INVALID_REQUEST
    assert raised.value.param == "tools[1].function.parameters"


async def generated(model: BatchedModel, content: str, **fields: Any) -> tuple[str, str, int]:
    """Text, finish reason and token count of one choice for a one-message chat."""
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "messages": [{"role": "user", "content": content}], **fields}
    )
    usage, response, _ = await run_chat(model, chat)
    assert response is not None
    [choice] = response["choices"]
    return choice["message"]["content"], choice["finish_reason"], usage.completion_tokens


YES_NO = "Is the sky blue? Answer yes or no."


async def test_logit_bias_forces_a_token(model: BatchedModel) -> None:
    """A +100 logit bias makes a token the answer."""
    maybe = model.weights.tokenize("Maybe", add_bos=False, special=False)[0]
    answer = await generated(model, YES_NO, temperature=0.0, max_tokens=1, logit_bias={str(maybe): 100})
    assert answer[0] == "Maybe"


async def test_ignore_eos_runs_to_max_tokens(model: BatchedModel) -> None:
    """ignore_eos generates past the natural end, up to max_tokens."""
    _, finish, count = await generated(model, YES_NO, temperature=0.0, max_tokens=8)
    assert finish == "stop"
    assert count < 8
    answer = await generated(model, YES_NO, temperature=0.0, max_tokens=8, ignore_eos=True)
    assert answer[1:] == ("length", 8)


async def test_seed_and_top_p(model: BatchedModel) -> None:
    """A seed reproduces a sampled answer; a tiny top_p samples greedily."""
    sampled = await generated(model, YES_NO, temperature=1.0, seed=11, max_tokens=12)
    assert await generated(model, YES_NO, temperature=1.0, seed=11, max_tokens=12) == sampled
    greedy_answer = await generated(model, YES_NO, temperature=0.0, max_tokens=12)
    assert (
        await generated(model, YES_NO, temperature=1.0, top_p=1e-9, seed=11, max_tokens=12) == greedy_answer
    )


async def test_frequency_penalty_reduces_repetition(model: BatchedModel) -> None:
    """A frequency penalty makes a repetition-prone answer repeat less."""
    prompt = "Repeat after me: hello hello hello hello hello hello hello hello"
    plain = (await generated(model, prompt, temperature=0.0, max_tokens=16))[0]
    penalized = (await generated(model, prompt, temperature=0.0, max_tokens=16, frequency_penalty=2.0))[0]
    assert penalized.lower().count("hello") < plain.lower().count("hello")


@pytest.mark.parametrize(
    "fields",
    [{"logprobs": True}, {"logprobs": True, "n": 2, "max_tokens": 6, "ignore_eos": True}],
    ids=["logprobs", "n=2"],
)
async def test_chat_chunk_tokens_add_up_to_the_completion_tokens(
    model: BatchedModel, fields: dict[str, Any]
) -> None:
    """Each content chunk counts its tokens, and they sum to the usage (with logprobs, with n)."""
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "stream": True, "temperature": 0, "max_tokens": 16, **fields}
    )
    usage, _, chunks = await run_chat(model, chat)
    for chunk, tokens in chunks:
        [choice] = chunk["choices"]
        carries_text = choice["delta"].get("content")
        assert (tokens >= 1) if carries_text else (tokens == 0), chunk
    assert sum(tokens for _, tokens in chunks) == usage.completion_tokens > 0
    assert len({chunk["choices"][0]["index"] for chunk, _ in chunks}) == (fields.get("n") or 1)


async def test_text_completion_chunk_tokens_add_up_to_the_completion_tokens(model: BatchedModel) -> None:
    """Text-completion chunks count their tokens too; the echoed prompt counts none."""
    request = CompletionRequest.model_validate(
        {
            "model": "m",
            "prompt": "The sky is",
            "max_tokens": 8,
            "temperature": 0,
            "stream": True,
            "echo": True,
        }
    )
    chunks: Streamed = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        chunks.append((chunk, tokens))

    usage, _ = await model.complete(request, threading.Event(), on_chunk)
    assert chunks[0][0]["choices"][0]["text"] == "The sky is"
    assert chunks[0][1] == chunks[-1][1] == 0
    assert sum(tokens for _, tokens in chunks) == usage.completion_tokens == 8


async def test_cancelled_chat_reports_what_it_used(model: BatchedModel) -> None:
    """A chat cancelled mid-stream raises Cancelled with its prompt and at least the tokens streamed."""
    cancel = threading.Event()
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "stream": True, "logprobs": True, "max_tokens": 50, "ignore_eos": True}
    )
    streamed: list[int] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        streamed.append(tokens)
        if sum(streamed) >= 3:
            cancel.set()

    with pytest.raises(Cancelled) as raised:
        await model.chat(chat, cancel, on_chunk)
    prompt = len(model.prompts.chat_prompt(chat))
    usage = raised.value.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt
    # The batch may take a step or two more than the chunks show before it sees the flag.
    assert sum(streamed) <= usage.completion_tokens <= sum(streamed) + 3
    assert usage.completion_tokens < 50
    assert usage.total_tokens == prompt + usage.completion_tokens
