"""The OpenAI request bodies the queen accepts and the worker runs: one definition for both sides.

Unknown fields are refused rather than ignored: a client that sends a parameter we would silently drop
gets a 400 naming it. Parameters that OpenAI defines but this project cannot honour are listed in
`UNSUPPORTED_CHAT_PARAMETERS` / `UNSUPPORTED_COMPLETION_PARAMETERS` (or checked by `unsupported_parameter`)
and refused the same way.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    field_validator,
    model_validator,
)

MAX_STOP_SEQUENCES = 4
INT32_MAX = 2**31 - 1
"""Bound of token counts, token ids and top_k: llama.cpp keeps them in 32-bit integers."""
MAX_EMBEDDING_INPUTS = 2048


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


_RESPONSE_FORMAT_TAGS = {
    "text": "ResponseFormatText",
    "json_object": "ResponseFormatJsonObject",
    "json_schema": "ResponseFormatJsonSchema",
}


def _response_format_tag(value: Any) -> str | None:
    # Tags named like the classes keep error locations free of field-like names (`json_schema` is
    # both a tag and a field), so the HTTP edge can name the parameter at fault exactly.
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return _RESPONSE_FORMAT_TAGS.get(kind) if isinstance(kind, str) else None


ResponseFormat = Annotated[
    Annotated[ResponseFormatText, Tag("ResponseFormatText")]
    | Annotated[ResponseFormatJsonObject, Tag("ResponseFormatJsonObject")]
    | Annotated[ResponseFormatJsonSchema, Tag("ResponseFormatJsonSchema")],
    Discriminator(
        _response_format_tag,
        custom_error_type="invalid_response_format",
        custom_error_message="type must be 'text', 'json_object' or 'json_schema'",
    ),
]


def _check_stops(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list):
        if len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not stop for stop in value):
            raise ValueError("stop sequences must not be empty")
    return value


def _check_stream_options(value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
    if value is not None and not info.data.get("stream"):
        raise ValueError("stream_options is only allowed when stream is true")
    return value


def _check_logit_bias(value: dict[str, float] | None) -> dict[str, float] | None:
    for token, bias in (value or {}).items():
        if not (token.isascii() and token.isdigit() and len(token) <= 10 and int(token) <= INT32_MAX):
            raise ValueError(f"keys must be token ids, got {token[:20]!r}")
        if not -100 <= bias <= 100:
            raise ValueError(f"biases must be between -100 and 100, got {bias}")
    return value


class _GenerationRequest(_Strict):
    """What chat and text completions share: the model, streaming, and sampling."""

    model: str = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int | None = Field(default=None, ge=1, le=16)
    stop: str | list[str] | None = None
    # 64 bits, signed or not: what any client's seed fits in; anything wider is not a seed.
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Not OpenAI's, but sent by common benchmark tools: generate exactly max_tokens.
    ignore_eos: bool = False
    # llama.cpp sampling extensions that llama.cpp-based servers accept.
    top_k: int | None = Field(default=None, ge=0, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, ge=0, le=100)

    _stops = field_validator("stop")(_check_stops)
    _bias = field_validator("logit_bias")(_check_logit_bias)
    # Field validators rather than a model validator, so that an error names the parameter at fault.
    _stream_options = field_validator("stream_options")(_check_stream_options)

    @property
    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def sequences(self) -> int:
        """Sequences a worker generates at once for the request: one per choice (and prompt)."""
        return self.n or 1


class ChatCompletionRequest(_GenerationRequest):
    """The body of POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    # A choice makes at most one call, which both values allow: true permits parallel calls, not requires.
    parallel_tool_calls: bool | None = None
    # OpenAI's cache routing hint: requests with the same key go to the worker that has their prefix.
    prompt_cache_key: str | None = Field(default=None, max_length=1024)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs requires logprobs to be true")
        return value

    @field_validator("tools")
    @classmethod
    def _distinct_tools(cls, value: list[Tool] | None) -> list[Tool] | None:
        names = [tool.function.name for tool in value or ()]
        if len(set(names)) != len(names):
            raise ValueError("tools must have distinct function names")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_needs_tools(
        cls, value: Literal["none", "auto", "required"] | NamedToolChoice | None, info: ValidationInfo
    ) -> Literal["none", "auto", "required"] | NamedToolChoice | None:
        tools: list[Tool] = info.data.get("tools") or []
        if value is not None and value != "none" and not tools:
            raise ValueError("tool_choice requires tools")
        if isinstance(value, NamedToolChoice) and value.function.name not in {t.function.name for t in tools}:
            raise ValueError(f"the function '{value.function.name}' is not in tools")
        return value

    @property
    def token_limit(self) -> int | None:
        """The output token limit, whichever of the two OpenAI names was used."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def tool_mode(self) -> Literal["none", "auto", "required"] | str:
        """How tools are used: none, auto, required, or the name of the one function that must be called."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return self.tool_choice.function.name
        return self.tool_choice or "auto"


