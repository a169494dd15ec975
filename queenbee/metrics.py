"""What the queen measures: Prometheus metrics for /metrics, and the recent activity the dashboard shows.

Request counters and histograms are fed from each finished request's record; the state of the hive
(workers, slots, queues) is read when it is scraped, so it is never stale. Every app has a registry of
its own: nothing here is global, so two queens in one process (as in the tests) never mix their counts.
Workers are never a label: they come and go with new ids, and each would leave a series behind.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.requests import Request
from starlette.responses import Response

from queenbee.hive import Hive
from queenbee.ledger import Ledger
from queenbee.observer import RequestRecord

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
GC_PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def worker_failures(record: RequestRecord) -> int:
    """Attempts of a request that failed through a worker's fault.

    The queen only moves a request to another worker after a failure, so every attempt but the last
    failed; the last did too if the request ended in a server-side error (a client's 4xx is not the
    worker's fault, and a request that never reached a worker made no attempt).
    """
    if record.outcome == "error" and record.status >= 500:
        return record.attempts
    return max(0, record.attempts - 1)


class HiveCollector:
    """Gauges read from the hive at scrape time."""

    def __init__(self, hive: Hive) -> None:
        self.hive = hive

    def collect(self) -> Iterable[Metric]:
        """The hive's current state."""
        workers = list(self.hive.workers.values())
        now = time.monotonic()
        yield GaugeMetricFamily("queenbee_workers_connected", "Workers connected.", value=len(workers))
        yield GaugeMetricFamily(
            "queenbee_workers_benched",
            "Workers out of rotation after repeated failures.",
            value=sum(worker.health.benched(now) for worker in workers),
        )
        slots = GaugeMetricFamily("queenbee_slots", "Request slots on connected workers.", labels=["state"])
        slots.add_metric(["busy"], sum(worker.in_flight for worker in workers))
        slots.add_metric(["free"], sum(worker.free_slots for worker in workers))
        yield slots
        queue = GaugeMetricFamily(
            "queenbee_queue_depth", "Requests waiting for a free slot, by model.", labels=["model"]
        )
        model_workers = GaugeMetricFamily(
            "queenbee_model_workers", "Connected workers serving each model.", labels=["model"]
        )
        for model in self.hive.models():
            queue.add_metric([model], self.hive.queue_depth(model))
            model_workers.add_metric([model], len(self.hive.serving(model)))
        yield queue
        yield model_workers


class LedgerCollector:
    """The usage ledger's health, read at scrape time."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def collect(self) -> Iterable[Metric]:
        """Rows the database has not taken yet, and how often it refused."""
        yield GaugeMetricFamily(
            "queenbee_ledger_spooled_rows",
            "Usage rows kept in the ledger's spool file because the database refused them, not yet replayed.",
            value=self.ledger.spooled_rows,
        )
        yield CounterMetricFamily(
            "queenbee_ledger_write_failures",
            "Ledger transactions (batches of rows, or replays of the spool) the database refused.",
            value=self.ledger.write_failures,
        )


class QueenMetrics:
    """The Prometheus metrics of one queen; observes every finished request."""

    def __init__(self, hive: Hive) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "queenbee_requests",
            "Client requests finished, by model and outcome (success, error, cancelled).",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "queenbee_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first output from a worker.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "queenbee_request_duration_seconds",
            "Seconds from a request's arrival to its end.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "queenbee_prompt_tokens", "Prompt tokens of finished requests.", ["model"], registry=self.registry
        )
        self.completion_tokens = Counter(
            "queenbee_completion_tokens",
            "Completion tokens generated for finished requests.",
            ["model"],
            registry=self.registry,
        )
        self.retries = Counter(
            "queenbee_retries",
            "Requests moved to another worker after a failure.",
            ["model"],
            registry=self.registry,
        )
        self.resumes = Counter(
            "queenbee_resumes",
            "Answers continued on another worker after output, by how the request then ended.",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.worker_failures = Counter(
            "queenbee_worker_failures",
            "Attempts that failed through a worker's fault (errors, timeouts, disconnects).",
            ["model"],
            registry=self.registry,
        )
        self.gc_pauses = Histogram(
            "queenbee_gc_pause_seconds",
            "Seconds each cyclic garbage collection held the queen's process, by generation (2: full).",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=self.registry,
        )
        self._gc_generations = [self.gc_pauses.labels(str(generation)) for generation in range(3)]
        self.usage_violations = Counter(
            "queenbee_usage_violations",
            "Requests whose worker reported usage the request could not have had (figures were bounded).",
            ["model"],
            registry=self.registry,
        )
        self.hive = hive
        self.registry.register(HiveCollector(hive))

    def model_label(self, model: str) -> str:
        """The label for a model: its id if the hive serves or has served it, else `unknown`.

        A client may send any model name; only the hive's own may grow the metrics' series.
        """
        return model if self.hive.known_model(model) else "unknown"

    async def request_finished(self, record: RequestRecord) -> None:
        """Count the request."""
        model = self.model_label(record.model)
        if record.usage_violation is not None:
            self.usage_violations.labels(model).inc()
        self.requests.labels(model, record.outcome).inc()
        self.duration.labels(model).observe(record.duration)
        if record.ttft is not None:
            self.ttft.labels(model).observe(record.ttft)
        self.prompt_tokens.labels(model).inc(record.prompt_tokens)
        self.completion_tokens.labels(model).inc(record.completion_tokens)
        if record.attempts > 1:
            self.retries.labels(model).inc(record.attempts - 1)
        if record.resumes:
            self.resumes.labels(model, record.outcome).inc(record.resumes)
        failures = worker_failures(record)
        if failures:
            self.worker_failures.labels(model).inc(failures)

    def gc_pause(self, generation: int, seconds: float) -> None:
        """Record one garbage collection (the collector guard calls this for every one, so the three
        generations' series are looked up once)."""
        self._gc_generations[min(generation, 2)].observe(seconds)

    def exposition(self) -> bytes:
        """The metrics in Prometheus's text format."""
        return generate_latest(self.registry)

    def watch_ledger(self, ledger: Ledger) -> None:
        """Export the ledger's health (spooled rows, write failures) with the other metrics."""
        self.registry.register(LedgerCollector(ledger))


async def metrics_endpoint(request: Request) -> Response:
    """GET /metrics: Prometheus's text format."""
    metrics: QueenMetrics = request.state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


@dataclass
class Served:
    """What one worker has served since it connected."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RecentActivity:
    """Per-worker totals and the last minute's throughput, for the dashboard."""

    def __init__(
        self, hive: Hive, *, window: float = 60.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.hive = hive
        self.window = window
        self.started = clock()
        self._clock = clock
        self._served: dict[str, Served] = {}
        self._recent: deque[tuple[float, int, int, bool]] = deque()
        # The tokens and failures of the requests in `_recent`, kept as they come and go: reading the
        # throughput costs the same at any request rate.
        self._window_prompt_tokens = 0
        self._window_completion_tokens = 0
        self._window_failures = 0
        self.totals = Served()
        self.failed = 0

    async def request_finished(self, record: RequestRecord) -> None:
        """Credit the worker and remember the request for the throughput window."""
        now = self._clock()
        failed = record.outcome == "error"
        self._recent.append((now, record.prompt_tokens, record.completion_tokens, failed))
        self._window_prompt_tokens += record.prompt_tokens
        self._window_completion_tokens += record.completion_tokens
        self._window_failures += failed
        self._expire(now)
        self.totals.requests += 1
        self.totals.prompt_tokens += record.prompt_tokens
        self.totals.completion_tokens += record.completion_tokens
        self.failed += failed
        if record.worker_id is None:
            return
        served = self._served.setdefault(record.worker_id, Served())
        served.requests += 1
        served.prompt_tokens += record.prompt_tokens
        served.completion_tokens += record.completion_tokens
        if len(self._served) > 2 * len(self.hive.workers) + 16:
            # Workers reconnect under new ids: forget the ones that are gone.
            for worker_id in [worker_id for worker_id in self._served if worker_id not in self.hive.workers]:
                del self._served[worker_id]

    def served(self, worker_id: str) -> Served:
        """What a connected worker has served so far."""
        return self._served.get(worker_id, Served())

    def throughput(self) -> dict[str, float]:
        """Requests and tokens over the last window, per second (requests per minute)."""
        now = self._clock()
        self._expire(now)
        # Young queens divide by their age, not by a full window they have not lived yet.
        span = max(1.0, min(self.window, now - self.started))
        return {
            "window_seconds": self.window,
            "requests_per_minute": 60.0 * len(self._recent) / span,
            "prompt_tokens_per_second": self._window_prompt_tokens / span,
            "completion_tokens_per_second": self._window_completion_tokens / span,
            "errors_per_minute": 60.0 * self._window_failures / span,
        }

    def _expire(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - self.window:
            _, prompt_tokens, completion_tokens, failed = self._recent.popleft()
            self._window_prompt_tokens -= prompt_tokens
            self._window_completion_tokens -= completion_tokens
            self._window_failures -= failed
