"""The routing policy: which of the workers that serve a model should take the next request."""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from queenbee.worker_session import WorkerSession

UNMEASURED_BONUS = 1e9
"""Workers with no measurement yet rank as fastest, so every new worker gets a fair first chance."""


def speed_score(worker: WorkerSession, model: str) -> float:
    """Higher is faster: the queen's measured tokens per second for this worker and model."""
    speed = worker.speed.get(model)
    if speed is None or speed.tokens_per_second is None:
        return UNMEASURED_BONUS
    return speed.tokens_per_second


def remote_penalty(worker: WorkerSession) -> int:
    """Requests a worker on another replica ranks as holding beyond its own: a quarter of its slots,
    at least one."""
    return max(1, worker.parallel // 4)


def choose_worker(
    candidates: Iterable[WorkerSession],
    model: str,
    *,
    now: float,
    exclude: frozenset[str] = frozenset(),
    slots: int = 1,
) -> WorkerSession | None:
    """Pick the least loaded worker with `slots` free, the fastest among equals, one connected to this
    queen rather than to another replica when they tie; None if none has them.

    A worker on another replica of the hive ranks as if a quarter of its slots (at least one) more
    were busy: the hop between replicas costs both replicas CPU, worth more than a small difference in
    load, and the load another replica announced is up to a beat old.

    One pass over the candidates: cost grows linearly with the workers serving the model.
    """
    best: WorkerSession | None = None
    best_key: tuple[float, float, bool] | None = None
    for worker in candidates:
        if not worker.can_take(slots) or worker.id in exclude or worker.health.benched(now):
            continue
        remote = worker.replica is not None
        load = (worker.in_flight + (remote_penalty(worker) if remote else 0)) / worker.parallel
        key = (load, -speed_score(worker, model), remote)
        if best_key is None or key < best_key:
            best, best_key = worker, key
    return best


HeapEntry = tuple[float, float, int, str, int]
"""(load, -speed, arrival order, worker id, version): the order `choose_worker` ranks workers in (the
order of a worker on another replica is offset by `REMOTE_ORDER`, so that it comes after local ones
on a tie)."""

REMOTE_ORDER = 2**62
"""Added to a remote worker's arrival order: a tie puts it after every local worker, without a sixth
field for a queen on its own to compare."""


class WorkerIndex:
    """The same policy as `choose_worker`, in O(log n) per decision: one lazy heap per model.

    Every change to a worker's load or speed pushes a fresh entry with a new version; entries whose
    version is stale, or whose worker is full, are dropped when they reach the top. A full worker comes
    back with the next `update`, which the hive calls whenever a slot frees. Benched and excluded workers
    are set aside for one decision and pushed back.
    """

    def __init__(self) -> None:
        self._heaps: dict[str, list[HeapEntry]] = {}
        self._workers: dict[str, WorkerSession] = {}
        self._versions: dict[str, int] = {}
        self._order = 0

    def update(self, worker: WorkerSession) -> None:
        """Index a worker (again) after its load, speed or registration changed."""
        self._workers[worker.id] = worker
        version = self._versions.get(worker.id, 0) + 1
        self._versions[worker.id] = version
        if worker.free_slots <= 0:
            return
        self._order += 1
        load = worker.in_flight / worker.parallel
        order = self._order
        if worker.replica is not None:  # as in choose_worker: busier by the penalty, after local on a tie
            load = (worker.in_flight + remote_penalty(worker)) / worker.parallel
            order += REMOTE_ORDER
        for model in worker.models:
            heap = self._heaps.setdefault(model, [])
            heapq.heappush(heap, (load, -speed_score(worker, model), order, worker.id, version))
            if len(heap) > 4 * len(self._workers) + 64:
                self._compact(model)

    def remove(self, worker: WorkerSession) -> None:
        """Forget a worker; its entries die lazily."""
        self._workers.pop(worker.id, None)
        self._versions.pop(worker.id, None)

    def choose(
        self, model: str, *, now: float, exclude: frozenset[str] = frozenset(), slots: int = 1
    ) -> WorkerSession | None:
        """The worker `choose_worker` would pick for `model`, or None if none can take the request now.

        A worker with some free slots but fewer than the request needs is set aside like an excluded one.
        """
        heap = self._heaps.get(model)
        if not heap:
            return None
        set_aside: list[HeapEntry] = []
        chosen: WorkerSession | None = None
        while heap:
            entry = heap[0]
            worker = self._workers.get(entry[3])
            if worker is None or self._versions.get(entry[3]) != entry[4] or worker.free_slots <= 0:
                heapq.heappop(heap)
                continue
            if worker.id in exclude or worker.health.benched(now) or not worker.can_take(slots):
                set_aside.append(heapq.heappop(heap))
                continue
            chosen = worker
            break
        for entry in set_aside:
            heapq.heappush(heap, entry)
        return chosen

    def _compact(self, model: str) -> None:
        heap = self._heaps[model]
        live = [entry for entry in heap if self._versions.get(entry[3]) == entry[4]]
        heapq.heapify(live)
        self._heaps[model] = live
