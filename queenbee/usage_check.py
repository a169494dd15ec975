"""What a worker may claim a request used: bounds the queen derives from the request and the answer.

Workers are strangers paid per token, so the usage they report is checked before it is credited or
billed. From the request alone the queen knows the most a request can produce (choices times
`max_tokens`, never more than the context) and roughly how long its prompt can be (every prompt token
covers at least one byte of the body, plus the chat template's own tokens); from the answer it knows
how much text was relayed, and a generated token always carries at least one byte of text, except the
end-of-text token and text withheld as a stop sequence or tool-call framing.

The bounds are generous on purpose: an honest worker never trips them; a worker that inflates its
counts by more than a few tokens does, and its figures are cut down to the bounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from protocol import Usage
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from queenbee.resume import AnswerSoFar

TEMPLATE_TOKENS_PER_MESSAGE: Final = 32
"""Tokens a chat template may add around each message (role markers, separators)."""

TEMPLATE_TOKENS: Final = 1024
"""Tokens a worker may add to a prompt on its own (a system prompt describing the tools, say)."""

UNRELAYED_TOKENS_PER_CHOICE: Final = 16
"""Tokens a choice may generate without relaying their text: the end token, stripped white space."""

TOOL_FRAMING_TOKENS: Final = 128
"""Tokens of a tool call's JSON framing, which is generated but relayed as structured fields."""


@dataclass(frozen=True)
class UsageBounds:
    """The most a request may use, as far as the queen can tell from the request itself."""

    max_prompt_tokens: int
    max_completion_tokens: int
    choices: int
    unrelayed_per_choice: int
    """Completion tokens a choice may produce beyond one per byte of text relayed."""
    prompt_estimate: int
    """A rough prompt size for reserving a key's tokens per minute before the worker has counted."""

    @property
    def reservation(self) -> int:
        """Tokens to reserve against the key's limit while the request runs."""
        return self.prompt_estimate + self.max_completion_tokens


NO_BOUNDS: Final = UsageBounds(0, 0, 1, 0, 0)
"""The bounds of a request refused before it could be sized: it may use nothing."""


@dataclass(frozen=True)
class CheckedUsage:
    """A worker's usage after the check: the figures to record, and what was wrong, if anything."""

    prompt_tokens: int
    completion_tokens: int
    violation: str | None = None


def _prompt_tokens(prompt: str | list[int]) -> int:
    # Token ids are counted as given (plus a BOS and an EOS); text as one token per byte at most.
    return len(prompt) + 2 if isinstance(prompt, list) else len(prompt.encode()) + 8


def _stop_bytes(stop: str | list[str] | None) -> int:
    stops = [stop] if isinstance(stop, str) else stop or []
    return sum(len(text.encode()) for text in stops)


def usage_bounds(
    request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest, body_bytes: int, n_ctx: int
) -> UsageBounds:
    """The bounds of a request of `body_bytes` bytes on a model loaded with a context of `n_ctx`."""
    estimate = body_bytes // 4 + 1
    if isinstance(request, EmbeddingRequest):
        inputs = request.inputs
        prompt = min(n_ctx * len(inputs), sum(_prompt_tokens(item) for item in inputs))
        return UsageBounds(prompt, 0, len(inputs), 0, min(prompt, estimate))
    if isinstance(request, ChatCompletionRequest):
        choices = request.n or 1
        prompt = min(
            n_ctx, body_bytes + TEMPLATE_TOKENS_PER_MESSAGE * len(request.messages) + TEMPLATE_TOKENS
        )
        framing = TOOL_FRAMING_TOKENS if request.tool_mode != "none" else 0
    else:
        prompts = request.prompts
        choices = (request.n or 1) * len(prompts)
        prompt = min(n_ctx * len(prompts), sum(_prompt_tokens(item) for item in prompts))
        framing = 0
    limit = request.token_limit
    per_choice = n_ctx if limit is None else min(limit, n_ctx)
    unrelayed = UNRELAYED_TOKENS_PER_CHOICE + _stop_bytes(request.stop) + framing
    return UsageBounds(prompt, choices * per_choice, choices, unrelayed, min(prompt, estimate))


def _utf8(value: Any) -> int:
    return len(value.encode()) if isinstance(value, str) else 0


def _message_bytes(part: dict[str, Any]) -> int:
    size = _utf8(part.get("content")) + _utf8(part.get("refusal"))
    for call in part.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if isinstance(function, dict):
            size += _utf8(function.get("name")) + _utf8(function.get("arguments"))
    return size


def text_bytes(payload: dict[str, Any] | None) -> int:
    """Bytes of generated text in a chunk or a whole response (content, tool calls, completion text)."""
    choices = payload.get("choices") if payload else None
    if not isinstance(choices, list):
        return 0
    size = 0
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        for key in ("delta", "message"):
            part = choice.get(key)
            if isinstance(part, dict):
                size += _message_bytes(part)
        size += _utf8(choice.get("text"))
    return size


def chunk_tokens(claimed: int, payload: dict[str, Any]) -> int:
    """The tokens a chunk may be said to carry: what the worker claims, at most one per byte plus one."""
    return min(claimed, text_bytes(payload) + 1)


def counted_by_ids(usage: Usage, answer: AnswerSoFar) -> Usage:
    """An answer's usage with its completion count no higher than the token ids the worker relayed.

    Every chunk of a stream names the ids of its tokens, and a whole answer's Result those of each
    choice (queenbee/whole_answers.py); the queen counts those, not the worker's word (a worker that
    reports one token more than it sent is not paid for it). Answers that did not name all their ids
    keep the bounded count of `check_usage`.
    """
    relayed = sum(len(ids) for ids in answer.ids.values())
    if not answer.resumable or relayed == 0 or usage.completion_tokens <= relayed:
        return usage
    return usage.model_copy(
        update={"completion_tokens": relayed, "total_tokens": usage.prompt_tokens + relayed}
    )


def check_usage(usage: Usage, bounds: UsageBounds, *, generated_text_bytes: int | None) -> CheckedUsage:
    """`usage` within `bounds`, given the bytes of text the worker relayed (None: not applicable)."""
    problems: list[str] = []
    prompt, completion = usage.prompt_tokens, usage.completion_tokens
    if usage.total_tokens != prompt + completion:
        problems.append(f"total_tokens {usage.total_tokens} is not prompt_tokens + completion_tokens")
    if prompt > bounds.max_prompt_tokens:
        problems.append(f"prompt_tokens {prompt} exceeds the request's bound {bounds.max_prompt_tokens}")
        prompt = bounds.max_prompt_tokens
    most = bounds.max_completion_tokens
    if generated_text_bytes is not None:
        most = min(most, generated_text_bytes + bounds.choices * bounds.unrelayed_per_choice)
    if completion > most:
        problems.append(
            f"completion_tokens {completion} exceeds what the request and its answer allow ({most})"
        )
        completion = most
    violation = "; ".join(problems)[:500] if problems else None
    return CheckedUsage(prompt, completion, violation)
