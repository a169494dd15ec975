"""The worker's reconnect backoff: exponential, capped, jittered, and reset after success."""

from __future__ import annotations

import random

from workerbee.connection import Backoff


def test_delays_grow_exponentially_up_to_the_cap() -> None:
    """The upper bound of each delay doubles until it reaches the cap."""
    backoff = Backoff(base=0.5, cap=4.0, rng=random.Random(1))
    bounds = [min(4.0, 0.5 * 2**attempt) for attempt in range(8)]
    delays = [backoff.next_delay() for _ in range(8)]
    assert all(0 <= delay <= bound for delay, bound in zip(delays, bounds, strict=True))
    assert max(delays[4:]) <= 4.0


def test_delays_are_jittered() -> None:
    """Two workers with different random streams do not retry in lockstep."""
    first = Backoff(rng=random.Random(1))
    second = Backoff(rng=random.Random(2))
    assert [first.next_delay() for _ in range(5)] != [second.next_delay() for _ in range(5)]


def test_reset_starts_over() -> None:
    """After a good connection the next failure waits as little as the first one did."""
    backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(3))
    for _ in range(6):
        backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0
    assert backoff.next_delay() <= 1.0
