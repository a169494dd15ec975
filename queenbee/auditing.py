"""Verified workers, the queen's side: admission (pins, auditors), audits of delivered answers, escrow.

- Admission (`admit`): a worker presenting the `--auditor-token` is trusted and is sent audits; one
  presenting another token is refused. A model id pinned with `--model-pin ID=SHA256` is refused to a
  worker whose file for it has another hash (or none), with the reason in its Welcome; a worker left
  with no model is refused outright.
- Audits: after an answer has been delivered, `delivered` samples it (queenbee/audits.py) and queues
  it; one task runs the queue, sending each to an auditor serving the same file (by hash) when the
  auditor has a free slot and no client waits for the model, so that audits never take a slot a
  client is waiting for. The verdict goes into the worker's standing; a pause benches the worker's
  identity for good (no traffic, after a restart too), logs why, and shows in /v1/workers and the
  metrics.
- Possession: each untrusted worker joining is asked the hash of a random byte range of each model
  file an auditor also holds, and so is the auditor, and again after one audit in ten; a wrong answer
  pauses the worker.
- Escrow (queenbee/escrow.py): an untrusted identity's earnings are held until it has passed
  `--escrow-audits` audits and been connected `--escrow-seconds`; a flagged request is forfeited.
- Standings (queenbee/standings.py) are written to the ledger whenever they change and read back when
  the queen starts (`load`): a pause, probation or a cleared escrow outlives a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import SecretStr, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from protocol import (
    AuditedChoice,
    AuditJob,
    ChallengeJob,
    ErrorCode,
    Job,
    JobError,
    Register,
    Result,
    Usage,
)
from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.verification import AUDIT_REPORT, CHALLENGE_REPORT, AuditReport, ChallengeReport
from queenbee import escrow
from queenbee.audits import (
    AuditPolicy,
    AuditRule,
    Delivered,
    DeliveredChoice,
    Standing,
    Verdict,
    answer_mode,
    implausibly_fast,
    judge,
)
from queenbee.auth import SecretFileError, read_secret_file, require_admin, secret_matches
from queenbee.errors import NotFound
from queenbee.forwarding import ForwardedCall
from queenbee.hive import Hive
from queenbee.ledger import Ledger
from queenbee.resume import AnswerSoFar
from queenbee.settings import QueenSettings
from queenbee.standings import load_standings, save_standing
from queenbee.worker_session import WorkerGone, WorkerSession

log = logging.getLogger("queenbee.audits")

MAX_STANDINGS = 100_000
"""Worker identities whose audit record is kept (least recently seen forgotten)."""
QUEUE_SIZE = 256
"""Audits that may wait; beyond it a sampled answer is not audited (counted as skipped)."""
POLL_SECONDS = 0.05
"""How often a waiting audit looks for a free auditor slot with no client waiting."""
CHALLENGE_BYTES = 2**20
"""Bytes of the model file a possession challenge hashes."""
CHALLENGE_SHARE = 0.1
"""Share of audits followed by a possession challenge of the audited worker (besides the one at
registration), so that a worker cannot drop the real file once registered."""


def parse_pins(pins: Iterable[str]) -> dict[str, str]:
    """`ID=SHA256` texts as a mapping; ValueError naming the bad one."""
    parsed: dict[str, str] = {}
    for text in pins:
        model, sep, digest = text.rpartition("=")
        digest = digest.strip().lower()
        if not sep or not model or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"--model-pin {text!r}: expected ID=SHA256 (64 hex digits)")
        parsed[model] = digest
    return parsed


def auditor_secret(settings: QueenSettings) -> SecretStr | None:
    """The auditor token from --auditor-token or --auditor-token-file; SecretFileError if unusable."""
    if settings.auditor_token is not None and settings.auditor_token_file is not None:
        raise SecretFileError("--auditor-token-file: give --auditor-token or --auditor-token-file, not both")
    if settings.auditor_token_file is not None:
        return read_secret_file(settings.auditor_token_file, "--auditor-token-file")
    return settings.auditor_token


@dataclass(frozen=True)
class Admission:
    """What the queen makes of a registration: the registration to serve, what it refuses, or a refusal."""

    registration: Register
    trusted: bool = False
    refused_models: dict[str, str] = field(default_factory=dict)
    refusal: str | None = None
    """Set when the worker is refused altogether."""


@dataclass
class AuditCounts:
    """What the audits have done since the queen started, for the metrics."""

    sampled: int = 0
    audited: int = 0
    flagged: int = 0
    paused: int = 0
    skipped: int = 0
    """Sampled answers that could not be audited (no auditor with the file, a full queue, a timeout)."""
    unauditable: int = 0
    """Delivered answers without the token ids an audit needs (resumed streams, workers that send none)."""
    audited_tokens: int = 0
    auditor_seconds: float = 0.0
    challenges: int = 0
    challenges_failed: int = 0


class AuditService:
    """The queen's audits, standings and escrow, for one app (created in its lifespan)."""

    def __init__(
        self,
        settings: QueenSettings,
        hive: Hive,
        ledger: Ledger,
        *,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.hive = hive
        self.ledger = ledger
        self.policy = AuditPolicy(
            rate=settings.audit_rate,
            probation_rate=settings.probation_rate,
            probation_requests=settings.probation_requests,
        )
        self.rule = AuditRule(gap_threshold=settings.audit_gap_threshold)
        self.pins = parse_pins(settings.model_pin)
        self.auditor_token = auditor_secret(settings)
        self.counts = AuditCounts()
        self.trusted: set[str] = set()
        """Session ids of the connected auditors."""
        self._standings: OrderedDict[str, Standing] = OrderedDict()
        self._rng = rng or random.SystemRandom()
        self._queue: asyncio.Queue[Delivered] = asyncio.Queue(maxsize=QUEUE_SIZE)
        self._ids = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        self._running = 0

    @property
    def enabled(self) -> bool:
        """Whether audits run at all (there is an auditor token for auditors to present)."""
        return self.auditor_token is not None

    async def load(self) -> None:
        """Read back the standings the ledger keeps (queenbee/standings.py): a restart forgets none."""
        if not self.enabled:
            return
        try:
            kept = await self.ledger.read(lambda connection: load_standings(connection, MAX_STANDINGS))
        except Exception as exc:
            log.error("audit: could not read the workers' standings from the ledger: %s", exc)
            return
        for identity, standing in kept.items():
            self._standings[identity] = standing
            self._standings.move_to_end(identity)
        paused = sum(standing.paused for standing in kept.values())
        log.info("audit: %d worker standings read from the ledger (%d paused)", len(kept), paused)

    def start(self) -> None:
        """Start the task that runs queued audits."""
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="audits")

    async def close(self) -> None:
        """Stop running audits (queued ones are dropped)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def standing(self, identity: str) -> Standing:
        """The audit record of a worker identity (kept across its reconnections, bounded)."""
        standing = self._standings.get(identity)
        if standing is None:
            standing = self._standings[identity] = Standing()
            if len(self._standings) > MAX_STANDINGS:
                self._standings.popitem(last=False)
        else:
            self._standings.move_to_end(identity)
        return standing

    def known_standing(self, identity: str) -> Standing | None:
        """The audit record of an identity, if it has one (for /v1/workers)."""
        return self._standings.get(identity)

    # Admission.

    def admit(self, registration: Register) -> Admission:
        """Decide what of a registration the queen serves (pins, auditor token)."""
        trusted = False
        if registration.auditor_token:
            if self.auditor_token is None or not secret_matches(
                self.auditor_token, registration.auditor_token
            ):
                return Admission(registration, refusal="the auditor token is not this queen's")
            trusted = True
        refused: dict[str, str] = {}
        for model in registration.models:
            pinned = self.pins.get(model.id)
            if pinned is not None and model.sha256 != pinned:
                claimed = model.sha256 or "no hash"
                refused[model.id] = (
                    f"'{model.id}' is pinned to the file with SHA-256 {pinned}; this worker's has {claimed}"
                )
        if not refused:
            return Admission(registration, trusted=trusted)
        kept = [model for model in registration.models if model.id not in refused]
        if not kept:
            return Admission(registration, refused_models=refused, refusal="; ".join(refused.values()))
        return Admission(
            registration.model_copy(update={"models": kept}), trusted=trusted, refused_models=refused
        )

    async def joined(self, worker: WorkerSession, trusted: bool) -> None:
        """A worker is in rotation: note an auditor; hold a new worker's pay and challenge its files."""
        if trusted:
            self.trusted.add(worker.id)
            return
        standing = self.standing(worker.identity)
        standing.ln_url = worker.registration.ln_url
        if standing.paused:
            self._pause(worker, standing.pause_reason)
        if not self.enabled:
            return
        if not standing.cleared:
            await self._open_hold(worker.registration.ln_url, worker.identity)
        if self.settings.possession_challenges:
            self.hive.spawn(self._challenge_all(worker))

    def is_trusted(self, worker: WorkerSession) -> bool:
        """Whether a worker is one of the queen's auditors (for keys that use trusted workers only)."""
        return worker.id in self.trusted

    def left(self, worker: WorkerSession) -> None:
        """A worker left the hive."""
        self.trusted.discard(worker.id)

    # Sampling.

    def delivered(
        self, call: ForwardedCall, worker: WorkerSession, usage: Usage, answer: AnswerSoFar
    ) -> None:
        """An answer reached its client: sample it for an audit (never blocks, never raises).

        Streams and whole answers alike: both name the token ids behind their text. An answer that moved
        to another worker mid-stream is no one worker's and is not audited; a whole answer that ran
        again elsewhere is the last worker's own.
        """
        if not self.enabled or worker.id in self.trusted or not call.endpoint.generates:
            return  # a token count generates nothing to audit
        request_id, model, request = call.request_id, call.model, call.request
        resumed = call.stream and call.resumes > 0
        if not isinstance(request, ChatCompletionRequest | CompletionRequest):
            return
        standing = self.standing(worker.identity)
        if not standing.sample(self.policy, self._rng, suspicious=self._fast(worker, model)):
            return
        self.counts.sampled += 1
        delivered = self._delivered(request_id, model, request, worker, usage, answer, resumed)
        if delivered is None:
            self.counts.unauditable += 1
            return
        try:
            self._queue.put_nowait(delivered)
        except asyncio.QueueFull:
            self.counts.skipped += 1

    def _fast(self, worker: WorkerSession, model: str) -> bool:
        """Whether the worker is implausibly fast beside the others serving the same file."""
        own = worker.speed.get(model)
        model_hash = worker.model_hashes.get(model)
        others = [
            speed.tokens_per_second
            for other in self.hive.serving(model)
            if other.id != worker.id
            and other.model_hashes.get(model) == model_hash
            and (speed := other.speed.get(model)) is not None
            and speed.tokens_per_second is not None
        ]
        return implausibly_fast(own.tokens_per_second if own is not None else None, others)

    def _delivered(
        self,
        request_id: str,
        model: str,
        request: ChatCompletionRequest | CompletionRequest,
        worker: WorkerSession,
        usage: Usage,
        answer: AnswerSoFar,
        resumed: bool,
    ) -> Delivered | None:
        model_hash = worker.model_hashes.get(model)
        if resumed or model_hash is None or not answer.resumable:
            return None
        if isinstance(request, CompletionRequest) and request.echo:
            return None
        n = (request.n or 1) * (len(request.prompts) if isinstance(request, CompletionRequest) else 1)
        stops = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        # A tool call is relayed as fields, not as the text its ids spell.
        tools = (
            isinstance(request, ChatCompletionRequest) and bool(request.tools) and request.tool_mode != "none"
        )
        choices = tuple(
            DeliveredChoice(
                index=index,
                token_ids=tuple(answer.ids.get(index, ())),
                text=None if tools else "".join(answer.texts.get(index, ())),
                # Ended by a stop sequence, the end token's probability says nothing.
                finished=answer.finish_reasons.get(index) == "stop" and not stops,
            )
            for index in range(n)
        )
        mode = answer_mode(request)
        return Delivered(
            request_id=request_id,
            model=model,
            model_hash=model_hash,
            identity=worker.identity,
            worker_id=worker.id,
            ln_url=worker.registration.ln_url,
            request=request,
            choices=choices,
            mode=mode or "sampled",
            ignore_eos=request.ignore_eos or mode is None,
            reported_prompt_tokens=usage.prompt_tokens,
            reported_completion_tokens=usage.completion_tokens,
            stops=stops,
        )

    # Running audits.

    @property
    def pending(self) -> int:
        """Audits queued or running."""
        return self._queue.qsize() + self._running

    async def _run(self) -> None:
        while True:
            delivered = await self._queue.get()
            self._running = 1
            try:
                await self.audit(delivered)
                if self.settings.possession_challenges and self._rng.random() < CHALLENGE_SHARE:
                    await self._challenge_again(delivered)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("audit of request %s failed", delivered.request_id)
                self.counts.skipped += 1
            finally:
                self._running = 0

    def _auditor_for(self, model: str, model_hash: str, identity: str) -> WorkerSession | None:
        candidates = [
            worker
            for worker in self.hive.serving(model)
            if worker.id in self.trusted
            and worker.identity != identity
            and worker.model_hashes.get(model) == model_hash
            and not worker.closed
        ]
        return self._rng.choice(candidates) if candidates else None

    async def _auditor_slot(self, model: str, model_hash: str, identity: str) -> WorkerSession | None:
        """An auditor with a free slot while no client waits for `model`, within the audit timeout."""
        try:
            async with asyncio.timeout(self.settings.audit_timeout):
                while True:
                    auditor = self._auditor_for(model, model_hash, identity)
                    if auditor is None:
                        return None
                    if auditor.free_slots > 0 and self.hive.queue_depth(model) == 0:
                        return auditor
                    await asyncio.sleep(POLL_SECONDS)
        except TimeoutError:
            return None

    async def _run_on(self, worker: WorkerSession, model: str, request: Any) -> Result | JobError | None:
        """Run a side job on a worker's free slot: its Result, its JobError, or None if the worker went
        away or took too long."""
        request_id = f"audit-{next(self._ids)}"
        stream = worker.reserve(request_id, model)
        await worker.send_job(Job(request_id=request_id, request=request))
        try:
            async with asyncio.timeout(self.settings.audit_timeout):
                while True:
                    event = await stream.next(self.settings.audit_timeout)
                    if isinstance(event, Result):
                        return event
                    if isinstance(event, JobError | WorkerGone):
                        log.warning("%s on worker %s failed: %s", request.kind, worker.id, event)
                        return event if isinstance(event, JobError) else None
        except TimeoutError:
            worker.cancel(request_id)
            return None

    async def audit(self, delivered: Delivered) -> Verdict | None:
        """Run one audit and apply its verdict; None if no auditor could run it."""
        auditor = await self._auditor_slot(delivered.model, delivered.model_hash, delivered.identity)
        if auditor is None:
            log.info(
                "request %s: no auditor holds the file of '%s'; not audited",
                delivered.request_id,
                delivered.model,
            )
            self.counts.skipped += 1
            return None
        request = delivered.request
        job = AuditJob(
            model=delivered.model,
            chat=request if isinstance(request, ChatCompletionRequest) else None,
            completion=request if isinstance(request, CompletionRequest) else None,
            choices=[
                AuditedChoice(index=choice.index, token_ids=list(choice.token_ids), finished=choice.finished)
                for choice in delivered.choices
            ],
        )
        result = await self._run_on(auditor, delivered.model, job)
        if (
            isinstance(result, JobError)
            and result.code is ErrorCode.INVALID_REQUEST
            and result.param == "choices"
        ):
            # Ids the real model does not have (outside its vocabulary): no honest worker returns them.
            verdict = Verdict(True, (f"the auditor refused its token ids: {result.message}",))
            await self.apply(
                delivered, verdict, AuditReport(prompt_tokens=0, choices=[], seconds=0), auditor.id
            )
            return verdict
        report = _parse(AUDIT_REPORT, result)
        if report is None:
            self.counts.skipped += 1
            return None
        verdict = judge(delivered, report, self.rule)
        await self.apply(delivered, verdict, report, auditor.id)
        return verdict

    async def apply(self, delivered: Delivered, verdict: Verdict, report: AuditReport, auditor: str) -> None:
        """Fold a verdict into the worker's standing, the ledger and, on a pause, the hive."""
        standing = self.standing(delivered.identity)
        standing.ln_url = delivered.ln_url
        paused_now = standing.record(verdict, self.policy)
        self.counts.audited += 1
        self.counts.audited_tokens += delivered.tokens
        self.counts.auditor_seconds += report.seconds
        now = time.time()
        reasons = "; ".join(verdict.reasons)[:2000] or None
        row = escrow.AuditRow(
            request_id=delivered.request_id,
            audited_at=now,
            identity=delivered.identity,
            ln_url=delivered.ln_url,
            model=delivered.model,
            auditor=auditor,
            flagged=verdict.flagged,
            reasons=reasons,
            tokens=delivered.tokens,
            seconds=report.seconds,
        )

        if verdict.flagged:
            standing.cleared = False

        def store(connection: Any) -> None:
            escrow.record_audit(connection, row)
            if verdict.flagged:
                escrow.forfeit(connection, delivered.request_id, delivered.ln_url, reasons or "flagged", now)
                escrow.open_hold(connection, delivered.ln_url, delivered.identity, now)
            save_standing(connection, delivered.identity, standing, now)

        await self._write(store)
        if verdict.flagged:
            self.counts.flagged += 1
            log.warning(
                "audit: request %s by worker %s (%s) flagged: %s",
                delivered.request_id,
                delivered.worker_id,
                delivered.identity,
                reasons,
            )
        if paused_now:
            self.counts.paused += 1
            for worker in list(self.hive.workers.values()):
                if worker.identity == delivered.identity:
                    self._pause(worker, standing.pause_reason)
            if not any(worker.identity == delivered.identity for worker in self.hive.workers.values()):
                self.hive.health_of(delivered.identity).benched_until = math.inf
        elif not verdict.flagged and not standing.cleared:
            await self._maybe_release(delivered.identity, standing)

    def _pause(self, worker: WorkerSession, reason: str) -> None:
        worker.health.benched_until = math.inf
        log.error(
            "audit: worker %s (%s) is paused: no traffic, its flagged pay forfeited and the rest held: %s",
            worker.id,
            worker.identity,
            reason,
        )

    async def _maybe_release(self, identity: str, standing: Standing) -> None:
        """Release an identity's escrow once it has passed enough audits and been connected long enough."""
        if standing.passed_since_flag < self.settings.escrow_audits:
            return
        now = time.time()
        sessions = [worker for worker in self.hive.workers.values() if worker.identity == identity]
        if (
            not sessions
            or now - min(worker.connected_at for worker in sessions) < self.settings.escrow_seconds
        ):
            return
        standing.cleared = True

        def store(connection: Any) -> None:
            escrow.release_holds(connection, identity, now)
            save_standing(connection, identity, standing, now)

        await self._write(store)
        log.info(
            "audit: worker %s passed %d audits; its escrow is released", identity, standing.passed_since_flag
        )

    async def _open_hold(self, ln_url: str, identity: str) -> None:
        now = time.time()
        await self._write(lambda connection: escrow.open_hold(connection, ln_url, identity, now))

    async def _write(self, function: Any) -> None:
        try:
            await self.ledger.write(function)
        except Exception as exc:
            log.error("audit: could not write to the ledger: %s", exc)

    # Possession challenges.

    async def _challenge_all(self, worker: WorkerSession) -> None:
        for model in worker.registration.models:
            if model.sha256 is None or model.size_bytes is None or model.size_bytes == 0:
                continue
            try:
                await self.challenge(worker, model.id, model.sha256, model.size_bytes)
            except Exception:
                log.exception("possession challenge of worker %s failed", worker.id)

    async def _challenge_again(self, delivered: Delivered) -> None:
        worker = self.hive.workers.get(delivered.worker_id)
        if worker is None or worker.closed:
            return
        info = next((model for model in worker.registration.models if model.id == delivered.model), None)
        if info is not None and info.size_bytes:
            await self.challenge(worker, delivered.model, delivered.model_hash, info.size_bytes)

    async def challenge(self, worker: WorkerSession, model: str, model_hash: str, size: int) -> bool | None:
        """Ask a worker and an auditor for the hash of one random range of a file; a wrong answer pauses.

        Returns whether the worker answered right, None when no auditor holds the file or no answer came.
        """
        auditor = await self._auditor_slot(model, model_hash, worker.identity)
        if auditor is None:
            return None
        length = min(CHALLENGE_BYTES, size)
        offset = self._rng.randrange(0, size - length + 1)
        job = ChallengeJob(model=model, offset=offset, length=length)
        expected = _parse(CHALLENGE_REPORT, await self._run_on(auditor, model, job))
        if expected is None:
            return None
        if worker.free_slots <= 0:
            return None
        answer: ChallengeReport | None = _parse(CHALLENGE_REPORT, await self._run_on(worker, model, job))
        self.counts.challenges += 1
        if answer is not None and answer.sha256 == expected.sha256:
            return True
        self.counts.challenges_failed += 1
        reason = f"could not prove it holds the file of '{model}' (bytes {offset}..{offset + length})"
        standing = self.standing(worker.identity)
        standing.paused = True
        standing.cleared = False
        standing.pause_reason = reason
        self.counts.paused += 1
        self._pause(worker, reason)
        now = time.time()
        await self._write(lambda connection: save_standing(connection, worker.identity, standing, now))
        return False

    async def reinstate(self, identity: str) -> Standing | None:
        """An operator's second chance for a paused identity: unpaused, on probation, its pay escrowed.

        Its audits so far stay in the `audits` table; its window of recent audits starts empty. None if
        the queen knows no standing of that identity.
        """
        standing = self.known_standing(identity)
        if standing is None:
            return None
        standing.paused = False
        standing.pause_reason = ""
        standing.paused_after = 0
        standing.recent.clear()
        standing.probation_left = self.policy.probation_requests
        standing.cleared = False
        standing.passed_since_flag = 0
        self.hive.health_of(identity).benched_until = 0.0
        sessions = [worker for worker in self.hive.workers.values() if worker.identity == identity]
        for worker in sessions:
            worker.health.benched_until = 0.0
        now = time.time()

        def store(connection: Any) -> None:
            save_standing(connection, identity, standing, now)
            if sessions:
                escrow.open_hold(connection, sessions[0].registration.ln_url, identity, now)

        await self._write(store)
        log.warning("audit: worker %s is reinstated by the operator, on probation", identity)
        return standing

    # Reporting.

    def worker_view(self, worker: WorkerSession) -> dict[str, Any]:
        """A worker's audit state as /v1/workers shows it."""
        if worker.id in self.trusted:
            return {"trusted": True}
        standing = self.known_standing(worker.identity)
        if standing is None:
            return {"trusted": False, "audits": 0, "flags": 0, "probation": False, "paused": False}
        return self.standing_view(standing)

    @staticmethod
    def standing_view(standing: Standing) -> dict[str, Any]:
        """An untrusted worker's standing as the admin sees it."""
        return {
            "trusted": False,
            "audits": standing.audits,
            "flags": standing.flags,
            "probation": standing.on_probation,
            "paused": standing.paused,
            "pause_reason": standing.pause_reason or None,
            "escrow_cleared": standing.cleared,
        }


