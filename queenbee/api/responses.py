"""OpenAI's Responses API (`/v1/responses`) as chat jobs: the request model and both translations.

A Responses request becomes one `ChatCompletionRequest` (`chat_request`): `instructions` a system
message, input items chat messages (a `function_call` an assistant tool call, a `function_call_output`
a tool message), `text.format` the response_format, function tools the tools. The chat answer becomes a
Response object (`response_object`), or, streamed, the Responses events (`ResponseEvents`, which turns
chat chunks into `response.*` events, each with its `sequence_number`). Both are pure; `ResponsesPresenter`
shows a forwarded call's answer through them and stores it, and the HTTP handlers at the end serve
create, retrieve, input_items and delete.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol import Usage
from protocol.openai import ChatCompletionRequest
from queenbee.api.chat_body import translated_chat
from queenbee.endpoints import RESPONSES
from queenbee.errors import InvalidRequest, NotFound, QueenError
from queenbee.forwarding import ForwardedCall
from queenbee.openai_api import forward, read_json
from queenbee.response_store import ResponseStore
from queenbee.streaming import named_sse_event


class TextFormat(BaseModel):
    """`text.format`: plain text, any JSON object, or JSON that matches a schema."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    """`text`: the output's format (and a verbosity, which a local model cannot honour, so accepted)."""

    model_config = ConfigDict(extra="forbid")

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(BaseModel):
    """The body of POST /v1/responses: the parameters this queen serves; anything else is a 400."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    metadata: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]] | None = (
        Field(default=None, max_length=16)
    )
    user: str | None = None
    safety_identifier: str | None = None
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(default=None, max_length=256)
    # Keeps a session on the worker that holds its prefix (cache-aware routing), as OpenAI routes on it.
    prompt_cache_key: str | None = Field(default=None, max_length=1024)
    # Accepted because SDKs send them with values that change nothing here.
    include: list[str] | None = None
    truncation: Literal["disabled", "auto"] | None = None
    service_tier: str | None = None
    stream_options: dict[str, Any] | None = None
    background: Literal[False] | None = None
    reasoning: dict[str, Any] | None = None

    @property
    def text_format(self) -> dict[str, Any]:
        """The text format as the response echoes it."""
        if self.text is None or self.text.format is None:
            return {"type": "text"}
        return self.text.format.model_dump(by_alias=True, exclude_none=True)


def new_id(prefix: str) -> str:
    """A fresh id for a response (`resp`), message (`msg`) or function call (`fc`) item."""
    return f"{prefix}_{uuid.uuid4().hex}"


def parse(body: dict[str, Any]) -> ResponsesRequest:
    """Validate a Responses body, or raise a 400 naming the field at fault."""
    try:
        return ResponsesRequest.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in error["loc"] if _is_field(part)) or None
        if error["type"] == "extra_forbidden":
            raise InvalidRequest(f"Unsupported parameter: '{param}'.", param=param) from None
        message = f"Invalid value for '{param}': {error['msg']}" if param else error["msg"]
        raise InvalidRequest(message, param=param) from None


def _is_field(part: str | int) -> bool:
    return isinstance(part, str) and part.isidentifier() and part not in {"str", "list", "dict"}


def _text_of(content: Any, param: str) -> str:
    """The text of a message's content: a string, or a list of text parts (input, output or plain)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequest(
            f"Invalid value for '{param}': expected a string or a list of parts.", param=param
        )
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"Unsupported content part '{kind}' at '{param}[{index}]': only text parts are served.",
                param=f"{param}[{index}]",
            )
        texts.append(part["text"])
    return "".join(texts)


