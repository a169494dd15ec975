"""The engine: owns the llama.cpp models and runs requests on them, never on the event loop.

Each model has one thread of its own: llama.cpp contexts are not thread-safe, so requests for a model
run one after the other on that thread while the event loop stays free to talk to the queen.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol import ErrorCode, ModelInfo, Usage
from protocol.openai import ChatCompletionRequest, ChatMessage

log = logging.getLogger("workerbee.engine")

ChunkSink = Callable[[dict[str, Any]], Awaitable[None]]


class EngineError(Exception):
    """A request the engine cannot run; `code` says whose fault it is."""

    def __init__(self, code: ErrorCode, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


class ModelLoadError(Exception):
    """A model file that cannot be loaded; the message is one line for the user."""


class Cancelled(Exception):
    """Raised inside generation when the request was cancelled."""


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


class _TokenCounter:
    """A llama.cpp logits processor that counts sampled tokens, stops cancelled requests, and can ban EOS."""

    def __init__(self, cancel: threading.Event, banned_token: int | None) -> None:
        self.cancel = cancel
        self.banned_token = banned_token
        self.sampled = 0

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        if self.cancel.is_set():
            raise Cancelled
        self.sampled += 1
        if self.banned_token is not None:
            scores[self.banned_token] = -np.inf
        return scores


def _llama_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    converted: list[dict[str, Any]] = []
    for message in messages:
        # Chat templates know system but rarely developer, OpenAI's newer name for the same role.
        role = "system" if message.role == "developer" else message.role
        item: dict[str, Any] = {"role": role, "content": message.text()}
        if message.name is not None:
            item["name"] = message.name
        if message.tool_call_id is not None:
            item["tool_call_id"] = message.tool_call_id
        converted.append(item)
    return converted


def _sampling_kwargs(chat: ChatCompletionRequest) -> dict[str, Any]:
    """llama-cpp-python arguments for a request, with OpenAI's defaults where the client sent nothing."""
    kwargs: dict[str, Any] = {
        "temperature": 1.0 if chat.temperature is None else chat.temperature,
        "top_p": 1.0 if chat.top_p is None else chat.top_p,
        # OpenAI has no top_k or min_p: off unless the client asks for llama.cpp's extensions.
        "top_k": 0 if chat.top_k is None else chat.top_k,
        "min_p": 0.0 if chat.min_p is None else chat.min_p,
        "presence_penalty": chat.presence_penalty or 0.0,
        "frequency_penalty": chat.frequency_penalty or 0.0,
        "repeat_penalty": 1.0 if chat.repeat_penalty is None else chat.repeat_penalty,
        "max_tokens": chat.token_limit,
        "stop": chat.stop if chat.stop is not None else [],
        "seed": chat.seed,
    }
    if chat.logit_bias:
        kwargs["logit_bias"] = {int(token): bias for token, bias in chat.logit_bias.items()}
    if chat.logprobs:
        kwargs["logprobs"] = True
        kwargs["top_logprobs"] = chat.top_logprobs or 0
    if chat.response_format is not None and chat.response_format.type != "text":
        kwargs["response_format"] = chat.response_format.model_dump(by_alias=True, exclude_none=True)
    return kwargs


