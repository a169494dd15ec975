"""Cache-aware routing: which worker already holds a request's prefix, and who should take it.

Workers summarise, per model, the prefixes their caches hold as chained hashes of canonical message
blocks, with the prompt tokens each covers (`protocol.CacheSummary`, hashes from protocol/prefix.py).
The queen hashes a request's messages the same way (it has no tokenizer and no chat template, but it
sees the same messages the worker renders), and `PrefixIndex` answers, for each worker that holds any
of the chain, the longest prefix it holds.

`CacheRouter.choose` then ranks the worker the least-loaded policy picked (scheduling.py) against the
workers holding the prefix by predicted time to first token:

    (uncached prompt tokens + RUNNING_COST_TOKENS * requests in flight) / measured prefill rate

where the uncached tokens are the queen's estimate of the messages past the longest prefix the worker
holds (BYTES_PER_TOKEN, TEMPLATE_TOKENS_PER_MESSAGE), so that every worker is measured with the same
ruler, and the prefill rate is measured from the uncached tokens and time to first token of streamed
answers that had the worker to themselves (a worker not measured yet is taken to be as fast as the
average measured one).

with a load guard: a worker more than `load_guard` (a fraction of its slots) busier than the least
loaded one is not chosen for its cache, so one hot prefix cannot pile every request onto one worker
while others idle. When no worker holds any of the prefix, the worker that last served the request's
session (`prompt_cache_key`, else `user`, per API key) takes it if the guard allows: the next turn of
a conversation whose summary has not come yet still finds its cache.

A worker's entries go when it disconnects, when it sends a new summary for the model, and when its
summary is older than `ttl` (workers refresh theirs every minute). Everything here is per request
O(prefix blocks + workers that hold one of them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from protocol import CacheSummary
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from protocol.prefix import TEXT_BLOCK_CHARS, chat_chain, text_hashes
from queenbee.worker_session import WorkerSession

BYTES_PER_TOKEN: Final = 4
"""The queen's estimate of a token's size in text (it has no tokenizer)."""

TEMPLATE_TOKENS_PER_MESSAGE: Final = 8
"""Tokens a chat template adds around a message, as far as the queen can tell."""

RUNNING_COST_TOKENS: Final = 32
"""What one request already running on a worker costs a newcomer's prefill, in prompt tokens: the
batch decodes its next token in every step the newcomer's prompt is fed in."""

DEFAULT_PREFILL_RATE: Final = 1000.0
"""Prompt tokens per second assumed while no worker of a model is measured (the same for all)."""

MAX_SESSIONS: Final = 100_000
"""Sessions whose worker is remembered (least recently used forgotten)."""

SESSION_SECONDS: Final = 600.0
"""How long a session's worker is remembered after its last request."""


@dataclass(frozen=True)
class PrefixQuery:
    """What the router needs of a request: its prefix chain, its size, and the session it belongs to."""

    hashes: tuple[int, ...]
    """Chained prefix hashes, shortest first."""
    prompt_tokens: int
    """The queen's estimate of the prompt's size, tokens."""
    session: tuple[str, str, str] | None = None
    """(API key, model, prompt_cache_key or user): requests that belong together."""
    tails: tuple[int, ...] = ()
    """tails[i]: the estimated prompt tokens past prefix i, what a worker holding it still decodes."""

    def uncached(self, depth: int | None) -> int:
        """Estimated tokens a worker holding prefix `depth` (None: none) still has to decode."""
        if depth is None or depth >= len(self.tails):
            return self.prompt_tokens
        return self.tails[depth]


