"""The forwarding POSTs served straight from a table: the same answers as through Starlette's router."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from servers import running
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from queenbee.app import _http_error, _queen_error, _unexpected_error
from queenbee.direct_routes import DirectRoutes
from queenbee.errors import InvalidRequest

ERROR_FIELDS = {"message", "type", "param", "code"}


async def test_a_direct_route_still_checks_the_host(tmp_path: Path) -> None:
    """With --allowed-host, a POST to a forwarding endpoint for another Host gets the JSON 400."""
    with running(tmp_path, allowed_host=["queen.example"]) as queen:
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            rebound = await client.post("/v1/chat/completions", json=body, headers={"Host": "evil.example"})
            allowed = await client.post("/v1/chat/completions", json=body, headers={"Host": "queen.example"})
    assert rebound.status_code == 400
    assert rebound.json()["error"]["code"] == "invalid_host"
    assert allowed.status_code == 404  # through: no worker serves "m"
    assert allowed.json()["error"]["code"] == "model_not_found"


async def test_errors_on_direct_and_routed_paths_keep_their_shapes(tmp_path: Path) -> None:
    """Another method on a direct path: Starlette's 405; errors OpenAI's (Anthropic's on /v1/messages)."""
    with running(tmp_path) as queen:
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            wrong_method = await client.get("/v1/chat/completions")
            post_to_get_route = await client.post("/v1/models", json={})
            bad_json = await client.post(
                "/v1/chat/completions", content=b"{", headers={"Content-Type": "application/json"}
            )
            anthropic = await client.post("/v1/messages", json={"model": "m"})
            not_json = await client.post(
                "/v1/embeddings", content=b"x", headers={"Content-Type": "text/plain"}
            )
    assert wrong_method.status_code == 405
    assert set(wrong_method.json()["error"]) == ERROR_FIELDS
    assert post_to_get_route.status_code == 405
    assert bad_json.status_code == 400
    assert set(bad_json.json()["error"]) == ERROR_FIELDS
    assert anthropic.status_code == 400
    assert anthropic.json()["type"] == "error"
    assert anthropic.json()["error"]["type"] == "invalid_request_error"
    assert not_json.status_code == 415


def _app(handler: Any) -> DirectRoutes:
    async def routed(request: Request) -> Response:
        return JSONResponse({"routed": True})

    starlette = Starlette(routes=[Route("/routed", routed, methods=["POST", "GET"])])
    return DirectRoutes(
        starlette,
        {"/direct": handler, "/v1/messages": handler},
        queen_error=_queen_error,
        http_error=_http_error,
        unexpected_error=_unexpected_error,
    )


async def test_a_handler_that_fails_gets_a_500_in_the_paths_shape(caplog: pytest.LogCaptureFixture) -> None:
    """An unexpected exception is logged and answered like Starlette's handler would, per API."""

    async def broken(request: Request) -> Response:
        raise RuntimeError("boom")

    async def refused(request: Request) -> Response:
        raise InvalidRequest("Bad 'x'.", param="x")

    transport = httpx.ASGITransport(app=_app(broken))
    with caplog.at_level(logging.ERROR, logger="queenbee.app"):
        async with httpx.AsyncClient(transport=transport, base_url="http://queen") as client:
            openai = await client.post("/direct")
            anthropic = await client.post("/v1/messages")
            routed = await client.post("/routed")
    assert openai.status_code == 500
    assert openai.json()["error"]["type"] == "internal_error"
    assert anthropic.status_code == 500
    assert anthropic.json()["type"] == "error"
    assert routed.json() == {"routed": True}
    assert any(
        "unexpected error while handling POST /direct" in record.getMessage() for record in caplog.records
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=_app(refused)), base_url="http://q"
    ) as client:
        invalid = await client.post("/direct")
    assert invalid.status_code == 400
    assert invalid.json()["error"]["param"] == "x"


async def test_a_failure_after_the_answer_began_is_not_answered_twice() -> None:
    """Once a stream has started, an exception ends the connection rather than sending a second response."""

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        raise RuntimeError("mid-stream")

    async def streaming(request: Request) -> Response:
        return StreamingResponse(events(), media_type="text/event-stream")

    transport = httpx.ASGITransport(app=_app(streaming))
    async with httpx.AsyncClient(transport=transport, base_url="http://queen") as client:
        with pytest.raises(RuntimeError, match="mid-stream"):
            await client.post("/direct")
