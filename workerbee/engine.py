"""The interface the connection talks to: an `Engine` runs OpenAI requests and streams their chunks.

llama_engine.py's `LlamaEngine` is the one the worker runs (every request in one continuous batch per
model, batching.py); tests stand in fakes that have the same methods. The engine's errors are in
errors.py and re-exported here for the connection.
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from protocol import ModelInfo, Resume, Usage
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from workerbee.errors import Cancelled, EngineError, ModelLoadError

__all__ = ["Cancelled", "ChunkSink", "Engine", "EngineError", "ModelLoadError"]

ChunkSink = Callable[[dict[str, Any], int], Awaitable[None]]
"""Takes a streamed chunk and the number of generated tokens whose text it carries (0: role, finish)."""


class Engine(Protocol):
    """What runs a worker's requests. Each method raises EngineError for what it refuses, and Cancelled
    (with the usage so far) when `cancel` is set before it ends; cancelling the coroutine stops the
    request at the next token."""

    def model_infos(self) -> list[ModelInfo]:
        """What the worker advertises."""
        ...

    async def chat(
        self,
        chat: ChatCompletionRequest,
        cancel: threading.Event,
        on_chunk: ChunkSink,
        resume: Resume | None = None,
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run a chat completion: streamed chunks go to `on_chunk`; the whole response (None if streamed).

        With `resume`, continue another worker's answer from the tokens it relayed; the connection
        passes one only to jobs that carry it.
        """
        ...

    async def complete(
        self,
        request: CompletionRequest,
        cancel: threading.Event,
        on_chunk: ChunkSink,
        resume: Resume | None = None,
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run a text completion: streamed chunks go to `on_chunk`; the whole response (None if streamed).

        `resume` as for `chat`.
        """
        ...

    async def embed(self, request: EmbeddingRequest, cancel: threading.Event) -> tuple[Usage, dict[str, Any]]:
        """Compute embeddings for every input of the request."""
        ...

    async def count_prompt_tokens(self, chat: ChatCompletionRequest) -> int:
        """The prompt tokens the model's chat template makes of `chat` (tools included); generates nothing."""
        ...
