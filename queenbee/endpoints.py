"""The endpoints the queen forwards to workers: the job kind each becomes and the names its answers carry."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from protocol import ChatJob, CompletionJob, EmbeddingJob, JobRequest, Resume, TokenCountJob
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest

OpenAIRequest = ChatCompletionRequest | CompletionRequest | EmbeddingRequest
"""The validated request bodies a job carries."""


@dataclass(frozen=True)
class Endpoint:
    """An endpoint the queen forwards: the job kind it becomes, and the names its answers carry."""

    path: str
    job: Callable[..., JobRequest]
    """Wraps the validated request into the job kind the worker runs."""
    object_name: str
    chunk_object: str
    id_prefix: str
    embeddings: bool = False
    """Served only by workers that run the model with embeddings; its answers carry no id or created."""
    generates: bool = True
    """Whether the worker generates tokens, so that its speed can be measured from the answer."""

    @property
    def resumable(self) -> bool:
        """Whether its answers can continue on another worker: generated text, from token ids."""
        return self.job in (ChatJob, CompletionJob)

    def job_request(self, request: OpenAIRequest, resume: Resume | None = None) -> JobRequest:
        """The typed request of the job for `request` (continuing an answer, with `resume`)."""
        return self.job(body=request) if resume is None else self.job(body=request, resume=resume)


CHAT_COMPLETIONS = Endpoint(
    "/v1/chat/completions", ChatJob, "chat.completion", "chat.completion.chunk", "chatcmpl-"
)
COMPLETIONS = Endpoint("/v1/completions", CompletionJob, "text_completion", "text_completion", "cmpl-")
EMBEDDINGS = Endpoint(
    "/v1/embeddings", EmbeddingJob, "list", "list", "embd-", embeddings=True, generates=False
)
RESPONSES = Endpoint("/v1/responses", ChatJob, "chat.completion", "chat.completion.chunk", "resp_")
MESSAGES = Endpoint("/v1/messages", ChatJob, "chat.completion", "chat.completion.chunk", "msg_")
COUNT_TOKENS = Endpoint(
    "/v1/messages/count_tokens", TokenCountJob, "token_count", "token_count", "count_", generates=False
)
"""The Responses and Messages endpoints run chat jobs; their presenters translate the chat answers."""