def normalize_input(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The request's input as items with ids, in the shape `input_items` lists them."""
    if isinstance(body.input, str):
        raw: list[dict[str, Any]] = [{"type": "message", "role": "user", "content": body.input}]
    else:
        raw = body.input
    items = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidRequest(f"Invalid value for 'input[{index}]': expected an object.", param="input")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise InvalidRequest(
                    f"Invalid value for 'input[{index}].role': {role!r}.", param=f"input[{index}].role"
                )
            text = _text_of(item.get("content"), f"input[{index}].content")
            part = "output_text" if role == "assistant" else "input_text"
            content: dict[str, Any] = {"type": part, "text": text}
            if part == "output_text":
                content["annotations"] = []
            items.append(
                {
                    "id": item.get("id") or new_id("msg"),
                    "type": "message",
                    "role": role,
                    "status": "completed",
                    "content": [content],
                }
            )
        elif kind == "function_call":
            for field in ("call_id", "name", "arguments"):
                if not isinstance(item.get(field), str):
                    param = f"input[{index}].{field}"
                    raise InvalidRequest(f"Missing or invalid '{param}'.", param=param)
            items.append(
                {
                    "id": item.get("id") or new_id("fc"),
                    "type": "function_call",
                    "call_id": item["call_id"],
                    "name": item["name"],
                    "arguments": item["arguments"],
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                param = f"input[{index}].call_id"
                raise InvalidRequest(f"Missing or invalid '{param}'.", param=param)
            output = _text_of(item.get("output"), f"input[{index}].output")
            items.append(
                {
                    "id": item.get("id") or new_id("fco"),
                    "type": "function_call_output",
                    "call_id": item["call_id"],
                    "output": output,
                    "status": "completed",
                }
            )
        elif kind == "reasoning":
            continue  # a local model's answer has no reasoning items to continue from
        else:
            raise InvalidRequest(
                f"Unsupported input item type '{kind}' at 'input[{index}]': message, function_call and "
                "function_call_output items are served.",
                param=f"input[{index}].type",
            )
    return items


def chat_messages(instructions: str | None, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat messages for the instructions and a conversation of (normalized) items."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    for item in items:
        kind = item["type"]
        if kind == "message":
            text = "".join(part.get("text", "") for part in item["content"])
            messages.append({"role": item["role"], "content": text})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            # The calls of one turn (and the text before them) are one assistant message in chat terms.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]})
    return messages


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    converted = []
    for index, tool in enumerate(tools):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidRequest(
                f"Unsupported tool type '{kind}' at 'tools[{index}]': only function tools are served.",
                param=f"tools[{index}].type",
            )
        function = {key: tool[key] for key in ("name", "description", "parameters", "strict") if key in tool}
        converted.append({"type": "function", "function": function})
    return converted or None


def _tool_choice(choice: str | dict[str, Any] | None) -> Any:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise InvalidRequest(
        f"Unsupported tool_choice type '{choice.get('type')}': 'auto', 'none', 'required' or a function.",
        param="tool_choice",
    )


def _response_format(body: ResponsesRequest) -> dict[str, Any] | None:
    text_format = body.text.format if body.text is not None else None
    if text_format is None or text_format.type == "text":
        return None
    if text_format.type == "json_object":
        return {"type": "json_object"}
    if text_format.name is None or text_format.schema_ is None:
        raise InvalidRequest("A json_schema text format needs a 'name' and a 'schema'.", param="text.format")
    schema: dict[str, Any] = {"name": text_format.name, "schema": text_format.schema_}
    if text_format.strict is not None:
        schema["strict"] = text_format.strict
    if text_format.description is not None:
        schema["description"] = text_format.description
    return {"type": "json_schema", "json_schema": schema}


def chat_request(
    body: ResponsesRequest, input_items: list[dict[str, Any]], history: list[dict[str, Any]]
) -> ChatCompletionRequest:
    """The chat request a Responses request becomes, continuing `history` (the previous response's)."""
    messages = chat_messages(body.instructions, [*history, *input_items])
    if not messages:
        raise InvalidRequest("The input is empty: send at least one message.", param="input")
    chat: dict[str, Any] = {"model": body.model, "messages": messages, "stream": body.stream}
    optional = {
        "max_completion_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tools": _tools(body.tools),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body),
        "user": body.safety_identifier or body.user,
        "prompt_cache_key": body.prompt_cache_key,
    }
    chat.update({key: value for key, value in optional.items() if value is not None})
    if chat.get("tools"):
        choice = _tool_choice(body.tool_choice)
        if choice is not None:
            chat["tool_choice"] = choice
    return translated_chat(chat, {"response_format": "text.format"})


def _cached_tokens(usage: dict[str, Any]) -> int:
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    return cached if isinstance(cached, int) else 0


def usage_object(usage: dict[str, Any]) -> dict[str, Any]:
    """Responses usage from chat usage."""
    return {
        "input_tokens": usage.get("prompt_tokens", 0),
        "input_tokens_details": {"cached_tokens": _cached_tokens(usage)},
        "output_tokens": usage.get("completion_tokens", 0),
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.get("total_tokens", 0),
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant message output item with one output_text part."""
    return {
        "id": item_id,
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    """A function_call output item."""
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "status": status,
    }


def skeleton(
    body: ResponsesRequest, response_id: str, created_at: int, status: str, *, store: bool
) -> dict[str, Any]:
    """A Response object without output or usage: what the stream's first events carry."""
    tool_choice: Any = body.tool_choice if body.tool_choice is not None else "auto"
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": [],
        "parallel_tool_calls": body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None},
        "store": store,
        "temperature": body.temperature if body.temperature is not None else 1.0,
        "text": {"format": body.text_format},
        "tool_choice": tool_choice,
        "tools": body.tools or [],
        "top_p": body.top_p if body.top_p is not None else 1.0,
        "truncation": body.truncation or "disabled",
        "usage": None,
        "user": body.user,
        "metadata": body.metadata or {},
    }


def _finished(response: dict[str, Any], finish_reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
    incomplete = finish_reason == "length"
    response["status"] = "incomplete" if incomplete else "completed"
    response["incomplete_details"] = {"reason": "max_output_tokens"} if incomplete else None
    response["usage"] = usage_object(usage)
    return response


def response_object(
    completion: dict[str, Any], body: ResponsesRequest, response_id: str, *, store: bool
) -> dict[str, Any]:
    """The Response object for a whole chat completion (with the queen's identity fields and usage)."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    finish_reason = choice.get("finish_reason")
    status = "incomplete" if finish_reason == "length" else "completed"
    output: list[dict[str, Any]] = []
    if message.get("content"):
        output.append(message_item(new_id("msg"), message["content"], status))
    for call in message.get("tool_calls") or ():
        function = call["function"]
        output.append(
            function_call_item(new_id("fc"), call["id"], function["name"], function["arguments"], "completed")
        )
    response = skeleton(body, response_id, completion["created"], status, store=store)
    response["output"] = output
    return _finished(response, finish_reason, completion.get("usage") or {})


class ResponseEvents:
    """Chat chunks in, Responses stream events out: a sans-I/O translator for one streamed response.

    `start` gives the events that open the stream, `chunk` those of one chat chunk, `finish` those that
    close every open item and end the response (with `response` left holding the whole object), and
    `fail` the `response.failed` event. Events are dicts; each carries its `sequence_number`.
    """

    def __init__(self, body: ResponsesRequest, response_id: str, created_at: int, *, store: bool) -> None:
        self.response = skeleton(body, response_id, created_at, "in_progress", store=store)
        self._sequence = 0
        self._started = False
        self._message: dict[str, Any] | None = None
        """The open message item, with its text so far."""
        self._calls: dict[int, dict[str, Any]] = {}
        """Open function_call items by the chat tool call's index."""
        self._finish_reason: str | None = None

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        """response.created and response.in_progress (once)."""
        if self._started:
            return []
        self._started = True
        snapshot = json.loads(json.dumps(self.response))
        return [
            self._event("response.created", response=snapshot),
            self._event("response.in_progress", response=snapshot),
        ]

    def _output_index(self) -> int:
        return len(self.response["output"])

    def _open_message(self) -> list[dict[str, Any]]:
        item = message_item(new_id("msg"), "", "in_progress")
        item["content"] = []
        self._message = {"item": item, "index": self._output_index(), "text": ""}
        self.response["output"].append(item)
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.output_item.added", output_index=self._message["index"], item=dict(item)),
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=self._message["index"],
                content_index=0,
                part=part,
            ),
        ]

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        if self._message is None:
            return []
        opened, self._message = self._message, None
        item, index, text = opened["item"], opened["index"], opened["text"]
        part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
        item.update(status=status, content=[part])
        return [
            self._event(
                "response.output_text.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self._event(
                "response.content_part.done",
                item_id=item["id"],
                output_index=index,
                content_index=0,
                part=part,
            ),
            self._event("response.output_item.done", output_index=index, item=item),
        ]

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of one chat chunk (after the opening ones, the first time)."""
        events = self.start()
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._message is None:
                    events += self._open_message()
                assert self._message is not None
                self._message["text"] += text
                events.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=self._message["item"]["id"],
                        output_index=self._message["index"],
                        content_index=0,
                        delta=text,
                        logprobs=[],
                    )
                )
            for call in delta.get("tool_calls") or ():
                events += self._tool_call_delta(call)
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
        return events

    def _tool_call_delta(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        index = call.get("index", 0)
        function = call.get("function") or {}
        opened = self._calls.get(index)
        if opened is None:
            events += self._close_message("completed")
            item = function_call_item(
                new_id("fc"), call.get("id") or new_id("call"), function.get("name") or "", "", "in_progress"
            )
            opened = self._calls[index] = {"item": item, "index": self._output_index()}
            self.response["output"].append(item)
            events.append(
                self._event("response.output_item.added", output_index=opened["index"], item=dict(item))
            )
        arguments = function.get("arguments") or ""
        if arguments:
            opened["item"]["arguments"] += arguments
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=opened["item"]["id"],
                    output_index=opened["index"],
                    delta=arguments,
                )
            )
        return events

    def finish(self, usage: dict[str, Any]) -> list[dict[str, Any]]:
        """Close every open item and end the response: response.completed, or .incomplete if cut short."""
        events = self.start()
        status = "incomplete" if self._finish_reason == "length" else "completed"
        events += self._close_message(status)
        for opened in self._calls.values():
            item = opened["item"]
            item["status"] = "completed"
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=opened["index"],
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
            events.append(self._event("response.output_item.done", output_index=opened["index"], item=item))
        self._calls = {}
        _finished(self.response, self._finish_reason, usage)
        kind = "response.incomplete" if self.response["status"] == "incomplete" else "response.completed"
        events.append(self._event(kind, response=self.response))
        return events

    def fail(self, error: QueenError) -> list[dict[str, Any]]:
        """End the response with response.failed, carrying the error."""
        events = self.start()
        self.response["status"] = "failed"
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        self.response["error"] = {"code": code, "message": error.message}
        events.append(self._event("response.failed", response=self.response))
        return events


@dataclass
class ResponsesPresenter:
    """Shows a forwarded chat call as a Response (whole or streamed), and stores it if asked."""

    call: ForwardedCall
    body: ResponsesRequest
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    store: ResponseStore | None
    """Where the response is kept; None when the request says store=false."""
    owner: str | None
    events: ResponseEvents = field(init=False)

    def __post_init__(self) -> None:
        self.events = ResponseEvents(
            self.body, self.call.request_id, self.call.created, store=self.store is not None
        )

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        """The Responses events of a chat chunk."""
        return [_sse(event) for event in self.events.chunk(chunk)]

    def text(self, index: int, text: str) -> list[bytes]:
        """The events of the chat chunk a Delta stands for."""
        return self.chunk(self.call.deltas.chunk(index, text, self.call.fingerprint))

    async def done(self, usage: Usage) -> list[bytes]:
        """Close the items, store the response, and end with response.completed (or .incomplete)."""
        events = self.events.finish(usage.model_dump())
        await self._keep(self.events.response)
        return [_sse(event) for event in events]

    def failed(self, error: QueenError) -> list[bytes]:
        """response.failed with the error."""
        return [_sse(event) for event in self.events.fail(error)]

    def cut(self) -> list[bytes]:
        """Nothing more: the client fell behind."""
        return []

    async def whole(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The Response object, stored if asked."""
        response = response_object(completion, self.body, self.call.request_id, store=self.store is not None)
        await self._keep(response)
        return response

    async def _keep(self, response: dict[str, Any]) -> None:
        if self.store is not None:
            await self.store.put(self.owner, response, self.input_items, self.history)


def _sse(event: dict[str, Any]) -> bytes:
    return named_sse_event(event["type"], event)


async def create_response(request: Request) -> Response:
    """POST /v1/responses."""
    body = parse(await read_json(request, request.state.settings))
    store: ResponseStore = request.state.responses
    owner: str | None = getattr(request.state, "api_key_id", None)
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await store.get(owner, body.previous_response_id)
        if previous is None:
            raise NotFound(
                f"Previous response with id '{body.previous_response_id}' not found.",
                param="previous_response_id",
            )
        history = previous.conversation()
    input_items = normalize_input(body)
    chat = chat_request(body, input_items, history)
    history_bytes = len(json.dumps(history)) if history else 0

    def present(call: ForwardedCall) -> ResponsesPresenter:
        return ResponsesPresenter(call, body, input_items, history, store if body.store else None, owner)

    return await forward(
        request,
        RESPONSES,
        chat,
        stream=body.stream,
        present=present,
        prompt_bytes=request.state.body_bytes + history_bytes,
        limit_param="max_output_tokens",
    )


async def _stored(request: Request) -> tuple[ResponseStore, str | None, str]:
    store: ResponseStore = request.state.responses
    owner: str | None = getattr(request.state, "api_key_id", None)
    return store, owner, request.path_params["response_id"]


def _not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


async def retrieve_response(request: Request) -> Response:
    """GET /v1/responses/{response_id}: a stored response of the caller's key."""
    store, owner, response_id = await _stored(request)
    stored = await store.get(owner, response_id)
    if stored is None:
        raise _not_found(response_id)
    return JSONResponse(stored.response)


async def list_input_items(request: Request) -> Response:
    """GET /v1/responses/{response_id}/input_items: the items of its request (`order`, `limit`, `after`)."""
    store, owner, response_id = await _stored(request)
    stored = await store.get(owner, response_id)
    if stored is None:
        raise _not_found(response_id)
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("Invalid value for 'order': 'asc' or 'desc'.", param="order")
    limit_text = request.query_params.get("limit", "20")
    if not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise InvalidRequest("Invalid value for 'limit': an integer from 1 to 100.", param="limit")
    items = stored.input_items if order == "asc" else stored.input_items[::-1]
    after = request.query_params.get("after")
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    page = items[: int(limit_text)]
    return JSONResponse(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > len(page),
        }
    )


async def delete_response(request: Request) -> Response:
    """DELETE /v1/responses/{response_id}."""
    store, owner, response_id = await _stored(request)
    if not await store.delete(owner, response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
