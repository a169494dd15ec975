"""How many CPU threads llama.cpp decodes with: measured on the loaded model at startup, not guessed.

llama.cpp built with OpenMP splits every matrix product among its threads, which spin at a barrier
until the slowest is done. A thread that is not scheduled stalls all the others, so llama.cpp must not
count on every core: the worker's own event loop, the queen and the clients on the same machine need
CPU for every token too. On a 2-core VM, 2 threads decoded 1.6x faster than 1 on an idle machine, and
up to 10x slower once the queen and its clients were busy on the other core (docs/benchmarks.md).

So the candidates never include every core (one is left for everything else), and among them the
worker times a few decode steps of a full batch, interleaved so that a burst of outside load hits every
candidate alike, and keeps the fastest. More threads must win by a clear margin.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count chosen, the median seconds per measured step of each candidate, and why."""

    threads: int
    timings: dict[int, float]
    reason: str = "measured"

    def describe(self) -> str:
        """One line for the log."""
        if not self.timings:
            return f"{self.threads} threads ({self.reason})"
        measured = ", ".join(f"{n}: {seconds * 1000:.1f} ms" for n, seconds in sorted(self.timings.items()))
        return f"{self.threads} threads ({self.reason}; median step by thread count: {measured})"


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def thread_candidates(cpus: int | None = None) -> list[int]:
    """Thread counts worth timing: 1, half, and all but one of the usable CPUs."""
    cpus = usable_cpus() if cpus is None else cpus
    return sorted({1, max(1, cpus // 2), max(1, cpus - 1)})


def choose_threads(
    step: Callable[[int], float], candidates: Sequence[int], *, rounds: int = 3, margin: float = 0.1
) -> ThreadChoice:
    """Time `step(threads)` (seconds) `rounds` times per candidate, interleaved, and pick a count.

    Going up from the smallest count, a larger count replaces the best so far only if its median is
    lower by more than `margin` (a fraction): among near-equals, the fewer threads.
    """
    samples: dict[int, list[float]] = {threads: [] for threads in candidates}
    for _ in range(rounds):
        for threads in candidates:
            samples[threads].append(step(threads))
    timings = {threads: statistics.median(values) for threads, values in samples.items()}
    best = min(timings)
    for threads in sorted(timings):
        if timings[threads] < timings[best] * (1 - margin):
            best = threads
    return ThreadChoice(best, timings)
