"""The audit policy, sans I/O: which delivered answers are audited, the rule that flags one, escalation.

A delivered answer is scored by an auditor (workerbee/auditor.py): for every returned token the gap in
nats between the trusted model's best token and the returned one, its rank, and the probability of
ending generation. `judge` applies the rule (docs/verification.md) to those scores and to what the queen
itself saw (the relayed text, the counts the worker reported):

- greedy answers: two or more tokens with a gap above `gap_threshold`, or any token ranked
  `max_rank` or lower down (the 11th best and below, by default), is another model's output;
- an end of generation where the model gave ending little probability (`min_end_eos`): a cut answer;
  an end skipped where it was the best token by far (`skipped_eos`): a padded one;
- sampled answers, from the auditor's replay of the worker's sampler: with a seed, two or more draws
  (the end included) `replay_distance` or more of probability away from the replayed draw; with or
  without one, two or more tokens the request's top-k, top-p or min-p drop;
- any answer: ids that do not detokenize to the relayed text (a stop sequence may follow it), or a
  prompt count above the auditor's.

`Standing` is one worker identity's record: one flag puts it on probation (its next
`probation_requests` requests audited at `probation_rate`), two flags within `flag_window` audits pause
it (no traffic, flagged pay forfeited). `AuditPolicy.sample` decides, per delivered request, whether it
is audited.
"""

from __future__ import annotations

import random
import statistics
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.verification import AuditReport, ScoredChoice

Mode = Literal["greedy", "sampled"]
"""How an answer was generated: only a greedy answer's tokens must be the model's best."""


@dataclass(frozen=True)
class AuditRule:
    """The thresholds of the rule (calibrated in bench/audit_calibration.py)."""

    gap_threshold: float = 0.5
    """Nats below the best token above which a returned token counts as a miss."""
    max_misses: int = 1
    """Misses a greedy answer may have; one more flags it."""
    max_rank: int = 10
    """A greedy token ranked this many places below the best, or more, flags the answer alone."""
    min_end_eos: float = 0.02
    """A greedy answer the worker ended itself needs at least this probability of ending there."""
    skipped_eos: float = 0.5
    """A greedy answer that goes on where ending had at least this probability (and was the best)."""
    replay_distance: float = 0.05
    """A seeded sampled token this much probability away from the replayed draw, or more, is far."""
    max_far_draws: int = 1
    """Far draws a seeded sampled answer may have (its end included); one more flags it."""
    max_dropped: int = 1
    """Tokens a sampled answer may have that the request's top-k, top-p or min-p drop; one more flags."""


@dataclass(frozen=True)
class DeliveredChoice:
    """One choice as the client received it."""

    index: int
    token_ids: tuple[int, ...]
    text: str | None
    """None where the text relayed is not what the ids spell (a tool call relayed as fields)."""
    finished: bool
    """The worker ended it (end of generation), rather than the token limit or a stop sequence."""


@dataclass(frozen=True)
class Delivered:
    """What the queen saw of a delivered answer: enough to audit it."""

    request_id: str
    model: str
    model_hash: str
    identity: str
    """The worker's instance id."""
    worker_id: str
    ln_url: str
    request: ChatCompletionRequest | CompletionRequest
    choices: tuple[DeliveredChoice, ...]
    mode: Mode
    ignore_eos: bool
    reported_prompt_tokens: int
    reported_completion_tokens: int
    stops: tuple[str, ...] = ()
    """The request's stop sequences: the ids of a choice a stop ended spell its text and the stop."""

    @property
    def tokens(self) -> int:
        """Completion tokens behind the relayed text."""
        return sum(len(choice.token_ids) for choice in self.choices)


@dataclass(frozen=True)
class Verdict:
    """An audit's outcome: flagged or not, and every reason, in words fit for a log line."""

    flagged: bool
    reasons: tuple[str, ...]


def answer_mode(request: ChatCompletionRequest | CompletionRequest) -> Mode | None:
    """How the request generates, for the rule; None when its distribution is not the model's own.

    Penalties, logit biases and grammars (tools, response formats) change what the model's best token
    is, and the auditor scores the model alone: such answers get only the text and count checks.
    """
    if request.logit_bias or request.presence_penalty or request.frequency_penalty:
        return None
    if request.repeat_penalty not in (None, 1.0):
        return None
    if isinstance(request, ChatCompletionRequest) and (
        (request.tools and request.tool_mode != "none") or request.response_format is not None
    ):
        return None
    if request.temperature == 0 or request.top_k == 1:
        return "greedy"
    return "sampled"


def same_text(spelled: str, relayed: str, stops: tuple[str, ...]) -> bool:
    """Whether ids that spell `spelled` are behind the relayed text: the same, or, for a choice a stop
    sequence ended, the text, the stop and what followed it in the stop's last token."""
    return spelled == relayed or any(spelled.startswith(relayed + stop) for stop in stops if stop)


