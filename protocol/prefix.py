"""Prefix hashes that the queen and the worker compute alike, for cache-aware routing (no I/O).

The queen has no tokenizer and no chat template, so it cannot hash tokens; both sides do see the
request's messages, exactly as the client sent them. A prefix is therefore named by a chain of hashes
over canonical message blocks: the first block is what the template renders before any message (the
tools), then one block per message, each hash covering every block before it. A worker reports, per
model, the hashes of the prefixes its KV cache holds with the tokens each covers (`CacheSummary`);
the queen hashes a request's messages the same way and looks the chain up, longest first.

The answer a worker generated is a block too (`reply_hash`): the next turn of a conversation sends
it back as an assistant message, so the chain of turn n + 1 runs through what the worker holds after
turn n. Text completions hash their prompt in blocks of `TEXT_BLOCK_CHARS` characters.

Hashes are the first 63 bits of BLAKE2b (fits a signed 64-bit integer anywhere).
"""

from __future__ import annotations

import hashlib
import json
from typing import Final

from protocol.openai import ChatCompletionRequest, ChatMessage

TEXT_BLOCK_CHARS: Final = 256
"""Characters of a text prompt per block."""

HASH_BITS: Final = 63


def _chain(previous: int, data: bytes) -> int:
    digest = hashlib.blake2b(previous.to_bytes(8, "big") + data, digest_size=8).digest()
    return int.from_bytes(digest, "big") >> (64 - HASH_BITS)


def _message_bytes(role: str, text: str, name: str | None, calls: object, call_id: str | None) -> bytes:
    canonical = [role, text, name, calls, call_id]
    return json.dumps(canonical, ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode()


def message_block(message: ChatMessage) -> bytes:
    """A message's canonical bytes: role, text (parts joined), name, tool calls, tool call id."""
    calls = [call.model_dump(mode="json") for call in message.tool_calls] if message.tool_calls else None
    return _message_bytes(message.role, message.text(), message.name, calls, message.tool_call_id)


def chat_root(request: ChatCompletionRequest) -> int:
    """The hash of what precedes the messages: the tools the template renders and how they are used."""
    mode = request.tool_mode
    tools = [tool.model_dump(mode="json") for tool in request.tools or ()] if mode != "none" else []
    header = json.dumps([mode, tools], sort_keys=True, separators=(",", ":")).encode()
    return _chain(0, b"chat" + header)


def chat_chain(request: ChatCompletionRequest) -> list[tuple[int, int]]:
    """Each message prefix's chained hash (element i covers the tools and messages 0..i), with the
    size of message i's block in bytes."""
    chain: list[tuple[int, int]] = []
    current = chat_root(request)
    for message in request.messages:
        block = message_block(message)
        current = _chain(current, block)
        chain.append((current, len(block)))
    return chain


def chat_hashes(request: ChatCompletionRequest) -> list[int]:
    """The chained hash of each message prefix: element i covers the tools and messages 0..i."""
    return [prefix_hash for prefix_hash, _ in chat_chain(request)]


def reply_hash(previous: int, text: str) -> int:
    """The chain hash after a plain assistant answer `text`, as the client sends it back next turn."""
    return _chain(previous, _message_bytes("assistant", text, None, None, None))


def text_hashes(prompt: str) -> list[int]:
    """The chained hash of each whole TEXT_BLOCK_CHARS block of a text prompt (a partial tail: none)."""
    hashes: list[int] = []
    current = _chain(0, b"text")
    for start in range(0, len(prompt) - TEXT_BLOCK_CHARS + 1, TEXT_BLOCK_CHARS):
        current = _chain(current, prompt[start : start + TEXT_BLOCK_CHARS].encode())
        hashes.append(current)
    return hashes
