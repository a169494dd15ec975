"""A worker connected to another replica of the hive, as this queen's scheduling and forwarding see it.

A `RemoteWorker` is a `WorkerSession` whose connection is the replica channel: the hive indexes it,
`reserve` takes its slots here, `send_job` and `cancel` travel to the replica holding the worker
(queenbee/replica_link.py), and the frames the worker sends come back through `deliver`, into the
same per-request streams, buffers and bounds as a local worker's. Forwarding cannot tell the two apart:
retries, resumes, deadlines and cancellation are the same code.

Its load is what this queen holds on it plus what the other replicas held at their last announcement
(`others`): scheduling ranks it by both, and the replica holding it refuses a job it has no slot for
(`overloaded`, which forwarding retries elsewhere without blame).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from starlette.types import Message

from protocol import Cancel, ErrorCode, Job, JobError, Register, encode
from protocol.messages import Frame
from queenbee.replica_link import Envelope, Mailbox
from queenbee.worker_session import ModelSpeed, RequestEvent, WorkerGone, WorkerHealth, WorkerSession

log = logging.getLogger("queenbee.replicas")


class NoSocket:
    """The `FrameSocket` of a remote worker: its frames travel by `RemoteWorker.send_job` instead."""

    async def send_text(self, data: str) -> None:
        """Never used: a remote worker sends through the replica channel."""
        raise RuntimeError("a remote worker has no socket of its own")

    async def receive(self) -> Message:
        """Never used: frames arrive through `RemoteWorker.deliver`."""
        raise RuntimeError("a remote worker has no socket of its own")

    async def close(self, code: int = 1000, reason: str | None = None) -> None:
        """Nothing to close: the worker stays connected to its own replica."""


class RemoteWorker(WorkerSession):
    """A worker on replica `replica`, reached through the replica channels."""

    def __init__(
        self,
        worker_id: str,
        registration: Register,
        *,
        replica: str,
        origin: str,
        mailbox: Mailbox,
        channel: str,
        on_slot_free: Callable[[WorkerSession], None],
        cancel_grace: float,
        max_frame_bytes: int,
        max_buffer_bytes: int,
        max_response_bytes: int,
        health: WorkerHealth,
    ) -> None:
        super().__init__(
            worker_id,
            NoSocket(),
            registration,
            on_slot_free=on_slot_free,
            cancel_grace=cancel_grace,
            max_frame_bytes=max_frame_bytes,
            max_buffer_bytes=max_buffer_bytes,
            max_response_bytes=max_response_bytes,
            health=health,
        )
        self.replica = replica
        self.others = 0
        """Slots the other replicas held on the worker at its replica's last announcement."""
        self._origin = origin
        self._mailbox = mailbox
        self._channel = channel

    @property
    def in_flight(self) -> int:
        """Slots held on the worker across the hive: this queen's and the others' (as last announced)."""
        return self._slots_held + self.others

    @property
    def free_slots(self) -> int:
        """Slots that can take a new request, as far as this queen knows (none while the replica
        channel cannot send)."""
        if self.closed or self.draining or not self._mailbox.connected:
            return 0
        return max(0, self.parallel - self._slots_held - self.others)

    def announced(
        self, *, others: int, draining: bool, speed: dict[str, ModelSpeed], connected_at: float
    ) -> None:
        """The worker's replica announced it again: its load elsewhere, whether it drains, its speed."""
        self.others = others
        self.connected_at = connected_at
        if draining and not self.draining:
            self.draining = True
            self.draining_since = time.monotonic()
        for model, measured in speed.items():
            if model in self.models:
                self.speed[model] = measured

    async def send_job(self, job: Job | str, request_id: str | None = None) -> None:
        """Send a job for a reserved slot to the worker's replica; a replica that is gone reads as gone."""
        text = job if isinstance(job, str) else encode(job)
        request_id = request_id or (job.request_id if isinstance(job, Job) else "")
        stream = self._pending.get(request_id)
        slots = stream.slots if stream is not None else 1
        envelope = Envelope("job", self._origin, self.id, request_id, str(slots), text.encode())
        self._mailbox.send(self._channel, envelope, on_lost=lambda: self.lost(request_id))

    async def send(self, frame: Frame) -> None:
        """Send a control frame: only cancels go to another replica's worker."""
        if isinstance(frame, Cancel):
            envelope = Envelope("cancel", self._origin, self.id, frame.request_id)
            self._mailbox.send(self._channel, envelope)

    async def deliver(self, data: bytes) -> None:
        """A frame the worker sent, relayed by its replica."""
        await self._handle(data)

    def _finish(self, request_id: str, event: RequestEvent | None) -> None:
        if isinstance(event, JobError) and event.code is ErrorCode.OVERLOADED:
            # Its replica had no slot for it: the others took what the last announcement showed free.
            # Until the next one says otherwise, the worker is full as far as this queen knows.
            stream = self._pending.get(request_id)
            held_after = self._slots_held - (stream.slots if stream is not None else 0)
            self.others = max(self.others, self.parallel - held_after)
        super()._finish(request_id, event)

    def lost(self, request_id: str, reason: str = "") -> None:
        """The worker's replica did not take the job, or ended it without the worker's word."""
        why = reason or f"replica {self.replica} did not receive the job"
        self._finish(request_id, WorkerGone(why))
