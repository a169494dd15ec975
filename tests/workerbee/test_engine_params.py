"""How the engine maps OpenAI parameters onto llama.cpp: sampling, seeds, grammars, tool prompts and
calls, and the token loop's stop, logprob and cancel handling on the real SmolLM2 model.
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
from workerbee.decoding import Cancelled, Piece, Sampling, choice_seeds, generate, llama_seed
from workerbee.engine import EngineError, LoadedModel, ModelConfig, chat_sampling, load_model
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
    sampling = chat_sampling(ChatCompletionRequest.model_validate(BASE))
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
    assert chat_sampling(chat, "root ::= x") == Sampling(
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
    assert chat_sampling(chat).top_logprobs == 0


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
def model() -> Iterator[LoadedModel]:
    """SmolLM2 loaded for the engine, on one thread."""
    loaded = load_model(ModelConfig(id="m", path=Path(smollm2_path()), n_ctx=512), threads=1)
    yield loaded
    loaded.close()


def parses(model: LoadedModel, grammar: str) -> bool:
    """Whether llama.cpp accepts a GBNF grammar."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(model.llama._model.vocab, grammar.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


@pytest.mark.parametrize("mode", ["auto", "required", "get_weather"])
def test_tool_grammars_parse(model: LoadedModel, mode: str) -> None:
    """The grammar of every tool_choice mode is valid GBNF for llama.cpp."""
    grammar = grammars.tool_grammar([WEATHER], mode)
    assert grammar is not None
    assert parses(model, grammar)
    assert grammars.tool_grammar([WEATHER], "none") is None


def test_json_grammars_parse_and_forbid_raw_control_characters(model: LoadedModel) -> None:
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


def greedy(model: LoadedModel, max_tokens: int = 16, **changes: Any) -> tuple[str, list[Piece]]:
    """The greedy answer to a fixed question, and the pieces it was streamed in."""
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "messages": [{"role": "user", "content": "Name three primary colors."}]}
    )
    pieces: list[Piece] = []
    sampling = Sampling(temperature=0.0, max_tokens=max_tokens, **changes)
    generation = generate(model.llama, model.chat_prompt(chat), sampling, threading.Event(), pieces.append)
    assert "".join(piece.text for piece in pieces) == generation.text
    return generation.text, pieces


def test_stop_split_across_tokens_is_held_back(model: LoadedModel) -> None:
    """A stop sequence that spans tokens never reaches a streamed piece, even in part."""
    text, pieces = greedy(model)
    boundary = len(pieces[0].text) + len(pieces[1].text)
    stop = text[boundary - 2 : boundary + 3]  # the end of one piece and the start of the next
    cut, cut_pieces = greedy(model, stop=(stop,))
    assert cut == text[: text.index(stop)]
    assert stop not in "".join(piece.text for piece in cut_pieces)


def test_logprobs_match_the_text(model: LoadedModel) -> None:
    """Every token of the text is reported once, with the piece that completes it."""
    text, pieces = greedy(model, max_tokens=8, top_logprobs=2)
    entries = [entry for piece in pieces for entry in piece.logprobs]
    assert len(entries) == 8
    assert "".join(entry.token for entry in entries) == text
    for piece in pieces:
        assert "".join(entry.token for entry in piece.logprobs) == piece.text


def test_cancel_stops_generation(model: LoadedModel) -> None:
    """Setting the cancel flag stops generation at the next token."""
    cancel = threading.Event()
    chat = ChatCompletionRequest.model_validate(BASE)
    with pytest.raises(Cancelled):
        generate(
            model.llama, model.chat_prompt(chat), Sampling(max_tokens=50), cancel, lambda _: cancel.set()
        )


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"messages": [{"role": "user", "content": "word " * 600}]}, "messages"),
        ({"max_tokens": 600}, "max_tokens"),
        ({"max_completion_tokens": 600}, "max_completion_tokens"),
    ],
)
def test_context_length_is_checked_before_generation(
    model: LoadedModel, change: dict[str, Any], param: str
) -> None:
    """A prompt or token limit past the context is refused, naming the parameter, before any token."""
    chat = ChatCompletionRequest.model_validate({**BASE, "stream": True, **change})
    emitted: list[dict[str, Any]] = []
    with pytest.raises(EngineError) as raised:
        model.run_chat(chat, threading.Event(), lambda chunk, tokens: emitted.append(chunk))
    assert raised.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert raised.value.param == param
    assert emitted == []


def test_bad_tool_schema_is_refused_by_position(model: LoadedModel) -> None:
    """A function whose parameters schema cannot be enforced is refused, naming which one."""
    bad = {"type": "function", "function": {"name": "g", "parameters": {"$ref": "https://example.com/x"}}}
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "tools": [WEATHER.model_dump(), bad], "tool_choice": "required"}
    )
    with pytest.raises(EngineError) as raised:
        model.run_chat(chat, threading.Event(), lambda chunk, tokens: None)
    assert raised.value.param == "tools[1].function.parameters"


