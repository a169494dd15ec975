"""What a request becomes before anything runs: prompt tokens, sampling parameters, a grammar, and the
checks that refuse it (context length, token ids, schemas, the chat template) as the client's fault.

Everything here is CPU work on the request's side (templating, tokenizing, schema conversion): the
engine runs it off the event loop and before the request reaches the batching thread.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from protocol import ErrorCode
from protocol.openai import ChatCompletionRequest, CompletionRequest
from workerbee import grammars, tool_calls
from workerbee.decoding import Sampling
from workerbee.errors import EngineError
from workerbee.llama_context import ModelWeights

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% endif %}"
)
"""The chat template for GGUF files that carry none."""


@dataclass(frozen=True)
class ModelConfig:
    """How to load one model."""

    id: str
    path: Path
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    tensor_split: tuple[float, ...] | None = None
    main_gpu: int = 0
    embeddings: bool = False
    size_bytes: int | None = None
    sha256: str | None = None
    """The GGUF's content hash (file_hash.py): resumes go only between workers with the same one."""
    cache_ram: int = 0
    """MiB of host RAM for evicted slot states (--cache-ram, cache_ram.py); 0: none."""


@dataclass(frozen=True)
class TextPrompt:
    """One prompt of a text completion: its tokens and its text (for `echo` and log-prob offsets)."""

    tokens: list[int]
    text: str


def request_sampling(
    request: ChatCompletionRequest | CompletionRequest, grammar: str | None = None
) -> Sampling:
    """The request's sampling parameters, with OpenAI's defaults where the client sent nothing."""
    if isinstance(request, ChatCompletionRequest):
        top_logprobs = (request.top_logprobs or 0) if request.logprobs else None
    else:
        top_logprobs = request.logprobs
    stop = request.stop
    return Sampling(
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p,
        # OpenAI has no top_k or min_p: off unless the client asks for llama.cpp's extensions.
        top_k=request.top_k or 0,
        min_p=request.min_p or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repeat_penalty=1.0 if request.repeat_penalty is None else request.repeat_penalty,
        logit_bias={int(token): bias for token, bias in (request.logit_bias or {}).items()},
        seed=request.seed,
        max_tokens=request.token_limit,
        stop=(stop,) if isinstance(stop, str) else tuple(stop or ()),
        ignore_eos=request.ignore_eos,
        top_logprobs=top_logprobs,
        grammar=grammar,
    )


def fingerprint(config: ModelConfig) -> str:
    """OpenAI's system_fingerprint: changes whenever what could change answers to a seeded request does."""
    try:
        llama_version = version("llama_cpp_python")
    except PackageNotFoundError:
        llama_version = "unknown"
    identity = f"{config.id}|{config.size_bytes}|{config.n_ctx}|{config.n_gpu_layers}|{llama_version}"
    return "fp_" + hashlib.sha256(identity.encode()).hexdigest()[:10]


