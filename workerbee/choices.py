"""OpenAI's answer objects, built from generated text: chat choices and chunks, text-completion choices.

The worker builds `choices` (and `system_fingerprint`); the queen adds `id`, `object`, `created`,
`model` and `usage`, which it owns. Fields OpenAI's schema requires are always present, as null when
unused (`message.refusal`, `choices[].logprobs`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from workerbee.decoding import Generation, Piece, TokenLogprob, token_ids
from workerbee.tool_calls import ToolCallParser

ChunkEmitter = Callable[[dict[str, Any], int], None]
"""Takes a chunk and the number of generated tokens whose text it carries (see Piece.tokens): a
`TokenIds` naming them when the pieces did."""


def chat_logprobs(entries: list[TokenLogprob]) -> list[dict[str, Any]]:
    """Token log probabilities in chat's shape: choices[].logprobs.content."""
    return [
        {
            "token": entry.token,
            "logprob": entry.logprob,
            "bytes": entry.bytes,
            "top_logprobs": [
                {"token": top.token, "logprob": top.logprob, "bytes": top.bytes} for top in entry.top_logprobs
            ],
        }
        for entry in entries
    ]


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """Token log probabilities in the legacy completions shape; offsets count from `text_offset`."""
    offsets: list[int] = []
    position = text_offset
    for entry in entries:
        offsets.append(position)
        position += len(entry.token)
    return {
        "tokens": [entry.token for entry in entries],
        "token_logprobs": [entry.logprob for entry in entries],
        "top_logprobs": [{top.token: top.logprob for top in entry.top_logprobs} for entry in entries],
        "text_offset": offsets,
    }


