"""The worker's outbox: frames ready in one turn of the event loop leave as one message, in order."""

from __future__ import annotations

import asyncio

import pytest

from protocol import MIN_FRAME_BYTES, Batch, Chunk, decode_worker_frame, encode
from workerbee.outbox import Outbox


def chunk(request_id: str, text: str = "hi") -> str:
    """An encoded chunk frame."""
    return encode(Chunk(request_id=request_id, chunk={"choices": [{"delta": {"content": text}}]}, tokens=1))


class Socket:
    """Records each message; `block` holds the next write until released (a socket under backpressure)."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.block: asyncio.Event | None = None
        self.error: Exception | None = None

    async def send(self, text: str) -> None:
        if self.block is not None:
            await self.block.wait()
        if self.error is not None:
            raise self.error
        self.messages.append(text)

    def request_ids(self) -> list[list[str]]:
        """The request ids of the chunks in each message."""
        ids: list[list[str]] = []
        for message in self.messages:
            frame = decode_worker_frame(message)
            inner = frame.frames if isinstance(frame, Batch) else [frame]
            ids.append([item.request_id for item in inner if isinstance(item, Chunk)])
        return ids


async def test_frames_sent_in_one_turn_leave_as_one_message() -> None:
    """Four streams each send a chunk in the same turn (one engine step): one batch of four, in order."""
    socket = Socket()
    outbox = Outbox(socket.send, lambda: MIN_FRAME_BYTES)
    await asyncio.gather(*(outbox.send(chunk(f"r{number}")) for number in range(4)))
    assert socket.request_ids() == [["r0", "r1", "r2", "r3"]]


async def test_each_stream_gets_one_frame_per_message_when_it_sends_in_turns() -> None:
    """Streams that each await their send: every message carries one frame of each, in stream order."""
    socket = Socket()
    outbox = Outbox(socket.send, lambda: MIN_FRAME_BYTES)

    async def stream(name: str) -> None:
        for number in range(3):
            await outbox.send(chunk(f"{name}{number}"))

    await asyncio.gather(stream("a"), stream("b"))
    assert socket.request_ids() == [["a0", "b0"], ["a1", "b1"], ["a2", "b2"]]


async def test_a_lone_frame_is_sent_as_itself() -> None:
    socket = Socket()
    outbox = Outbox(socket.send, lambda: MIN_FRAME_BYTES)
    await outbox.send(chunk("a"))
    assert socket.messages == [chunk("a")]


async def test_what_arrives_during_a_write_leaves_with_the_next_message() -> None:
    socket = Socket()
    socket.block = asyncio.Event()
    outbox = Outbox(socket.send, lambda: MIN_FRAME_BYTES)
    first = asyncio.create_task(outbox.send(chunk("a")))
    await asyncio.sleep(0.01)  # the write of "a" is under way, held by the socket
    later = [asyncio.create_task(outbox.send(chunk(name))) for name in ("b", "c")]
    await asyncio.sleep(0.01)
    assert not first.done()
    assert not any(task.done() for task in later)
    socket.block.set()
    await asyncio.gather(first, *later)
    assert socket.request_ids() == [["a"], ["b", "c"]]


async def test_messages_keep_within_the_limit_the_peer_states_now() -> None:
    socket = Socket()
    limit = [MIN_FRAME_BYTES]
    outbox = Outbox(socket.send, lambda: limit[0])
    big = "x" * 30_000
    await asyncio.gather(*(outbox.send(chunk(f"r{number}", big)) for number in range(5)))
    assert all(len(message) <= MIN_FRAME_BYTES for message in socket.messages)
    assert [one for ids in socket.request_ids() for one in ids] == [f"r{number}" for number in range(5)]
    limit[0] = 2**20
    socket.messages.clear()
    await asyncio.gather(*(outbox.send(chunk(f"r{number}", big)) for number in range(5)))
    assert len(socket.messages) == 1


async def test_a_socket_failure_reaches_every_sender_of_the_message() -> None:
    socket = Socket()
    socket.error = ConnectionResetError("gone")
    outbox = Outbox(socket.send, lambda: MIN_FRAME_BYTES)
    results = await asyncio.gather(*(outbox.send(chunk(name)) for name in "abc"), return_exceptions=True)
    assert all(isinstance(result, ConnectionResetError) for result in results)
    socket.error = None
    await outbox.send(chunk("d"))  # the outbox goes on once the socket does
    assert socket.request_ids() == [["d"]]


async def test_a_cancelled_sender_does_not_take_the_others_frames_with_it() -> None:
    socket = Socket()
    socket.block = asyncio.Event()
    outbox = Outbox(socket.send, lambda: MIN_FRAME_BYTES)
    tasks = [asyncio.create_task(outbox.send(chunk(name))) for name in "abc"]
    await asyncio.sleep(0.01)
    tasks[0].cancel()
    socket.block.set()
    with pytest.raises(asyncio.CancelledError):
        await tasks[0]
    await asyncio.gather(*tasks[1:])
    assert socket.request_ids() == [["a", "b", "c"]]
