"""Anthropic's Messages API (`/v1/messages`, `/v1/messages/count_tokens`) as chat and token-count jobs.

A Messages request becomes one `ChatCompletionRequest` (`chat_request`): `system` a system message,
text blocks message content, `tool_use` blocks assistant tool calls, `tool_result` blocks tool messages,
`tool_choice` `any` the chat `required` and `tool` a named function. The chat answer becomes a Message
(`message_object`), or, streamed, Anthropic's events (`MessageEvents`: `message_start`, `ping`,
`content_block_start` / `_delta` (`text_delta`, `input_json_delta`) / `_stop`, `message_delta`,
`message_stop`). Errors take Anthropic's shape (`queenbee.errors.anthropic_error`), statuses stay those of
chat completions. The translations are pure; the presenters and handlers at the end are thin.

A worker names the stop sequence that ended a choice (`stop_reason` on the chat choice, as vLLM does),
so a message says `stop_sequence` with the sequence, or `end_turn`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from protocol import Usage
from protocol.openai import ChatCompletionRequest
from queenbee.api.chat_body import translated_chat
from queenbee.endpoints import COUNT_TOKENS, MESSAGES
from queenbee.errors import InvalidRequest, QueenError
from queenbee.forwarding import ForwardedCall
from queenbee.openai_api import forward, read_json
from queenbee.streaming import named_sse_event

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}
"""Anthropic's stop_reason for each chat finish_reason."""


class _Conversation(BaseModel):
    """What a Messages request and a token count share: the model, the conversation and its tools."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=256)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class MessagesRequest(_Conversation):
    """The body of POST /v1/messages: the parameters this queen serves; anything else is a 400."""

    max_tokens: int = Field(ge=1, le=2**31 - 1)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stream: bool = False
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None


class CountTokensRequest(_Conversation):
    """The body of POST /v1/messages/count_tokens."""


def parse(model: type[_Conversation], body: dict[str, Any]) -> Any:
    """Validate a body, or raise a 400 naming the field at fault."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in error["loc"] if isinstance(part, str)) or None
        if error["type"] == "extra_forbidden":
            raise InvalidRequest(f"{param}: Extra inputs are not permitted", param=param) from None
        if error["type"] == "missing":
            raise InvalidRequest(f"{param}: Field required", param=param) from None
        raise InvalidRequest(f"{param}: {error['msg']}" if param else error["msg"], param=param) from None


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(block, dict) for block in content):
        raise InvalidRequest(f"{where}: expected a string or a list of content blocks", param=where)
    return content


def _text(blocks: list[dict[str, Any]], where: str) -> str:
    texts = []
    for index, block in enumerate(blocks):
        if block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise InvalidRequest(
                f"{where}.{index}: only text blocks are served here, not '{block.get('type')}'",
                param=f"{where}.{index}",
            )
        texts.append(block["text"])
    return "".join(texts)


def _tool_result_text(block: dict[str, Any], where: str) -> str:
    content = block.get("content", "")
    text = _text(_blocks(content, f"{where}.content"), f"{where}.content") if content else ""
    return f"Error: {text}" if block.get("is_error") else text


def chat_messages(
    system: str | list[dict[str, Any]] | None, messages: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Chat messages for Anthropic's system prompt and messages."""
    chat: list[dict[str, Any]] = []
    if system:
        chat.append({"role": "system", "content": _text(_blocks(system, "system"), "system")})
    for number, message in enumerate(messages):
        where = f"messages.{number}"
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidRequest(f"{where}.role: expected 'user' or 'assistant'", param=f"{where}.role")
        texts: list[str] = []
        calls: list[dict[str, Any]] = []
        for index, block in enumerate(_blocks(message.get("content"), f"{where}.content")):
            kind = block.get("type")
            at = f"{where}.content.{index}"
            if kind == "text" and isinstance(block.get("text"), str):
                texts.append(block["text"])
            elif kind == "tool_use" and role == "assistant":
                arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
                calls.append(
                    {
                        "id": str(block.get("id", "")),
                        "type": "function",
                        "function": {"name": str(block.get("name", "")), "arguments": arguments},
                    }
                )
            elif kind == "tool_result" and role == "user":
                chat.append(
                    {
                        "role": "tool",
                        "tool_call_id": str(block.get("tool_use_id", "")),
                        "content": _tool_result_text(block, at),
                    }
                )
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue
            else:
                raise InvalidRequest(f"{at}: '{kind}' blocks are not served in {role} messages", param=at)
        if role == "assistant":
            if texts or calls:
                entry: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
                if calls:
                    entry["tool_calls"] = calls
                chat.append(entry)
        elif texts:
            chat.append({"role": "user", "content": "".join(texts)})
    return chat


def _tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    converted = []
    for index, tool in enumerate(tools or ()):
        if tool.get("type", "custom") != "custom":
            raise InvalidRequest(
                f"tools.{index}: only custom tools are served, not '{tool.get('type')}'",
                param=f"tools.{index}",
            )
        function = {"name": tool.get("name"), "parameters": tool.get("input_schema")}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        converted.append({"type": "function", "function": function})
    return converted or None


def _tool_choice(choice: dict[str, Any] | None) -> tuple[Any, bool | None]:
    """The chat tool_choice and parallel_tool_calls for Anthropic's tool_choice."""
    if choice is None:
        return None, None
    parallel = False if choice.get("disable_parallel_tool_use") else None
    kind = choice.get("type")
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}, parallel
    raise InvalidRequest("tool_choice.type: expected 'auto', 'any', 'tool' or 'none'", param="tool_choice")


