"""The queen's ASGI application: routes, error handlers, and the lifespan that owns runtime state."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TypedDict

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from queenbee.errors import QueenError
from queenbee.hive import Hive
from queenbee.observer import Observers, RequestLog, RequestObserver
from queenbee.openai_api import chat_completions, health, list_models
from queenbee.settings import QueenSettings
from queenbee.worker_endpoint import worker_endpoint

log = logging.getLogger("queenbee.app")

_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


class QueenState(TypedDict):
    """What every request handler finds in `request.state`."""

    hive: Hive
    settings: QueenSettings
    observer: RequestObserver


async def _queen_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QueenError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = {
        "error": {
            "message": str(exc.detail),
            "type": _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
            "param": None,
            "code": None,
        }
    }
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error while handling %s %s", request.method, request.url.path)
    body = {
        "error": {"message": "Internal server error.", "type": "internal_error", "param": None, "code": None}
    }
    return JSONResponse(body, status_code=500)


def create_app(settings: QueenSettings) -> Starlette:
    """Build the queen's application for `settings`."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[QueenState]:
        hive = Hive(settings)
        # Also on app.state, for operators' tools and tests that hold the app rather than a request.
        app.state.hive = hive
        observer = Observers([RequestLog()])
        yield {"hive": hive, "settings": settings, "observer": observer}
        for worker in list(hive.workers.values()):
            await worker.close(1001, "queen shutting down")

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        WebSocketRoute("/worker", worker_endpoint),
    ]
    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            QueenError: _queen_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
