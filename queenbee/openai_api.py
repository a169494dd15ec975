"""The OpenAI-compatible HTTP edge: request validation, routing to a worker, relaying the answer."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, unsupported_parameter
from queenbee.errors import InvalidRequest, ModelNotFound
from queenbee.forwarding import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, Endpoint, ForwardedCall
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


RequestModel = TypeVar("RequestModel", ChatCompletionRequest, CompletionRequest, EmbeddingRequest)

# Error types that only say "this branch of a union is the wrong type": when another branch has a more
# specific complaint (a bad content part, a list too short), that one is what the client needs to hear.
_TYPE_MISMATCHES = frozenset(
    {
        "string_type",
        "int_type",
        "int_parsing",
        "float_type",
        "float_parsing",
        "bool_type",
        "bool_parsing",
        "list_type",
        "dict_type",
        "model_type",
        "model_attributes_type",
    }
)


def _is_field_name(part: str) -> bool:
    # Pydantic puts union branch labels into error locations ("str", "list[TextPart]", tag names like
    # "ResponseFormatJsonSchema", "function-after[...]"); OpenAI field names are lower-case identifiers.
    return part.isidentifier() and not part[:1].isupper() and part not in {"str", "int", "float", "bool"}


def _param_of(loc: tuple[str | int, ...]) -> str:
    parts: list[str] = []
    for part in loc:
        if parts == ["logit_bias"]:
            break  # what follows is the client's token id, not a field
        if isinstance(part, int):
            parts.append(f"[{part}]")
        elif _is_field_name(part):
            parts.append(("." if parts else "") + part)
    return "".join(parts)


def _most_telling(errors: list[ErrorDetails]) -> ErrorDetails:
    """The error to report: an unknown top-level field first, then the most specific complaint."""
    for error in errors:
        if error["type"] == "extra_forbidden" and len(error["loc"]) == 1:
            return error
    return max(
        errors,
        key=lambda error: (error["type"] not in _TYPE_MISMATCHES, len(_param_of(error["loc"]).split("."))),
    )


def parse_request(model: type[RequestModel], body: dict[str, Any]) -> RequestModel:
    """Validate a body into a shared request model, or raise a 400 naming the field at fault.

    Parameters the schema accepts but the workers cannot honour are refused here too, by name.
    """
    try:
        parsed = model.model_validate(body)
    except ValidationError as exc:
        error = _most_telling(exc.errors(include_url=False))
        param = _param_of(error["loc"]) or None
        if error["type"] == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = f"Invalid value for '{param}': {error['msg']}" if param else error["msg"]
        raise InvalidRequest(message, param=param) from None
    refused = unsupported_parameter(parsed)
    if refused is not None:
        name, reason = refused
        raise InvalidRequest(f"Unsupported parameter '{name}': {reason}.", param=name)
    return parsed


def parse_chat_request(body: dict[str, Any]) -> ChatCompletionRequest:
    """Validate a chat completion body into the shared request model, or raise a 400 naming the field."""
    return parse_request(ChatCompletionRequest, body)


async def _forward(
    request: Request,
    endpoint: Endpoint,
    parsed: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
    *,
    stream: bool,
    usage: bool,
) -> Response:
    call = ForwardedCall(
        request.state.hive,
        request.state.settings,
        request.state.observer,
        endpoint,
        parsed.model,
        parsed.model_dump(mode="json", exclude_unset=True, by_alias=True),
        stream=stream,
        include_usage=usage,
        api_key_id=getattr(request.state, "api_key_id", None),
    )
    return await call.respond(request)


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    settings: QueenSettings = request.state.settings
    chat = parse_chat_request(await read_json(request, settings.max_body_bytes))
    return await _forward(request, CHAT_COMPLETIONS, chat, stream=chat.stream, usage=chat.include_usage)


async def completions(request: Request) -> Response:
    """POST /v1/completions: OpenAI's legacy text completions."""
    settings: QueenSettings = request.state.settings
    completion = parse_request(CompletionRequest, await read_json(request, settings.max_body_bytes))
    return await _forward(
        request, COMPLETIONS, completion, stream=completion.stream, usage=completion.include_usage
    )


async def embeddings(request: Request) -> Response:
    """POST /v1/embeddings: served by workers that run the model with --embeddings."""
    settings: QueenSettings = request.state.settings
    embedding = parse_request(EmbeddingRequest, await read_json(request, settings.max_body_bytes))
    return await _forward(request, EMBEDDINGS, embedding, stream=False, usage=False)


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "queenbee"}


async def list_models(request: Request) -> Response:
    """GET /v1/models: what connected workers serve, in OpenAI's list shape."""
    hive: Hive = request.state.hive
    return JSONResponse({"object": "list", "data": [_model_object(model) for model in hive.models()]})


async def retrieve_model(request: Request) -> Response:
    """GET /v1/models/{model}: one model a connected worker serves, or a 404 in OpenAI's shape."""
    hive: Hive = request.state.hive
    model: str = request.path_params["model"]
    if model not in hive.models():
        raise ModelNotFound(f"The model '{model}' does not exist or no worker serves it.", param="model")
    return JSONResponse(_model_object(model))


async def health(request: Request) -> Response:
    """GET /health: the queen is up; how many workers and models it has."""
    hive: Hive = request.state.hive
    return JSONResponse({"status": "ok", "workers": len(hive.workers), "models": hive.models()})
