"""The engine the worker runs: every model it serves, each one `BatchedModel` (batching.py).

Each model has one decoding thread and one KV cache: chat, tools, structured outputs, log
probabilities, n choices and text completions all run in its batch, up to `--parallel` sequences at
once (a request with n choices takes n of them); embeddings run in a pooled context of their own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from protocol import ErrorCode, ModelInfo, Resume, Usage
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from workerbee.batching import BatchedModel
from workerbee.engine import ChunkSink
from workerbee.errors import EngineError
from workerbee.prefix_cache import Block
from workerbee.prompts import ModelConfig

__all__ = ["LlamaEngine", "ModelConfig"]

log = logging.getLogger("workerbee.engine")


class LlamaEngine:
    """Every model this worker serves, and the way requests reach them (an Engine, see engine.py)."""

    def __init__(self, models: dict[str, BatchedModel]) -> None:
        self.models = models

    @classmethod
    async def load(
        cls, configs: list[ModelConfig], *, threads: int | None = None, parallel: int = 1
    ) -> LlamaEngine:
        """Load every model off the event loop, each batching `parallel` sequences.

        `threads` None: each model measures the fastest thread count once loaded (threads.py).
        """
        models: dict[str, BatchedModel] = {}
        try:
            for config in configs:
                log.info("loading model %s from %s", config.id, config.path)
                models[config.id] = await asyncio.to_thread(
                    BatchedModel.load, config, parallel=parallel, threads=threads
                )
        except BaseException:
            for model in models.values():
                model.close()
            raise
        return cls(models)

    def cache_state(self) -> dict[str, tuple[int, list[Block]]]:
        """Per model, the version of what its caches hold and the prefixes they hold (any thread)."""
        return {
            model_id: (model.cache_version, model.cached_prefixes())
            for model_id, model in self.models.items()
        }

    def watch_cache(self, callback: Callable[[], None]) -> None:
        """Call `callback` (from a decoding thread) whenever a model's cached prefixes change."""
        for model in self.models.values():
            model.scheduler.on_cache_change = callback

    async def add(self, config: ModelConfig, *, parallel: int, threads: int | None) -> None:
        """Load one more model off the event loop and serve it (a fine-tuned one, say)."""
        if config.id in self.models:
            raise ValueError(f"this worker already serves '{config.id}'")
        log.info("loading model %s from %s", config.id, config.path)
        model = await asyncio.to_thread(BatchedModel.load, config, parallel=parallel, threads=threads)
        watching = next(iter(self.models.values()), None)
        if watching is not None:
            model.scheduler.on_cache_change = watching.scheduler.on_cache_change
        self.models[config.id] = model

    def model_infos(self) -> list[ModelInfo]:
        """What the worker advertises."""
        return [model.info() for model in self.models.values()]

    def model(self, model_id: str) -> BatchedModel:
        """The model clients call `model_id`; EngineError if this worker does not serve it."""
        model = self.models.get(model_id)
        if model is None:
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"this worker does not serve '{model_id}'", "model")
        return model

    async def chat(
        self,
        chat: ChatCompletionRequest,
        cancel: threading.Event,
        on_chunk: ChunkSink,
        resume: Resume | None = None,
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run (or, with `resume`, continue) a chat completion; streamed chunks go to `on_chunk`."""
        return await self.model(chat.model).chat(chat, cancel, on_chunk, resume)

    async def complete(
        self,
        request: CompletionRequest,
        cancel: threading.Event,
        on_chunk: ChunkSink,
        resume: Resume | None = None,
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run (or, with `resume`, continue) a text completion; streamed chunks go to `on_chunk`."""
        return await self.model(request.model).complete(request, cancel, on_chunk, resume)

    async def embed(self, request: EmbeddingRequest, cancel: threading.Event) -> tuple[Usage, dict[str, Any]]:
        """Compute embeddings for every input of the request."""
        return await self.model(request.model).embed(request, cancel)

    async def count_prompt_tokens(self, chat: ChatCompletionRequest) -> int:
        """The prompt tokens of a chat request, tools included (the tokenizer runs off the event loop)."""
        model = self.model(chat.model)
        return len(await asyncio.to_thread(model.prompts.chat_prompt, chat))

    def close(self) -> None:
        """Free every model."""
        for model in self.models.values():
            model.close()
