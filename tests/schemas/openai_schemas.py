"""Validation of everything the queen answers against the published JSON schemas (the *.json beside):
OpenAI's for chat, completions, embeddings and Responses, Anthropic's for Messages.

`ValidatingTransport` and `AsyncValidatingTransport` sit under an httpx client (the openai SDK's or a
test's own) and check every response body, and every event of every stream, as it passes: a test that
talks to the queen through them cannot see an object that breaks the schema without failing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import httpx
import httpx2
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

SCHEMAS = Path(__file__).parent
BASE_URI = "https://schemas.openai.local/"


@cache
def _registry() -> Registry[Any]:
    resources = [
        (BASE_URI + path.name, Resource.from_contents(json.loads(path.read_text())))
        for path in SCHEMAS.glob("*.json")
    ]
    return Registry().with_resources(resources)


@cache
def validator(name: str) -> Draft202012Validator:
    """The validator for one schema, e.g. "CreateChatCompletionResponse"."""
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, registry=_registry())


def validate(name: str, instance: Any) -> None:
    """Fail with every violation listed if `instance` does not match the schema `name`."""
    errors = sorted(validator(name).iter_errors(instance), key=lambda error: list(error.path))
    if errors:
        details = "\n".join(f"  at {list(error.path)}: {error.message}" for error in errors)
        raise AssertionError(
            f"response does not match OpenAI's {name}:\n{details}\n{json.dumps(instance)[:2000]}"
        )


TERMINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "message_stop", "error"}
)
"""Named events that end a stream (the Responses and Messages APIs send no [DONE])."""


def schema_name(path: str, status: int, *, streamed: bool, method: str = "POST") -> str:
    """Which schema a response to `method path` must match."""
    if path.startswith("/v1/messages"):
        if status >= 400:
            return "AnthropicError"
        if path.endswith("/count_tokens"):
            return "AnthropicTokenCount"
        return "AnthropicStreamEvent" if streamed else "AnthropicMessage"
    if status >= 400:
        return "ErrorResponse"
    if path.startswith("/v1/responses"):
        if streamed:
            return "ResponseStreamEvent"
        if path.endswith("/input_items"):
            return "ResponseItemList"
        return "ResponseDeleted" if method == "DELETE" else "Response"
    if path.endswith("/chat/completions"):
        return "CreateChatCompletionStreamResponse" if streamed else "CreateChatCompletionResponse"
    if path.endswith("/completions"):
        return "CreateCompletionResponse"
    if path.endswith("/embeddings"):
        return "CreateEmbeddingResponse"
    if path.endswith("/models"):
        return "ListModelsResponse"
    if "/models/" in path:
        return "Model"
    raise AssertionError(f"no schema for {path}")


@dataclass
class Seen:
    """What a transport validated: one schema name per object."""

    names: list[str] = field(default_factory=list)
    streams: int = 0


@dataclass
class _SseChecker:
    """Splits a byte stream into SSE events and validates each data payload."""

    path: str
    seen: Seen
    buffer: bytes = b""
    done: bool = False
    sequence: int = 0
    """The sequence_number the next Responses event must carry."""

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            event, self.buffer = self.buffer.split(b"\n\n", 1)
            self._event(event.decode("utf-8"))

    def _event(self, event: str) -> None:
        event_name = None
        if event.startswith("event: "):
            line, _, event = event.partition("\n")
            event_name = line[len("event: ") :]
        assert event.startswith("data: "), f"not an SSE data event: {event!r}"
        assert not self.done, "an event came after the end of the stream"
        payload = event[len("data: ") :]
        if event_name is not None:
            self._named(event_name, json.loads(payload))
            return
        if payload == "[DONE]":
            self.done = True
            return
        body = json.loads(payload)
        # A stream that fails after it began ends with an error event, in the error shape.
        name = "ErrorResponse" if "error" in body else schema_name(self.path, 200, streamed=True)
        validate(name, body)
        self.seen.names.append(name)

    def _named(self, event_name: str, body: dict[str, Any]) -> None:
        assert body.get("type") == event_name, f"event {event_name!r} carries {body.get('type')!r}"
        name = schema_name(self.path, 200, streamed=True)
        validate(name, body)
        if "sequence_number" in body:
            assert body["sequence_number"] == self.sequence, body
            self.sequence += 1
        self.seen.names.append(name)
        self.done = event_name in TERMINAL_EVENTS

    def close(self) -> None:
        assert not self.buffer.strip(), f"the stream ended inside an event: {self.buffer!r}"
        assert self.done, "the stream ended without data: [DONE]"
        self.seen.streams += 1


def _check_whole(response: Any, path: str, seen: Seen, method: str) -> None:
    name = schema_name(path, response.status_code, streamed=False, method=method)
    validate(name, response.json())
    seen.names.append(name)


def _is_stream(response: Any) -> bool:
    return response.status_code < 400 and response.headers.get("content-type", "").startswith(
        "text/event-stream"
    )


class _SyncStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, checker: _SseChecker) -> None:
        self.inner = inner
        self.checker = checker

    def __iter__(self) -> Iterator[bytes]:
        for data in self.inner:
            self.checker.feed(data)
            yield data
        self.checker.close()

    def close(self) -> None:
        self.inner.close()


class _AsyncStreamBase:
    def __init__(self, inner: Any, checker: _SseChecker) -> None:
        self.inner = inner
        self.checker = checker

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for data in self.inner:
            self.checker.feed(data)
            yield data
        self.checker.close()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _AsyncStream(_AsyncStreamBase, httpx.AsyncByteStream):
    pass


class _Httpx2AsyncStream(_AsyncStreamBase, httpx2.AsyncByteStream):
    pass


class ValidatingTransport(httpx.BaseTransport):
    """An httpx transport that validates every response body and stream event it carries."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()
        self.seen = Seen()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send the request; check the answer (streams as they are read)."""
        response = self.inner.handle_request(request)
        path = request.url.path
        if _is_stream(response):
            assert isinstance(response.stream, httpx.SyncByteStream)
            checker = _SseChecker(path, self.seen)
            return httpx.Response(
                response.status_code,
                headers=response.headers,
                stream=_SyncStream(response.stream, checker),
                extensions=response.extensions,
            )
        response.read()
        _check_whole(response, path, self.seen, request.method)
        return response

    def close(self) -> None:
        """Close the connection pool."""
        self.inner.close()


class _AsyncValidating:
    """What the async transports share; `http` is the httpx-like package of the client they serve."""

    http: Any = httpx
    stream_class: Any = _AsyncStream

    def __init__(self) -> None:
        self.inner = self.http.AsyncHTTPTransport()
        self.seen = Seen()

    async def handle_async_request(self, request: Any) -> Any:
        """Send the request; check the answer (streams as they are read)."""
        response = await self.inner.handle_async_request(request)
        path = request.url.path
        if _is_stream(response):
            checker = _SseChecker(path, self.seen)
            return self.http.Response(
                response.status_code,
                headers=response.headers,
                stream=self.stream_class(response.stream, checker),
                extensions=response.extensions,
            )
        await response.aread()
        _check_whole(response, path, self.seen, request.method)
        return response

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self.inner.aclose()


class AsyncValidatingTransport(_AsyncValidating, httpx.AsyncBaseTransport):
    """The async twin of ValidatingTransport."""


class Httpx2ValidatingTransport(_AsyncValidating, httpx2.AsyncBaseTransport):
    """AsyncValidatingTransport for clients built on httpx2 (the anthropic SDK's fork of httpx)."""

    http = httpx2
    stream_class = _Httpx2AsyncStream
