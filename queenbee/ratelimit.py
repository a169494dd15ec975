"""Per-key limits: requests and tokens per minute over a sliding window, and requests in flight.

A request is admitted if its key made fewer than `rpm` requests in the last minute, has fewer than
`max_concurrent` requests in flight, and its tokens (used in the window plus reserved by requests still
running) leave room. Tokens are reserved when a request is admitted (its prompt estimate plus its
`max_tokens`) and settled to what it really used when it ends, so concurrent requests cannot spend many
times a key's limit before any of them has finished. A reservation alone may exceed the limit when
nothing else is in the window: a big request is never refused forever.

Admission hands out a `Lease`; settling it (exactly once, however the request ends) releases the
concurrency slot and turns the reservation into usage.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from queenbee.auth import ApiKey, ClientKeys
from queenbee.errors import RateLimited
from queenbee.settings import QueenSettings

OPEN = ""
"""The bucket of an open queen: without keys, every client shares one set of limits."""


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_total: int = 0
    reserved: int = 0
    in_flight: int = 0

    def expire(self, before: float) -> None:
        while self.requests and self.requests[0] <= before:
            self.requests.popleft()
        while self.tokens and self.tokens[0][0] <= before:
            self.token_total -= self.tokens.popleft()[1]


@dataclass(frozen=True)
class Limits:
    """Requests and tokens per minute; None is unlimited."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None

    @property
    def unlimited(self) -> bool:
        """Whether nothing is limited."""
        return self.rpm is None and self.tpm is None and self.max_concurrent is None


class Lease:
    """One admitted request's hold on its key's limits: a concurrency slot and a token reservation."""

    shared = False
    """Whether the lease is held in Redis, for the whole hive (ratelimit_redis.py): reserved by awaiting."""

    def __init__(self, limiter: RateLimiter | None, bucket: str) -> None:
        self._limiter = limiter
        self.bucket = bucket
        self.reserved = 0
        self.settled = False
        self.handed_over = False
        """Set by whoever takes over settling the lease (the forwarding of the request to a worker)."""

    def reserve(self, tokens: int) -> None:
        """Reserve the most tokens the request may use, or raise RateLimited if the key has no room."""
        if self._limiter is not None and not self.settled:
            self._limiter._reserve(self, tokens)

    def settle(self, tokens: int) -> None:
        """The request ended having used `tokens`: free its slot and charge them (once; later calls no-op)."""
        if self.settled:
            return
        self.settled = True
        if self._limiter is not None:
            self._limiter._settle(self, tokens)


class RateLimiter:
    """Admits requests within their key's limits, and learns each request's tokens when it ends."""

    shared = False
    """Whether admission is shared by a hive of replicas (ratelimit_redis.py): admitted by awaiting."""

    def __init__(
        self,
        default: Limits,
        per_key: dict[str, Limits] | None = None,
        *,
        window: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default
        self.per_key = per_key or {}
        self.window = window
        self._clock = clock
        self._windows: dict[str, _Window] = {}

    @classmethod
    def from_settings(cls, settings: QueenSettings, clients: ClientKeys) -> RateLimiter:
        """The queen's limits, with the keys file's overrides."""
        default = Limits(settings.rate_limit_rpm, settings.rate_limit_tpm, settings.max_concurrent_per_key)
        per_key = {
            key.id: Limits(
                key.rpm if key.rpm is not None else default.rpm,
                key.tpm if key.tpm is not None else default.tpm,
                default.max_concurrent,
            )
            for key in clients.keys
        }
        return cls(default, per_key)

    def limits(self, bucket: str) -> Limits:
        """The limits of a key id (or of the open bucket)."""
        return self.per_key.get(bucket, self.default)

    def admit(self, key: ApiKey | None) -> Lease:
        """Count a new request against its key and hold a slot for it, or raise RateLimited."""
        bucket = key.id if key is not None else OPEN
        limits = self.limits(bucket)
        if limits.unlimited:
            return Lease(None, bucket)
        now = self._clock()
        window = self._windows.setdefault(bucket, _Window())
        window.expire(now - self.window)
        if limits.max_concurrent is not None and window.in_flight >= limits.max_concurrent:
            raise RateLimited(
                f"Too many concurrent requests: limit {limits.max_concurrent} in flight per key. "
                "Please try again when one has finished.",
                limit="requests",
                retry_after=1,
            )
        if limits.rpm is not None and len(window.requests) >= limits.rpm:
            wait = window.requests[0] + self.window - now
            raise RateLimited(
                f"Rate limit reached on requests per minute (RPM): limit {limits.rpm}. "
                f"Please try again in {_seconds(wait)}s.",
                limit="requests",
                retry_after=_seconds(wait),
            )
        if limits.tpm is not None and window.token_total + window.reserved >= limits.tpm:
            self._refuse_tokens(window, limits.tpm, now, 0)
        window.requests.append(now)
        window.in_flight += 1
        return Lease(self, bucket)

    def _reserve(self, lease: Lease, tokens: int) -> None:
        tpm = self.limits(lease.bucket).tpm
        if tpm is None or tokens <= 0:
            return
        window = self._windows.setdefault(lease.bucket, _Window())
        window.expire(self._clock() - self.window)
        committed = window.token_total + window.reserved
        if committed > 0 and committed + tokens > tpm:
            self._refuse_tokens(window, tpm, self._clock(), tokens)
        window.reserved += tokens
        lease.reserved += tokens

    def _settle(self, lease: Lease, tokens: int) -> None:
        window = self._windows.setdefault(lease.bucket, _Window())
        window.in_flight = max(0, window.in_flight - 1)
        window.reserved = max(0, window.reserved - lease.reserved)
        lease.reserved = 0
        if tokens > 0 and self.limits(lease.bucket).tpm is not None:
            window.tokens.append((self._clock(), tokens))
            window.token_total += tokens

    def _refuse_tokens(self, window: _Window, tpm: int, now: float, requested: int) -> None:
        # Reservations end when their requests do, which may be any moment: ask to come back soon.
        wait = 1.0 if window.reserved else self._tokens_free_in(window, tpm, now)
        asked = f", requested {requested}" if requested else ""
        raise RateLimited(
            f"Rate limit reached on tokens per minute (TPM): limit {tpm}, used {window.token_total}, "
            f"reserved by requests in flight {window.reserved}{asked}. "
            f"Please try again in {_seconds(wait)}s.",
            limit="tokens",
            retry_after=_seconds(wait),
        )

    def _tokens_free_in(self, window: _Window, tpm: int, now: float) -> float:
        """Seconds until the tokens in the window drop below `tpm`."""
        remaining = window.token_total
        for at, tokens in window.tokens:
            remaining -= tokens
            if remaining < tpm:
                return at + self.window - now
        return self.window


def _seconds(wait: float) -> int:
    return max(1, math.ceil(wait))