async def reinstate_worker(request: Request) -> Response:
    """POST /admin/workers/{identity}/reinstate: give a paused worker identity another chance (admin key).

    Pauses outlive restarts (the standings are in the ledger); this is how an operator lifts one. The
    worker comes back on probation with its pay escrowed. 404 for an identity the queen has no record of.
    """
    require_admin(request)
    identity = request.path_params["identity"]
    service: AuditService = request.state.audits
    standing = await service.reinstate(identity)
    if standing is None:
        raise NotFound(f"No audit record of a worker with the instance id '{identity}'.", param="identity")
    return JSONResponse({"identity": identity, **service.standing_view(standing)})


def _parse(adapter: Any, result: Result | JobError | None) -> Any:
    if not isinstance(result, Result) or result.response is None:
        return None
    try:
        return adapter.validate_python(result.response)
    except ValidationError as exc:
        log.warning("an auditor's or worker's report does not parse: %s", exc.errors(include_url=False)[:1])
        return None


class AuditCollector:
    """The audits' counters and the paused workers, read at scrape time."""

    def __init__(self, service: AuditService) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        """The counters."""
        counts = self.service.counts
        for name, help_text, value in (
            ("queenbee_audits_sampled", "Delivered answers sampled for an audit.", counts.sampled),
            ("queenbee_audits", "Audits run.", counts.audited),
            ("queenbee_audits_flagged", "Audits that flagged the answer.", counts.flagged),
            ("queenbee_audits_skipped", "Sampled answers no auditor could audit.", counts.skipped),
            (
                "queenbee_audits_unauditable",
                "Sampled answers without the ids an audit needs.",
                counts.unauditable,
            ),
            ("queenbee_audited_tokens", "Completion tokens audited.", counts.audited_tokens),
            ("queenbee_workers_paused", "Workers paused by audits or challenges.", counts.paused),
            ("queenbee_possession_challenges", "Possession challenges answered.", counts.challenges),
            (
                "queenbee_possession_challenges_failed",
                "Possession challenges failed.",
                counts.challenges_failed,
            ),
        ):
            yield CounterMetricFamily(name, help_text, value=value)
        yield CounterMetricFamily(
            "queenbee_auditor_seconds", "Seconds auditors spent scoring.", value=counts.auditor_seconds
        )
        paused = sum(
            1
            for worker in self.service.hive.workers.values()
            if (standing := self.service.known_standing(worker.identity)) is not None and standing.paused
        )
        yield GaugeMetricFamily(
            "queenbee_paused_workers_connected", "Connected workers paused.", value=paused
        )
