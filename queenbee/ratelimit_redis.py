"""Per-key limits shared by every replica of a hive, on Redis: one key cannot multiply them by replicas.

The same limits as `RateLimiter` (ratelimit.py), kept in Redis and decided by Lua scripts, each one
atomic on the server, on the server's clock: requests in the window (a sorted set of admissions),
tokens used in the window (a sorted set of settlements), requests in flight and their token
reservations (a sorted set of leases by expiry, and a hash of what each reserved). A request in
flight is a lease its replica renews every third of `--replica-lease`: a replica that dies stops
renewing, and its requests stop counting one lease later. Nothing is a counter a crash could leave
behind.

When Redis cannot be reached the replica falls back to its own in-memory limits (a key may then use
them once per replica) and says so once in the log, without trying Redis again per request until a
heartbeat reaches it; /health and `queenbee_redis_up` show the outage.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from queenbee.auth import ApiKey, ClientKeys
from queenbee.errors import RateLimited
from queenbee.ratelimit import OPEN, Lease, Limits, RateLimiter, _seconds
from queenbee.settings import QueenSettings

log = logging.getLogger("queenbee.ratelimit")

_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - window)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('HDEL', KEYS[4], id)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local function used()
  local total = 0
  for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
    total = total + tonumber(string.match(member, ':(%d+)$'))
  end
  return total
end
local function reserved()
  local total = 0
  for _, value in ipairs(redis.call('HVALS', KEYS[4])) do total = total + tonumber(value) end
  return total
end
local function free_in(tpm)
  local remaining = used()
  local entries = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  for i = 1, #entries, 2 do
    remaining = remaining - tonumber(string.match(entries[i], ':(%d+)$'))
    if remaining < tpm then return tonumber(entries[i + 1]) + window - now end
  end
  return window
end
local function keep()
  for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], window + tonumber(ARGV[2])) end
end
"""

ADMIT = (
    _PRELUDE
    + """
-- ARGV: window_ms lease_ms lease_id rpm tpm max_concurrent (0: unlimited)
local rpm, tpm, concurrent = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if concurrent > 0 and redis.call('ZCARD', KEYS[3]) >= concurrent then return {'concurrency', 1000} end
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {'requests', tonumber(oldest[2]) + window - now}
end
if tpm > 0 then
  local u, r = used(), reserved()
  if u + r >= tpm then
    local wait = 1000
    if r == 0 then wait = free_in(tpm) end
    return {'tokens', wait, u, r}
  end
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[2]), ARGV[3])
keep()
return {'ok'}
"""
)

RESERVE = (
    _PRELUDE
    + """
-- ARGV: window_ms lease_ms lease_id tokens tpm
local tokens, tpm = tonumber(ARGV[4]), tonumber(ARGV[5])
local u, r = used(), reserved()
if u + r > 0 and u + r + tokens > tpm then
  local wait = 1000
  if r == 0 then wait = free_in(tpm) end
  return {'tokens', wait, u, r}
end
redis.call('HINCRBY', KEYS[4], ARGV[3], tokens)
keep()
return {'ok'}
"""
)

SETTLE = (
    _PRELUDE
    + """
-- ARGV: window_ms lease_ms lease_id tokens
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[3])
local tokens = tonumber(ARGV[4])
if tokens > 0 then redis.call('ZADD', KEYS[2], now, ARGV[3] .. ':' .. tokens) end
keep()
return {'ok'}
"""
)

RENEW = """
-- ARGV: lease_ms lease_id...
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
return #ARGV - 1
"""


class SharedLease(Lease):
    """A lease held in Redis: its id names its admission, its reservation and its hold on a slot."""

    shared = True

    def __init__(self, limiter: SharedRateLimiter, bucket: str) -> None:
        super().__init__(limiter, bucket)
        self.id = os.urandom(8).hex()
        self.shared_limiter = limiter

    async def reserve_shared(self, tokens: int) -> None:
        """Reserve the most tokens the request may use across the hive, or raise RateLimited."""
        if not self.settled:
            await self.shared_limiter.reserve_shared(self, tokens)