@dataclass
class ChatChoice:
    """One chat choice as it is generated: streams it as chunks if asked, and builds the whole choice.

    `tool_mode` is none, auto, required or a function's name. In auto mode the grammar lets the answer be
    text or a call, and the first character tells which: a call starts with "{", text never does.

    Each content or tool-call chunk counts the tokens of the pieces it carries, those of pieces that made
    no chunk of their own (whitespace while deciding, call text the parser holds) included; the role and
    finish chunks count none.
    """

    index: int
    tool_mode: str
    logprobs: bool
    fingerprint: str
    emit: ChunkEmitter | None = None
    parser: ToolCallParser | None = field(default=None, init=False)
    _deciding: bool = field(default=False, init=False)
    _pending: Piece = field(default_factory=lambda: Piece("", []), init=False)
    _content: list[dict[str, Any]] = field(default_factory=list, init=False)
    _tokens: int = field(default=0, init=False)
    """Tokens of pieces taken but not yet counted in a chunk."""
    _ids: list[int] = field(default_factory=list, init=False)
    """Their ids, as far as the pieces gave them."""
    resumed: bool = False
    """The choice continues another worker's: its first chunk (the role) was sent already."""

    def __post_init__(self) -> None:
        self._deciding = self.tool_mode == "auto"
        if self.tool_mode not in {"none", "auto"}:
            self.parser = ToolCallParser()
        if self.emit is not None and not self.resumed:
            first = {"role": "assistant", "content": None if self.parser is not None else ""}
            self._chunk(first)

    def replay(self, piece: Piece) -> None:
        """Take text the client already has (a resumed choice's relayed tokens): parsed, never sent."""
        emit, self.emit = self.emit, None
        try:
            self.on_piece(piece)
        finally:
            self.emit = emit
            self._tokens = 0
            self._ids = []

    def on_piece(self, piece: Piece) -> None:
        """Take the next piece of generated text."""
        self._tokens += piece.tokens
        self._ids.extend(piece.ids)
        if self._deciding:
            piece = Piece(self._pending.text + piece.text, self._pending.logprobs + piece.logprobs, 0)
            if not piece.text.strip():
                self._pending = piece
                return
            self._deciding = False
            if piece.text.lstrip().startswith("{"):
                self.parser = ToolCallParser()
        text = piece.text
        if self.logprobs:
            self._content.extend(chat_logprobs(piece.logprobs))
        if self.parser is not None:
            deltas = self.parser.feed(text)
            if deltas and self.emit is not None:
                self._chunk({"tool_calls": deltas}, tokens=self._take_tokens())
        elif self.emit is not None and (text or piece.logprobs):
            logprobs = {"content": chat_logprobs(piece.logprobs), "refusal": None} if self.logprobs else None
            self._chunk({"content": text}, logprobs=logprobs, tokens=self._take_tokens())

    def finish(self, generation: Generation) -> dict[str, Any]:
        """End the choice: the last chunk if streaming, and the whole choice in chat.completion's shape."""
        call = self.parser.tool_call() if self.parser is not None else None
        if self.parser is not None and self.emit is not None:
            deltas = self.parser.finish()
            if deltas:
                self._chunk({"tool_calls": deltas}, tokens=self._take_tokens())
        finish_reason: str = generation.finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": generation.text, "refusal": None}
        if call is not None:
            finish_reason = "tool_calls"
            message["content"] = None
            message["tool_calls"] = [call]
        logprobs = None
        if self.logprobs:
            # Log probabilities describe message content; a tool call has none.
            logprobs = {"content": None if call is not None else self._content, "refusal": None}
        stop = generation.stop_sequence if finish_reason == "stop" else None
        if self.emit is not None:
            self._chunk({}, finish_reason=finish_reason, stop_reason=stop)
        whole = {
            "index": self.index,
            "message": message,
            "logprobs": logprobs,
            "finish_reason": finish_reason,
        }
        if stop is not None:
            whole["stop_reason"] = stop
        return whole

    def _chunk(
        self,
        delta: dict[str, Any],
        *,
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        tokens: int = 0,
        stop_reason: str | None = None,
    ) -> None:
        assert self.emit is not None
        choice = {"index": self.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        if stop_reason is not None:
            # As vLLM does: the stop sequence that ended the choice (Anthropic's API reports it).
            choice["stop_reason"] = stop_reason
        self.emit({"choices": [choice], "system_fingerprint": self.fingerprint}, tokens)

    def _take_tokens(self) -> int:
        tokens = token_ids(self._tokens, self._ids)
        self._tokens, self._ids = 0, []
        return tokens


@dataclass
class CompletionChoice:
    """One text-completion choice: streams it as chunks if asked, and builds the whole choice."""

    index: int
    logprobs: bool
    fingerprint: str
    prompt: str = ""
    """The prompt as text: log probabilities' text offsets count from its start."""
    echo: bool = False
    """Whether the prompt comes back before the completion."""
    emit: ChunkEmitter | None = None
    resumed: bool = False
    """The choice continues another worker's: the echoed prompt was sent already."""
    _sent: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.emit is not None and self.echo and self.prompt and not self.resumed:
            self._chunk(self.prompt, None)

    def replay(self, piece: Piece) -> None:
        """Take text the client already has (a resumed choice's relayed tokens): counted, never sent."""
        self._sent += len(piece.text)

    def on_piece(self, piece: Piece) -> None:
        """Take the next piece of generated text."""
        if self.emit is None or not (piece.text or piece.logprobs):
            return
        logprobs = (
            completion_logprobs(piece.logprobs, len(self.prompt) + self._sent) if self.logprobs else None
        )
        self._sent += len(piece.text)
        self._chunk(piece.text, logprobs, tokens=token_ids(piece.tokens, piece.ids))

    def finish(self, generation: Generation) -> dict[str, Any]:
        """End the choice: the last chunk if streaming, and the whole choice in text_completion's shape."""
        logprobs = None
        if self.logprobs and generation.logprobs is not None:
            logprobs = completion_logprobs(generation.logprobs, len(self.prompt))
        if self.emit is not None:
            self._chunk("", None, finish_reason=generation.finish_reason)
        return {
            "index": self.index,
            "text": (self.prompt if self.echo else "") + generation.text,
            "logprobs": logprobs,
            "finish_reason": generation.finish_reason,
        }

    def _chunk(
        self,
        text: str,
        logprobs: dict[str, Any] | None,
        finish_reason: str | None = None,
        *,
        tokens: int = 0,
    ) -> None:
        assert self.emit is not None
        choice = {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        self.emit({"choices": [choice], "system_fingerprint": self.fingerprint}, tokens)
