"""Who is owed what: token totals per worker payout address (`ln_url`) and per API key, from the ledger.

    queenbee usage [--db PATH|URL] [--spool PATH] [--since WHEN] [--until WHEN] [--format table|json]

reads the ledger (a SQLite file, or a `postgresql://` URL) and its spool (safe while queens run, and
while another process holds the database's write lock); `GET /admin/usage?since=&until=&format=` asks a
running queen, with the admin key. Rows waiting in the spool (the database refused them) count like
committed ones, each once; with PostgreSQL, each replica has a spool of its own, and the report counts
the one on this host (rows in another replica's spool count once it has replayed them). Of the prompt
tokens, `cached_tokens` are those the worker took from its prompt cache (they may be priced apart). WHEN
is an ISO 8601 date or time (UTC unless it names a zone), seconds since the epoch, or a time ago such as
90s, 30m, 12h, 7d or 2w. The range holds requests that started at or after --since and before --until.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, suppress
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from queenbee import ledger_spool
from queenbee.auth import require_admin
from queenbee.errors import InvalidRequest
from queenbee.errors import LedgerUnavailable as ReportUnavailable
from queenbee.escrow import escrow_split
from queenbee.ledger import Ledger, LedgerError, Row, connect, ledger_errors
from queenbee.ledger_db import Database, Target, default_spool, display_name, is_postgres, open_errors
from queenbee.ledger_db import parse_target as parse_db
from queenbee.settings import default_db_path

_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_COLUMNS = (
    "requests",
    "succeeded",
    "failed",
    "cancelled",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "total_tokens",
)
_WORKER_COLUMNS = (*_COLUMNS, "violations", "payable", "escrowed", "forfeited")

Format = Literal["table", "json"]


@dataclass(frozen=True)
class UsageRow:
    """Totals for one worker payout address or one API key over a time range."""

    name: str
    requests: int
    succeeded: int
    failed: int
    cancelled: int
    prompt_tokens: int
    completion_tokens: int
    violations: int = 0
    """Requests whose worker's usage report was not believed (bounded before it was credited)."""
    cached_tokens: int = 0
    """Of `prompt_tokens`, those the worker took from its prompt cache."""
    escrowed: int = 0
    """Of a worker address's tokens, those waiting in escrow (queenbee/escrow.py)."""
    forfeited: int = 0
    """Of a worker address's tokens, those of flagged requests: owed to nobody."""

    @property
    def payable(self) -> int:
        """A worker address's tokens that are owed now: the total less the escrowed and the forfeited."""
        return self.total_tokens - self.escrowed - self.forfeited

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object."""
        return {
            "requests": self.requests,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }

    def plus(self, other: UsageRow) -> UsageRow:
        """This row's counts and `other`'s added up, under this row's name."""
        return UsageRow(
            self.name,
            *(getattr(self, name) + getattr(other, name) for name in _COUNTS),
        )


_COUNTS: Final = (
    "requests",
    "succeeded",
    "failed",
    "cancelled",
    "prompt_tokens",
    "completion_tokens",
    "violations",
    "cached_tokens",
    "escrowed",
    "forfeited",
)

# Every token figure is clamped to 0..2**31-1 when stored (migration 2 clamped the rows before it), so
# a SUM over at most 2**32 rows is at most 2**32 * (2**31 - 1) = 2**63 - 2**32, below SQLite's 2**63 - 1:
# SUM cannot raise "integer overflow" before the ledger holds 2**32 rows (136 years at 1,000 requests a
# second); PostgreSQL sums INTEGER columns as BIGINT. Each column is summed alone; prompt plus
# completion, and the spool's rows, are added in Python. CASE rather than a summed comparison: a
# PostgreSQL boolean has no SUM.
_TOTALS: Final = """
    SELECT {group} AS name, COUNT(*),
        COALESCE(SUM(CASE WHEN outcome = 'success' THEN 1 ELSE 0 END), 0),
        COALESCE(SUM(CASE WHEN outcome = 'error' THEN 1 ELSE 0 END), 0),
        COALESCE(SUM(CASE WHEN outcome = 'cancelled' THEN 1 ELSE 0 END), 0),
        COALESCE(SUM({prompt}), 0), COALESCE(SUM({completion}), 0),
        COALESCE(SUM(CASE WHEN usage_violation IS NOT NULL THEN 1 ELSE 0 END), 0),
        COALESCE(SUM(cached_tokens), 0)
    FROM usage
    WHERE started_at >= ? AND started_at < ? {where}
    GROUP BY name
"""
_WORKER_TOTALS: Final = _TOTALS.format(
    group="COALESCE(ln_url, '')",
    prompt="COALESCE(worker_prompt_tokens, prompt_tokens)",
    completion="COALESCE(worker_completion_tokens, completion_tokens)",
    where="AND worker_id IS NOT NULL",
)
# A worker segment (an answer that moved to another worker) credits its worker and bills no one: it is
# counted for workers, not for keys.
_KEY_TOTALS: Final = _TOTALS.format(
    group="COALESCE(api_key_id, '')",
    prompt="prompt_tokens",
    completion="completion_tokens",
    where="AND segment_of IS NULL",
)
_IDS_PER_QUERY: Final = 500


