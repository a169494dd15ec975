"""The registry of connected workers, and the per-model queues of requests waiting for a free slot."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any

from protocol import CacheSummary
from queenbee.errors import InvalidRequest, ModelNotFound, NoCapacity
from queenbee.prefix_index import CacheRouter, PrefixQuery
from queenbee.scheduling import WorkerIndex
from queenbee.settings import QueenSettings
from queenbee.worker_session import ModelSpeed, RequestStream, WorkerHealth, WorkerSession

log = logging.getLogger("queenbee.hive")

MAX_REMEMBERED_WORKERS = 100_000
"""Worker identities whose health the hive remembers after they leave (least recently seen forgotten)."""

MAX_KNOWN_MODELS = 1024
"""Model ids remembered as served (metric labels): beyond it, new ones are labelled `unknown`."""


@dataclass(frozen=True)
class ModelLimits:
    """What the workers serving one model accept, at the extremes."""

    n_ctx: int
    """The longest context any of them serves it with, tokens."""
    smallest_job_bytes: int
    """The smallest job frame one of them accepts: a job this size or smaller fits every one."""
    largest_job_bytes: int
    """The largest job frame one of them accepts: a bigger job fits none."""
    largest_parallel: int
    """The most slots one of them has."""


class Hive:
    """Every connected worker, indexed by the models it serves."""

    def __init__(self, settings: QueenSettings) -> None:
        self._settings = settings
        self.workers: dict[str, WorkerSession] = {}
        self._by_model: dict[str, dict[str, WorkerSession]] = {}
        self._waiters: dict[str, deque[asyncio.Event]] = {}
        self._index = WorkerIndex()
        self.cache = CacheRouter(ttl=settings.cache_summary_ttl, load_guard=settings.cache_load_guard)
        """Which workers hold which prompt prefixes (cache-aware routing, prefix_index.py)."""
        self._health: OrderedDict[str, WorkerHealth] = OrderedDict()
        self._known_models: set[str] = set()
        self._limits: dict[str, ModelLimits] = {}
        """Per model, the extremes over the workers serving it: computed on demand, dropped on any change."""
        self._background: set[asyncio.Task[None]] = set()
        self.draining = False
        self.replica_id: str | None = None
        """This queen's name in a hive of replicas (--redis-url); None for a queen on its own."""
        self.summary_listener: Callable[[WorkerSession, CacheSummary], None] | None = None
        """Told of every cache summary of a worker connected here (the replicas share them)."""
        self._activity = asyncio.Event()
        """Set on shutdown: requests already accepted finish, new ones are refused."""
        self.on_join: Callable[[], None] | None = None
        """Called when a worker is put into rotation (the garbage collector's guard)."""
        self.on_leave: Callable[[int], None] | None = None
        """Called with the number of workers left when one leaves."""

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a coroutine in a task of its own, holding a reference until it is done.

        For work that must outlive the task that starts it, such as recording a request whose handler
        is being cancelled.
        """
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def health_of(self, identity: str) -> WorkerHealth:
        """The health record of a worker identity, kept across its reconnections.

        A worker that fails, is benched, and reconnects is still benched: leaving and coming back is
        not a way out. Records of identities not seen for longest are forgotten past a bound.
        """
        health = self._health.get(identity)
        if health is None:
            health = self._health[identity] = WorkerHealth()
            if len(self._health) > MAX_REMEMBERED_WORKERS:
                self._health.popitem(last=False)
        else:
            self._health.move_to_end(identity)
        return health

    def known_model(self, model: str) -> bool:
        """Whether some worker has served `model` since the queen started (bounded; for metric labels)."""
        return model in self._known_models

    def context_length(self, model: str) -> int | None:
        """The longest context any connected worker serves `model` with, tokens; None if none serves it."""
        limits = self.limits(model)
        return None if limits is None else limits.n_ctx

    def limits(self, model: str) -> ModelLimits | None:
        """The extremes over the workers serving `model` (None if none does), without a scan per request:
        with ten thousand workers a scan would cost more than the rest of the request."""
        limits = self._limits.get(model)
        if limits is None:
            serving = self._by_model.get(model)
            if not serving:
                return None
            job_bytes = [worker.max_job_bytes for worker in serving.values()]
            limits = self._limits[model] = ModelLimits(
                n_ctx=max(worker.n_ctx.get(model, 0) for worker in serving.values()),
                smallest_job_bytes=min(job_bytes),
                largest_job_bytes=max(job_bytes),
                largest_parallel=max(worker.parallel for worker in serving.values()),
            )
        return limits

    def add(self, worker: WorkerSession) -> None:
        """Put a newly registered worker into rotation."""
        for model in worker.models:
            if len(self._known_models) < MAX_KNOWN_MODELS:
                self._known_models.add(model)
        self.workers[worker.id] = worker
        for model in worker.models:
            self._by_model.setdefault(model, {})[worker.id] = worker
            self._limits.pop(model, None)
        self.slot_freed(worker)
        if self.on_join is not None:
            self.on_join()

    def remove(self, worker: WorkerSession) -> None:
        """Take a worker out of rotation (it disconnected or was dropped)."""
        self._activity.set()
        self.cache.remove_worker(worker)  # first: a worker out of `workers` holds nothing
        held = self.workers.pop(worker.id, None) is not None
        self._index.remove(worker)
        for model in worker.models:
            serving = self._by_model.get(model)
            if serving is None:
                continue
            serving.pop(worker.id, None)
            self._limits.pop(model, None)
            if not serving:
                del self._by_model[model]
                # Nobody serves the model any more: waiting requests learn it now, not at their deadline.
                self._wake_all(model)
        if held and self.on_leave is not None:
            self.on_leave(len(self.workers))

    def busy(self) -> int:
        """Requests in flight on workers plus requests waiting for a slot."""
        return sum(worker.held_here for worker in self.workers.values()) + self.queue_depth()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight or waiting; False if that did not happen in time."""
        try:
            async with asyncio.timeout(timeout):
                while self.busy():
                    self._activity.clear()
                    await self._activity.wait()
        except TimeoutError:
            return False
        return True

    def models(self) -> list[str]:
        """Ids of the models at least one connected worker serves, sorted."""
        return sorted(self._by_model)

    def serving(self, model: str) -> list[WorkerSession]:
        """The workers that serve a model."""
        return list(self._by_model.get(model, {}).values())

    def queue_depth(self, model: str | None = None) -> int:
        """Requests waiting for a slot, for one model or all."""
        if model is not None:
            return len(self._waiters.get(model, ()))
        return sum(len(queue) for queue in self._waiters.values())

    async def acquire(
        self,
        model: str,
        request_id: str,
        *,
        exclude: frozenset[str] = frozenset(),
        embeddings: bool = False,
        model_hash: str | None = None,
        prefix: PrefixQuery | None = None,
        sequences: int = 1,
    ) -> tuple[WorkerSession, RequestStream]:
        """Reserve a slot on the best worker for `model`, waiting in line if every worker is busy.

        A request generating `sequences` at once (n choices) takes that many slots of one worker, or, if
        no worker has that many, all the slots of one of the largest (which runs the rest as they free).

        First come, first served: a newcomer takes a slot at once only if nobody is waiting; a waiter
        that is woken but cannot use the slot (its retry excludes that worker) passes the turn on.
        Raises ModelNotFound if no worker serves the model, NoCapacity if the line is full or the wait
        runs past the queue timeout. With `embeddings`, only workers that serve the model's embeddings
        qualify (InvalidRequest if none does). With `model_hash`, only workers whose file for the model
        has that content hash qualify: a resumed answer continues on the same weights or nowhere. With
        `prefix` (and --routing cache-aware), a worker holding the request's prefix or session may be
        chosen over the least loaded one (prefix_index.py).
        """
        if self.draining:
            raise NoCapacity("The queen is shutting down.", retry_after=5)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.queue_timeout
        queue = self._waiters.setdefault(model, deque())
        waiter: asyncio.Event | None = None
        try:
            while True:
                serving = self._by_model.get(model)
                if serving is None:
                    raise ModelNotFound(
                        f"The model '{model}' does not exist or no worker serves it.", param="model"
                    )
                if embeddings:
                    # Workers without embeddings are set aside like the ones a retry excludes.
                    without = _without_embeddings(serving.values(), model)
                    if len(without) == len(serving):
                        raise InvalidRequest(
                            f"The model '{model}' is not served with embeddings: no worker that serves it "
                            "was started with --embeddings.",
                            param="model",
                            code="embeddings_not_served",
                        )
                    exclude = exclude | without
                if model_hash is not None:
                    exclude = exclude | frozenset(
                        worker_id
                        for worker_id, worker in serving.items()
                        if worker.model_hashes.get(model) != model_hash
                    )
                if waiter is not None or not queue:
                    slots = self._slots_needed(model, sequences, exclude)
                    worker = self._index.choose(model, now=time.monotonic(), exclude=exclude, slots=slots)
                    if worker is not None and prefix is not None and self._settings.routing == "cache-aware":
                        worker = self._cache_choice(model, prefix, worker, exclude, slots)
                    if worker is not None:
                        stream = worker.reserve(request_id, model, slots)
                        self._index.update(worker)
                        return worker, stream
                    if exclude and all(worker_id in exclude for worker_id in serving):
                        raise NoCapacity(f"No other worker for '{model}' is left to retry on.")
                    if waiter is not None:
                        waiter.clear()
                        if exclude:
                            # The slot may be on a worker this retry excludes: let the next one look.
                            # Without excludes a slot this waiter cannot use does not exist, and passing
                            # the turn on would let a later waiter overtake it.
                            self._wake_next(model, after=waiter)
                if waiter is None:
                    if len(queue) >= self._settings.queue_size:
                        raise NoCapacity(f"All workers for '{model}' are busy and the queue is full.")
                    waiter = asyncio.Event()
                    queue.append(waiter)
                try:
                    async with asyncio.timeout_at(deadline):
                        await waiter.wait()
                except TimeoutError:
                    raise NoCapacity(
                        f"All workers for '{model}' stayed busy for {self._settings.queue_timeout:g} s."
                    ) from None
        finally:
            if waiter is not None:
                queue.remove(waiter)
                # More slots may be free than this request used: let the next in line look.
                self._wake_next(model)
            if not queue and self._waiters.get(model) is queue:
                del self._waiters[model]
            self._activity.set()

    def _slots_needed(self, model: str, sequences: int, exclude: frozenset[str]) -> int:
        """Slots a request generating `sequences` at once takes: one each, capped at the most slots one
        worker it may use has (looking at every worker only when a retry excludes some)."""
        if sequences <= 1:
            return 1
        limits = self.limits(model)
        largest = limits.largest_parallel if limits is not None else 1
        if exclude:
            serving = self._by_model.get(model, {})
            largest = max((w.parallel for w in serving.values() if w.id not in exclude), default=1)
        return min(sequences, largest)

    def _cache_choice(
        self,
        model: str,
        prefix: PrefixQuery,
        least_loaded: WorkerSession,
        exclude: frozenset[str],
        slots: int,
    ) -> WorkerSession:
        """The worker cache-aware routing prefers to the least loaded one (which it may be)."""
        now = time.monotonic()

        def usable(worker: WorkerSession) -> bool:
            return (
                worker.can_take(slots)
                and worker.id not in exclude
                and model in worker.models
                and not worker.health.benched(now)
            )

        chosen = self.cache.choose(model, prefix, least_loaded, self.workers, usable, now).worker
        self.cache.served(prefix, chosen, now)
        return chosen

    def cache_summary(self, worker: WorkerSession, summary: CacheSummary) -> None:
        """A worker says what its caches hold of a model now (models it does not serve are ignored)."""
        if worker.id in self.workers and summary.model in worker.models:
            self.cache.index.update(worker.id, summary, time.monotonic())
            if self.summary_listener is not None and worker.replica is None:
                self.summary_listener(worker, summary)

    def reserve_all(self, worker: WorkerSession, request_id: str, model: str) -> list[RequestStream]:
        """Take every slot of an idle worker for one job (fine-tuning): no other request goes to it.

        The first stream is the job's; the others only hold their slots (`{request_id}/hold{n}`) until
        the caller releases them.
        """
        streams = [worker.reserve(request_id, model)]
        streams += [worker.reserve(f"{request_id}/hold{n}", model) for n in range(1, worker.parallel)]
        self._index.update(worker)
        return streams

    def reserve_on(self, worker: WorkerSession, request_id: str, slots: int = 1) -> RequestStream:
        """Take `slots` of a chosen worker for a request another replica of the hive scheduled here."""
        stream = worker.reserve(request_id, "", slots)
        self._index.update(worker)
        return stream

    def slot_freed(self, worker: WorkerSession) -> None:
        """A slot opened on `worker`: wake the first request waiting for each model it serves."""
        self._activity.set()
        if worker.id in self.workers:
            self._index.update(worker)
        for model in worker.models:
            self._wake_next(model)

    def record_speed(
        self, worker: WorkerSession, model: str, *, ttft: float | None, tokens: int, duration: float
    ) -> None:
        """Fold a finished request into the worker's measured speed, and re-rank it."""
        worker.speed.setdefault(model, ModelSpeed()).record(ttft, tokens, duration)
        if worker.id in self.workers:
            self._index.update(worker)

    def _wake_next(self, model: str, *, after: asyncio.Event | None = None) -> None:
        """Wake the first waiter for `model` that is not awake yet (behind `after`, if given)."""
        queue = self._waiters.get(model)
        if not queue:
            return
        seen_after = after is None
        for waiter in queue:
            if not seen_after:
                seen_after = waiter is after
                continue
            if not waiter.is_set():
                waiter.set()
                return

    def _wake_all(self, model: str) -> None:
        for waiter in self._waiters.get(model, ()):
            waiter.set()


def _serves_embeddings(worker: WorkerSession, model: str) -> bool:
    return any(info.id == model and info.embeddings for info in worker.registration.models)


def _without_embeddings(workers: Iterable[WorkerSession], model: str) -> frozenset[str]:
    """Ids of the workers that serve `model` but not its embeddings: excluded from embeddings requests."""
    return frozenset(worker.id for worker in workers if not _serves_embeddings(worker, model))
