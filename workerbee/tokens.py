"""Counting a chat request's prompt tokens without generating: the answer to a `count_tokens` job."""

from __future__ import annotations

from typing import Any

from protocol import Usage
from protocol.openai import ChatCompletionRequest
from workerbee.engine import Engine


async def count_tokens(engine: Engine, chat: ChatCompletionRequest) -> tuple[Usage, dict[str, Any]]:
    """The prompt tokens the model's chat template makes of `chat` (tools included), as `input_tokens`.

    Nothing is generated, so the usage is zero: counting costs the client nothing.
    """
    tokens = await engine.count_prompt_tokens(chat)
    return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), {"input_tokens": tokens}