def usage_totals(
    connection: Database,
    since: float | None,
    until: float | None,
    *,
    spool: Path | None = None,
) -> tuple[list[UsageRow], list[UsageRow]]:
    """Totals per worker `ln_url` and per API key, for requests started in range, most tokens first.

    Workers are totalled by what they are credited with (`worker_*_tokens`: what they generated), keys
    by what the client is billed. With `spool`, rows waiting there that are not in the database yet are
    counted too, each once.
    """
    low = since if since is not None else float("-inf")
    high = until if until is not None else float("inf")
    # The spool first, then the database: a row replayed in between is then in the database's snapshot
    # and recognised as a duplicate, where the other order would miss it in both.
    spooled = [row for row in _spooled_rows(spool) if low <= row.started_at < high] if spool else []
    with connection.transaction(write=False):  # one snapshot for the totals and the duplicate check
        by_worker = [_usage_row(row) for row in connection.execute(_WORKER_TOTALS, (low, high))]
        by_key = [_usage_row(row) for row in connection.execute(_KEY_TOTALS, (low, high))]
        recorded = _recorded_ids(connection, [row.request_id for row in spooled])
        unique: dict[str, Row] = {}
        for row in spooled:
            if row.request_id not in recorded:
                unique.setdefault(row.request_id, row)
        split = escrow_split(connection, low, high, unique.values())
    workers = _add(by_worker, (_worker_tally(row) for row in unique.values() if row.worker_id is not None))
    workers = [
        replace(row, escrowed=split[row.name].escrowed, forfeited=split[row.name].forfeited)
        if row.name in split
        else row
        for row in workers
    ]
    keys = _add(by_key, (_key_tally(row) for row in unique.values() if row.segment_of is None))
    return workers, keys


def _usage_row(row: tuple[Any, ...]) -> UsageRow:
    # int(): PostgreSQL's sums of BIGINT are NUMERIC (Decimal in Python).
    return UsageRow(str(row[0]), *(int(value) for value in row[1:]))


def _spooled_rows(spool: Path) -> Iterator[Row]:
    for obj in ledger_spool.read(spool).objects:
        with suppress(ValueError):
            yield Row.from_json(obj)


def _recorded_ids(connection: Database, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), _IDS_PER_QUERY):
        chunk = ids[start : start + _IDS_PER_QUERY]
        query = f"SELECT request_id FROM usage WHERE request_id IN ({', '.join('?' * len(chunk))})"
        found.update(request_id for (request_id,) in connection.execute(query, chunk))
    return found


def _tally(name: str, row: Row, prompt: int, completion: int) -> UsageRow:
    return UsageRow(
        name,
        1,
        int(row.outcome == "success"),
        int(row.outcome == "error"),
        int(row.outcome == "cancelled"),
        prompt,
        completion,
        int(row.usage_violation is not None),
        row.cached_tokens,
    )


def _worker_tally(row: Row) -> UsageRow:
    return _tally(row.ln_url or "", row, row.worker_prompt_tokens, row.worker_completion_tokens)


def _key_tally(row: Row) -> UsageRow:
    return _tally(row.api_key_id or "", row, row.prompt_tokens, row.completion_tokens)


def _add(totals: list[UsageRow], more: Iterable[UsageRow]) -> list[UsageRow]:
    by_name = {row.name: row for row in totals}
    for row in more:
        by_name[row.name] = by_name[row.name].plus(row) if row.name in by_name else row
    return sorted(by_name.values(), key=lambda row: (-row.total_tokens, row.name))


def read_usage(
    db: Target, since: float | None, until: float | None, *, spool: Path | None = None
) -> tuple[list[UsageRow], list[UsageRow]]:
    """Totals from a ledger and its spool (default: `ledger_db.default_spool`), for `queenbee usage`
    (safe while queens run)."""
    with closing(connect(db)) as connection:
        return usage_totals(connection, since, until, spool=spool or default_spool(db))