def chat_request(body: _Conversation) -> ChatCompletionRequest:
    """The chat request a Messages request (or a token count's conversation) becomes."""
    if body.thinking is not None and body.thinking.get("type") != "disabled":
        raise InvalidRequest("thinking: extended thinking is not served", param="thinking")
    chat: dict[str, Any] = {"model": body.model, "messages": chat_messages(body.system, body.messages)}
    tools = _tools(body.tools)
    if tools:
        chat["tools"] = tools
        choice, parallel = _tool_choice(body.tool_choice)
        if choice is not None:
            chat["tool_choice"] = choice
        if parallel is not None:
            chat["parallel_tool_calls"] = parallel
    if isinstance(body, MessagesRequest):
        optional = {
            "max_tokens": body.max_tokens,
            "stop": body.stop_sequences,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
        }
        chat.update({key: value for key, value in optional.items() if value is not None})
        chat["stream"] = body.stream
        user = (body.metadata or {}).get("user_id")
        if isinstance(user, str):
            chat["user"] = user
    return translated_chat(chat)


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def message_object(completion: dict[str, Any]) -> dict[str, Any]:
    """The Message for a whole chat completion (with the queen's identity fields and usage)."""
    choice = completion["choices"][0]
    message = choice.get("message") or {}
    content: list[dict[str, Any]] = []
    if message.get("content"):
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call["function"]
        content.append(
            {
                "type": "tool_use",
                "id": call["id"],
                "name": function["name"],
                "input": _arguments(function["arguments"]),
            }
        )
    usage = completion.get("usage") or {}
    return {
        "id": completion["id"],
        "type": "message",
        "role": "assistant",
        "model": completion["model"],
        "content": content,
        **stop_fields(choice.get("finish_reason"), choice.get("stop_reason")),
        "usage": anthropic_usage(usage),
    }


