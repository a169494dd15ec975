"""Messages between queen replicas: one Redis pub/sub channel per replica, one envelope per message.

The envelope is sans-I/O: a header of ids and the frame's JSON text as it is, joined by the ASCII unit
separator; envelopes for one replica that are ready together travel as one message, joined by the
record separator (JSON text never holds a raw control character, so neither needs escaping). The
`Mailbox` is the I/O: one subscriber connection that hands each envelope to the replica in order, and
a publisher that sends whatever is queued in one pipelined round trip and says which envelopes no
replica received (PUBLISH counts the subscribers that got it: none means the replica is gone).

    job     origin -> owner   run `frame` (a Job's text) on the owner's worker; `arg` is the slots it takes
    cancel  origin -> owner   the client left: cancel `request_id`
    out     owner -> origin   a frame the worker sent for `request_id` (Chunk, ResultPart, Result, JobError)
    gone    owner -> origin   the request ended without the worker's word; `arg` says why
    cache   owner -> others   a CacheSummary one of its workers sent (cache-aware routing across the hive)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, cast

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

log = logging.getLogger("queenbee.replicas")

Kind = Literal["job", "cancel", "out", "gone", "cache"]
_KINDS: frozenset[str] = frozenset({"job", "cancel", "out", "gone", "cache"})
_SEPARATOR = b"\x1f"
_RECORDS = b"\x1e"


class EnvelopeError(ValueError):
    """A message on a replica channel that is not an envelope."""


@dataclass(frozen=True)
class Envelope:
    """One message between replicas."""

    kind: Kind
    origin: str
    """The replica that sent it."""
    worker_id: str
    request_id: str
    arg: str = ""
    frame: bytes = b""

    def encode(self) -> bytes:
        """The message's bytes on the channel."""
        header = "\x1f".join((self.kind, self.origin, self.worker_id, self.request_id, self.arg))
        return header.encode() + _SEPARATOR + self.frame

    @classmethod
    def decode(cls, data: bytes) -> Envelope:
        """Parse a message, or raise EnvelopeError."""
        parts = data.split(_SEPARATOR, 5)
        if len(parts) != 6:
            raise EnvelopeError(f"an envelope has 6 fields, this one {len(parts)}")
        kind, origin, worker_id, request_id, arg = (part.decode(errors="replace") for part in parts[:5])
        if kind not in _KINDS:
            raise EnvelopeError(f"unknown envelope kind {kind[:32]!r}")
        return cls(cast(Kind, kind), origin, worker_id, request_id, arg, parts[5])


def decode_message(data: bytes) -> list[Envelope]:
    """The envelopes of one message, in order; raises EnvelopeError if one is malformed."""
    return [Envelope.decode(record) for record in data.split(_RECORDS)]


def channel_of(prefix: str, replica_id: str) -> str:
    """The channel a replica listens on."""
    return f"{prefix}replica:{replica_id}"


OnLost = Callable[[], None]


