"""Counting a chat request's prompt tokens without generating: the answer to a `count_tokens` job."""

from __future__ import annotations

import asyncio
from typing import Any

from protocol import Usage
from protocol.openai import ChatCompletionRequest
from workerbee.engine import Engine


async def count_tokens(engine: Engine, chat: ChatCompletionRequest) -> tuple[Usage, dict[str, Any]]:
    """The prompt tokens the model's chat template makes of `chat` (tools included), as `input_tokens`.

    Nothing is generated, so the usage is zero: counting costs the client nothing. The tokenizer runs on
    the model's own thread, so that it never races a generation on the same model.
    """
    model = engine.model(chat.model)
    loop = asyncio.get_running_loop()
    tokens = await loop.run_in_executor(model.executor, model.chat_prompt, chat)
    return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), {"input_tokens": len(tokens)}
