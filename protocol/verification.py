"""What an auditor answers: the scores of a delivered answer, and the hash a possession challenge asks for.

These travel as the `response` of a `Result` to an `AuditJob` or a `ChallengeJob` (protocol 3), and the
queen validates them with `AUDIT_REPORT` / `CHALLENGE_REPORT` before judging anything.

Units: log-probabilities and gaps are natural logs (nats); probabilities are in [0, 1].
"""

from __future__ import annotations

from pydantic import Field, TypeAdapter

from protocol.messages import Frame


class ScoredChoice(Frame):
    """One audited choice: how the trusted model rates every token the worker returned.

    Position i is the i-th returned token: `gaps[i]` is the best token's log-probability minus the
    returned one's at that position (0 when the returned token is the best), `ranks[i]` how many tokens
    the model rated higher, `eos[i]` the probability of ending generation there. `eos` has one entry
    more than the ids: the position after the last token, where a finished choice ended.
    """

    index: int = Field(ge=0, le=127)
    gaps: list[float] = Field(max_length=2**16)
    ranks: list[int] = Field(max_length=2**16)
    eos: list[float] = Field(max_length=2**16 + 1)
    best_is_eos: list[bool] = Field(
        max_length=2**16, description="Whether ending generation was the model's best token at position i."
    )
    text: str = Field(description="The ids detokenized by the auditor's copy: what the client should have.")
    sampled_p: list[float] | None = Field(
        default=None,
        max_length=2**16,
        description="For a sampled answer: each returned token's probability in the distribution the "
        "worker's sampler draws from (the request's top-k, top-p, min-p and temperature on the trusted "
        "logits); 0 for a token those drop.",
    )
    replay_distances: list[float] | None = Field(
        default=None,
        max_length=2**16,
        description="For a sampled answer with a seed: how far each returned token is from what the "
        "worker's sampler, replayed with the choice's seed on the trusted logits (the returned tokens fed "
        "back in), draws there: the probability mass strictly between the two in the order the draw "
        "walks the tokens; 0 when they are the same, 1 when the sampler drops the returned one.",
    )
    replay_end_distance: float | None = Field(
        default=None,
        ge=0,
        description="The same distance for ending generation after the last token (the nearest end "
        "token): what a choice the worker ended must be close to.",
    )


class AuditReport(Frame):
    """An auditor's scores of one delivered answer."""

    prompt_tokens: int = Field(ge=0, description="The prompt's tokens as the auditor counts them.")
    choices: list[ScoredChoice] = Field(max_length=128)
    seconds: float = Field(ge=0, description="Time the auditor spent scoring, seconds.")


class ChallengeReport(Frame):
    """The answer to a possession challenge."""

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the asked byte range, hex.")
    size_bytes: int = Field(ge=0, description="The model file's size (all parts), bytes.")


AUDIT_REPORT: TypeAdapter[AuditReport] = TypeAdapter(AuditReport)
CHALLENGE_REPORT: TypeAdapter[ChallengeReport] = TypeAdapter(ChallengeReport)
