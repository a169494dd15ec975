"""Many scripted workers in one process: a hive of thousands of connections for the queen to hold.

`python -m bench.many_workers WS_URL COUNT [DELAY]` connects COUNT workers (model "instant", 4 slots
each), prints `connected COUNT` once all are registered, and answers each job like bench.instant_worker,
after DELAY seconds (0 unless given: a delay keeps requests in flight, to measure what each costs).
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
import sys

import websockets

from bench.instant_worker import Answers, registration
from protocol import Job, decode_queen_frame, encode

_HANDSHAKES_AT_ONCE = 100


async def _worker(
    url: str, answers: Answers, delay: float, gate: asyncio.Semaphore, ready: asyncio.Queue[None]
) -> None:
    async with gate:
        websocket = await websockets.connect(url, max_size=None, compression=None, open_timeout=120)
        await websocket.send(encode(registration(4, "many")))
        await websocket.recv()
    ready.put_nowait(None)

    async def reply(job: Job) -> None:
        await asyncio.sleep(delay)
        for data in answers.frames(job):
            await websocket.send(data)

    tasks: set[asyncio.Task[None]] = set()
    with contextlib.suppress(websockets.ConnectionClosed):
        async for message in websocket:
            frame = decode_queen_frame(message)
            if isinstance(frame, Job):
                task = asyncio.create_task(reply(frame))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


async def serve(url: str, count: int, delay: float) -> None:
    """Connect `count` workers and serve until interrupted."""
    answers = Answers(2)
    gate = asyncio.Semaphore(_HANDSHAKES_AT_ONCE)
    ready: asyncio.Queue[None] = asyncio.Queue()
    workers = [asyncio.create_task(_worker(url, answers, delay, gate, ready)) for _ in range(count)]
    for _ in range(count):
        await ready.get()
    print(f"connected {count}", flush=True)
    await asyncio.gather(*workers)


def main() -> None:
    """Entry point: WS_URL COUNT [DELAY]."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    url, count = sys.argv[1], int(sys.argv[2])
    delay = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(url, count, delay))


if __name__ == "__main__":
    main()
