"""The OpenAI schemas the conformance tests validate against: well-formed, and strict where it matters."""

from __future__ import annotations

from typing import Any

import pytest
from schemas.openai_schemas import SCHEMAS, schema_name, validate, validator

CHAT_RESPONSE: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "system_fingerprint": "fp_1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


@pytest.mark.parametrize("path", sorted(SCHEMAS.glob("*.json")), ids=lambda path: path.stem)
def test_schemas_are_valid_json_schemas(path: Any) -> None:
    """Every schema file is a valid draft 2020-12 schema whose references resolve."""
    if path.stem != "components":
        validator(path.stem)


def test_a_good_chat_completion_passes() -> None:
    """A complete chat.completion object validates."""
    validate("CreateChatCompletionResponse", CHAT_RESPONSE)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda body: body["choices"][0]["message"].pop("refusal"),
        lambda body: body["choices"][0].pop("logprobs"),
        lambda body: body["choices"][0].update(finish_reason="done"),
        lambda body: body.update(object="chat.completion.chunk"),
        lambda body: body["usage"].pop("total_tokens"),
        lambda body: body.pop("created"),
    ],
)
def test_missing_or_wrong_fields_fail(breakage: Any) -> None:
    """Leaving out a required field, or an enum value OpenAI does not define, fails validation."""
    body = {
        **CHAT_RESPONSE,
        "choices": [{**CHAT_RESPONSE["choices"][0]}],
        "usage": {**CHAT_RESPONSE["usage"]},
    }
    body["choices"][0]["message"] = {**CHAT_RESPONSE["choices"][0]["message"]}
    breakage(body)
    with pytest.raises(AssertionError):
        validate("CreateChatCompletionResponse", body)


def test_error_bodies_need_every_field() -> None:
    """An error object needs message, type, param and code (param and code may be null)."""
    validate("ErrorResponse", {"error": {"message": "m", "type": "t", "param": None, "code": None}})
    with pytest.raises(AssertionError):
        validate("ErrorResponse", {"error": {"message": "m", "type": "t"}})


@pytest.mark.parametrize(
    ("path", "status", "streamed", "name"),
    [
        ("/v1/chat/completions", 200, False, "CreateChatCompletionResponse"),
        ("/v1/chat/completions", 200, True, "CreateChatCompletionStreamResponse"),
        ("/v1/completions", 200, True, "CreateCompletionResponse"),
        ("/v1/embeddings", 200, False, "CreateEmbeddingResponse"),
        ("/v1/models", 200, False, "ListModelsResponse"),
        ("/v1/models/a/b", 200, False, "Model"),
        ("/v1/embeddings", 404, False, "ErrorResponse"),
    ],
)
def test_schema_for_each_response(path: str, status: int, streamed: bool, name: str) -> None:
    """Each endpoint's answers are checked against the right schema."""
    assert schema_name(path, status, streamed=streamed) == name
