"""OpenAI's Files API for fine-tuning: upload (multipart, `purpose=fine-tune`), list, retrieve, content,
delete.

An upload is chat-format JSONL (queenbee/training_data.py), checked before it is stored: a bad line is
a 400 naming the line and what is wrong with it. A file belongs to the API key that uploaded it; to
every other key it does not exist (404).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from queenbee.errors import InvalidRequest, NotFound, RequestTimeout, RequestTooLarge, UnsupportedMediaType
from queenbee.settings import QueenSettings
from queenbee.training_data import TrainingDataError, parse_chat_jsonl
from queenbee.tuning_store import StoredFile, TuningStore

PURPOSE = "fine-tune"
"""The one purpose this hive stores files for."""

MULTIPART_OVERHEAD = 64 * 2**10
"""Bytes of an upload's body besides the file: boundaries, part headers, the purpose field."""

LIST_LIMIT = 10_000
"""Most files one list page holds (OpenAI's limit)."""


def _owner(request: Request) -> str | None:
    owner: str | None = getattr(request.state, "api_key_id", None)
    return owner


async def _bounded_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The whole body, at most `max_bytes`, received within `timeout` seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestTooLarge(f"The upload exceeds {max_bytes} bytes.")
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    raise ClientDisconnect()
                body += message.get("body", b"")
                if len(body) > max_bytes:
                    raise RequestTooLarge(f"The upload exceeds {max_bytes} bytes.")
                if not message.get("more_body", False):
                    return bytes(body)
    except TimeoutError:
        raise RequestTimeout(f"The upload did not arrive within {timeout:g} s.") from None


def _replay(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def create_file(request: Request) -> Response:
    """POST /v1/files: store a fine-tuning file after checking every line."""
    settings: QueenSettings = request.state.settings
    store: TuningStore = request.state.tuning
    media_type = (request.headers.get("content-type") or "").partition(";")[0].strip().lower()
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(
            "Upload files as multipart/form-data with the fields 'file' and 'purpose'."
        )
    limit = settings.fine_tuning_max_file_bytes
    body = await _bounded_body(request, limit + MULTIPART_OVERHEAD, settings.body_timeout)
    try:
        async with Request(request.scope, _replay(body)).form(max_files=1, max_fields=8) as form:
            purpose = form.get("purpose")
            upload = form.get("file")
            if not isinstance(purpose, str) or not purpose:
                raise InvalidRequest("The field 'purpose' is required.", param="purpose")
            if purpose != PURPOSE:
                raise InvalidRequest(
                    f"The purpose '{purpose}' is not supported: this hive stores files for '{PURPOSE}' only.",
                    param="purpose",
                )
            if not isinstance(upload, UploadFile):
                raise InvalidRequest("The field 'file' is required, as a file.", param="file")
            content = await upload.read()
            filename = upload.filename or "upload.jsonl"
    except HTTPException as exc:  # a malformed multipart body, as Starlette reports it
        raise InvalidRequest(
            f"The upload is not valid multipart/form-data: {exc.detail}", param="file"
        ) from None
    if len(content) > limit:
        raise RequestTooLarge(f"The file exceeds {limit} bytes.")
    try:
        await asyncio.to_thread(parse_chat_jsonl, content)
    except TrainingDataError as exc:
        raise InvalidRequest(
            f"Invalid file format: {exc}", param="file", code="invalid_file_format"
        ) from None
    stored = StoredFile(
        id="file-" + uuid.uuid4().hex[:24],
        owner=_owner(request),
        created_at=time.time(),
        filename=filename[:256],
        purpose=purpose,
        content=content,
    )
    await store.put_file(stored)
    return JSONResponse(stored.to_object())


def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be an integer.", param=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low} and {high}.", param=name)
    return value


async def list_files(request: Request) -> Response:
    """GET /v1/files: the caller's files, newest first (`order=asc` for oldest first)."""
    store: TuningStore = request.state.tuning
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order")
    page = await store.list_files(
        _owner(request),
        purpose=request.query_params.get("purpose"),
        limit=_int_param(request, "limit", LIST_LIMIT, 1, LIST_LIMIT),
        after=request.query_params.get("after"),
        ascending=order == "asc",
    )
    return JSONResponse(
        {
            "object": "list",
            "data": page.data,
            "has_more": page.has_more,
            "first_id": page.data[0]["id"] if page.data else None,
            "last_id": page.data[-1]["id"] if page.data else None,
        }
    )


async def _file(request: Request) -> StoredFile:
    store: TuningStore = request.state.tuning
    file_id: str = request.path_params["file_id"]
    stored = await store.get_file(_owner(request), file_id)
    if stored is None:
        raise NotFound(f"No such File object: {file_id}", param="id")
    return stored


async def retrieve_file(request: Request) -> Response:
    """GET /v1/files/{file_id}."""
    return JSONResponse((await _file(request)).to_object())


async def file_content(request: Request) -> Response:
    """GET /v1/files/{file_id}/content: the file as it was uploaded."""
    stored = await _file(request)
    return Response(stored.content, media_type="application/octet-stream")


async def delete_file(request: Request) -> Response:
    """DELETE /v1/files/{file_id}."""
    store: TuningStore = request.state.tuning
    stored = await _file(request)
    await store.delete_file(stored.owner, stored.id)
    return JSONResponse({"id": stored.id, "object": "file", "deleted": True})