def parse_when(text: str, *, now: float) -> float:
    """Seconds since the epoch for a WHEN argument; ValueError if it is none of the accepted forms."""
    text = text.strip()
    ago = _AGO.fullmatch(text)
    if ago is not None:
        return now - float(ago.group(1)) * _UNIT_SECONDS[ago.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO 8601 date or time, seconds since the epoch, or a time ago like 7d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return datetime.fromtimestamp(moment, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class UsageReport:
    """Totals per worker payout address and per API key over a time range."""

    since: float | None
    until: float | None
    workers: list[UsageRow]
    """One row per ln_url; workers that gave none share the row named ''."""
    keys: list[UsageRow]
    """One row per API key id; requests to an open queen are under ''."""

    def total(self) -> UsageRow:
        """Every request in the range (each request has exactly one key row)."""
        total = UsageRow("total", 0, 0, 0, 0, 0, 0)
        for row in self.keys:
            total = total.plus(row)
        return total

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON object."""
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "workers": [
                {
                    "ln_url": row.name,
                    **row.to_json(),
                    "violations": row.violations,
                    "payable_tokens": row.payable,
                    "escrowed_tokens": row.escrowed,
                    "forfeited_tokens": row.forfeited,
                }
                for row in self.workers
            ],
            "api_keys": [{"api_key": row.name, **row.to_json()} for row in self.keys],
            "total": self.total().to_json(),
        }

    def to_table(self) -> str:
        """The report as plain-text tables."""
        period = f"Usage from {_iso(self.since) or 'the start'} to {_iso(self.until) or 'now'}"
        return "\n\n".join(
            [
                period,
                "Per worker payout address (ln_url); tokens are what each is owed\n"
                + _table("ln_url", self.workers, _WORKER_COLUMNS, empty="(none)"),
                "Per API key\n" + _table("api_key", [*self.keys, self.total()], _COLUMNS, empty="(no key)"),
            ]
        )

    def render(self, output: Format) -> str:
        """The report as a table or as JSON."""
        if output == "json":
            return json.dumps(self.to_json(), indent=2)
        return self.to_table()


def _table(title: str, rows: list[UsageRow], columns: tuple[str, ...], *, empty: str) -> str:
    header = [title, *columns]
    lines = [header] + [
        [row.name or empty, *(str(getattr(row, column)) for column in columns)] for row in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)
        ).rstrip()
        for line in lines
    )


def _bounds(since: str | None, until: str | None) -> tuple[float | None, float | None]:
    now = time.time()
    return (
        parse_when(since, now=now) if since else None,
        parse_when(until, now=now) if until else None,
    )


async def admin_usage(request: Request) -> Response:
    """GET /admin/usage?since=&until=&format=json|table: the usage report, for the admin key only.

    503 (`ledger_unavailable`) while the ledger's database cannot be read.
    """
    require_admin(request)
    params = request.query_params
    output = params.get("format", "json")
    if output not in ("json", "table"):
        raise InvalidRequest("format must be 'json' or 'table'.", param="format")
    try:
        since, until = _bounds(params.get("since"), params.get("until"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="since/until") from None
    ledger: Ledger = request.state.ledger
    try:
        workers, keys = await ledger.read(
            lambda connection: usage_totals(connection, since, until, spool=ledger.spool_path)
        )
    except ledger_errors() as exc:
        # The database is unreachable (a PostgreSQL outage, say): the report would be incomplete.
        message = " ".join(str(exc).split())
        raise ReportUnavailable(f"The usage report cannot be read now: {message}", retry_after=5) from None
    report = UsageReport(since, until, workers, keys)
    if output == "table":
        return PlainTextResponse(report.to_table() + "\n")
    return JSONResponse(report.to_json())


def usage_main(argv: list[str]) -> int:
    """`queenbee usage`: print the usage report from a ledger file."""
    parser = argparse.ArgumentParser(
        prog="queenbee usage",
        description="Token totals per worker payout address (ln_url) and per API key, from the ledger.",
    )
    parser.add_argument(
        "--db",
        type=parse_db,
        default=parse_db(os.environ["QUEENBEE_DB"]) if os.environ.get("QUEENBEE_DB") else default_db_path(),
        help="The queen's ledger: a SQLite file or a postgresql:// URL (default: $QUEENBEE_DB, else "
        "%(default)s).",
    )
    parser.add_argument(
        "--spool",
        type=Path,
        default=Path(os.environ["QUEENBEE_LEDGER_SPOOL"])
        if os.environ.get("QUEENBEE_LEDGER_SPOOL")
        else None,
        help="The spool whose waiting rows count too (default: $QUEENBEE_LEDGER_SPOOL, else the one a "
        "queen on this host uses for --db by default).",
    )
    when = "an ISO 8601 date or time (UTC unless it names a zone), epoch seconds, or a time ago like 7d"
    parser.add_argument("--since", help=f"Start of the range, inclusive: {when}.")
    parser.add_argument("--until", help=f"End of the range, exclusive: {when}.")
    parser.add_argument("--format", choices=["table", "json"], default="table", help="Output format.")
    args = parser.parse_args(argv)
    try:
        since, until = _bounds(args.since, args.until)
    except ValueError as exc:
        parser.error(str(exc))
    if not is_postgres(args.db) and not Path(args.db).exists():
        print(f"queenbee usage: error: no ledger at {args.db}", file=sys.stderr)
        return 1
    try:
        workers, keys = read_usage(args.db, since, until, spool=args.spool)
    except LedgerError as exc:
        print(f"queenbee usage: error: {exc}", file=sys.stderr)
        return 1
    except open_errors() as exc:
        message = " ".join(str(exc).split())
        print(f"queenbee usage: error: cannot read {display_name(args.db)}: {message}", file=sys.stderr)
        return 1
    print(UsageReport(since, until, workers, keys).render(args.format))
    return 0
