"""A scripted worker that answers every job at once: the queen's own cost, with no model behind it.

`python -m bench.instant_worker WS_URL PARALLEL [CHUNKS] [--one-per-message] [--chunks-only]` registers
model "instant" and answers each job with a role chunk, CHUNKS content chunks (2 unless given) and a
final chunk (streamed) or a whole response, as soon as it comes. The frames are encoded once, as
templates, so the worker costs little per chunk. The content goes as `delta` frames, as workerbee sends
text (workerbee/chunk_frames.py); with `--chunks-only` as the `chunk` frames they stand for, as before
protocol 6.

It sends as workerbee does (workerbee/outbox.py): every job answers in a task of its own, one frame a
turn of the event loop, and the frames of all jobs ready in one turn leave as one message (a `batch`
frame): like a batching engine whose every step yields a chunk per stream, at the socket's speed. With
`--one-per-message` it sends each job's frames one message each, as they come, and only chunk frames:
what a bare relay, which reads one chunk frame per message, can take.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid

import websockets

from protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    Chunk,
    Delta,
    Job,
    ModelInfo,
    Register,
    Result,
    Usage,
    Welcome,
    decode_queen_frame,
    encode,
)
from workerbee.outbox import Outbox

USAGE = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)


FINGERPRINT = "instant"


def _chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, object]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {"choices": [choice], "system_fingerprint": FINGERPRINT}


_REQUEST_ID = "instant-request-id-placeholder"


def answer(request_id: str, stream: bool, chunks: int = 2, *, deltas: bool = True) -> list[str]:
    """The frames that answer a job, encoded (the content as Delta frames, or as Chunks)."""
    if not stream:
        message = {"role": "assistant", "content": "Hello there"}
        response = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        }
        ids = [[1] * USAGE.completion_tokens]  # the token ids behind the answer, as protocol 4 requires
        return [encode(Result(request_id=request_id, usage=USAGE, response=response, token_ids=ids))]
    # With the generated tokens each chunk's text took (Chunk.tokens): one a word, none for role or finish.
    words = [" there" if n % 2 else "Hello" for n in range(chunks)]
    content = [
        Delta(request_id=request_id, text=word, tokens=1)
        if deltas
        else Chunk(request_id=request_id, chunk=_chunk({"content": word}), tokens=1)
        for word in words
    ]
    frames = [
        Chunk(request_id=request_id, chunk=_chunk({"role": "assistant", "content": ""})),
        *content,
        Chunk(request_id=request_id, chunk=_chunk({}, "stop")),
    ]
    usage = Usage(prompt_tokens=3, completion_tokens=chunks, total_tokens=3 + chunks)
    return [*map(encode, frames), encode(Result(request_id=request_id, usage=usage))]


class Answers:
    """The encoded answers, made once with a placeholder request id that each job's id replaces."""

    def __init__(self, chunks: int, *, deltas: bool = True) -> None:
        self._streamed = answer(_REQUEST_ID, True, chunks, deltas=deltas)
        self._whole = answer(_REQUEST_ID, False, chunks)

    def frames(self, job: Job) -> list[str]:
        """The frames that answer `job`."""
        frames = self._streamed if job.stream else self._whole
        return [frame.replace(_REQUEST_ID, job.request_id) for frame in frames]


def registration(parallel: int, prefix: str = "bench") -> Register:
    """What a scripted worker registers: model "instant" with `parallel` slots, a fresh instance id."""
    return Register(
        protocol_version=PROTOCOL_VERSION,
        instance_id=f"{prefix}-{uuid.uuid4().hex[:12]}",
        max_frame_bytes=MAX_FRAME_BYTES,
        worker_version="bench",
        cpu_count=1,
        disk_space=1,
        vram=0,
        models=[ModelInfo(id="instant", n_ctx=2048)],
        parallel=parallel,
    )


async def serve(
    url: str, parallel: int, chunks: int = 2, *, batched: bool = True, deltas: bool = True
) -> None:
    """Register and answer jobs until the connection closes (one frame per message unless `batched`;
    the content as Delta frames, or as Chunks)."""
    answers = Answers(chunks, deltas=deltas)
    async with websockets.connect(url, max_size=None, compression=None) as websocket:
        await websocket.send(encode(registration(parallel)))
        welcome = decode_queen_frame(await websocket.recv())
        if not isinstance(welcome, Welcome):
            raise SystemExit(f"the queen refused the worker: {welcome}")
        outbox = Outbox(websocket.send, lambda: welcome.max_frame_bytes)
        running: set[asyncio.Task[None]] = set()

        async def answer_job(frames: list[str]) -> None:
            for data in frames:
                await outbox.send(data)

        async for message in websocket:
            frame = decode_queen_frame(message)
            if not isinstance(frame, Job):
                continue
            if batched:
                task = asyncio.create_task(answer_job(answers.frames(frame)))
                running.add(task)
                task.add_done_callback(running.discard)
            else:
                for data in answers.frames(frame):
                    await websocket.send(data)


def main() -> None:
    """Entry point: WS_URL PARALLEL [CHUNKS] [--one-per-message] [--chunks-only]."""
    options = {"--one-per-message", "--chunks-only"}
    arguments = [argument for argument in sys.argv[1:] if argument not in options]
    url, parallel = arguments[0], int(arguments[1])
    chunks = int(arguments[2]) if len(arguments) > 2 else 2
    batched = "--one-per-message" not in sys.argv
    deltas = batched and "--chunks-only" not in sys.argv
    with contextlib.suppress(KeyboardInterrupt, websockets.ConnectionClosed):
        asyncio.run(serve(url, parallel, chunks, batched=batched, deltas=deltas))


if __name__ == "__main__":
    main()
