"""How many CPU threads llama.cpp decodes with: measured on the loaded model at startup, not guessed.

llama.cpp built with OpenMP splits every matrix product among its threads and waits for the slowest.
On a machine whose cores are shared (a VM, a laptop running other work) a thread that is not scheduled
stalls all the others: on a busy 2-core machine 2 threads decoded several times slower than 1
(docs/benchmarks.md). So the worker times a few decode steps with each candidate count, interleaved so
that a burst of outside load hits every candidate alike, and keeps the fastest. More threads must win
by a clear margin: they also take cores from the event loop and from everything else on the machine.
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
    """Thread counts worth timing: 1, half, all but one, and all of the usable CPUs."""
    cpus = usable_cpus() if cpus is None else cpus
    return sorted({1, max(1, cpus // 2), max(1, cpus - 1), cpus})


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
