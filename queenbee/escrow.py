"""Escrow in the ledger: what each payout address (`ln_url`) is owed now, what waits, what is forfeited.

Earnings start in escrow. When a worker identity the queen has not cleared serves under an `ln_url`,
an escrow hold opens for that address; the worker's (and the address's) usage rows that start while the
hold is open are *escrowed*. Once the worker has passed `--escrow-audits` audits and been connected for
`--escrow-seconds`, the hold is released and those rows become *payable*. A flagged audit *forfeits* the
flagged request (it is paid to nobody) and opens a hold again. Rows no hold covers are payable.

Holds are per `ln_url` because payouts are: two workers sharing an address share its holds. The
functions here run on the ledger's threads (`Ledger.write`, `Ledger.read`), on SQLite or PostgreSQL
alike (`ledger_db`); tokens are the worker's
credited prompt plus completion tokens of each row, so the three figures add up, exactly, to what the
usage report says the address earned.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from queenbee.ledger import Row
from queenbee.ledger_db import Database

_SPLIT: Final = """
    SELECT COALESCE(u.ln_url, '') AS name,
        COALESCE(SUM(CASE WHEN f.request_id IS NOT NULL THEN u.tokens END), 0),
        COALESCE(SUM(CASE WHEN f.request_id IS NULL AND EXISTS (
            SELECT 1 FROM escrow_holds h
            WHERE h.ln_url = COALESCE(u.ln_url, '') AND h.released_at IS NULL AND u.started_at >= h.opened_at
        ) THEN u.tokens END), 0)
    FROM (
        SELECT request_id, ln_url, started_at,
            CAST(COALESCE(worker_prompt_tokens, prompt_tokens) AS BIGINT)
                + COALESCE(worker_completion_tokens, completion_tokens) AS tokens
        FROM usage
        WHERE started_at >= ? AND started_at < ? AND worker_id IS NOT NULL
    ) AS u
    LEFT JOIN forfeits AS f ON f.request_id = u.request_id
    GROUP BY name
"""


@dataclass(frozen=True)
class Split:
    """Of an address's credited tokens, those escrowed and those forfeited (the rest are payable)."""

    escrowed: int = 0
    forfeited: int = 0


def open_hold(connection: Database, ln_url: str, identity: str, now: float) -> bool:
    """Open a hold on `ln_url` for `identity` unless one is open already; whether one was opened."""
    open_already = connection.execute(
        "SELECT 1 FROM escrow_holds WHERE ln_url = ? AND identity = ? AND released_at IS NULL",
        (ln_url, identity),
    ).fetchone()
    if open_already:
        return False
    connection.execute(
        "INSERT INTO escrow_holds (ln_url, identity, opened_at) VALUES (?, ?, ?)", (ln_url, identity, now)
    )
    return True


def release_holds(connection: Database, identity: str, now: float) -> int:
    """Release every open hold of `identity`: its escrowed rows become payable. How many were released."""
    cursor = connection.execute(
        "UPDATE escrow_holds SET released_at = ? WHERE identity = ? AND released_at IS NULL", (now, identity)
    )
    return cursor.rowcount


def forfeit(connection: Database, request_id: str, ln_url: str, reason: str, now: float) -> None:
    """Forfeit a request's earnings (kept once, with its first reason)."""
    connection.execute(
        "INSERT INTO forfeits (request_id, ln_url, forfeited_at, reason) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        (request_id, ln_url, now, reason[:500]),
    )


@dataclass(frozen=True)
class AuditRow:
    """One audit's outcome, as the `audits` table keeps it."""

    request_id: str
    audited_at: float
    identity: str
    ln_url: str
    model: str
    auditor: str
    flagged: bool
    reasons: str | None
    tokens: int
    seconds: float


def record_audit(connection: Database, audit: AuditRow) -> None:
    """Keep an audit's outcome."""
    connection.execute(
        "INSERT INTO audits (request_id, audited_at, identity, ln_url, model, auditor, flagged, reasons, "
        "tokens, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            audit.request_id,
            audit.audited_at,
            audit.identity,
            audit.ln_url,
            audit.model,
            audit.auditor,
            int(audit.flagged),
            audit.reasons,
            audit.tokens,
            audit.seconds,
        ),
    )


def escrow_split(
    connection: Database, low: float, high: float, spooled: Iterable[Row] = ()
) -> dict[str, Split]:
    """Escrowed and forfeited tokens per `ln_url` for rows started in [low, high), spooled rows included.

    Call inside the report's transaction, so that it sees the same rows as the totals.
    """
    split = {
        # int(): PostgreSQL sums BIGINT as NUMERIC, which psycopg reads as Decimal.
        name: Split(int(escrowed), int(forfeited))
        for name, forfeited, escrowed in connection.execute(_SPLIT, (low, high))
    }
    rows = [row for row in spooled if row.worker_id is not None]
    if not rows:
        return split
    holds = connection.execute(
        "SELECT ln_url, opened_at FROM escrow_holds WHERE released_at IS NULL"
    ).fetchall()
    for row in rows:
        name = row.ln_url or ""
        tokens = row.worker_prompt_tokens + row.worker_completion_tokens
        held = any(ln_url == name and row.started_at >= opened for ln_url, opened in holds)
        lost = connection.execute("SELECT 1 FROM forfeits WHERE request_id = ?", (row.request_id,)).fetchone()
        before = split.get(name, Split())
        if lost:
            split[name] = Split(before.escrowed, before.forfeited + tokens)
        elif held:
            split[name] = Split(before.escrowed + tokens, before.forfeited)
    return split
