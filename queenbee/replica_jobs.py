"""The jobs other replicas send to this queen's workers: run each, relay what the worker sends back.

The replica that served the client keeps everything about the request (retries, resumes, the ledger
row, the key's limits); this side only holds a slot of its worker for it, sends the job, and relays
the worker's frames to the origin's channel until the request ends. A job for a worker that is full,
draining or gone is refused at once (`overloaded`, or `gone`), and the origin tries elsewhere.

The slots held for each origin are announced with the worker (`held_for`), so the other replicas'
view of the worker's load expires with this replica's announcement: no counter outlives a crash. When
the origin stops listening (a PUBLISH nobody received, or its announcement expired) its requests are
cancelled on the workers.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from protocol import Chunk, Delta, ErrorCode, JobError, Result, ResultPart, encode
from queenbee.hive import Hive
from queenbee.replica_link import Envelope, Kind, Mailbox, channel_of
from queenbee.settings import QueenSettings
from queenbee.worker_session import BufferOverflow, RequestEvent, RequestStream, WorkerSession

log = logging.getLogger("queenbee.replicas")


@dataclass
class _Relayed:
    """A job run here for another replica."""

    origin: str
    worker: WorkerSession
    slots: int
    stream: RequestStream
    timer: asyncio.TimerHandle | None = None
    lost: bool = False
    """The origin stopped listening: the job was cancelled, its last frames go nowhere."""


class ReplicaJobs:
    """Runs jobs from other replicas on this queen's workers and relays their answers."""

    def __init__(
        self,
        hive: Hive,
        settings: QueenSettings,
        mailbox: Mailbox,
        *,
        replica_id: str,
        prefix: str,
    ) -> None:
        self._hive = hive
        self._settings = settings
        self._mailbox = mailbox
        self._replica_id = replica_id
        self._prefix = prefix
        self._running: dict[str, _Relayed] = {}
        self.started = 0
        """Jobs of other replicas started here since this replica started."""

    def held_by_worker(self) -> dict[str, dict[str, int]]:
        """For each local worker running jobs of other replicas, the slots held for each of them."""
        held: dict[str, Counter[str]] = {}
        for relayed in self._running.values():
            held.setdefault(relayed.worker.id, Counter())[relayed.origin] += relayed.slots
        return {worker_id: dict(by_origin) for worker_id, by_origin in held.items()}

    @property
    def running(self) -> int:
        """Jobs of other replicas in flight here."""
        return len(self._running)

    def received(self, envelope: Envelope) -> None:
        """A job or a cancel from another replica."""
        if envelope.kind == "cancel":
            relayed = self._running.get(envelope.request_id)
            if relayed is not None and relayed.origin == envelope.origin:
                relayed.worker.cancel(envelope.request_id)
            return
        self._start(envelope)

    def origin_gone(self, origin: str) -> None:
        """A replica left the hive: cancel what its clients were running here."""
        for request_id, relayed in list(self._running.items()):
            if relayed.origin == origin and not relayed.lost:
                log.info("replica %s left: cancelling its request %s", origin, request_id)
                self._lose(request_id, relayed)

    def _start(self, envelope: Envelope) -> None:
        request_id, origin = envelope.request_id, envelope.origin
        worker = self._hive.workers.get(envelope.worker_id)
        if worker is None or worker.replica is not None or worker.closed:
            self._reply(origin, "gone", envelope.worker_id, request_id, arg="the worker left its replica")
            return
        slots = int(envelope.arg) if envelope.arg.isdigit() else 1
        if request_id in self._running or not request_id or self._hive.draining or not worker.can_take(slots):
            refusal = JobError(
                request_id=request_id or "-",
                code=ErrorCode.OVERLOADED,
                message=f"the worker has no {slots} free slot(s) on replica {self._replica_id}",
            )
            self._reply(origin, "out", worker.id, request_id, frame=encode(refusal).encode())
            return
        stream = self._hive.reserve_on(worker, request_id, slots)
        relayed = self._running[request_id] = _Relayed(origin, worker, slots, stream)
        self.started += 1
        # Each frame goes on as the session's reader hands it over: no task, no queue in between.
        stream.on_event = lambda event: self._forward(request_id, relayed, event)
        # The origin keeps the request's deadlines; this only bounds a job whose origin went quiet.
        limit = self._settings.request_timeout + 2 * self._settings.cancel_grace
        relayed.timer = asyncio.get_running_loop().call_later(limit, self._lose, request_id, relayed)
        self._hive.spawn(worker.send_job(envelope.frame.decode(), request_id))

    def _forward(self, request_id: str, relayed: _Relayed, event: RequestEvent) -> None:
        """Relay one event of a job to its origin; the last one ends the job here."""
        if isinstance(event, Delta | Chunk):
            self._out(relayed, request_id, encode(event))
            return
        if isinstance(event, BufferOverflow):
            # The whole response was too big: the session cancelled it; its last word goes nowhere.
            self._gone(relayed, request_id, event.reason)
            relayed.lost = True
            return
        if isinstance(event, Result):
            for part in relayed.stream.parts:
                self._out(relayed, request_id, encode(ResultPart(request_id=request_id, data=part)))
            relayed.stream.parts = []
            self._out(relayed, request_id, encode(event))
        elif isinstance(event, JobError):
            self._out(relayed, request_id, encode(event))
        else:
            self._gone(relayed, request_id, event.reason)
        self._running.pop(request_id, None)
        if relayed.timer is not None:
            relayed.timer.cancel()

    def _out(self, relayed: _Relayed, request_id: str, frame: str) -> None:
        if relayed.lost:
            return
        self._reply(
            relayed.origin,
            "out",
            relayed.worker.id,
            request_id,
            frame=frame.encode(),
            on_lost=lambda: self._lose(request_id, relayed),
        )

    def _gone(self, relayed: _Relayed, request_id: str, reason: str) -> None:
        if not relayed.lost:
            self._reply(relayed.origin, "gone", relayed.worker.id, request_id, arg=reason)

    def _lose(self, request_id: str, relayed: _Relayed) -> None:
        """The origin is not listening: stop the job (its slot frees when the worker confirms)."""
        if relayed.lost:
            return
        relayed.lost = True
        relayed.worker.cancel(request_id)

    def _reply(
        self,
        origin: str,
        kind: Kind,
        worker_id: str,
        request_id: str,
        *,
        arg: str = "",
        frame: bytes = b"",
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        envelope = Envelope(kind, self._replica_id, worker_id, request_id, arg, frame)
        self._mailbox.send(channel_of(self._prefix, origin), envelope, on_lost)