def anthropic_usage(usage: dict[str, Any]) -> dict[str, int]:
    """Anthropic's usage block for a chat usage: `input_tokens` are the prompt tokens the worker decoded,
    `cache_read_input_tokens` those it reused from its cache (together the whole prompt, as Anthropic
    counts them). Nothing is written to a cache on request, so `cache_creation_input_tokens` is 0."""
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    cached = min(max(cached, 0), prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def stop_fields(finish_reason: str | None, stop_sequence: Any) -> dict[str, Any]:
    """Anthropic's `stop_reason` and `stop_sequence` for how a chat choice ended.

    The worker names the stop sequence that ended a choice (`stop_reason` on the chat choice, as vLLM
    does); a choice that stopped without one ended its turn.
    """
    if finish_reason in (None, "stop") and isinstance(stop_sequence, str):
        return {"stop_reason": "stop_sequence", "stop_sequence": stop_sequence}
    return {"stop_reason": STOP_REASONS.get(finish_reason or "stop", "end_turn"), "stop_sequence": None}


class MessageEvents:
    """Chat chunks in, Anthropic stream events out: a sans-I/O translator for one streamed message."""

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self._started = False
        self._blocks = 0
        """Content blocks opened so far: the next one's index."""
        self._open: Literal["text", "tool_use"] | None = None
        self._calls: set[int] = set()
        """Chat tool call indexes that have a block."""
        self._finish_reason: str | None = None
        self._stop_sequence: str | None = None

    def start(self) -> list[dict[str, Any]]:
        """message_start and a ping (once)."""
        if self._started:
            return []
        self._started = True
        message: dict[str, Any] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _close(self) -> list[dict[str, Any]]:
        if self._open is None:
            return []
        self._open = None
        return [{"type": "content_block_stop", "index": self._blocks - 1}]

    def _begin(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        events = self._close()
        self._open = block["type"]
        events.append({"type": "content_block_start", "index": self._blocks, "content_block": block})
        self._blocks += 1
        return events

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The events of one chat chunk (after the opening ones, the first time)."""
        events = self.start()
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content")
            if text:
                if self._open != "text":
                    events += self._begin({"type": "text", "text": ""})
                delta_event = {"type": "text_delta", "text": text}
                events.append(
                    {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta_event}
                )
            for call in delta.get("tool_calls") or ():
                index = call.get("index", 0)
                function = call.get("function") or {}
                if index not in self._calls:
                    self._calls.add(index)
                    block: dict[str, Any] = {
                        "type": "tool_use",
                        "id": call.get("id") or "",
                        "name": function.get("name") or "",
                        "input": {},
                    }
                    events += self._begin(block)
                if function.get("arguments"):
                    delta_event = {"type": "input_json_delta", "partial_json": function["arguments"]}
                    events.append(
                        {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta_event}
                    )
            if choice.get("finish_reason"):
                self._finish_reason = choice["finish_reason"]
                stop = choice.get("stop_reason")
                self._stop_sequence = stop if isinstance(stop, str) else None
        return events

    def finish(self, usage: dict[str, Any]) -> list[dict[str, Any]]:
        """Close the open block, then message_delta (stop reason, usage) and message_stop."""
        events = self.start() + self._close()
        events.append(
            {
                "type": "message_delta",
                "delta": stop_fields(self._finish_reason, self._stop_sequence),
                "usage": anthropic_usage(usage),
            }
        )
        events.append({"type": "message_stop"})
        return events

    def fail(self, error: QueenError) -> list[dict[str, Any]]:
        """An error event in Anthropic's shape."""
        return [error.anthropic_body()]


@dataclass
class MessagesPresenter:
    """Shows a forwarded chat call as an Anthropic Message, whole or streamed."""

    call: ForwardedCall
    events: MessageEvents = field(init=False)

    def __post_init__(self) -> None:
        self.events = MessageEvents(self.call.request_id, self.call.model)

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        """The Messages events of a chat chunk."""
        return [_sse(event) for event in self.events.chunk(chunk)]

    def text(self, index: int, text: str) -> list[bytes]:
        """The events of the chat chunk a Delta stands for."""
        return self.chunk(self.call.deltas.chunk(index, text, self.call.fingerprint))

    async def done(self, usage: Usage) -> list[bytes]:
        """The events that end the message."""
        return [_sse(event) for event in self.events.finish(usage.model_dump())]

    def failed(self, error: QueenError) -> list[bytes]:
        """An error event."""
        return [_sse(event) for event in self.events.fail(error)]

    def cut(self) -> list[bytes]:
        """Nothing more: the client fell behind."""
        return []

    async def whole(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The Message."""
        return message_object(completion)


@dataclass
class TokenCountPresenter:
    """Shows a token-count job's answer as `{"input_tokens": n}` (it is never streamed)."""

    call: ForwardedCall

    def chunk(self, chunk: dict[str, Any]) -> list[bytes]:
        """Never called: token counts are not streamed."""
        return []

    def text(self, index: int, text: str) -> list[bytes]:
        """Never called: token counts are not streamed."""
        return []

    async def done(self, usage: Usage) -> list[bytes]:
        """Never called: token counts are not streamed."""
        return []

    def failed(self, error: QueenError) -> list[bytes]:
        """Never called: token counts are not streamed."""
        return []

    def cut(self) -> list[bytes]:
        """Never called: token counts are not streamed."""
        return []

    async def whole(self, completion: dict[str, Any]) -> dict[str, Any]:
        """The count."""
        return {"input_tokens": completion["input_tokens"]}


def _sse(event: dict[str, Any]) -> bytes:
    return named_sse_event(event["type"], event)


async def create_message(request: Request) -> Response:
    """POST /v1/messages."""
    body: MessagesRequest = parse(MessagesRequest, await read_json(request, request.state.settings))
    chat = chat_request(body)
    return await forward(request, MESSAGES, chat, stream=body.stream, present=MessagesPresenter)


async def count_tokens(request: Request) -> Response:
    """POST /v1/messages/count_tokens: the prompt tokens of a conversation, by the worker's tokenizer."""
    body: CountTokensRequest = parse(CountTokensRequest, await read_json(request, request.state.settings))
    chat = chat_request(body)
    return await forward(request, COUNT_TOKENS, chat, stream=False, present=TokenCountPresenter)


def is_messages_path(path: str) -> bool:
    """Whether a request path belongs to the Messages API, whose errors take Anthropic's shape."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")
