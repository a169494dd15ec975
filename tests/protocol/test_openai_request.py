"""The shared OpenAI request model: what it accepts, and what it refuses by name."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from protocol.openai import ChatCompletionRequest, unsupported_parameter

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
    """Parameters that cannot be honoured are reported with their name and a reason."""
    chat = ChatCompletionRequest.model_validate({**BASE, "n": 3})
    assert unsupported_parameter(chat) == ("n", "only n=1 is supported")
    assert unsupported_parameter(ChatCompletionRequest.model_validate({**BASE, "n": 1})) is None