TokenIds = Annotated[list[Annotated[int, Field(ge=0, le=INT32_MAX)]], Field(min_length=1)]
"""A prompt or input given as token ids."""


class CompletionRequest(_GenerationRequest):
    """The body of POST /v1/completions (OpenAI's legacy text completions)."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    # OpenAI's default for this endpoint is 16 tokens; null means "up to the context length".
    max_tokens: int | None = Field(default=16, ge=0, le=INT32_MAX)
    best_of: int | None = Field(default=None, ge=1, le=20)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    @property
    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request: one text or token list each."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [[int(item) for item in self.prompt]]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    @property
    def token_limit(self) -> int | None:
        """The output token limit per choice; None means up to the context length."""
        return self.max_tokens

    @property
    def sequences(self) -> int:
        """Sequences a worker generates at once for the request: n choices for every prompt."""
        return (self.n or 1) * len(self.prompts)


class EmbeddingRequest(_Strict):
    """The body of POST /v1/embeddings."""

    model: str = Field(min_length=1, max_length=256)
    input: (
        Annotated[str, Field(min_length=1)]
        | Annotated[
            list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)
        ]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    )
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1, le=65536)
    user: str | None = None

    @property
    def inputs(self) -> list[str | list[int]]:
        """Every input of the request: one text or token list each."""
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, int) for item in self.input):
            return [[int(item) for item in self.input]]  # type: ignore[arg-type]
        return list(self.input)  # type: ignore[arg-type]


UNSUPPORTED_CHAT_PARAMETERS: dict[str, str] = {}
"""Chat parameters the schema accepts but the engine cannot honour, with the reason; refused with 400.

Empty: every chat parameter of OpenAI's schema that the request model accepts is implemented. Value
combinations that cannot be honoured are refused by `unsupported_parameter`.
"""

UNSUPPORTED_COMPLETION_PARAMETERS: dict[str, str] = {
    "suffix": "insertion before a suffix (fill-in-the-middle) is not supported",
}
"""Text-completion parameters that cannot be honoured, with the reason; refused with 400."""


def unsupported_parameter(
    request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
) -> tuple[str, str] | None:
    """The first parameter set in `request` that cannot be honoured, with the reason, or None."""
    if isinstance(request, ChatCompletionRequest):
        for name, reason in UNSUPPORTED_CHAT_PARAMETERS.items():
            if getattr(request, name) is not None:
                return name, reason
        if (
            request.tool_mode != "none"
            and request.response_format is not None
            and request.response_format.type != "text"
        ):
            return "response_format", "a JSON response_format cannot be combined with tool calls"
    elif isinstance(request, CompletionRequest):
        for name, reason in UNSUPPORTED_COMPLETION_PARAMETERS.items():
            if getattr(request, name) not in (None, ""):
                return name, reason
        if request.best_of is not None and request.best_of > 1:
            return "best_of", "only best_of=1 is supported"
        if request.echo and request.logprobs is not None:
            return "echo", "echo cannot be combined with logprobs (prompt log probabilities are not computed)"
    return None
