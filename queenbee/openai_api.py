"""The OpenAI-compatible HTTP edge: request validation, routing to a worker, relaying the answer."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol.openai import ChatCompletionRequest, unsupported_parameter
from queenbee.errors import InvalidRequest
from queenbee.forwarding import CHAT_COMPLETIONS, ForwardedCall
from queenbee.hive import Hive
from queenbee.settings import QueenSettings


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, or InvalidRequest saying what is wrong with it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise InvalidRequest(f"The request body exceeds {max_bytes} bytes.")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_bytes:
            raise InvalidRequest(f"The request body exceeds {max_bytes} bytes.")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return data


def _param_of(loc: tuple[str | int, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif part in {"str", "list[TextPart]", "function-after[_content_required(), ChatMessage]"}:
            continue
        else:
            parts.append(("." if parts else "") + part)
    return "".join(parts)


def parse_chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """Validate a chat completion body into the shared request model, or raise a 400 naming the field."""
    try:
        chat = ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param_of(first["loc"]) or None
        if first["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = f"Invalid value for '{param}': {first['msg']}" if param else first["msg"]
        raise InvalidRequest(message, param=param) from None
    refused = unsupported_parameter(chat)
    if refused is not None:
        name, reason = refused
        raise InvalidRequest(f"Unsupported parameter '{name}': {reason}.", param=name)
    return chat


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    hive: Hive = request.state.hive
    settings: QueenSettings = request.state.settings
    body = await read_json(request, settings.max_body_bytes)
    chat = parse_chat_request(body)
    call = ForwardedCall(
        hive,
        settings,
        request.state.observer,
        CHAT_COMPLETIONS,
        chat.model,
        chat.model_dump(mode="json", exclude_unset=True, by_alias=True),
        stream=chat.stream,
        include_usage=chat.include_usage,
        api_key_id=getattr(request.state, "api_key_id", None),
    )
    return await call.respond(request)


async def list_models(request: Request) -> Response:
    """GET /v1/models: what connected workers serve, in OpenAI's list shape."""
    hive: Hive = request.state.hive
    data = [{"id": model, "object": "model", "created": 0, "owned_by": "queenbee"} for model in hive.models()]
    return JSONResponse({"object": "list", "data": data})


async def health(request: Request) -> Response:
    """GET /health: the queen is up; how many workers and models it has."""
    hive: Hive = request.state.hive
    return JSONResponse({"status": "ok", "workers": len(hive.workers), "models": hive.models()})
