"""What the client has of an answer, in token ids: enough for another worker to continue it exactly.

Sans-I/O: forwarding.py feeds every chunk it relays to an `AnswerSoFar` and, when the worker under the
stream fails, asks it for the `Resume` a job carries to the next worker (docs/resume.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol import Chunk, Delta, Resume, ResumedChoice
from protocol.openai import ChatCompletionRequest, CompletionRequest


@dataclass
class AnswerSoFar:
    """The ids of the tokens relayed for each choice, and the choices whose end was relayed."""

    ids: dict[int, list[int]] = field(default_factory=dict)
    finished: set[int] = field(default_factory=set)
    texts: dict[int, list[str]] = field(default_factory=dict)
    """The text relayed for each choice, in pieces (content or completion text): what audits compare."""
    finish_reasons: dict[int, str] = field(default_factory=dict)
    resumable: bool = True
    """False once a chunk carried tokens it did not name: such an answer cannot be continued."""

    def relayed(self, chunk: Chunk) -> None:
        """A chunk reached the client."""
        choices = chunk.chunk.get("choices")
        choices = choices if isinstance(choices, list) else []
        if chunk.tokens and (
            chunk.token_ids is None or len(chunk.token_ids) != chunk.tokens or len(choices) != 1
        ):
            self.resumable = False
        for choice in choices:
            index = choice.get("index", 0) if isinstance(choice, dict) else None
            if not isinstance(index, int):
                self.resumable = False
                continue
            if chunk.token_ids:
                self.ids.setdefault(index, []).extend(chunk.token_ids)
            delta = choice.get("delta")
            text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
            if isinstance(text, str) and text:
                self.texts.setdefault(index, []).append(text)
            reason = choice.get("finish_reason")
            if reason is not None:
                self.finished.add(index)
                if isinstance(reason, str):
                    self.finish_reasons[index] = reason

    def relayed_text(self, delta: Delta) -> None:
        """A Delta reached the client: new text for one choice."""
        if delta.tokens and (delta.token_ids is None or len(delta.token_ids) != delta.tokens):
            self.resumable = False
        if delta.token_ids:
            self.ids.setdefault(delta.index, []).extend(delta.token_ids)
        if delta.text:
            self.texts.setdefault(delta.index, []).append(delta.text)

    def resume(self, request: ChatCompletionRequest | CompletionRequest) -> Resume | None:
        """The unfinished choices of `request` as a resume; None if there are none or it cannot be."""
        if not self.resumable:
            return None
        if isinstance(request, ChatCompletionRequest):
            n = request.n or 1
        else:
            n = (request.n or 1) * len(request.prompts)
        limit = request.token_limit
        choices = [
            ResumedChoice(
                index=index,
                token_ids=self.ids.get(index, []),
                budget=None if limit is None else max(0, limit - len(self.ids.get(index, []))),
            )
            for index in range(n)
            if index not in self.finished
        ]
        return Resume(choices=choices) if choices else None