class SharedRateLimiter(RateLimiter):
    """The hive's limits in Redis; in-memory `RateLimiter` ones while Redis is unreachable."""

    shared = True

    def __init__(
        self,
        default: Limits,
        per_key: dict[str, Limits] | None,
        redis: Redis,
        *,
        lease: float,
        window: float = 60.0,
    ) -> None:
        super().__init__(default, per_key, window=window)
        self._redis = redis
        self._lease_ms = int(lease * 1000)
        self._window_ms = int(window * 1000)
        self._admit = redis.register_script(ADMIT)
        self._reserve_script = redis.register_script(RESERVE)
        self._settle_script = redis.register_script(SETTLE)
        self._renew = redis.register_script(RENEW)
        self._live: dict[str, dict[str, SharedLease]] = {}
        """Leases in flight on this replica, by bucket: renewed every beat."""
        self._tasks: set[asyncio.Task[None]] = set()
        self.reachable = True

    @classmethod
    def shared_from_settings(
        cls, settings: QueenSettings, clients: ClientKeys, redis: Redis
    ) -> SharedRateLimiter:
        """The queen's limits, with the keys file's overrides, kept in `redis`."""
        local = RateLimiter.from_settings(settings, clients)
        return cls(local.default, local.per_key, redis, lease=settings.replica_lease)

    @staticmethod
    def _keys(bucket: str) -> list[str]:
        # One hash tag per bucket: the four keys of a script live on one node of a cluster.
        tag = f"queenbee:rl:{{{bucket or ' open'}}}"
        return [f"{tag}:requests", f"{tag}:tokens", f"{tag}:held", f"{tag}:reserved"]

    async def admit_shared(self, key: ApiKey | None) -> Lease:
        """Count a new request against its key across the hive and hold a slot, or raise RateLimited."""
        bucket = key.id if key is not None else OPEN
        limits = self.limits(bucket)
        if limits.unlimited:
            return Lease(None, bucket)
        if not self.reachable:
            # Not a connection attempt per request while Redis is out: the replica's beat says when
            # it is back (`reachable_again`).
            return self.admit(key)
        lease = SharedLease(self, bucket)
        args: list[int | str] = [self._window_ms, self._lease_ms, lease.id, limits.rpm or 0, limits.tpm or 0]
        try:
            answer = await self._admit(keys=self._keys(bucket), args=[*args, limits.max_concurrent or 0])
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return self.admit(key)
        self._reachable()
        self._refuse_if(answer, limits, 0)
        self._live.setdefault(bucket, {})[lease.id] = lease
        return lease

    async def reserve_shared(self, lease: SharedLease, tokens: int) -> None:
        """Reserve `tokens` for a lease across the hive, or raise RateLimited."""
        limits = self.limits(lease.bucket)
        if limits.tpm is None or tokens <= 0:
            return
        args: list[int | str] = [self._window_ms, self._lease_ms, lease.id, tokens, limits.tpm]
        try:
            answer = await self._reserve_script(keys=self._keys(lease.bucket), args=args)
        except (RedisError, OSError) as exc:
            self._unreachable(exc)
            return  # admitted by the hive; the reservation is what an outage costs
        self._refuse_if(answer, limits, tokens)
        lease.reserved += tokens

    def _settle(self, lease: Lease, tokens: int) -> None:
        if not isinstance(lease, SharedLease):
            super()._settle(lease, tokens)
            return
        self._live.get(lease.bucket, {}).pop(lease.id, None)
        counted = tokens if self.limits(lease.bucket).tpm is not None else 0
        task = asyncio.get_running_loop().create_task(self._settle_in_redis(lease, counted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _settle_in_redis(self, lease: SharedLease, tokens: int) -> None:
        try:
            async with asyncio.timeout(self._lease_ms / 1000):
                args: list[int | str] = [self._window_ms, self._lease_ms, lease.id, tokens]
                await self._settle_script(keys=self._keys(lease.bucket), args=args)
        except (RedisError, OSError, TimeoutError) as exc:
            # Unrenewed, the lease stops counting within one lease; its tokens are what is lost.
            self._unreachable(exc)

    async def renew(self) -> None:
        """Renew the leases of this replica's requests in flight (called every beat)."""
        for bucket, leases in list(self._live.items()):
            if not leases:
                del self._live[bucket]
                continue
            await self._renew(keys=self._keys(bucket)[2:3], args=[self._lease_ms, *leases])

    def _refuse_if(self, answer: list[Any], limits: Limits, requested: int) -> None:
        verdict = answer[0].decode() if isinstance(answer[0], bytes) else str(answer[0])
        if verdict == "ok":
            return
        wait = _seconds(int(answer[1]) / 1000)
        if verdict == "concurrency":
            raise RateLimited(
                f"Too many concurrent requests: limit {limits.max_concurrent} in flight per key across "
                "the hive. Please try again when one has finished.",
                limit="requests",
                retry_after=1,
            )
        if verdict == "requests":
            raise RateLimited(
                f"Rate limit reached on requests per minute (RPM): limit {limits.rpm}. "
                f"Please try again in {wait}s.",
                limit="requests",
                retry_after=wait,
            )
        asked = f", requested {requested}" if requested else ""
        raise RateLimited(
            f"Rate limit reached on tokens per minute (TPM): limit {limits.tpm}, used {int(answer[2])}, "
            f"reserved by requests in flight {int(answer[3])}{asked}. Please try again in {wait}s.",
            limit="tokens",
            retry_after=wait,
        )

    def _unreachable(self, exc: BaseException) -> None:
        if self.reachable:
            log.warning("Redis is unreachable (%r): rate limits are this replica's own until it is back", exc)
        self.reachable = False

    def _reachable(self) -> None:
        if not self.reachable:
            log.info("Redis is reachable again: rate limits are the hive's")
        self.reachable = True

    def reachable_again(self) -> None:
        """A heartbeat reached Redis: admissions go to the hive's limits again."""
        self._reachable()