def judge(delivered: Delivered, report: AuditReport, rule: AuditRule) -> Verdict:
    """Apply the rule to an auditor's report on a delivered answer."""
    reasons: list[str] = []
    if report.prompt_tokens < delivered.reported_prompt_tokens:
        reasons.append(
            f"reported {delivered.reported_prompt_tokens} prompt tokens where the auditor counts "
            f"{report.prompt_tokens}"
        )
    scored = {choice.index: choice for choice in report.choices}
    for choice in delivered.choices:
        score = scored.get(choice.index)
        if score is None or len(score.gaps) != len(choice.token_ids):
            reasons.append(f"choice {choice.index}: the auditor's report does not match the answer")
            continue
        if choice.text is not None and not same_text(score.text, choice.text, delivered.stops):
            reasons.append(f"choice {choice.index}: the token ids do not detokenize to the relayed text")
        if delivered.mode != "greedy":
            reasons += _sampled_reasons(choice, score, rule)
            continue
        misses = sum(gap > rule.gap_threshold for gap in score.gaps)
        if misses > rule.max_misses:
            reasons.append(
                f"choice {choice.index}: {misses} of {len(score.gaps)} tokens more than "
                f"{rule.gap_threshold:g} nats below the model's best"
            )
        worst = max(score.ranks, default=0)
        if worst >= rule.max_rank:
            reasons.append(f"choice {choice.index}: a token ranked {worst + 1} by the model")
        if choice.finished and score.eos[-1] < rule.min_end_eos:
            reasons.append(
                f"choice {choice.index}: ended where the model gives ending {score.eos[-1]:.3f} probability"
            )
        if not delivered.ignore_eos:
            skipped = [
                position
                for position, (best, eos) in enumerate(zip(score.best_is_eos, score.eos, strict=False))
                if best and eos >= rule.skipped_eos
            ]
            if skipped:
                reasons.append(
                    f"choice {choice.index}: went on at token {skipped[0]} where ending had probability "
                    f"{score.eos[skipped[0]]:.3f}"
                )
    return Verdict(bool(reasons), tuple(reasons))


def _sampled_reasons(choice: DeliveredChoice, score: ScoredChoice, rule: AuditRule) -> list[str]:
    """The rule for a sampled answer, from the auditor's replay of the worker's sampler."""
    reasons: list[str] = []
    if score.sampled_p is not None and len(score.sampled_p) == len(choice.token_ids):
        dropped = sum(probability == 0 for probability in score.sampled_p)
        if dropped > rule.max_dropped:
            reasons.append(
                f"choice {choice.index}: {dropped} of {len(score.sampled_p)} tokens the request's top-k, "
                "top-p or min-p do not allow"
            )
    if score.replay_distances is not None and len(score.replay_distances) == len(choice.token_ids):
        far = sum(distance >= rule.replay_distance for distance in score.replay_distances)
        end = score.replay_end_distance
        if choice.finished and end is not None and end >= rule.replay_distance:
            far += 1
        if far > rule.max_far_draws:
            reasons.append(
                f"choice {choice.index}: {far} of {len(score.replay_distances) + choice.finished} draws "
                f"{rule.replay_distance:g} or more of probability away from the seeded sampler's replay"
            )
    return reasons


@dataclass(frozen=True)
class AuditPolicy:
    """How often answers are audited, and how flags escalate."""

    rate: float = 0.05
    """Share of delivered requests audited."""
    probation_rate: float = 0.5
    """Share audited while on probation."""
    probation_requests: int = 20
    """Delivered requests a flag puts under the probation rate."""
    flag_window: int = 50
    """Audits over which two flags pause a worker."""
    pause_flags: int = 2
    """Flags within the window that pause a worker."""


FAST_FACTOR = 2.0
"""A worker measured this many times faster than the median of the others on the same file is suspect."""


def implausibly_fast(own: float | None, others: list[float], factor: float = FAST_FACTOR) -> bool:
    """Whether a worker's measured tokens per second stand out from the others' on the same model file.

    Speed is the queen's own measurement (never the worker's word): a worker much faster than others
    with the same weights is likely running something smaller, so it is audited more. Needs two others.
    """
    if own is None or len(others) < 2:
        return False
    return own > factor * statistics.median(others)


@dataclass
class Standing:
    """One worker identity's audit record: in memory across its reconnections, in the ledger across the
    queen's restarts (queenbee/standings.py)."""

    ln_url: str = ""
    probation_left: int = 0
    recent: deque[bool] = field(default_factory=deque)
    """The outcomes of its last audits, True for a flag (at most `flag_window`)."""
    audits: int = 0
    flags: int = 0
    passed_since_flag: int = 0
    paused: bool = False
    pause_reason: str = ""
    cleared: bool = False
    paused_after: int = 0
    """The audits it had had when it was paused."""
    """Its escrow was released: it passed enough audits, connected long enough, since its last flag."""

    @property
    def on_probation(self) -> bool:
        """Whether a recent flag raised its audit rate."""
        return self.probation_left > 0

    def sample(self, policy: AuditPolicy, rng: random.Random, *, suspicious: bool = False) -> bool:
        """Whether the delivered request that just finished is audited (counts down probation).

        A `suspicious` worker (implausibly fast) is sampled at the probation rate too.
        """
        # Probation never audits less than the base rate, whatever the two are set to.
        rate = max(policy.rate, policy.probation_rate) if self.on_probation or suspicious else policy.rate
        if self.on_probation:
            self.probation_left -= 1
        return rng.random() < rate

    def record(self, verdict: Verdict, policy: AuditPolicy) -> bool:
        """Fold an audit's verdict in; returns True if it paused the worker just now."""
        self.audits += 1
        self.recent.append(verdict.flagged)
        while len(self.recent) > policy.flag_window:
            self.recent.popleft()
        if not verdict.flagged:
            self.passed_since_flag += 1
            return False
        self.flags += 1
        self.passed_since_flag = 0
        self.probation_left = policy.probation_requests
        if not self.paused and sum(self.recent) >= policy.pause_flags:
            self.paused = True
            self.paused_after = self.audits
            self.pause_reason = verdict.reasons[0] if verdict.reasons else "flagged"
            return True
        return False