class Mailbox:
    """A replica's channel: receive envelopes in order, send them batched, learn which were lost."""

    def __init__(
        self,
        redis: Redis,
        channel: str,
        on_envelope: Callable[[Envelope], Awaitable[None]],
        *,
        retry: float = 0.5,
        idle: float = 5.0,
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._on_envelope = on_envelope
        self._retry = retry
        self._idle = idle
        self._queue: list[tuple[str, bytes, OnLost | None]] = []
        self._ready = asyncio.Event()
        self.subscribed = asyncio.Event()
        """Set while the subscriber listens (cleared when Redis drops it)."""
        self.connected = True
        """False after a send failed, until one succeeds again."""

    def send(self, channel: str, envelope: Envelope, on_lost: OnLost | None = None) -> None:
        """Queue an envelope for `channel`; `on_lost` runs if no replica received it (or Redis failed)."""
        self._queue.append((channel, envelope.encode(), on_lost))
        self._ready.set()

    async def run(self) -> None:
        """Send and receive until cancelled, riding out Redis outages (retrying every `retry` s)."""
        async with asyncio.TaskGroup() as group:
            group.create_task(self._send_loop())
            group.create_task(self._receive_loop())

    async def _send_loop(self) -> None:
        # One connection of its own, spoken to directly: the client's per-command machinery (pool,
        # retries, hooks) cost more than the PUBLISH itself, and a channel's messages stay in order.
        connection: Connection | None = None
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                batch, self._queue = self._queue, []
                # One message per channel: a burst of chunks for one replica costs one PUBLISH.
                by_channel: dict[str, list[tuple[bytes, OnLost | None]]] = {}
                for channel, payload, on_lost in batch:
                    by_channel.setdefault(channel, []).append((payload, on_lost))
                commands = [
                    ("PUBLISH", channel, _RECORDS.join(payload for payload, _ in entries))
                    for channel, entries in by_channel.items()
                ]
                counts: list[int]
                try:
                    if connection is None:
                        connection = await self._connection()
                    await connection.send_packed_command(
                        connection.pack_commands(commands), check_health=False
                    )
                    counts = [int(await connection.read_response()) for _ in commands]
                    self.connected = True
                except (RedisError, OSError) as exc:
                    if self.connected:
                        log.warning("replica messages could not be sent to Redis: %r", exc)
                    self.connected = False
                    counts = [0] * len(commands)
                    await self._discard(connection)
                    connection = None
                for entries, count in zip(by_channel.values(), counts, strict=True):
                    if count == 0:
                        for _, on_lost in entries:
                            if on_lost is not None:
                                on_lost()
        finally:
            await self._discard(connection)

    async def _receive_loop(self) -> None:
        while True:
            connection: Connection | None = None
            try:
                connection = await self._connection()
                await connection.send_command("SUBSCRIBE", self._channel, check_health=False)
                await connection.read_response(push_request=True)  # the subscription's confirmation
                self.subscribed.set()
                pinged = False
                while True:
                    reply = await connection.read_response(timeout=self._idle, push_request=True)
                    if reply is None:
                        # Quiet for a while: a PING proves the connection is still there (its answer,
                        # or any message, comes before the next wait is over).
                        if pinged:
                            raise RedisConnectionError(f"Redis did not answer a PING in {self._idle:g} s")
                        await connection.send_command("PING", check_health=False)
                        pinged = True
                        continue
                    pinged = False
                    if not isinstance(reply, list) or len(reply) != 3 or reply[0] != b"message":
                        continue
                    try:
                        envelopes = decode_message(reply[2])
                    except EnvelopeError as exc:
                        log.warning("ignored a bad message on %s: %s", self._channel, exc)
                        continue
                    for envelope in envelopes:
                        await self._on_envelope(envelope)
            except (RedisError, OSError) as exc:
                if self.subscribed.is_set():
                    log.warning("lost the replica channel %s: %r; retrying", self._channel, exc)
            except Exception:
                # A bug must not leave the replica deaf for good: say so, and listen again.
                log.exception("the replica channel %s failed; listening again", self._channel)
            finally:
                self.subscribed.clear()
                await self._discard(connection)
            await asyncio.sleep(self._retry)

    async def _connection(self) -> Connection:
        """A connection of the client's pool, held by this mailbox until it breaks."""
        pool = self._redis.connection_pool
        connection = cast(Connection, await pool.get_connection())  # type: ignore[no-untyped-call]
        connection.health_check_interval = 0  # its loop checks it: a health PING would interleave
        return connection

    async def _discard(self, connection: Connection | None) -> None:
        """Close a connection this mailbox held (broken, or no longer needed)."""
        if connection is not None:
            with contextlib.suppress(RedisError, OSError):
                await connection.disconnect()
            with contextlib.suppress(RedisError, OSError):
                await self._redis.connection_pool.release(connection)
