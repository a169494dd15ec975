"""Per-key rate limits: requests and tokens per minute, over a sliding window.

A request is admitted if its key made fewer than `rpm` requests, and used fewer than `tpm` tokens, in the
last minute. Tokens are only known once a request ends, so the token limit is paid after the fact: the
request that crosses it still runs, and the key waits until enough of its usage has left the window.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from queenbee.auth import ApiKey, ClientKeys
from queenbee.errors import RateLimited
from queenbee.observer import RequestRecord
from queenbee.settings import QueenSettings

OPEN = ""
"""The bucket of an open queen: without keys, every client shares one set of limits."""


@dataclass
class _Window:
    requests: deque[float] = field(default_factory=deque)
    tokens: deque[tuple[float, int]] = field(default_factory=deque)
    token_total: int = 0

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

    @property
    def unlimited(self) -> bool:
        """Whether nothing is limited."""
        return self.rpm is None and self.tpm is None


class RateLimiter:
    """Admits requests within their key's limits, and learns each request's tokens when it ends."""

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
        default = Limits(settings.rate_limit_rpm, settings.rate_limit_tpm)
        per_key = {
            key.id: Limits(
                key.rpm if key.rpm is not None else default.rpm,
                key.tpm if key.tpm is not None else default.tpm,
            )
            for key in clients.keys
        }
        return cls(default, per_key)

    def limits(self, bucket: str) -> Limits:
        """The limits of a key id (or of the open bucket)."""
        return self.per_key.get(bucket, self.default)

    def admit(self, key: ApiKey | None) -> None:
        """Count a new request against its key, or raise RateLimited saying when to come back."""
        bucket = key.id if key is not None else OPEN
        limits = self.limits(bucket)
        if limits.unlimited:
            return
        now = self._clock()
        window = self._windows.setdefault(bucket, _Window())
        window.expire(now - self.window)
        if limits.rpm is not None and len(window.requests) >= limits.rpm:
            wait = window.requests[0] + self.window - now
            raise RateLimited(
                f"Rate limit reached on requests per minute (RPM): limit {limits.rpm}. "
                f"Please try again in {_seconds(wait)}s.",
                limit="requests",
                retry_after=_seconds(wait),
            )
        if limits.tpm is not None and window.token_total >= limits.tpm:
            wait = self._tokens_free_in(window, limits.tpm, now)
            raise RateLimited(
                f"Rate limit reached on tokens per minute (TPM): limit {limits.tpm}, "
                f"used {window.token_total}. Please try again in {_seconds(wait)}s.",
                limit="tokens",
                retry_after=_seconds(wait),
            )
        window.requests.append(now)

    async def request_finished(self, record: RequestRecord) -> None:
        """Charge the request's tokens to its key."""
        bucket = record.api_key_id or OPEN
        tokens = record.prompt_tokens + record.completion_tokens
        if tokens <= 0 or self.limits(bucket).tpm is None:
            return
        window = self._windows.setdefault(bucket, _Window())
        window.tokens.append((self._clock(), tokens))
        window.token_total += tokens

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
