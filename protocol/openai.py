"""The OpenAI request bodies the queen accepts and the worker runs: one definition for both sides.

Unknown fields are refused rather than ignored: a client that sends a parameter we would silently drop
gets a 400 naming it. Parameters that OpenAI defines but this project cannot honour yet are listed in
`UNSUPPORTED_CHAT_PARAMETERS` and refused the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CHAT_COMPLETIONS_PATH = "/v1/chat/completions"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Strict):
    """A text part of a message's content list."""

    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    """The function named by an assistant's tool call."""

    name: str
    arguments: str


class ToolCall(_Strict):
    """A tool call made by the assistant in an earlier turn."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Strict):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def text(self) -> str:
        """The content as one string: text parts are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(_Strict):
    """Options that apply only when streaming."""

    include_usage: bool = False


class FunctionDefinition(_Strict):
    """A function the model may call."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    """A tool the model may call."""

    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoiceFunction(_Strict):
    """The function named in a tool_choice."""

    name: str


class NamedToolChoice(_Strict):
    """tool_choice that forces one function."""

    type: Literal["function"]
    function: NamedToolChoiceFunction


class JsonSchemaFormat(_Strict):
    """The schema of a json_schema response_format."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatText(_Strict):
    """Plain text output (the default)."""

    type: Literal["text"]


class ResponseFormatJsonObject(_Strict):
    """Any valid JSON object."""

    type: Literal["json_object"]


class ResponseFormatJsonSchema(_Strict):
    """JSON that matches a schema."""

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class ChatCompletionRequest(_Strict):
    """The body of POST /v1/chat/completions."""

    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    user: str | None = None
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Not OpenAI's, but sent by common benchmark tools: generate exactly max_tokens.
    ignore_eos: bool = False
    # llama.cpp sampling extensions that llama.cpp-based servers accept.
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0)

    @field_validator("stop")
    @classmethod
    def _at_most_four_stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.tool_choice is not None and self.tool_choice != "none" and not self.tools:
            raise ValueError("tool_choice requires tools")
        return self

    @property
    def token_limit(self) -> int | None:
        """The output token limit, whichever of the two OpenAI names was used."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage


UNSUPPORTED_CHAT_PARAMETERS: dict[str, str] = {
    "tools": "tool calling is not supported yet",
    "tool_choice": "tool calling is not supported yet",
    "parallel_tool_calls": "tool calling is not supported yet",
}
"""Parameters the schema accepts but the engine cannot honour yet, with the reason; refused with 400."""


def unsupported_parameter(request: ChatCompletionRequest) -> tuple[str, str] | None:
    """The first parameter set in `request` that cannot be honoured, with the reason, or None."""
    for name, reason in UNSUPPORTED_CHAT_PARAMETERS.items():
        if getattr(request, name) is not None:
            return name, reason
    if request.n is not None and request.n > 1:
        return "n", "only n=1 is supported"
    return None
