"""A hive of several queen replicas joined by Redis (`--redis-url`): who holds which workers.

Every third of `--replica-lease` each replica writes one announcement, a key that expires after the
lease unless renewed: its workers (registration without secrets, slots, the slots it holds for each
other replica, draining, measured speed). It reads the others' announcements in the same beat and
mirrors their workers into its own hive as `RemoteWorker`s, so that scheduling picks across the whole
hive and forwarding runs a request on any worker the same way (queenbee/remote_worker.py); the jobs the
others send here are run by `ReplicaJobs`.

Nothing is a counter that a crash could leave behind: a replica that dies stops renewing, its key
expires, the others drop its workers (their streams end with WorkerGone, which forwarding resumes or
retries) and cancel what its clients ran on theirs. While Redis is unreachable a replica keeps serving
its own workers, says so in /health and `queenbee_redis_up`, drops the mirrors once the lease has
passed, and rejoins at the first beat that reaches Redis again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from protocol import CacheSummary, FrameError, Register, decode_worker_frame, encode
from queenbee.hive import Hive
from queenbee.metrics import RecentActivity
from queenbee.ratelimit_redis import SharedRateLimiter
from queenbee.remote_worker import RemoteWorker
from queenbee.replica_jobs import ReplicaJobs
from queenbee.replica_link import Envelope, Mailbox, channel_of
from queenbee.settings import QueenSettings
from queenbee.worker_session import ModelSpeed, WorkerSession

log = logging.getLogger("queenbee.replicas")

T = TypeVar("T")

PREFIX = "queenbee:"
"""Every key and channel of the hive starts with it."""

_EARLY_SUMMARIES = 4096
"""At most this many summaries wait for their workers to be mirrored."""

_SERVED = ("requests", "errors", "prompt_tokens", "completion_tokens")
"""The totals each replica announces of its own clients' requests."""

_RATES = (
    "requests_per_minute",
    "prompt_tokens_per_second",
    "completion_tokens_per_second",
    "errors_per_minute",
)
"""The throughput each replica announces of its own clients' requests, over the last window."""

_SECRETS = {"auth_key", "auditor_token", "training"}
"""Left out of announcements: secrets, and fine-tuning, which stays with the replica holding the worker."""


async def _off_loop(function: Callable[[Any], T], argument: Any, size: int) -> T:
    """`function(argument)`, in a thread when `size` (workers, or about) makes it long enough to hold
    up the requests on the event loop."""
    if size < 500:
        return function(argument)
    return await asyncio.to_thread(function, argument)


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("this replica left the hive: its task failed", exc_info=task.exception())


def new_replica_id() -> str:
    """A random replica name (when --replica-id is not given)."""
    return "replica-" + os.urandom(4).hex()


@dataclass
class ReplicaView:
    """Another replica as its last announcement showed it."""

    id: str
    announced_at: float
    workers: int
    slots: int
    busy: int
    jobs_relayed: int
    jobs_run: int = 0
    """Jobs of other replicas' clients its workers ran since it started."""
    requests: int = 0
    """Requests of its own clients finished since it started (the ledger rows it wrote)."""
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    rates: dict[str, float] = field(default_factory=dict)
    """Its own clients' throughput over the last window, as announced (`_RATES`)."""


@dataclass
class ReplicaStatus:
    """How this replica stands with Redis, for /health and the metrics."""

    redis_up: bool = False
    last_contact: float | None = None
    """Monotonic time of the last beat that reached Redis."""
    outages: int = 0
    replicas: dict[str, ReplicaView] = field(default_factory=dict)


