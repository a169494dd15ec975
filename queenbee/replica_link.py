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
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

log = logging.getLogger("queenbee.replicas")

Kind = Literal["job", "cancel", "out", "gone"]
_KINDS: frozenset[str] = frozenset({"job", "cancel", "out", "gone"})
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
    ) -> None:
        self._redis = redis
        self._channel = channel
        self._on_envelope = on_envelope
        self._retry = retry
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
        while True:
            await self._ready.wait()
            self._ready.clear()
            batch, self._queue = self._queue, []
            # One message per channel: a burst of chunks for one replica costs one PUBLISH.
            by_channel: dict[str, list[tuple[bytes, OnLost | None]]] = {}
            for channel, payload, on_lost in batch:
                by_channel.setdefault(channel, []).append((payload, on_lost))
            messages = [
                (channel, _RECORDS.join(payload for payload, _ in entries))
                for channel, entries in by_channel.items()
            ]
            counts: list[int]
            try:
                if len(messages) == 1:
                    counts = [int(await self._redis.publish(*messages[0]))]
                else:
                    async with self._redis.pipeline(transaction=False) as pipe:
                        for channel, message in messages:
                            pipe.publish(channel, message)
                        counts = [int(count) for count in await pipe.execute()]
                self.connected = True
            except (RedisError, OSError) as exc:
                if self.connected:
                    log.warning("replica messages could not be sent to Redis: %r", exc)
                self.connected = False
                counts = [0] * len(messages)
            for entries, count in zip(by_channel.values(), counts, strict=True):
                if count == 0:
                    for _, on_lost in entries:
                        if on_lost is not None:
                            on_lost()

    async def _receive_loop(self) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                self.subscribed.set()
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=None)
                    if message is None or message.get("type") != "message":
                        continue
                    try:
                        envelopes = decode_message(message["data"])
                    except EnvelopeError as exc:
                        log.warning("ignored a bad message on %s: %s", self._channel, exc)
                        continue
                    for envelope in envelopes:
                        await self._on_envelope(envelope)
            except (RedisError, OSError) as exc:
                if self.subscribed.is_set():
                    log.warning("lost the replica channel %s: %r; retrying", self._channel, exc)
                self.subscribed.clear()
            finally:
                self.subscribed.clear()
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self._retry)
