"""A scripted queen: a real websocket server whose frames a test controls, to exercise the worker side."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import websockets
from websockets.asyncio.server import Server, ServerConnection

from protocol import MAX_FRAME_BYTES, Batch, ProtocolError, Register, Welcome, decode_worker_frame, encode
from protocol.messages import Frame


class FakeQueen:
    """Accepts worker connections on 127.0.0.1, welcomes them (or not), and records every frame.

    `max_frame_bytes` is the limit it states in Welcome and enforces on what it receives: a bigger frame
    closes the connection (1009), as a real queen's websocket server would. With `tls`, it speaks wss://.
    """

    def __init__(
        self,
        *,
        refuse_with: ProtocolError | None = None,
        max_frame_bytes: int = MAX_FRAME_BYTES,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.refuse_with = refuse_with
        self.max_frame_bytes = max_frame_bytes
        self.tls = tls
        self.registrations: list[Register] = []
        self.frames: asyncio.Queue[Any] = asyncio.Queue()
        self.connections: list[ServerConnection] = []
        self.connected = asyncio.Event()
        self.largest_frame = 0
        """Size of the largest frame received after a registration, bytes."""
        self.batches: list[list[Any]] = []
        """The frames of every `batch` message received (their frames go on `frames` one by one too)."""
        self._server: Server | None = None

    @property
    def url(self) -> str:
        """The worker URL to connect to."""
        assert self._server is not None
        port = next(iter(self._server.sockets)).getsockname()[1]
        if self.tls is not None:
            return f"wss://localhost:{port}/worker"
        return f"ws://127.0.0.1:{port}/worker"

    async def start(self) -> FakeQueen:
        """Listen on an ephemeral port."""
        self._server = await websockets.serve(
            self._handle, "127.0.0.1", 0, max_size=self.max_frame_bytes, ssl=self.tls
        )
        return self

    async def stop(self) -> None:
        """Close every connection and stop listening."""
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def send(self, frame: Frame | str | bytes) -> None:
        """Send a frame (or raw text or bytes) to the most recent worker."""
        text = frame if isinstance(frame, str | bytes) else encode(frame)
        await self.connections[-1].send(text)

    async def next_frame(self, timeout: float = 10.0) -> Any:
        """The next frame a worker sent after registering."""
        return await asyncio.wait_for(self.frames.get(), timeout)

    async def _handle(self, connection: ServerConnection) -> None:
        registration = decode_worker_frame(await connection.recv())
        assert isinstance(registration, Register)
        self.registrations.append(registration)
        if self.refuse_with is not None:
            await connection.send(encode(self.refuse_with))
            await connection.close(1008, self.refuse_with.message)
            return
        self.connections.append(connection)
        await connection.send(
            encode(Welcome(worker_id=f"w{len(self.registrations)}", max_frame_bytes=self.max_frame_bytes))
        )
        self.connected.set()
        try:
            async for message in connection:
                size = len(message.encode()) if isinstance(message, str) else len(message)
                self.largest_frame = max(self.largest_frame, size)
                frame = decode_worker_frame(message, limit=self.max_frame_bytes)
                if isinstance(frame, Batch):
                    self.batches.append(list(frame.frames))
                    for inner in frame.frames:
                        await self.frames.put(inner)
                else:
                    await self.frames.put(frame)
        except websockets.ConnectionClosed:
            pass
