"""Who is owed what: token totals per worker payout address (`ln_url`) and per API key, from the ledger.

    queenbee usage [--db PATH] [--since WHEN] [--until WHEN] [--format table|json]

reads the ledger file (safe while the queen runs); `GET /admin/usage?since=&until=&format=` asks a
running queen, with the admin key. WHEN is an ISO 8601 date or time (UTC unless it names a zone),
seconds since the epoch, or a time ago such as 90s, 30m, 12h, 7d or 2w. The range holds requests that
started at or after --since and before --until.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sqlite3
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from queenbee.auth import require_admin
from queenbee.errors import InvalidRequest
from queenbee.ledger import Ledger, LedgerError, UsageRow, connect, usage_totals
from queenbee.settings import default_db_path

_AGO = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_COLUMNS = (
    "requests",
    "succeeded",
    "failed",
    "cancelled",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
)

Format = Literal["table", "json"]


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
        return UsageRow(
            "total",
            *(sum(getattr(row, column) for row in self.keys) for column in _COLUMNS[:-1]),
        )

    def to_json(self) -> dict[str, Any]:
        """The report as a JSON object."""
        return {
            "since": _iso(self.since),
            "until": _iso(self.until),
            "workers": [{"ln_url": row.name, **row.to_json()} for row in self.workers],
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
                + _table("ln_url", self.workers, empty="(none)"),
                "Per API key\n" + _table("api_key", [*self.keys, self.total()], empty="(no key)"),
            ]
        )

    def render(self, output: Format) -> str:
        """The report as a table or as JSON."""
        if output == "json":
            return json.dumps(self.to_json(), indent=2)
        return self.to_table()


def _table(title: str, rows: list[UsageRow], *, empty: str) -> str:
    header = [title, *_COLUMNS]
    lines = [header] + [
        [row.name or empty, *(str(getattr(row, column)) for column in _COLUMNS)] for row in rows
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
    """GET /admin/usage?since=&until=&format=json|table: the usage report, for the admin key only."""
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
    workers, keys = await ledger.usage_totals(since, until)
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
        type=Path,
        default=Path(os.environ["QUEENBEE_DB"]) if os.environ.get("QUEENBEE_DB") else default_db_path(),
        help="The queen's ledger file (default: $QUEENBEE_DB, else %(default)s).",
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
    if not args.db.exists():
        print(f"queenbee usage: error: no ledger at {args.db}", file=sys.stderr)
        return 1
    try:
        connection = connect(args.db)
    except LedgerError as exc:
        print(f"queenbee usage: error: {exc}", file=sys.stderr)
        return 1
    try:
        workers, keys = usage_totals(connection, since, until)
    except sqlite3.Error as exc:
        print(f"queenbee usage: error: cannot read {args.db}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    print(UsageReport(since, until, workers, keys).render(args.format))
    return 0