class ReplicaHive:
    """This queen's membership of a hive of replicas."""

    def __init__(self, hive: Hive, settings: QueenSettings, redis: Redis, replica_id: str) -> None:
        self.hive = hive
        self.settings = settings
        self.redis = redis
        self.id = replica_id
        self.status = ReplicaStatus()
        self.mailbox = Mailbox(
            redis, channel_of(PREFIX, replica_id), self._received, idle=settings.replica_lease
        )
        self.jobs = ReplicaJobs(hive, settings, self.mailbox, replica_id=replica_id, prefix=PREFIX)
        self._mirrors: dict[str, RemoteWorker] = {}
        """Workers of the other replicas, by worker id."""
        self._written: set[str] = set()
        """Local workers whose registration is in this replica's roster in Redis."""
        self._task: asyncio.Task[None] | None = None
        self.activity: RecentActivity | None = None
        """This replica's totals, announced so that every replica's /metrics shows every replica's."""
        self._summaries: dict[tuple[str, str], bytes] = {}
        """The last cache summary of each local worker and model, encoded: shared with the others, and
        again with a replica that joins."""
        self._early: dict[tuple[str, str, str], tuple[CacheSummary, float]] = {}
        """Summaries of other replicas' workers not mirrored yet (they come before the next beat)."""
        hive.summary_listener = self._share_summary
        self.limiter: SharedRateLimiter | None = None
        """The hive's rate limits, whose leases in flight each beat renews."""
        hive.replica_id = replica_id

    @classmethod
    def from_settings(cls, hive: Hive, settings: QueenSettings) -> ReplicaHive:
        """The membership --redis-url and --replica-id describe (nothing is contacted yet)."""
        assert settings.redis_url is not None
        beat = settings.replica_lease / 3
        redis = Redis.from_url(
            settings.redis_url,
            socket_timeout=max(beat, 0.5),
            socket_connect_timeout=max(beat, 0.5),
            health_check_interval=max(1, round(settings.replica_lease)),
        )
        return cls(hive, settings, redis, settings.replica_id or new_replica_id())

    def start(self) -> None:
        """Join the hive: announce, listen and read the others in the background."""
        self._task = asyncio.get_running_loop().create_task(self._run())
        self._task.add_done_callback(_report_crash)

    async def close(self) -> None:
        """Leave the hive: stop, withdraw the announcement (others drop our workers at once)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            async with asyncio.timeout(self.settings.replica_lease):
                await self.redis.delete(self._key(self.id), self._roster(self.id))
        except (RedisError, OSError, TimeoutError):
            log.info("could not withdraw this replica's announcement; it expires with its lease")
        await self.redis.aclose()

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.mailbox.run())
            group.create_task(self._beat_forever())

    def _key(self, replica_id: str) -> str:
        return f"{PREFIX}announce:{replica_id}"

    def _roster(self, replica_id: str) -> str:
        return f"{PREFIX}roster:{replica_id}"

    async def _beat_forever(self) -> None:
        interval = self.settings.replica_lease / 3
        # The first announcement waits (a little) for the channel: a replica not listening stays out.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await self.mailbox.subscribed.wait()
        while True:
            try:
                async with asyncio.timeout(interval * 2):
                    await self.beat()
            except (RedisError, OSError, TimeoutError) as exc:
                self._unreachable(exc)
            except Exception:
                # A bug must not take the replica out of the hive for good: say so, and beat again.
                log.exception("a heartbeat of replica %s failed", self.id)
            await asyncio.sleep(interval)

    async def beat(self) -> None:
        """Announce this replica's workers and read the others' (one heartbeat)."""
        lease_ms = int(self.settings.replica_lease * 1000)
        members = f"{PREFIX}replicas"
        # A replica whose channel is not subscribed (yet, or again) would never hear its answers: it
        # stays out of the hive, announcing nothing and using no other replica's worker, until it is.
        listening = self.mailbox.subscribed.is_set()
        local = {worker.id: worker for worker in self.hive.workers.values() if worker.replica is None}
        joined = {
            worker_id: worker.registration.model_dump_json(exclude=_SECRETS)
            for worker_id, worker in local.items()
            if worker_id not in self._written
        }
        left = [worker_id for worker_id in self._written if worker_id not in local]
        for key in [key for key in self._summaries if key[0] not in local]:
            del self._summaries[key]
        announcement = await _off_loop(json.dumps, self._announcement(local), len(local))
        async with self.redis.pipeline(transaction=False) as pipe:
            if listening:
                # Registrations go once, to the roster; each beat carries only what changes.
                if joined:
                    pipe.hset(self._roster(self.id), mapping=joined)  # type: ignore[arg-type]
                if left:
                    pipe.hdel(self._roster(self.id), *left)
                pipe.pexpire(self._roster(self.id), lease_ms)
                pipe.set(self._key(self.id), announcement, px=lease_ms)
            else:
                pipe.delete(self._key(self.id), self._roster(self.id))
            pipe.zadd(members, {self.id: time.time()})
            # A replica not seen for a minute is long gone: its name need not be listed any more.
            pipe.zremrangebyscore(members, "-inf", time.time() - 60)
            pipe.zrange(members, 0, -1)
            results = await pipe.execute()
        others = [name.decode() for name in results[-1] if name.decode() != self.id]
        if not listening:
            self._written.clear()
            for worker_id in list(self._mirrors):
                self._drop_mirror(worker_id, "this replica's channel is not subscribed")
            return
        self._written.update(joined)
        self._written.difference_update(left)
        if not results[int(bool(joined)) + int(bool(left))]:
            self._written.clear()  # the roster was gone (Redis restarted empty): written again next beat
        values = cast(
            list[bytes | None], await self.redis.mget([self._key(n) for n in others]) if others else []
        )
        if not self.mailbox.connected:
            # A send failed since: the mirrors looked full meanwhile, and are ranked again now.
            self.mailbox.connected = True
            for mirror in list(self._mirrors.values()):
                self.hive.slot_freed(mirror)
        if not self.status.redis_up:
            log.info("replica %s is in the hive (Redis reachable)", self.id)
        self.status.redis_up = True
        self.status.last_contact = time.monotonic()
        await self._update(dict(zip(others, values, strict=True)))
        # Summaries of workers not announced within a lease are not coming: let them go.
        stale = time.monotonic() - self.settings.replica_lease
        for early in [early for early, (_, at) in self._early.items() if at < stale]:
            del self._early[early]
        if self.limiter is not None:
            await self.limiter.renew()
            self.limiter.reachable_again()

    def _unreachable(self, exc: BaseException) -> None:
        if self.status.redis_up:
            self.status.outages += 1
            log.warning("Redis is unreachable (%r): serving this replica's own workers only", exc)
        self.status.redis_up = False
        last = self.status.last_contact
        if last is None or time.monotonic() - last > self.settings.replica_lease:
            # The others have dropped us by now, as we drop them: nothing sent to them would arrive.
            for name in list(self.status.replicas):
                self._replica_gone(name, "Redis is unreachable")

    def _announcement(self, local: dict[str, WorkerSession]) -> dict[str, Any]:
        """What changes from beat to beat: each local worker's load, draining and speed (empty fields
        left out), and this replica's totals."""
        held = self.jobs.held_by_worker()
        workers = []
        for worker in local.values():
            entry: dict[str, Any] = {"id": worker.id, "at": worker.connected_at, "busy": worker.in_flight}
            if worker.id in held:
                entry["held_for"] = held[worker.id]
            # A replica shutting down takes no more jobs: its workers show as draining.
            if worker.draining or worker.closed or self.hive.draining:
                entry["draining"] = True
            if worker.speed:
                entry["speed"] = {
                    model: [speed.ttft, speed.tokens_per_second, speed.samples]
                    for model, speed in worker.speed.items()
                }
            workers.append(entry)
        return {
            "replica": self.id,
            "at": time.time(),
            "jobs_relayed": self.jobs.running,
            "jobs_run": self.jobs.started,
            "served": self._served(),
            "rates": self._rates(),
            "workers": workers,
        }

    def _served(self) -> dict[str, int]:
        """This replica's own clients' totals, as it announces them."""
        activity = self.activity
        if activity is None:
            return {}
        totals = activity.totals
        return {
            "requests": totals.requests,
            "errors": activity.failed,
            "prompt_tokens": totals.prompt_tokens,
            "completion_tokens": totals.completion_tokens,
        }

    def _rates(self) -> dict[str, float]:
        """This replica's own clients' throughput over the last window, as it announces it."""
        activity = self.activity
        if activity is None:
            return {}
        throughput = activity.throughput()
        return {name: throughput[name] for name in _RATES}

    def own_view(self) -> ReplicaView:
        """This replica as the others see it in its announcements, as of now."""
        local = [worker for worker in self.hive.workers.values() if worker.replica is None]
        served = self._served()
        return ReplicaView(
            id=self.id,
            announced_at=time.time(),
            workers=len(local),
            slots=sum(worker.parallel for worker in local),
            busy=sum(worker.in_flight for worker in local),
            jobs_relayed=self.jobs.running,
            jobs_run=self.jobs.started,
            requests=served.get("requests", 0),
            errors=served.get("errors", 0),
            prompt_tokens=served.get("prompt_tokens", 0),
            completion_tokens=served.get("completion_tokens", 0),
            rates=self._rates(),
        )

    def stats(self) -> dict[str, Any]:
        """The whole hive's traffic for /stats: every live replica's own clients' totals and throughput
        (this one's now, the others' as last announced), summed."""
        served: Counter[str] = Counter()
        rates: Counter[str] = Counter()
        for view in [self.own_view(), *self.status.replicas.values()]:
            served.update({name: getattr(view, name) for name in _SERVED})
            rates.update(view.rates)
        return {
            "replica": self.id,
            "replicas": sorted([self.id, *self.status.replicas]),
            "totals": {
                "requests": served["requests"],
                "failed": served["errors"],
                "prompt_tokens": served["prompt_tokens"],
                "completion_tokens": served["completion_tokens"],
            },
            "throughput": {name: round(rates[name], 3) for name in _RATES},
        }

    async def _update(self, announcements: dict[str, bytes | None]) -> None:
        """Mirror the other replicas' workers as their announcements now stand (reading the roster for
        the workers not mirrored yet)."""
        for name in [name for name in self.status.replicas if announcements.get(name) is None]:
            self._replica_gone(name, "its announcement expired")
        for name, value in announcements.items():
            if value is None:
                continue
            try:
                body = await _off_loop(json.loads, value, len(value) // 100)
                entries = body["workers"]
                new = [str(e["id"]) for e in entries if str(e["id"]) not in self._mirrors]
                new = [worker_id for worker_id in new if worker_id not in self.hive.workers]
                roster: dict[str, Register] = {}
                if new:
                    found = await self.redis.hmget(self._roster(name), new)
                    for worker_id, data in zip(new, found, strict=True):
                        if data is not None:
                            roster[worker_id] = Register.model_validate_json(data)
                self._mirror(name, body, roster)
            except (ValueError, KeyError, TypeError, ValidationError) as exc:
                log.warning("ignored replica %s's announcement: %r", name, exc)

    def _cached(self, envelope: Envelope, mirror: RemoteWorker | None) -> None:
        """Another replica's worker holds these prefixes: routed by here too (kept until the worker is
        mirrored, if it is not yet)."""
        try:
            summary = decode_worker_frame(envelope.frame, limit=self.settings.max_frame_bytes)
        except FrameError as exc:
            log.warning("ignored a cache summary from replica %s: %s", envelope.origin, exc.message)
            return
        if not isinstance(summary, CacheSummary):
            return
        if mirror is not None and mirror.replica == envelope.origin:
            self.hive.cache_summary(mirror, summary)
        elif mirror is None and len(self._early) < _EARLY_SUMMARIES:
            self._early[(envelope.origin, envelope.worker_id, summary.model)] = (summary, time.monotonic())

    def _share_summary(self, worker: WorkerSession, summary: CacheSummary) -> None:
        """A local worker's cache summary goes to every other replica, and is kept for newcomers."""
        frame = encode(summary).encode()
        self._summaries[(worker.id, summary.model)] = frame
        for name in self.status.replicas:
            self._send_summary(name, worker.id, frame)

    def _send_summary(self, name: str, worker_id: str, frame: bytes) -> None:
        envelope = Envelope("cache", self.id, worker_id, "", "", frame)
        self.mailbox.send(channel_of(PREFIX, name), envelope)

    def _mirror(self, name: str, body: dict[str, Any], roster: dict[str, Register]) -> None:
        seen: set[str] = set()
        slots = busy = 0
        for entry in body["workers"]:
            worker_id = str(entry["id"])
            mirror = self._mirrors.get(worker_id)
            if mirror is None:
                registration = roster.get(worker_id)
                if registration is None:
                    # Ours (the same connection cannot be on two replicas: ours is the one that is
                    # live), or not in the roster yet: seen at a later beat.
                    continue
                mirror = self._add_mirror(name, worker_id, registration)
            seen.add(worker_id)
            held = entry.get("held_for") or {}
            others = max(0, int(entry["busy"]) - int(held.get(self.id, 0)))
            speed = {
                model: ModelSpeed(ttft=values[0], tokens_per_second=values[1], samples=int(values[2]))
                for model, values in (entry.get("speed") or {}).items()
            }
            before = (mirror.others, mirror.draining)
            mirror.announced(
                others=others,
                draining=bool(entry.get("draining")),
                speed=speed,
                connected_at=float(entry["at"]),
            )
            if (mirror.others, mirror.draining) != before:
                self.hive.slot_freed(mirror)  # re-ranked, and a waiter may now fit
            slots += mirror.parallel
            busy += int(entry["busy"])
        for worker_id in [w for w, m in self._mirrors.items() if m.replica == name and w not in seen]:
            self._drop_mirror(worker_id, f"the worker left replica {name}")
        if name not in self.status.replicas:
            # A replica new to this one: what this one's workers hold, so that it can route by it.
            for (worker_id, _), frame in list(self._summaries.items()):
                self._send_summary(name, worker_id, frame)
        self.status.replicas[name] = ReplicaView(
            id=name,
            announced_at=float(body.get("at", 0.0)),
            workers=len(seen),
            slots=slots,
            busy=busy,
            jobs_relayed=int(body.get("jobs_relayed", 0)),
            jobs_run=int(body.get("jobs_run", 0)),
            **{name: int(value) for name, value in (body.get("served") or {}).items() if name in _SERVED},
            rates={
                name: float(value)
                for name, value in (body.get("rates") or {}).items()
                if name in _RATES and math.isfinite(float(value)) and float(value) >= 0
            },
        )

    def _add_mirror(self, name: str, worker_id: str, registration: Register) -> RemoteWorker:
        settings = self.settings
        mirror = RemoteWorker(
            worker_id,
            registration,
            replica=name,
            origin=self.id,
            mailbox=self.mailbox,
            channel=channel_of(PREFIX, name),
            on_slot_free=self.hive.slot_freed,
            cancel_grace=settings.cancel_grace,
            max_frame_bytes=settings.max_frame_bytes,
            max_buffer_bytes=settings.max_request_buffer_bytes,
            max_response_bytes=settings.max_response_bytes,
            health=self.hive.health_of(registration.instance_id),
        )
        self._mirrors[worker_id] = mirror
        self.hive.add(mirror)
        for key in [key for key in self._early if key[:2] == (name, worker_id)]:
            self.hive.cache_summary(mirror, self._early.pop(key)[0])
        log.info(
            "worker %s of replica %s joins this replica's view: models=%s parallel=%d",
            worker_id,
            name,
            ",".join(sorted(mirror.models)),
            mirror.parallel,
        )
        return mirror

    def _drop_mirror(self, worker_id: str, reason: str) -> None:
        mirror = self._mirrors.pop(worker_id, None)
        if mirror is None:
            return
        self.hive.remove(mirror)
        mirror.fail_all(reason)

    def _replica_gone(self, name: str, why: str) -> None:
        log.warning("replica %s left the hive: %s", name, why)
        self.status.replicas.pop(name, None)
        for worker_id in [w for w, m in self._mirrors.items() if m.replica == name]:
            self._drop_mirror(worker_id, f"replica {name} left the hive ({why})")
        self.jobs.origin_gone(name)

    async def _received(self, envelope: Envelope) -> None:
        if envelope.kind in ("job", "cancel"):
            self.jobs.received(envelope)
            return
        mirror = self._mirrors.get(envelope.worker_id)
        if envelope.kind == "cache":
            self._cached(envelope, mirror)
            return
        if mirror is None or mirror.replica != envelope.origin:
            return  # a request of a mirror dropped meanwhile: it has already ended with WorkerGone
        if envelope.kind == "out":
            await mirror.deliver(envelope.frame)
        else:
            mirror.lost(envelope.request_id, f"on replica {envelope.origin}: {envelope.arg}")

    def health(self) -> dict[str, Any]:
        """The hive as /health shows it."""
        return {
            "replica": self.id,
            "redis": "ok" if self.status.redis_up else "unavailable",
            "replicas": sorted([self.id, *self.status.replicas]),
            "remote_workers": len(self._mirrors),
        }


class ReplicaCollector:
    """The hive's gauges, per replica, read at scrape time."""

    def __init__(self, replicas: ReplicaHive) -> None:
        self.replicas = replicas

    def collect(self) -> Iterable[Metric]:
        """Redis's reachability, and every replica's workers and slots as last announced."""
        replicas = self.replicas
        up = GaugeMetricFamily(
            "queenbee_redis_up",
            "Whether this replica reaches the hive's Redis (1) or not (0).",
            labels=["replica"],
        )
        up.add_metric([replicas.id], float(replicas.status.redis_up))
        yield up
        yield GaugeMetricFamily(
            "queenbee_redis_outages",
            "Times this replica lost Redis since it started.",
            value=replicas.status.outages,
        )
        workers = GaugeMetricFamily(
            "queenbee_replica_workers", "Workers connected to each replica of the hive.", labels=["replica"]
        )
        slots = GaugeMetricFamily(
            "queenbee_replica_slots", "Request slots of each replica's workers.", labels=["replica", "state"]
        )
        relayed = GaugeMetricFamily(
            "queenbee_replica_jobs_relayed",
            "Requests of other replicas' clients running on each replica's workers now.",
            labels=["replica"],
        )
        run = CounterMetricFamily(
            "queenbee_replica_jobs_run",
            "Requests of other replicas' clients each replica's workers ran, since it started.",
            labels=["replica"],
        )
        served = {
            name: CounterMetricFamily(
                f"queenbee_replica_{name}",
                f"{name.replace('_', ' ').capitalize()} of each replica's own clients' requests, since it "
                "started (finished requests; the errors among them; their tokens).",
                labels=["replica"],
            )
            for name in _SERVED
        }
        views = [replicas.own_view(), *replicas.status.replicas.values()]
        for view in views:
            workers.add_metric([view.id], view.workers)
            slots.add_metric([view.id, "busy"], view.busy)
            slots.add_metric([view.id, "free"], max(0, view.slots - view.busy))
            relayed.add_metric([view.id], view.jobs_relayed)
            run.add_metric([view.id], view.jobs_run)
            for name, family in served.items():
                family.add_metric([view.id], getattr(view, name))
        yield workers
        yield slots
        yield relayed
        yield run
        yield from served.values()