class Prompts:
    """A model's chat template and tokenizer, and the checks every request passes before it runs."""

    def __init__(self, config: ModelConfig, weights: ModelWeights) -> None:
        from llama_cpp import llama_chat_format

        self.config = config
        self.weights = weights
        self.n_ctx = config.n_ctx
        self.template: str = weights.metadata.get("tokenizer.chat_template") or CHATML_TEMPLATE
        self.native_tools = tool_calls.template_knows_tools(self.template)
        self.fingerprint = fingerprint(config)
        self._formatter: Any = llama_chat_format.Jinja2ChatFormatter(
            template=self.template,
            eos_token=weights.token_text(weights.eos),
            bos_token=weights.token_text(weights.bos),
            stop_token_ids=[weights.eos],
        )

    def render_chat(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """The prompt tokens the chat template makes of `messages` (already in the template's terms)."""
        import jinja2

        try:
            result = self._formatter(messages=messages, tools=tools)
        except (ValueError, TypeError, jinja2.TemplateError) as exc:
            # Templates refuse conversations they cannot express (roles out of order, for one).
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"the model's chat template refused the messages: {exc}",
                "messages",
            ) from None
        return self.weights.tokenize(result.prompt, add_bos=not result.added_special, special=True)

    def chat_prompt(self, chat: ChatCompletionRequest) -> list[int]:
        """The prompt tokens of a chat request, tools included."""
        mode = chat.tool_mode
        messages = tool_calls.llama_messages(
            chat.messages, tools=chat.tools, mode=mode, native_tools=self.native_tools
        )
        tools = None
        if self.native_tools and mode != "none" and chat.tools:
            tools = [tool.model_dump(exclude_none=True) for tool in chat.tools]
        return self.render_chat(messages, tools)

    def completion_prompts(self, request: CompletionRequest) -> list[TextPrompt]:
        """Each prompt of a text completion as tokens and text (token-id prompts checked)."""
        prompts: list[TextPrompt] = []
        for text_or_tokens in request.prompts:
            if isinstance(text_or_tokens, str):
                tokens = self.weights.tokenize(text_or_tokens, add_bos=self.weights.add_bos, special=True)
                prompts.append(TextPrompt(tokens, text_or_tokens))
            else:
                self.check_token_ids(text_or_tokens, "prompt")
                prompts.append(TextPrompt(list(text_or_tokens), self.weights.detokenize(text_or_tokens)))
        return prompts

    def check_fits(self, prompt_tokens: int, request: ChatCompletionRequest | CompletionRequest) -> int:
        """Refuse a prompt (or max_tokens) the context cannot hold; returns the most tokens to generate."""
        n_ctx = self.n_ctx
        chat = isinstance(request, ChatCompletionRequest)
        what = "messages" if chat else "prompt"
        if prompt_tokens >= n_ctx:
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {n_ctx} tokens, "
                f"but the {what} {'take' if chat else 'takes'} {prompt_tokens} tokens.",
                what,
            )
        limit = request.token_limit
        if limit is not None and prompt_tokens + limit > n_ctx:
            param = (
                "max_completion_tokens"
                if isinstance(request, ChatCompletionRequest) and request.max_completion_tokens is not None
                else "max_tokens"
            )
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {n_ctx} tokens. However, you requested "
                f"{prompt_tokens + limit} tokens ({prompt_tokens} in the {what}, {limit} in the "
                "completion).",
                param,
            )
        room = n_ctx - prompt_tokens
        return room if limit is None else min(limit, room)

    def check_token_ids(self, tokens: list[int], param: str) -> None:
        """Refuse token ids outside the vocabulary, naming `param`."""
        n_vocab = self.weights.vocab.n_tokens
        bad = next((token for token in tokens if not 0 <= token < n_vocab), None)
        if bad is not None:
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"token id {bad} is out of range: the vocabulary has {n_vocab}",
                param,
            )

    def chat_grammar(self, chat: ChatCompletionRequest) -> tuple[str | None, str | None]:
        """The grammar a chat request's tools or response_format ask for, and the parameter it comes from.

        A schema the grammar cannot express is refused with the parameter at fault.
        """
        mode = chat.tool_mode
        if mode != "none" and chat.tools:
            for index, tool in enumerate(chat.tools):
                try:
                    grammars.json_schema_grammar(grammars.parameters_schema(tool))
                except grammars.GrammarError as exc:
                    raise EngineError(
                        ErrorCode.INVALID_REQUEST, str(exc), f"tools[{index}].function.parameters"
                    ) from None
            try:
                return grammars.tool_grammar(chat.tools, mode), "tools"
            except grammars.GrammarError as exc:
                raise EngineError(ErrorCode.INVALID_REQUEST, str(exc), "tools") from None
        param = "response_format.json_schema.schema"
        try:
            return grammars.response_format_grammar(chat.response_format), param
        except grammars.GrammarError as exc:
            raise EngineError(ErrorCode.INVALID_REQUEST, str(exc), param) from None
