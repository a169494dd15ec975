"""What a prompt's prefixes are called on the queen, and how many of its tokens each covers (no I/O).

The queen names a prefix by a chain of hashes over the request's messages (protocol/prefix.py); the
worker, which renders the prompt, knows how many tokens each of those prefixes is. `chat_blocks` pairs
them: the prompt of messages 0..i is rendered on its own, and the tokens it shares with the whole
prompt are what that prefix covers. The scheduler keeps each slot's blocks beside its tokens, and
`summarize` folds every slot's (and host RAM's) into the bounded list a `CacheSummary` carries.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from protocol.messages import MAX_CACHED_PREFIXES
from protocol.openai import ChatCompletionRequest
from protocol.prefix import TEXT_BLOCK_CHARS, chat_hashes, text_hashes
from workerbee.errors import EngineError
from workerbee.llama_context import ModelWeights, longest_common_prefix
from workerbee.prompts import Prompts

Block = tuple[int, int]
"""A prefix hash and the prompt tokens it covers."""

MAX_RENDERED_PREFIXES = 16
"""Message prefixes rendered per request besides the first message (a shared system prompt): the last
ones, where the next turn of a conversation will diverge. Each costs a render and a tokenization."""

MAX_TEXT_BLOCKS = 64
"""Blocks of a text prompt that are reported (the first 16 KiB of text or so)."""


@dataclass(frozen=True)
class PromptBlocks:
    """The blocks of one prompt, shortest first, and the hash an answer to it chains from (chat only)."""

    blocks: tuple[Block, ...] = ()
    reply_root: int | None = None
    """The hash of the whole conversation: a plain answer to it is the next block (`reply_hash`)."""


NO_BLOCKS = PromptBlocks()


def chat_blocks(prompts: Prompts, chat: ChatCompletionRequest, prompt: list[int]) -> PromptBlocks:
    """The blocks of a chat prompt: each message prefix's hash with the tokens it shares with `prompt`."""
    hashes = chat_hashes(chat)
    count = len(hashes)
    wanted = sorted({0, *range(max(1, count - 1 - MAX_RENDERED_PREFIXES), count - 1)})
    blocks: list[Block] = []
    for index in wanted:
        if index >= count - 1:
            continue
        try:
            partial = prompts.chat_prompt(chat.model_copy(update={"messages": chat.messages[: index + 1]}))
        except EngineError:
            continue  # a template that refuses a partial conversation (it must end with a user turn)
        shared = longest_common_prefix(partial, prompt)
        if shared > 0:
            blocks.append((hashes[index], shared))
    blocks.append((hashes[-1], len(prompt)))
    reply_root = hashes[-1] if chat.tool_mode == "none" and chat.response_format is None else None
    return PromptBlocks(tuple(blocks), reply_root)


def text_blocks(weights: ModelWeights, text: str, prompt: list[int]) -> PromptBlocks:
    """The blocks of a text prompt: each whole block of characters with the tokens its text shares."""
    hashes = text_hashes(text)[:MAX_TEXT_BLOCKS]
    blocks: list[Block] = []
    for number, prefix_hash in enumerate(hashes, 1):
        partial = weights.tokenize(text[: number * TEXT_BLOCK_CHARS], add_bos=weights.add_bos, special=True)
        shared = longest_common_prefix(partial, prompt)
        if shared > 0:
            blocks.append((prefix_hash, shared))
    return PromptBlocks(tuple(blocks))


@dataclass
class SlotBlocks:
    """The blocks one cache holds (a slot's KV stream, or a state kept in host RAM)."""

    blocks: list[Block] = field(default_factory=list)

    def replace(self, prompt: PromptBlocks) -> None:
        """The cache now holds this prompt (what it held before is gone or shared by the prompt)."""
        self.blocks = list(prompt.blocks)

    def clear(self) -> None:
        """The cache holds nothing."""
        self.blocks = []


def summarize(caches: Iterable[Iterable[Block]], limit: int = MAX_CACHED_PREFIXES) -> list[Block]:
    """Every hash any cache holds with the most tokens one holds it for, longest first, at most `limit`."""
    best: dict[int, int] = {}
    for blocks in caches:
        for prefix_hash, tokens in blocks:
            if tokens > best.get(prefix_hash, 0):
                best[prefix_hash] = tokens
    ranked = sorted(best.items(), key=lambda item: -item[1])
    return ranked[:limit]
