"""A whole (non-streamed) answer as the queen counts and audits it: its choices' ids, text and ends.

A worker names the ids behind each choice of a whole chat or text completion in its `Result`
(`Result.token_ids`, in the order of the response's choices). Read into an `AnswerSoFar`, the same
record a stream fills chunk by chunk, a whole answer is counted by its ids (`usage_check.counted_by_ids`)
and audited (queenbee/auditing.py) exactly as a stream is.
"""

from __future__ import annotations

from typing import Any

from queenbee.resume import AnswerSoFar


def whole_answer(response: dict[str, Any], token_ids: list[list[int]] | None) -> AnswerSoFar:
    """The ids, text and finish reason of each choice; not `resumable` (uncountable) without one list
    of ids per choice."""
    choices = response.get("choices")
    answer = AnswerSoFar()
    if token_ids is None or not isinstance(choices, list) or len(choices) != len(token_ids):
        answer.resumable = False
        return answer
    for choice, ids in zip(choices, token_ids, strict=True):
        index = choice.get("index") if isinstance(choice, dict) else None
        if not isinstance(index, int) or index in answer.ids:
            answer.resumable = False
            return answer
        answer.ids[index] = list(ids)
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        if isinstance(text, str) and text:
            answer.texts[index] = [text]
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            answer.finished.add(index)
            answer.finish_reasons[index] = reason
    return answer
