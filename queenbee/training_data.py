"""Fine-tuning data in OpenAI's chat format: one JSON object a line, `{"messages": [...]}`.

Each line holds one chat: messages with a `role` (system, user or assistant) and a string `content`,
at least one of them the assistant's. Blank lines are skipped. The first bad line ends the check with
a `TrainingDataError` naming the line (counted from 1) and what is wrong with it.
"""

from __future__ import annotations

import json
from typing import Any, Final

ROLES: Final = frozenset({"system", "user", "assistant"})

MAX_EXAMPLE_MESSAGES: Final = 256
"""Messages one chat may have."""


class TrainingDataError(ValueError):
    """A training file that cannot be used; `line` is the line at fault (None: the whole file)."""

    def __init__(self, message: str, line: int | None = None) -> None:
        self.line = line
        super().__init__(message if line is None else f"line {line}: {message}")


def _message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(message) - {"role", "content"})
    if unknown:
        raise ValueError(f"{where} has an unsupported field '{unknown[0]}' (only role and content are)")
    role = message.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}.role must be one of system, user or assistant, not {json.dumps(role)}")
    content = message.get("content")
    if not isinstance(content, str):
        raise ValueError(f"{where}.content must be a string")
    return {"role": role, "content": content}


def _chat(line: dict[str, Any]) -> list[dict[str, Any]]:
    unknown = sorted(set(line) - {"messages"})
    if unknown:
        raise ValueError(f"unsupported field '{unknown[0]}' (a line holds only 'messages')")
    messages = line.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    if len(messages) > MAX_EXAMPLE_MESSAGES:
        raise ValueError(f"'messages' has {len(messages)} messages, more than {MAX_EXAMPLE_MESSAGES}")
    chat = [_message(index, message) for index, message in enumerate(messages)]
    if not any(message["role"] == "assistant" for message in chat):
        raise ValueError("the chat has no assistant message to learn from")
    return chat


def parse_chat_jsonl(content: bytes) -> list[list[dict[str, Any]]]:
    """The chats of a chat-format JSONL file; TrainingDataError at the first bad line."""
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise TrainingDataError("the file is not UTF-8 text", line) from None
    chats: list[list[dict[str, Any]]] = []
    for number, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except (json.JSONDecodeError, RecursionError) as exc:
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise TrainingDataError(f"not valid JSON ({reason})", number) from None
        if not isinstance(line, dict):
            raise TrainingDataError("a line must be a JSON object with 'messages'", number)
        try:
            chats.append(_chat(line))
        except ValueError as exc:
            raise TrainingDataError(str(exc), number) from None
    if not chats:
        raise TrainingDataError("the file holds no examples")
    return chats