def generated(model: LoadedModel, content: str, **sampling: Any) -> tuple[str, str, int]:
    """Text, finish reason and token count of one choice for a one-message chat, on this engine's loop."""
    chat = ChatCompletionRequest.model_validate({**BASE, "messages": [{"role": "user", "content": content}]})
    generation = generate(model.llama, model.chat_prompt(chat), Sampling(**sampling), threading.Event())
    return generation.text, generation.finish_reason, generation.completion_tokens


YES_NO = "Is the sky blue? Answer yes or no."


def test_logit_bias_forces_a_token(model: LoadedModel) -> None:
    """A +100 logit bias makes a token the answer."""
    maybe = int(model.llama.tokenize(b"Maybe", add_bos=False, special=False)[0])
    assert generated(model, YES_NO, temperature=0.0, max_tokens=1, logit_bias={maybe: 100.0})[0] == "Maybe"


def test_ignore_eos_runs_to_max_tokens(model: LoadedModel) -> None:
    """ignore_eos generates past the natural end, up to max_tokens."""
    _, finish, count = generated(model, YES_NO, temperature=0.0, max_tokens=8)
    assert finish == "stop"
    assert count < 8
    assert generated(model, YES_NO, temperature=0.0, max_tokens=8, ignore_eos=True)[1:] == ("length", 8)


def test_seed_and_top_p(model: LoadedModel) -> None:
    """A seed reproduces a sampled answer; a tiny top_p samples greedily."""
    sampled = generated(model, YES_NO, temperature=1.0, seed=11, max_tokens=12)
    assert generated(model, YES_NO, temperature=1.0, seed=11, max_tokens=12) == sampled
    greedy_answer = generated(model, YES_NO, temperature=0.0, max_tokens=12)
    assert generated(model, YES_NO, temperature=1.0, top_p=1e-9, seed=11, max_tokens=12) == greedy_answer


def test_frequency_penalty_reduces_repetition(model: LoadedModel) -> None:
    """A frequency penalty makes a repetition-prone answer repeat less."""
    prompt = "Repeat after me: hello hello hello hello hello hello hello hello"
    plain = generated(model, prompt, temperature=0.0, max_tokens=16)[0]
    penalized = generated(model, prompt, temperature=0.0, max_tokens=16, frequency_penalty=2.0)[0]
    assert penalized.lower().count("hello") < plain.lower().count("hello")


@pytest.mark.parametrize(
    "fields",
    [{"logprobs": True}, {"logprobs": True, "n": 2, "max_tokens": 6, "ignore_eos": True}],
    ids=["logprobs", "n=2"],
)
def test_chat_chunk_tokens_add_up_to_the_completion_tokens(
    model: LoadedModel, fields: dict[str, Any]
) -> None:
    """On the token loop's path each content chunk counts its tokens, and they sum to the usage."""
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "stream": True, "temperature": 0, "max_tokens": 16, **fields}
    )
    chunks: list[tuple[dict[str, Any], int]] = []
    usage, _ = model.run_chat(chat, threading.Event(), lambda chunk, tokens: chunks.append((chunk, tokens)))
    for chunk, tokens in chunks:
        [choice] = chunk["choices"]
        carries_text = choice["delta"].get("content")
        assert (tokens >= 1) if carries_text else (tokens == 0), chunk
    assert sum(tokens for _, tokens in chunks) == usage.completion_tokens > 0
    assert len({chunk["choices"][0]["index"] for chunk, _ in chunks}) == (fields.get("n") or 1)


def test_text_completion_chunk_tokens_add_up_to_the_completion_tokens(model: LoadedModel) -> None:
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
    chunks: list[tuple[dict[str, Any], int]] = []
    usage, _ = model.run_completion(request, threading.Event(), lambda c, t: chunks.append((c, t)))
    assert chunks[0][0]["choices"][0]["text"] == "The sky is"
    assert chunks[0][1] == chunks[-1][1] == 0
    assert sum(tokens for _, tokens in chunks) == usage.completion_tokens == 8


def test_cancelled_chat_reports_what_it_used(model: LoadedModel) -> None:
    """A chat cancelled mid-stream raises Cancelled with its prompt and the tokens streamed until then."""
    cancel = threading.Event()
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "stream": True, "logprobs": True, "max_tokens": 50, "ignore_eos": True}
    )
    streamed: list[int] = []

    def emit(chunk: dict[str, Any], tokens: int) -> None:
        streamed.append(tokens)
        if sum(streamed) >= 3:
            cancel.set()

    with pytest.raises(Cancelled) as raised:
        model.run_chat(chat, cancel, emit)
    prompt = len(model.chat_prompt(chat))
    assert raised.value.usage is not None
    assert raised.value.usage.prompt_tokens == prompt
    assert raised.value.usage.completion_tokens == sum(streamed) >= 3
    assert raised.value.usage.total_tokens == prompt + sum(streamed)
