"""The OpenAI-compatible HTTP edge: request validation, routing to a worker, relaying the answer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from pydantic import ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, unsupported_parameter
from queenbee.endpoints import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, Endpoint, OpenAIRequest
from queenbee.errors import (
    ContextLengthExceeded,
    InvalidRequest,
    ModelNotFound,
    NoCapacity,
    QueenError,
    RequestTimeout,
    RequestTooLarge,
    UnsupportedMediaType,
)
from queenbee.forwarding import ForwardedCall
from queenbee.hive import Hive
from queenbee.json_body import THREAD_PARSE_BYTES, parse_body_async
from queenbee.ledger import Ledger
from queenbee.presenters import Presenter
from queenbee.ratelimit import Lease
from queenbee.settings import QueenSettings
from queenbee.training_queue import FineTunedModels, TrainingQueue
from queenbee.usage_check import NO_BOUNDS, usage_bounds


def _is_json(content_type: str | None) -> bool:
    media_type = (content_type or "").partition(";")[0].strip().lower()
    return media_type == "application/json" or (
        media_type.startswith("application/") and media_type.endswith("+json")
    )


async def read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The request body, at most `max_bytes`, received within `timeout` seconds.

    The content type must be JSON: a browser page cannot send one to another origin without a CORS
    preflight, which the queen never grants, so no web page can spend a visitor's way into the queen.
    """
    if not _is_json(request.headers.get("content-type")):
        raise UnsupportedMediaType("The request body must be JSON: send 'Content-Type: application/json'.")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLarge(f"The request body exceeds {max_bytes} bytes.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            message = await request.receive()
            body += message.get("body", b"")
            while message.get("more_body", False):
                if len(body) > max_bytes:
                    raise RequestTooLarge(f"The request body exceeds {max_bytes} bytes.")
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                body += message.get("body", b"")
    except TimeoutError:
        raise RequestTimeout(f"The request body did not arrive within {timeout:g} s.") from None
    if len(body) > max_bytes:
        raise RequestTooLarge(f"The request body exceeds {max_bytes} bytes.")
    return bytes(body)


async def read_json(request: Request, settings: QueenSettings) -> dict[str, Any]:
    """The request body as a JSON object, or an error saying what is wrong with it."""
    body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
    request.state.body_bytes = len(body)
    return await parse_body_async(body)


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


async def parse_request_async(model: type[RequestModel], body: dict[str, Any], size: int) -> RequestModel:
    """`parse_request`, in a worker thread for big bodies so other requests are served meanwhile."""
    if size < THREAD_PARSE_BYTES:
        return parse_request(model, body)
    return await asyncio.to_thread(parse_request, model, body)


def _check_token_limit(parsed: OpenAIRequest, n_ctx: int, name: str | None) -> None:
    if isinstance(parsed, EmbeddingRequest):
        return
    limit = parsed.token_limit
    if limit is not None and limit > n_ctx:
        if name is None:
            name = "max_completion_tokens" if getattr(parsed, "max_completion_tokens", None) else "max_tokens"
        raise ContextLengthExceeded(
            f"'{name}' is {limit}, more than the model's context length of {n_ctx} tokens.", param=name
        )


async def forward(
    request: Request,
    endpoint: Endpoint,
    parsed: OpenAIRequest,
    *,
    stream: bool,
    usage: bool = False,
    present: Callable[[ForwardedCall], Presenter] | None = None,
    prompt_bytes: int | None = None,
    limit_param: str | None = None,
) -> Response:
    """Forward a validated request to a worker and answer the client, through `present` if given.

    `prompt_bytes` sizes the prompt for the usage bounds when it is bigger than the body (a Responses
    request that continues a stored conversation); by default it is the body's size. `limit_param` is
    what the client called the output token limit, if the API names it otherwise than chat does.
    """
    hive: Hive = request.state.hive
    lease: Lease | None = getattr(request.state, "lease", None)
    call = ForwardedCall(
        hive,
        request.state.settings,
        request.state.observer,
        endpoint,
        parsed.model,
        parsed,
        NO_BOUNDS,
        stream=stream,
        include_usage=usage,
        api_key_id=getattr(request.state, "api_key_id", None),
        lease=lease,
    )
    if present is not None:
        call.presenter = present(call.backref())
    audits = getattr(request.state, "audits", None)
    if audits is not None:
        call.on_delivered = audits.delivered
    if audits is not None and call.api_key_id in request.state.settings.trusted_only_key:
        call.worker_filter = audits.is_trusted
    try:
        fine_tuned: FineTunedModels | None = getattr(request.state, "fine_tuned", None)
        if fine_tuned is not None and not fine_tuned.visible(parsed.model, call.api_key_id):
            # Another key's fine-tuned model does not exist for this one.
            message = f"The model '{parsed.model}' does not exist or no worker serves it."
            raise ModelNotFound(message, param="model")
        training: TrainingQueue | None = getattr(request.state, "training", None)
        if fine_tuned is not None and training is not None and fine_tuned.get(parsed.model) is not None:
            # A fine-tuned model whose worker left: another --train worker fetches it from the queen.
            await training.serve(parsed.model)
        n_ctx = hive.context_length(parsed.model)
        if n_ctx is None:
            message = f"The model '{parsed.model}' does not exist or no worker serves it."
            raise ModelNotFound(message, param="model")
        _check_token_limit(parsed, n_ctx, limit_param)
        if call.worker_filter is not None and not any(map(call.worker_filter, hive.serving(parsed.model))):
            raise NoCapacity(
                f"No trusted worker serves '{parsed.model}' now: this API key's prompts go only to the "
                "queen's auditors.",
                retry_after=5,
            )
        size = request.state.body_bytes if prompt_bytes is None else prompt_bytes
        call.bounds = usage_bounds(parsed, size, n_ctx)
        if lease is not None:
            if lease.shared:  # held in Redis for the hive (ratelimit_redis.py)
                await lease.reserve_shared(call.bounds.reservation)  # type: ignore[attr-defined]
            else:
                lease.reserve(call.bounds.reservation)
    except QueenError as exc:
        await call.record("error", exc.status, error_code=exc.code)
        raise
    return await call.respond(request)


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    settings: QueenSettings = request.state.settings
    body = await read_json(request, settings)
    chat = await parse_request_async(ChatCompletionRequest, body, request.state.body_bytes)
    return await forward(request, CHAT_COMPLETIONS, chat, stream=chat.stream, usage=chat.include_usage)


async def completions(request: Request) -> Response:
    """POST /v1/completions: OpenAI's legacy text completions."""
    settings: QueenSettings = request.state.settings
    body = await read_json(request, settings)
    completion = await parse_request_async(CompletionRequest, body, request.state.body_bytes)
    return await forward(
        request, COMPLETIONS, completion, stream=completion.stream, usage=completion.include_usage
    )


async def embeddings(request: Request) -> Response:
    """POST /v1/embeddings: served by workers that run the model with --embeddings."""
    settings: QueenSettings = request.state.settings
    body = await read_json(request, settings)
    embedding = await parse_request_async(EmbeddingRequest, body, request.state.body_bytes)
    return await forward(request, EMBEDDINGS, embedding, stream=False, usage=False)


def _model_object(model: str) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": 0, "owned_by": "queenbee"}


def _visible_models(request: Request) -> list[str]:
    """The models connected workers serve that the caller may use (fine-tuned ones only its own)."""
    hive: Hive = request.state.hive
    fine_tuned: FineTunedModels | None = getattr(request.state, "fine_tuned", None)
    if fine_tuned is None:
        return hive.models()
    owner = getattr(request.state, "api_key_id", None)
    served = {model for model in hive.models() if fine_tuned.visible(model, owner)}
    # The key's fine-tuned models the queen holds a copy of: a request for one has a worker fetch it.
    return sorted(served | set(fine_tuned.kept(owner)))


async def list_models(request: Request) -> Response:
    """GET /v1/models: what connected workers serve, in OpenAI's list shape (another key's fine-tuned
    models left out)."""
    models = _visible_models(request)
    return JSONResponse({"object": "list", "data": [_model_object(model) for model in models]})


async def retrieve_model(request: Request) -> Response:
    """GET /v1/models/{model}: one model a connected worker serves, or a 404 in OpenAI's shape."""
    model: str = request.path_params["model"]
    if model not in _visible_models(request):
        raise ModelNotFound(f"The model '{model}' does not exist or no worker serves it.", param="model")
    return JSONResponse(_model_object(model))


async def health(request: Request) -> Response:
    """GET /health: the queen is up (or degraded: usage rows wait in the ledger's spool, or a replica
    cannot reach Redis); its workers, and with --redis-url how it stands in the hive."""
    hive: Hive = request.state.hive
    ledger: Ledger = request.state.ledger
    body: dict[str, Any] = {
        "status": "degraded" if ledger.degraded else "ok",
        "workers": len(hive.workers),
        "models": hive.models(),
        "ledger_spooled_rows": ledger.spooled_rows,
    }
    replicas = getattr(request.state, "replicas", None)
    if replicas is not None:
        # A replica cut off from Redis serves its own workers only: degraded, and it says why.
        body["hive"] = replicas.health()
        if body["hive"]["redis"] != "ok":
            body["status"] = "degraded"
    return JSONResponse(body)
