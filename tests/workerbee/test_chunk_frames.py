"""The frames a worker sends for its streamed chunks: a Delta for text alone once the stream's
fingerprint went out in a Chunk, a Chunk for everything else (workerbee/chunk_frames.py)."""

from __future__ import annotations

from typing import Any

import pytest

from protocol import Chunk, Delta
from workerbee.chunk_frames import StreamFrames, text_only
from workerbee.decoding import TokenIds

FINGERPRINT = "b1-abc"


def chat(delta: dict[str, Any], **choice: Any) -> dict[str, Any]:
    """A chat chunk as workerbee/choices.py builds it."""
    entry = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None, **choice}
    return {"choices": [entry], "system_fingerprint": FINGERPRINT}


def text(piece: str, **choice: Any) -> dict[str, Any]:
    """A text-completion chunk as workerbee/choices.py builds it."""
    entry = {"index": 0, "text": piece, "logprobs": None, "finish_reason": None, **choice}
    return {"choices": [entry], "system_fingerprint": FINGERPRINT}


@pytest.mark.parametrize(
    ("chunk", "expected"),
    [
        (chat({"content": "hi"}), (0, "hi")),
        (chat({"content": "hi"}, index=3), (3, "hi")),
        (text(" once"), (0, " once")),
        (chat({"role": "assistant", "content": ""}), None),
        (chat({"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}), None),
        (chat({"content": "hi"}, logprobs={"content": [], "refusal": None}), None),
        (chat({}, finish_reason="stop"), None),
        (chat({"content": ""}, finish_reason="length"), None),
        (chat({"content": "x"}, stop_reason="###"), None),
        (text("x", logprobs={"tokens": ["x"]}), None),
        ({"choices": [chat({"content": "a"})["choices"][0]] * 2, "system_fingerprint": FINGERPRINT}, None),
        ({"choices": chat({"content": "a"})["choices"]}, None),
        ({**chat({"content": "a"}), "usage": None}, None),
        ({"type": "message", "message": "training"}, None),
    ],
)
def test_only_a_chunk_of_text_alone_is_text_only(
    chunk: dict[str, Any], expected: tuple[int, str] | None
) -> None:
    """Roles, tool calls, log probabilities, finishes, stop reasons, several choices, a missing
    fingerprint or any other field keep the chunk whole."""
    assert text_only(chunk) == expected


def test_text_after_the_first_chunk_goes_as_deltas() -> None:
    """The role chunk carries the fingerprint; the text after it goes as Deltas with its token ids; a
    new fingerprint goes out in a Chunk before Deltas resume; the finish is a Chunk."""
    frames = StreamFrames("r1")
    role = frames.frame(chat({"role": "assistant", "content": ""}), 0)
    first = frames.frame(chat({"content": "Hel"}), TokenIds([5, 6]))
    second = frames.frame(chat({"content": "lo"}), 1)
    changed = frames.frame({**chat({"content": "!"}), "system_fingerprint": "b2-def"}, 1)
    after = frames.frame({**chat({"content": "?"}), "system_fingerprint": "b2-def"}, 1)
    finish = frames.frame(chat({}, finish_reason="stop"), 0)
    assert isinstance(role, Chunk)
    assert first == Delta(request_id="r1", index=0, text="Hel", tokens=2, token_ids=[5, 6])
    assert second == Delta(request_id="r1", index=0, text="lo", tokens=1, token_ids=None)
    assert isinstance(changed, Chunk)
    assert changed.chunk["system_fingerprint"] == "b2-def"
    assert changed.tokens == 1
    assert isinstance(after, Delta)
    assert isinstance(finish, Chunk)


def test_a_stream_without_a_role_chunk_starts_with_a_chunk() -> None:
    """A text completion (or a resumed chat) has no role chunk: its first text goes whole."""
    frames = StreamFrames("r2")
    assert isinstance(frames.frame(text("Once"), 1), Chunk)
    assert frames.frame(text(" upon"), 1) == Delta(request_id="r2", text=" upon", tokens=1)