def _tails(sizes: list[int], per_block: int, last: int) -> tuple[tuple[int, ...], int]:
    """The estimated tokens past each block, and of the whole prompt, from the blocks' byte sizes."""
    costs = [size // BYTES_PER_TOKEN + per_block for size in sizes]
    tails: list[int] = []
    left = last
    for cost in reversed(costs):
        tails.append(left)
        left += cost
    return tuple(reversed(tails)), left


def prefix_query(
    request: ChatCompletionRequest | CompletionRequest | EmbeddingRequest,
    prompt_tokens: int,
    api_key_id: str | None,
) -> PrefixQuery | None:
    """The routing facts of a request; None for requests that use no cache (embeddings).

    `prompt_tokens` is the queen's estimate of the whole prompt when the blocks cannot say better.
    """
    tails: tuple[int, ...] = ()
    if isinstance(request, ChatCompletionRequest):
        chain = chat_chain(request)
        hashes = [prefix_hash for prefix_hash, _ in chain]
        # After the last message comes the template's generation prompt: a few tokens.
        tails, prompt_tokens = _tails([size for _, size in chain], TEMPLATE_TOKENS_PER_MESSAGE, 8)
        key = request.prompt_cache_key or request.user
    elif isinstance(request, CompletionRequest):
        prompts = request.prompts
        hashes = text_hashes(prompts[0]) if len(prompts) == 1 and isinstance(prompts[0], str) else []
        if hashes:
            text = prompts[0]
            rest = (len(text) - len(hashes) * TEXT_BLOCK_CHARS) // BYTES_PER_TOKEN + 1
            tails, prompt_tokens = _tails([TEXT_BLOCK_CHARS] * len(hashes), 0, rest)
        key = request.user
    else:
        return None
    session = (api_key_id or "", request.model, key) if key else None
    return PrefixQuery(tuple(hashes), prompt_tokens, session, tails)


class PrefixIndex:
    """Per model, which workers hold which prefix hash and for how many tokens; entries expire."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._holders: dict[str, dict[int, dict[str, int]]] = {}
        """model -> prefix hash -> worker id -> tokens."""
        self._summaries: dict[str, dict[str, tuple[float, list[int]]]] = {}
        """worker id -> model -> (when the summary came, the hashes it listed)."""

    def update(self, worker_id: str, summary: CacheSummary, now: float) -> None:
        """Replace what a worker holds of a model with its new summary."""
        self._forget(worker_id, summary.model)
        holders = self._holders.setdefault(summary.model, {})
        for prefix_hash, tokens in summary.prefixes:
            holders.setdefault(prefix_hash, {})[worker_id] = tokens
        self._summaries.setdefault(worker_id, {})[summary.model] = (
            now,
            [prefix_hash for prefix_hash, _ in summary.prefixes],
        )

    def remove_worker(self, worker_id: str) -> None:
        """Forget everything a worker holds (it disconnected)."""
        for model in list(self._summaries.get(worker_id, ())):
            self._forget(worker_id, model)
        self._summaries.pop(worker_id, None)

    def holds_any(self, model: str) -> bool:
        """Whether any worker holds any prefix of `model` (else there is nothing to hash for)."""
        return bool(self._holders.get(model))

    def matches(self, model: str, hashes: Iterable[int], now: float) -> dict[str, tuple[int, int]]:
        """For every worker holding part of the chain, the longest prefix it holds: (its position in
        the chain, the tokens the worker says it covers)."""
        holders = self._holders.get(model)
        found: dict[str, tuple[int, int]] = {}
        if not holders:
            return found
        stale: set[str] = set()
        for depth, prefix_hash in enumerate(hashes):
            for worker_id, tokens in holders.get(prefix_hash, {}).items():
                if worker_id in stale:
                    continue
                if now - self._summaries[worker_id][model][0] > self.ttl:
                    stale.add(worker_id)
                    continue
                found[worker_id] = (depth, tokens)
        for worker_id in stale:
            self._forget(worker_id, model)
            found.pop(worker_id, None)
        return found

    def entries(self, model: str) -> int:
        """Prefix hashes indexed for a model (for tests and metrics)."""
        return len(self._holders.get(model, {}))

    def _forget(self, worker_id: str, model: str) -> None:
        summaries = self._summaries.get(worker_id)
        if summaries is None or model not in summaries:
            return
        _, hashes = summaries.pop(model)
        holders = self._holders.get(model, {})
        for prefix_hash in hashes:
            workers = holders.get(prefix_hash)
            if workers is not None:
                workers.pop(worker_id, None)
                if not workers:
                    del holders[prefix_hash]
        if not holders:
            self._holders.pop(model, None)


class SessionAffinity:
    """The worker that last served each session, for a while (bounded, least recently used forgotten)."""

    def __init__(self, seconds: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self._seconds = seconds
        self._limit = limit
        self._workers: OrderedDict[tuple[str, str, str], tuple[str, float]] = OrderedDict()

    def worker_of(self, session: tuple[str, str, str], now: float) -> str | None:
        """The worker id that last served the session, if it is remembered."""
        entry = self._workers.get(session)
        if entry is None:
            return None
        if entry[1] < now:
            del self._workers[session]
            return None
        return entry[0]

    def served(self, session: tuple[str, str, str], worker_id: str, now: float) -> None:
        """The session's request went to `worker_id`."""
        self._workers[session] = (worker_id, now + self._seconds)
        self._workers.move_to_end(session)
        if len(self._workers) > self._limit:
            self._workers.popitem(last=False)


@dataclass(frozen=True)
class Choice:
    """Who the router picked, and what it expects of it (for tests and logs)."""

    worker: WorkerSession
    cached_tokens: int
    predicted_ttft: float


class CacheRouter:
    """The prefix index, the session memory and the prefill rates, and the choice they make together."""

    def __init__(self, *, ttl: float, load_guard: float) -> None:
        self.index = PrefixIndex(ttl)
        self.sessions = SessionAffinity()
        self.load_guard = load_guard
        self._rates: dict[tuple[str, str], float] = {}
        """(worker id, model) -> prompt tokens per second, an exponential moving average."""
        self._rate_sums: dict[str, tuple[float, int]] = {}
        """model -> (sum, count) of its workers' rates: an unmeasured worker is taken as the average."""

    def remove_worker(self, worker: WorkerSession) -> None:
        """The worker left: its caches are nobody's now."""
        self.index.remove_worker(worker.id)
        for model in worker.models:
            rate = self._rates.pop((worker.id, model), None)
            if rate is not None:
                total, count = self._rate_sums[model]
                self._rate_sums[model] = (total - rate, count - 1)

    def record_prefill(self, worker: WorkerSession, model: str, uncached_tokens: int, ttft: float) -> None:
        """Fold a measured time to first token for `uncached_tokens` decoded into the worker's rate.

        Only for answers that had the worker to themselves: under load the time measures the others.
        """
        if uncached_tokens < RUNNING_COST_TOKENS or ttft <= 0:
            return  # too little prompt to say anything about prefill speed
        rate = uncached_tokens / ttft
        key = (worker.id, model)
        previous = self._rates.get(key)
        updated = rate if previous is None else 0.7 * previous + 0.3 * rate
        self._rates[key] = updated
        total, count = self._rate_sums.get(model, (0.0, 0))
        if previous is None:
            self._rate_sums[model] = (total + updated, count + 1)
        else:
            self._rate_sums[model] = (total - previous + updated, count)

    def prefill_rate(self, worker: WorkerSession, model: str) -> float:
        """The worker's measured prompt tokens per second on `model` (until measured: the average)."""
        rate = self._rates.get((worker.id, model))
        if rate is not None:
            return rate
        total, count = self._rate_sums.get(model, (0.0, 0))
        return total / count if count and total > 0 else DEFAULT_PREFILL_RATE

    def predicted_ttft(
        self, worker: WorkerSession, model: str, query: PrefixQuery, depth: int | None
    ) -> float:
        """Seconds until the worker's first token, holding prefix `depth` of the chain (None: none)."""
        uncached = query.uncached(depth)
        return (uncached + RUNNING_COST_TOKENS * worker.in_flight) / self.prefill_rate(worker, model)

    def choose(
        self,
        model: str,
        query: PrefixQuery,
        base: WorkerSession,
        workers: dict[str, WorkerSession],
        usable: Callable[[WorkerSession], bool],
        now: float,
    ) -> Choice:
        """The worker with the lowest predicted TTFT among `base` (the least loaded) and the workers
        holding the prefix or the session, within the load guard; `usable` says who may take it now."""
        held = self.index.matches(model, query.hashes, now) if query.hashes else {}
        if not held and query.session is not None:
            # No visible prefix yet: the session's last worker likely holds what its summary will say.
            affine = workers.get(self.sessions.worker_of(query.session, now) or "")
            if affine is not None and usable(affine) and self._within_guard(affine, base):
                return Choice(affine, 0, self.predicted_ttft(affine, model, query, None))
        depth, cached = held.get(base.id, (None, 0))
        best = Choice(base, cached, self.predicted_ttft(base, model, query, depth))
        for worker_id, (depth, cached) in held.items():
            worker = workers.get(worker_id)
            if worker is None or worker is base or not usable(worker) or not self._within_guard(worker, base):
                continue
            ttft = self.predicted_ttft(worker, model, query, depth)
            if ttft < best.predicted_ttft:
                best = Choice(worker, cached, ttft)
        return best

    def served(self, query: PrefixQuery, worker: WorkerSession, now: float) -> None:
        """The request went to `worker`: its session goes there next time too."""
        if query.session is not None:
            self.sessions.served(query.session, worker.id, now)

    def _within_guard(self, worker: WorkerSession, base: WorkerSession) -> bool:
        return worker.in_flight / worker.parallel <= base.in_flight / base.parallel + self.load_guard
