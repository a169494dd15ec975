"""The chat request another API's body was translated into, validated as the chat endpoint would."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from protocol.openai import ChatCompletionRequest, unsupported_parameter
from queenbee.errors import InvalidRequest


def translated_chat(chat: dict[str, Any], names: Mapping[str, str] | None = None) -> ChatCompletionRequest:
    """`chat` as a ChatCompletionRequest, or InvalidRequest; `names` maps chat parameters to the API's own.

    A refused parameter is named as the client's API names it (`response_format` is `text.format` in the
    Responses API, say).
    """
    try:
        parsed = ChatCompletionRequest.model_validate(chat)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"])
        raise InvalidRequest(f"The request cannot be served: {where}: {error['msg']}") from None
    refused = unsupported_parameter(parsed)
    if refused is not None:
        name = (names or {}).get(refused[0], refused[0])
        raise InvalidRequest(f"Unsupported parameter '{name}': {refused[1]}.", param=name)
    return parsed
