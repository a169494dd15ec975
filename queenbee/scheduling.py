"""The routing policy: which of the workers that serve a model should take the next request."""

from __future__ import annotations

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


def choose_worker(
    candidates: Iterable[WorkerSession], model: str, *, now: float, exclude: frozenset[str] = frozenset()
) -> WorkerSession | None:
    """Pick the least loaded worker with a free slot, the fastest among equals; None if all are busy.

    One pass over the candidates: cost grows linearly with the workers serving the model.
    """
    best: WorkerSession | None = None
    best_key: tuple[float, float] | None = None
    for worker in candidates:
        if worker.free_slots <= 0 or worker.id in exclude or worker.health.benched(now):
            continue
        key = (worker.in_flight / worker.parallel, -speed_score(worker, model))
        if best_key is None or key < best_key:
            best, best_key = worker, key
    return best