class LoadedModel:
    """One llama.cpp model and the single thread that may touch it."""

    def __init__(self, config: ModelConfig, llama: Any) -> None:
        self.config = config
        self.llama = llama
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llama-{config.id[:16]}")
        self._formatter = self._chat_formatter()

    def _chat_formatter(self) -> Any:
        from llama_cpp import llama_chat_format

        template = self.llama.metadata.get("tokenizer.chat_template")
        if template is None:
            return None
        vocab = self.llama._model
        eos = self.llama.token_eos()
        bos = self.llama.token_bos()
        return llama_chat_format.Jinja2ChatFormatter(
            template=template,
            eos_token=vocab.token_get_text(eos) if eos != -1 else "",
            bos_token=vocab.token_get_text(bos) if bos != -1 else "",
            stop_token_ids=[eos],
        )

    def count_prompt_tokens(self, messages: list[dict[str, Any]]) -> int | None:
        """Tokens the chat template makes of `messages`, as llama-cpp-python feeds them; None if unknown."""
        if self._formatter is None:
            return None
        result = self._formatter(messages=messages)
        tokens = self.llama.tokenize(
            result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True
        )
        return len(tokens)

    def info(self) -> ModelInfo:
        """How the model is advertised to the queen."""
        return ModelInfo(
            id=self.config.id,
            n_ctx=self.config.n_ctx,
            size_bytes=self.config.size_bytes,
            n_gpu_layers=self.config.n_gpu_layers,
            embeddings=self.config.embeddings,
        )

    def run_chat(
        self,
        chat: ChatCompletionRequest,
        cancel: threading.Event,
        emit: Callable[[dict[str, Any]], None],
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Generate an answer (blocking; runs on the model's thread). Streams through `emit` if asked."""
        if cancel.is_set():
            raise Cancelled
        messages = _llama_messages(chat.messages)
        prompt_tokens = self.count_prompt_tokens(messages)
        if prompt_tokens is not None and prompt_tokens >= self.config.n_ctx:
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {self.config.n_ctx} tokens, "
                f"but the messages take {prompt_tokens} tokens.",
                "messages",
            )
        limit = chat.token_limit
        if prompt_tokens is not None and limit is not None and prompt_tokens + limit > self.config.n_ctx:
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {self.config.n_ctx} tokens. However, you "
                f"requested {prompt_tokens + limit} tokens ({prompt_tokens} in the messages, "
                f"{limit} in the completion).",
                "max_tokens",
            )
        counter = _TokenCounter(cancel, self.llama.token_eos() if chat.ignore_eos else None)
        kwargs = _sampling_kwargs(chat)
        try:
            if not chat.stream:
                response = self.llama.create_chat_completion(
                    messages=messages, stream=False, logits_processor=[counter], **kwargs
                )
                usage = response.pop("usage")
                return Usage(**usage), response
            finish_reason: str | None = None
            for chunk in self.llama.create_chat_completion(
                messages=messages, stream=True, logits_processor=[counter], **kwargs
            ):
                if cancel.is_set():
                    raise Cancelled
                for choice in chunk.get("choices", ()):
                    finish_reason = choice.get("finish_reason") or finish_reason
                emit(chunk)
        except ValueError as exc:
            # llama-cpp-python's own context check, should the template count above have missed it.
            raise EngineError(ErrorCode.INVALID_REQUEST, str(exc)) from None
        # The token that ended generation by EOS was sampled but is not part of the answer.
        completion = max(0, counter.sampled - (1 if finish_reason == "stop" else 0))
        prompt = prompt_tokens or 0
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        ), None

    def close(self) -> None:
        """Free the model and its thread."""
        self.executor.shutdown(wait=True)
        self.llama.close()


def load_model(config: ModelConfig, *, threads: int) -> LoadedModel:
    """Load a GGUF with llama.cpp (blocking). Raises ModelLoadError with one clear line."""
    from llama_cpp import Llama

    if not config.path.is_file():
        raise ModelLoadError(f"model file not found: {config.path}")
    try:
        llama = Llama(
            model_path=str(config.path),
            n_ctx=config.n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            n_gpu_layers=config.n_gpu_layers,
            tensor_split=list(config.tensor_split) if config.tensor_split else None,
            main_gpu=config.main_gpu,
            embedding=config.embeddings,
            verbose=False,
        )
    except (ValueError, RuntimeError, OSError) as exc:
        raise ModelLoadError(f"could not load {config.path}: {exc}") from None
    return LoadedModel(config, llama)


class Engine:
    """Every model this worker serves, and the way requests reach them."""

    def __init__(self, models: dict[str, LoadedModel]) -> None:
        self.models = models

    @classmethod
    async def load(cls, configs: list[ModelConfig], *, threads: int) -> Engine:
        """Load every model off the event loop."""
        models: dict[str, LoadedModel] = {}
        for config in configs:
            log.info("loading model %s from %s", config.id, config.path)
            models[config.id] = await asyncio.to_thread(load_model, config, threads=threads)
        return cls(models)

    def model_infos(self) -> list[ModelInfo]:
        """What the worker advertises."""
        return [model.info() for model in self.models.values()]

    async def chat(
        self, chat: ChatCompletionRequest, cancel: threading.Event, on_chunk: ChunkSink
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run a chat completion; streamed chunks go to `on_chunk` as they are produced.

        If this coroutine is cancelled, generation stops at the next token.
        """
        model = self.models.get(chat.model)
        if model is None:
            raise EngineError(
                ErrorCode.MODEL_NOT_FOUND, f"this worker does not serve '{chat.model}'", "model"
            )
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

        def emit(chunk: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)

        def work() -> tuple[Usage, dict[str, Any] | None]:
            try:
                return model.run_chat(chat, cancel, emit)
            finally:
                loop.call_soon_threadsafe(chunks.put_nowait, None)

        future = loop.run_in_executor(model.executor, work)
        try:
            while (chunk := await chunks.get()) is not None:
                await on_chunk(chunk)
            return await future
        finally:
            if not future.done():
                cancel.set()

    def close(self) -> None:
        """Free every model."""
        for model in self.models.values():
            model.close()
