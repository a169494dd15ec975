"""How many CPU threads llama.cpp decodes with: measured on the loaded model, at startup and while serving.

llama.cpp built with OpenMP splits every matrix product among its threads, which spin at a barrier
until the slowest is done. A thread that is not scheduled stalls all the others, so the best count
depends on what else the machine is doing, not only on its core count: on a 2-core VM, 2 threads
decoded 1.5-1.9x faster than 1 while nothing else ran, and up to 10x slower than 1 when the other core
was busy (the worker's own event loop, a queen and its clients on the same machine, or the host's other
tenants; docs/benchmarks.md has the measurements).

So:

- llama.cpp never gets every core: a serving worker always needs CPU beside it (its event loop sends
  every token), and one preempted OpenMP thread stalls the rest. The candidates are 1, half, and all
  but one of the usable CPUs (on 1 or 2 CPUs, that is 1 thread);
- at startup the worker times a few decode steps of a full batch with each candidate, interleaved so
  that a burst of outside load hits every candidate alike, and starts with the fastest
  (`choose_threads`);
- while serving, a `ThreadTuner` keeps checking: now and then a few steps run with a neighbouring
  candidate, and the faster count is kept. A trial that goes badly stops after one slow step, and
  trials that lose become rarer, so the cost of looking is small.

`--threads` fixes the count and turns both off.
"""

from __future__ import annotations

import os
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


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
    """Thread counts worth trying: 1, half, and all but one of the usable CPUs (never all of them)."""
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


@dataclass
class _Trial:
    threads: int
    size: int
    samples: list[float] = field(default_factory=list)


class ThreadTuner:
    """Keeps decoding on the fastest thread count while serving, by short trials of a neighbouring count.

    Steps are compared only with steps of the same size (tokens in the batch): a steady batch of n
    generating sequences repeats the same size for as long as it runs. After `interval` steps at the
    current count, or at once if its steps have become half again as slow as when it was chosen, the
    next `trial_steps` steps of that size run with the next count up or down. A trial step slower than
    twice the current median ends the trial at once. If the trial's median beats the current one by
    `margin`, the trial's count becomes current; if not, the interval doubles (up to `max_interval`).
    """

    def __init__(
        self,
        candidates: Sequence[int],
        start: int,
        *,
        interval: int = 64,
        max_interval: int = 4096,
        trial_steps: int = 4,
        margin: float = 0.1,
        window: int = 8,
    ) -> None:
        self.candidates = sorted({*candidates, start})
        self.current = start
        self.switches = 0
        self._first_interval = interval
        self._interval = interval
        self._max_interval = max_interval
        self._trial_steps = trial_steps
        self._margin = margin
        self._window = window
        self._since_trial = 0
        self._upward = True
        self._recent: dict[int, deque[float]] = {}
        self._baseline: dict[int, float] = {}
        self._trial: _Trial | None = None

    def threads_for(self, size: int) -> int:
        """The thread count for the next step, which decodes `size` tokens."""
        trial = self._trial
        if trial is not None:
            if trial.size == size:
                return trial.threads
            self._trial = None  # the batch changed shape: its steps would not compare
        return self.current

    def record(self, threads: int, size: int, seconds: float) -> bool:
        """Learn from a step that took `seconds`; True if the current count just changed."""
        trial = self._trial
        if trial is not None and (threads, size) == (trial.threads, trial.size):
            reference = statistics.median(self._recent[size])
            if seconds > 2 * reference:
                return self._end_trial(trial, won=False)
            trial.samples.append(seconds)
            if len(trial.samples) < self._trial_steps:
                return False
            return self._end_trial(
                trial, won=statistics.median(trial.samples) < reference * (1 - self._margin)
            )
        if threads != self.current:
            return False
        recent = self._recent.setdefault(size, deque(maxlen=self._window))
        recent.append(seconds)
        self._since_trial += 1
        if len(recent) < 3 or len(self.candidates) < 2:
            return False
        median = statistics.median(recent)
        baseline = self._baseline.setdefault(size, median)
        if self._since_trial >= self._interval or median > 1.5 * baseline:
            self._start_trial(size)
        return False

    def _start_trial(self, size: int) -> None:
        index = self.candidates.index(self.current)
        step = 1 if self._upward else -1
        if not 0 <= index + step < len(self.candidates):
            step = -step
        self._trial = _Trial(self.candidates[index + step], size)
        self._since_trial = 0

    def _end_trial(self, trial: _Trial, *, won: bool) -> bool:
        self._trial = None
        self._upward = not self._upward
        if won:
            self.current = trial.threads
            self.switches += 1
            self._recent = {trial.size: deque(trial.samples, maxlen=self._window)}
            self._baseline = {}
            self._interval = self._first_interval
            return True
        self._interval = min(2 * self._interval, self._max_interval)
        # What the current count does now is the new normal: slowing down further triggers a trial.
        self._baseline[trial.size] = statistics.median(self._recent[trial.size])
        return False
