"""The floors the queen is measured against, as bare ASGI apps on the queen's own server stack.

`python -m bench.bare_relay instant PORT [CHUNKS]` answers every chat request at once, with the body the
instant worker gives (whole, or the same chunks as SSE): the HTTP stack alone, the "direct" baseline.

`python -m bench.bare_relay relay PORT` is a websocket-to-SSE relay with nothing else: instant workers
connect to `/worker` as they would to a queen, and each POST becomes a job frame for the next worker
(round robin) whose frames are passed to the client as SSE events without validation, accounting,
limits or a ledger. It is what relaying costs in Python on this stack before the queen does anything.

Both run on uvicorn with uvloop, httptools and websockets-sansio, permessage-deflate off, as the queen.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import uuid
from typing import Any

import uvicorn
from starlette.types import Receive, Scope, Send

from bench.instant_worker import answer
from protocol import MAX_FRAME_BYTES

_JSON = [(b"content-type", b"application/json")]
_SSE = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def _read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return body


def _sse(chunk: dict[str, Any], request_id: str) -> bytes:
    payload = {**chunk, "id": request_id, "object": "chat.completion.chunk", "model": "instant"}
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class InstantUpstream:
    """Answers at once, as an OpenAI server with an instant model would."""

    def __init__(self, chunks: int) -> None:
        frames = [json.loads(frame) for frame in answer("id", True, chunks, deltas=False)]
        self._events = [
            _sse(frame["chunk"], "chatcmpl-instant") for frame in frames if frame["type"] == "chunk"
        ]
        whole = json.loads(answer("id", False, chunks)[0])
        self._whole = json.dumps({**whole["response"], "id": "chatcmpl-instant", "model": "instant"}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request."""
        if scope["type"] != "http":
            return
        body = json.loads(await _read_body(receive) or b"{}")
        if body.get("stream"):
            await send({"type": "http.response.start", "status": 200, "headers": _SSE})
            for event in self._events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": _JSON})
        await send({"type": "http.response.body", "body": self._whole})


class BareRelay:
    """Workers on a websocket, clients on HTTP, frames passed through."""

    def __init__(self) -> None:
        self._workers: list[Worker] = []
        self._turn = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A worker's websocket or a client's request."""
        if scope["type"] == "websocket":
            await self._worker(receive, send)
        elif scope["type"] == "http":
            await self._request(receive, send)

    async def _worker(self, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await receive()  # the worker's Register; taken on trust here
        welcome = {"type": "welcome", "worker_id": "bare", "max_frame_bytes": MAX_FRAME_BYTES}
        await send({"type": "websocket.send", "text": json.dumps(welcome)})
        worker = Worker(send)
        self._workers.append(worker)
        try:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                worker.deliver(message["text"])
        finally:
            self._workers.remove(worker)

    async def _request(self, receive: Receive, send: Send) -> None:
        body = json.loads(await _read_body(receive))
        worker = self._workers[next(self._turn) % len(self._workers)]
        request_id = "chatcmpl-" + uuid.uuid4().hex
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        worker.requests[request_id] = queue
        job = {"type": "job", "request_id": request_id, "request": {"kind": "chat", "body": body}}
        await worker.send({"type": "websocket.send", "text": json.dumps(job)})
        try:
            if body.get("stream"):
                await send({"type": "http.response.start", "status": 200, "headers": _SSE})
                while (frame := await queue.get())["type"] == "chunk":
                    event = _sse(frame["chunk"], request_id)
                    await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
                return
            frame = await queue.get()
            response = {**frame["response"], "id": request_id, "model": "instant", "usage": frame["usage"]}
            await send({"type": "http.response.start", "status": 200, "headers": _JSON})
            await send({"type": "http.response.body", "body": json.dumps(response).encode()})
        finally:
            del worker.requests[request_id]


class Worker:
    """One connected worker of the bare relay: its send, and a queue per request it runs."""

    def __init__(self, send: Send) -> None:
        self.send = send
        self.requests: dict[str, asyncio.Queue[dict[str, Any]]] = {}

    def deliver(self, text: str) -> None:
        """Hand a frame to its request."""
        frame = json.loads(text)
        queue = self.requests.get(frame.get("request_id", ""))
        if queue is not None:
            queue.put_nowait(frame)


def main() -> None:
    """Entry point: instant PORT [CHUNKS] | relay PORT."""
    mode, port = sys.argv[1], int(sys.argv[2])
    app: InstantUpstream | BareRelay
    app = InstantUpstream(int(sys.argv[3]) if len(sys.argv) > 3 else 2) if mode == "instant" else BareRelay()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
