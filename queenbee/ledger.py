"""The usage ledger: one row per finished request in SQLite, committed before the client sees the end.

The ledger is what operators pay workers from, so a row is durable before the response's last byte
leaves: WAL journal, `synchronous=FULL`, one transaction per row. All SQLite work runs in one thread of
its own, so a slow disk delays the request being recorded and never the event loop.

The schema is versioned with `PRAGMA user_version`; `MIGRATIONS[n]` takes a ledger from version n to
n + 1, in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from queenbee.observer import RequestRecord

log = logging.getLogger("queenbee.ledger")

T = TypeVar("T")

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # 1: the usage table, indexed for the reports' time ranges.
    (
        """
        CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL UNIQUE,
            started_at REAL NOT NULL,
            path TEXT NOT NULL,
            model TEXT NOT NULL,
            api_key_id TEXT,
            worker_id TEXT,
            ln_url TEXT,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            ttft REAL,
            duration REAL NOT NULL,
            outcome TEXT NOT NULL CHECK (outcome IN ('success', 'error', 'cancelled')),
            status INTEGER NOT NULL,
            error_code TEXT,
            attempts INTEGER NOT NULL,
            streamed INTEGER NOT NULL
        )
        """,
        "CREATE INDEX usage_started_at ON usage (started_at)",
    ),
)
"""Every schema change, in order; never edit one that has shipped, append a new one."""

SCHEMA_VERSION: Final = len(MIGRATIONS)

_INSERT = """
    INSERT INTO usage (
        request_id, started_at, path, model, api_key_id, worker_id, ln_url, prompt_tokens,
        completion_tokens, ttft, duration, outcome, status, error_code, attempts, streamed
    ) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""


class LedgerError(Exception):
    """The ledger file cannot be used."""


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating if needed) a ledger in WAL mode with durable commits, and bring its schema up to date.

    The connection is in autocommit mode: every statement outside an explicit BEGIN is its own
    transaction, committed when `execute` returns.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(path, isolation_level=None)
    except (OSError, sqlite3.Error) as exc:
        raise LedgerError(f"cannot open the ledger at {path}: {exc}") from None
    try:
        mode = connection.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise LedgerError(f"the ledger at {path} cannot use WAL mode (journal_mode={mode})")
        connection.execute("PRAGMA synchronous = FULL")
        # The queen and `queenbee usage` may use the file at once; wait on a lock rather than fail.
        connection.execute("PRAGMA busy_timeout = 5000")
        migrate(connection, path)
    except sqlite3.DatabaseError as exc:
        connection.close()
        raise LedgerError(f"the ledger at {path} is not usable: {exc}") from None
    except BaseException:
        connection.close()
        raise
    return connection


def schema_version(connection: sqlite3.Connection) -> int:
    """The schema version a ledger is at (0 for a new, empty file)."""
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(connection: sqlite3.Connection, path: Path | str = "the ledger") -> int:
    """Apply the migrations a ledger lacks, each in one transaction; returns the version it is now at."""
    # IMMEDIATE takes the write lock before reading the version, so two processes opening a new ledger
    # at once cannot both apply the same migration.
    connection.execute("BEGIN IMMEDIATE")
    try:
        version = schema_version(connection)
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{path} has schema version {version}, newer than this queenbee knows ({SCHEMA_VERSION})"
            )
        for number in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[number]:
                connection.execute(statement)
            # PRAGMA takes no parameters; the number is ours, not input.
            connection.execute(f"PRAGMA user_version = {number + 1}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise
    if version < SCHEMA_VERSION:
        log.info("ledger %s migrated from schema version %d to %d", path, version, SCHEMA_VERSION)
    return SCHEMA_VERSION


def insert(connection: sqlite3.Connection, record: RequestRecord) -> None:
    """Write one record; durable when this returns."""
    connection.execute(
        _INSERT,
        (
            record.request_id,
            record.started_at,
            record.path,
            record.model,
            record.api_key_id,
            record.worker_id,
            record.ln_url,
            record.prompt_tokens,
            record.completion_tokens,
            record.ttft,
            record.duration,
            record.outcome,
            record.status,
            record.error_code,
            record.attempts,
            int(record.streamed),
        ),
    )


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
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


_TOTALS = """
    SELECT {group} AS name, COUNT(*),
        COALESCE(SUM(outcome = 'success'), 0), COALESCE(SUM(outcome = 'error'), 0),
        COALESCE(SUM(outcome = 'cancelled'), 0),
        COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0)
    FROM usage
    WHERE started_at >= ? AND started_at < ? {where}
    GROUP BY name
    ORDER BY SUM(prompt_tokens + completion_tokens) DESC, name
"""


def usage_totals(
    connection: sqlite3.Connection, since: float | None, until: float | None
) -> tuple[list[UsageRow], list[UsageRow]]:
    """Totals per worker `ln_url` (requests a worker ran) and per API key, for requests started in range."""
    bounds = (since if since is not None else float("-inf"), until if until is not None else float("inf"))
    by_worker = connection.execute(
        _TOTALS.format(group="COALESCE(ln_url, '')", where="AND worker_id IS NOT NULL"), bounds
    ).fetchall()
    by_key = connection.execute(_TOTALS.format(group="COALESCE(api_key_id, '')", where=""), bounds).fetchall()
    return [UsageRow(*row) for row in by_worker], [UsageRow(*row) for row in by_key]


class Ledger:
    """The queen's ledger: a request observer that writes every record before the response ends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # One thread owns the connection for its whole life, so SQLite never sees two threads.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queenbee-ledger")
        self._connection: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path) -> Ledger:
        """Open the ledger at `path`, creating and migrating it as needed."""
        ledger = cls(path)
        try:
            await ledger._run(ledger._open)
        except BaseException:
            ledger._executor.shutdown(wait=True)
            raise
        log.info("usage ledger at %s", path)
        return ledger

    async def request_finished(self, record: RequestRecord) -> None:
        """Write the record; it is committed when this returns."""
        await self._run(lambda: insert(self._require(), record))

    async def usage_totals(
        self, since: float | None, until: float | None
    ) -> tuple[list[UsageRow], list[UsageRow]]:
        """Totals per worker ln_url and per API key (see `usage_totals`)."""
        return await self._run(lambda: usage_totals(self._require(), since, until))

    async def close(self) -> None:
        """Finish the writes already submitted, then close the file."""
        try:
            await self._run(self._close)
        finally:
            self._executor.shutdown(wait=True)

    def _open(self) -> None:
        self._connection = connect(self.path)

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _require(self) -> sqlite3.Connection:
        if self._connection is None:
            raise LedgerError(f"the ledger at {self.path} is closed")
        return self._connection

    async def _run(self, function: Callable[[], T]) -> T:
        # Shielded: a write still waiting for the thread would be dropped if its caller's cancellation
        # reached the executor's future; this way it runs, and commits, whatever happens to the caller.
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._executor, function))
