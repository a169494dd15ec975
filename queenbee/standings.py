"""Audit standings in the ledger: each worker identity's record, so that a queen restart forgets nothing.

A `Standing` (queenbee/audits.py) is kept in the queen's memory and written here, in the
`audit_standings` table (ledger migration 8), whenever an audit or a possession challenge changes it or
its escrow is released; the queen reads them all back when it starts. A paused worker stays paused, one
on probation stays on it (a restart loses at most the count-down of its probation since its last audit),
and a cleared one is not held in escrow again. Every audit itself is in the `audits` table (escrow.py).

The functions run on the ledger's threads (`Ledger.write`, `Ledger.read`); their SQL is the ledger's
portable spelling (`?` placeholders, an `ON CONFLICT` upsert), for SQLite and PostgreSQL alike.
"""

from __future__ import annotations

from collections import deque
from typing import Final

from queenbee.audits import Standing
from queenbee.ledger_db import Database

_COLUMNS: Final = (
    "identity, ln_url, probation_left, recent, audits, flags, passed_since_flag, paused, pause_reason, "
    "cleared, paused_after, updated_at"
)


def save_standing(connection: Database, identity: str, standing: Standing, now: float) -> None:
    """Keep an identity's standing as it is now (replacing what was kept)."""
    recent = "".join("1" if flagged else "0" for flagged in standing.recent)
    connection.execute(
        f"INSERT INTO audit_standings ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT (identity) DO UPDATE SET ln_url = excluded.ln_url, "
        "probation_left = excluded.probation_left, recent = excluded.recent, audits = excluded.audits, "
        "flags = excluded.flags, passed_since_flag = excluded.passed_since_flag, "
        "paused = excluded.paused, pause_reason = excluded.pause_reason, cleared = excluded.cleared, "
        "paused_after = excluded.paused_after, updated_at = excluded.updated_at",
        (
            identity,
            standing.ln_url,
            standing.probation_left,
            recent,
            standing.audits,
            standing.flags,
            standing.passed_since_flag,
            int(standing.paused),
            standing.pause_reason[:2000],
            int(standing.cleared),
            standing.paused_after,
            now,
        ),
    )


def load_standings(connection: Database, limit: int) -> dict[str, Standing]:
    """The `limit` most recently changed standings, least recent first (the order the queen keeps them)."""
    rows = connection.execute(
        f"SELECT {_COLUMNS} FROM audit_standings ORDER BY updated_at DESC LIMIT ?", (limit,)
    ).fetchall()
    standings: dict[str, Standing] = {}
    for row in reversed(rows):
        identity, ln_url, probation, recent, audits, flags, passed, paused, reason, cleared, after, _ = row
        standings[identity] = Standing(
            ln_url=ln_url,
            probation_left=int(probation),
            recent=deque(flag == "1" for flag in recent),
            audits=int(audits),
            flags=int(flags),
            passed_since_flag=int(passed),
            paused=bool(paused),
            pause_reason=reason,
            cleared=bool(cleared),
            paused_after=int(after),
        )
    return standings
