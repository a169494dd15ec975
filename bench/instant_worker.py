"""A scripted worker that answers every job at once: the queen's own cost, with no model behind it.

`python -m bench.instant_worker WS_URL PARALLEL` registers model "instant" and answers each job with
a role chunk, two content chunks and a final chunk (streamed) or a whole response, as soon as it comes.
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

USAGE = Usage(prompt_tokens=3, completion_tokens=2, total_tokens=5)


def _chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def answer(job: Job) -> list[str]:
    """The frames that answer `job`, encoded."""
    request_id = job.request_id
    if not job.stream:
        message = {"role": "assistant", "content": "Hello there"}
        response = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        }
        return [encode(Result(request_id=request_id, usage=USAGE, response=response))]
    # With the generated tokens each chunk's text took (Chunk.tokens): one a word, none for role or finish.
    chunks = [
        (_chunk({"role": "assistant", "content": ""}), 0),
        (_chunk({"content": "Hello"}), 1),
        (_chunk({"content": " there"}), 1),
        (_chunk({}, "stop"), 0),
    ]
    frames = [encode(Chunk(request_id=request_id, chunk=chunk, tokens=tokens)) for chunk, tokens in chunks]
    return [*frames, encode(Result(request_id=request_id, usage=USAGE))]


async def serve(url: str, parallel: int) -> None:
    """Register and answer jobs until the connection closes."""
    async with websockets.connect(url, max_size=None) as websocket:
        register = Register(
            protocol_version=PROTOCOL_VERSION,
            instance_id="bench-" + uuid.uuid4().hex[:12],
            max_frame_bytes=MAX_FRAME_BYTES,
            worker_version="bench",
            cpu_count=1,
            disk_space=1,
            vram=0,
            models=[ModelInfo(id="instant", n_ctx=2048)],
            parallel=parallel,
        )
        await websocket.send(encode(register))
        welcome = decode_queen_frame(await websocket.recv())
        if not isinstance(welcome, Welcome):
            raise SystemExit(f"the queen refused the worker: {welcome}")
        async for message in websocket:
            frame = decode_queen_frame(message)
            if isinstance(frame, Job):
                for data in answer(frame):
                    await websocket.send(data)


def main() -> None:
    """Entry point: WS_URL PARALLEL."""
    url, parallel = sys.argv[1], int(sys.argv[2])
    with contextlib.suppress(KeyboardInterrupt, websockets.ConnectionClosed):
        asyncio.run(serve(url, parallel))


if __name__ == "__main__":
    main()
