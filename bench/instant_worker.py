"""A scripted worker that answers every job at once: the queen's own cost, with no model behind it.

`python -m bench.instant_worker WS_URL PARALLEL [CHUNKS] [--one-per-message]` registers model "instant"
and answers each job with a role chunk, CHUNKS content chunks (2 unless given) and a final chunk
(streamed) or a whole response, as soon as it comes. The frames are encoded once, as templates, so the
worker costs little per chunk.

It sends as workerbee does (workerbee/outbox.py): every job answers in a task of its own, one frame a
turn of the event loop, and the frames of all jobs ready in one turn leave as one message (a `batch`
frame): like a batching engine whose every step yields a chunk per stream, at the socket's speed. With
`--one-per-message` it sends each job's frames one message each, as they come: what a bare relay,
which reads one frame per message, can take.
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


def _chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


_REQUEST_ID = "instant-request-id-placeholder"


def answer(request_id: str, stream: bool, chunks: int = 2) -> list[str]:
    """The frames that answer a job, encoded."""
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
    content = [(_chunk({"content": word}), 1) for word in words]
    frames = [
        (_chunk({"role": "assistant", "content": ""}), 0),
        *content,
        (_chunk({}, "stop"), 0),
    ]
    usage = Usage(prompt_tokens=3, completion_tokens=chunks, total_tokens=3 + chunks)
    encoded = [encode(Chunk(request_id=request_id, chunk=chunk, tokens=tokens)) for chunk, tokens in frames]
    return [*encoded, encode(Result(request_id=request_id, usage=usage))]


class Answers:
    """The encoded answers, made once with a placeholder request id that each job's id replaces."""

    def __init__(self, chunks: int) -> None:
        self._streamed = answer(_REQUEST_ID, True, chunks)
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


async def serve(url: str, parallel: int, chunks: int = 2, *, batched: bool = True) -> None:
    """Register and answer jobs until the connection closes."""
    answers = Answers(chunks)
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
    """Entry point: WS_URL PARALLEL [CHUNKS] [--one-per-message]."""
    arguments = [argument for argument in sys.argv[1:] if argument != "--one-per-message"]
    url, parallel = arguments[0], int(arguments[1])
    chunks = int(arguments[2]) if len(arguments) > 2 else 2
    batched = "--one-per-message" not in sys.argv
    with contextlib.suppress(KeyboardInterrupt, websockets.ConnectionClosed):
        asyncio.run(serve(url, parallel, chunks, batched=batched))


if __name__ == "__main__":
    main()
