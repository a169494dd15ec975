"""The shared OpenAI request model: what it accepts, and what it refuses by name."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from protocol.openai import (
    UNSUPPORTED_CHAT_PARAMETERS,
    UNSUPPORTED_COMPLETION_PARAMETERS,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingRequest,
    unsupported_parameter,
)

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_minimal_request_is_valid() -> None:
    """A model and one message is a whole request."""
    chat = ChatCompletionRequest.model_validate(BASE)
    assert chat.stream is False
    assert chat.token_limit is None


def test_max_completion_tokens_wins_over_max_tokens() -> None:
    """OpenAI's newer name takes precedence when both are given."""
    chat = ChatCompletionRequest.model_validate({**BASE, "max_tokens": 5, "max_completion_tokens": 7})
    assert chat.token_limit == 7


def test_content_parts_are_joined() -> None:
    """A list of text parts reads as one string."""
    chat = ChatCompletionRequest.model_validate(
        {
            **BASE,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
        }
    )
    assert chat.messages[0].text() == "ab"


@pytest.mark.parametrize(
    "change",
    [
        {"stream_options": {"include_usage": True}},
        {"top_logprobs": 2},
        {"stop": ["a", "b", "c", "d", "e"]},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user"}]},
        {"unknown": 1},
        {"temperature": -1},
    ],
)
def test_inconsistent_requests_are_refused(change: dict[str, Any]) -> None:
    """Combinations OpenAI refuses are refused here too."""
    with pytest.raises(pydantic.ValidationError):
        ChatCompletionRequest.model_validate({**BASE, **change})


def test_unsupported_parameters_are_named() -> None:
    """Value combinations that cannot be honoured are reported with their name and a reason."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    chat = ChatCompletionRequest.model_validate(
        {**BASE, "tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}}
    )
    assert unsupported_parameter(chat) == (
        "response_format",
        "a JSON response_format cannot be combined with tool calls",
    )
    assert unsupported_parameter(ChatCompletionRequest.model_validate({**BASE, "n": 3})) is None


def test_every_chat_parameter_is_supported() -> None:
    """Every chat parameter the schema accepts is honoured: none is listed as unsupported."""
    assert UNSUPPORTED_CHAT_PARAMETERS == {}
    full = ChatCompletionRequest.model_validate(
        {
            **BASE,
            "n": 2,
            "seed": 1,
            "stop": ["x"],
            "logprobs": True,
            "top_logprobs": 3,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "parallel_tool_calls": False,
            "logit_bias": {"42": -100},
            "user": "u",
            "ignore_eos": True,
        }
    )
    assert unsupported_parameter(full) is None
    assert full.tool_mode == "f"


@pytest.mark.parametrize(
    ("change", "mode"),
    [
        ({}, "none"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "auto"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}, "none"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "required"}, "required"),
    ],
)
def test_tool_mode(change: dict[str, Any], mode: str) -> None:
    """tool_choice defaults to auto when tools are given, as OpenAI's does."""
    assert ChatCompletionRequest.model_validate({**BASE, **change}).tool_mode == mode


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"tool_choice": "auto"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
        ({"logit_bias": {"token": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"stop": ["a", ""]}, "stop"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_refusals_are_located_at_their_field(change: dict[str, Any], field: str) -> None:
    """Cross-field checks fail at the field at fault, so the HTTP edge can name it."""
    with pytest.raises(pydantic.ValidationError) as raised:
        ChatCompletionRequest.model_validate({**BASE, **change})
    assert raised.value.errors()[0]["loc"][0] == field


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("hi", ["hi"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2, 3], [[1, 2, 3]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_completion_prompt_forms(prompt: Any, prompts: list[Any]) -> None:
    """A completion prompt may be a string, strings, token ids, or lists of token ids."""
    request = CompletionRequest.model_validate({"model": "m", "prompt": prompt})
    assert request.prompts == prompts
    assert request.max_tokens == 16


@pytest.mark.parametrize("prompt", [[], [[]], [1, "a"], [-1], None])
def test_bad_completion_prompts_are_refused(prompt: Any) -> None:
    """Empty or mixed prompts are refused."""
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": prompt})


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"suffix": "end"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"echo": True, "logprobs": 1}, "echo"),
    ],
)
def test_unsupported_completion_parameters_are_named(change: dict[str, Any], refused: str) -> None:
    """Completion parameters that cannot be honoured are refused by name."""
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x", **change})
    found = unsupported_parameter(request)
    assert found is not None
    assert found[0] == refused


def test_suffix_is_listed_as_unsupported() -> None:
    """suffix (fill-in-the-middle) is the one completion parameter listed as unsupported."""
    assert set(UNSUPPORTED_COMPLETION_PARAMETERS) == {"suffix"}
    request = CompletionRequest.model_validate({"model": "m", "prompt": "x", "suffix": ""})
    assert unsupported_parameter(request) is None


@pytest.mark.parametrize(
    ("value", "inputs"),
    [("hi", ["hi"]), (["a", "b"], ["a", "b"]), ([5, 6], [[5, 6]]), ([[5], [6]], [[5], [6]])],
)
def test_embedding_input_forms(value: Any, inputs: list[Any]) -> None:
    """Embedding input may be a string, strings, token ids, or lists of token ids."""
    request = EmbeddingRequest.model_validate({"model": "m", "input": value})
    assert request.inputs == inputs
    assert request.encoding_format == "float"


@pytest.mark.parametrize("value", ["", [], [""], [[]], ["x"] * 2049])
def test_bad_embedding_inputs_are_refused(value: Any) -> None:
    """Empty inputs, and more than 2048 of them, are refused as OpenAI refuses them."""
    with pytest.raises(pydantic.ValidationError):
        EmbeddingRequest.model_validate({"model": "m", "input": value})
