"""The usage ledger: one row per finished request, durable before the client sees the end.

The database is a SQLite file (the default, for one queen) or PostgreSQL (`--db postgresql://...`, which
several queen replicas share); `ledger_db` is the one place where the two differ. The ledger is what
operators pay workers from, so a row is durable before the response's last byte leaves: committed to
the database (SQLite: WAL journal, `synchronous=FULL`; PostgreSQL: `synchronous_commit=on`), or, when
the database cannot take it (disk full, file too large, locked by another process, I/O error, the
PostgreSQL connection lost), appended and fsynced to the spool (`ledger_spool`), from which a replay
task of the ledger's own copies it into the database once writes work again. Only when the spool cannot
be written either does `request_finished` raise. A lost PostgreSQL connection is opened again by the
replays, with exponential backoff and jitter that resets once the database takes rows again.

Writes are group commits: records that arrive while a transaction is in flight go into the next one
together, so a slow disk costs each request its own commit and never a queue of other requests'
commits. The database waits only a short `write_timeout` for a lock on the request path; after one
failure the ledger is degraded and sends rows straight to the spool until the replay has emptied it.

The schema is versioned (`PRAGMA user_version` in SQLite, the `queenbee_schema` table in PostgreSQL);
`MIGRATIONS[n]` takes a ledger from version n to n + 1; those a ledger lacks are applied in one
transaction, under a lock that makes two queens starting at once apply each only once. Request ids are
unique, so a row written twice (a replay, a retry after a lost connection) is kept once.

Errors:

    LedgerError              the ledger cannot be used (opening, migrating, a closed ledger, a spool
                             another queen holds)
    └── LedgerUnavailable    a record could be stored neither in the database nor in the spool
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Final, NamedTuple, TypeVar

from queenbee import ledger_spool
from queenbee.ledger_db import (
    Database,
    SpoolLock,
    Target,
    database_errors,
    default_spool,
    display_name,
    is_postgres,
    open_database,
    open_errors,
)
from queenbee.observer import RequestRecord

log = logging.getLogger("queenbee.ledger")

T = TypeVar("T")

MAX_TOKENS: Final = 2**31 - 1
"""Token figures are clamped to 0..MAX_TOKENS when stored, so that sums cannot overflow (see usage_report)."""

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
    # 2: what the worker is credited with beside what the client is billed, and why the worker's own
    # report was not believed. Older rows credit the worker what the client was billed, and every token
    # figure is brought into 0..2**31-1 so that the reports' sums cannot overflow.
    (
        "ALTER TABLE usage ADD COLUMN worker_prompt_tokens INTEGER",
        "ALTER TABLE usage ADD COLUMN worker_completion_tokens INTEGER",
        "ALTER TABLE usage ADD COLUMN usage_violation TEXT",
        f"""
        UPDATE usage SET
            prompt_tokens = MAX(0, MIN(prompt_tokens, {MAX_TOKENS})),
            completion_tokens = MAX(0, MIN(completion_tokens, {MAX_TOKENS})),
            worker_prompt_tokens = MAX(0, MIN(prompt_tokens, {MAX_TOKENS})),
            worker_completion_tokens = MAX(0, MIN(completion_tokens, {MAX_TOKENS}))
        """,
    ),
    # 3: responses kept for the Responses API's `store` (queenbee/response_store.py), by owner and age.
    (
        """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            owner TEXT,
            created_at REAL NOT NULL,
            response TEXT NOT NULL,
            input_items TEXT NOT NULL,
            history TEXT NOT NULL
        )
        """,
        "CREATE INDEX responses_created_at ON responses (created_at)",
    ),
    # 4: an answer that moved to another worker mid-stream has a row per worker it left ("segment"),
    # crediting that worker what it generated; `segment_of` names the request, whose own row (NULL
    # here) bills the client and credits the worker that finished it.
    ("ALTER TABLE usage ADD COLUMN segment_of TEXT",),
    # 5: verified workers (queenbee/escrow.py): every audit's outcome; escrow holds, under which an ln_url's
    # earnings from `opened_at` on wait until `released_at`; and forfeited requests, paid to nobody.
    (
        """
        CREATE TABLE audits (
            id INTEGER PRIMARY KEY,
            request_id TEXT NOT NULL,
            audited_at REAL NOT NULL,
            identity TEXT NOT NULL,
            ln_url TEXT NOT NULL,
            model TEXT NOT NULL,
            auditor TEXT NOT NULL,
            flagged INTEGER NOT NULL,
            reasons TEXT,
            tokens INTEGER NOT NULL,
            seconds REAL NOT NULL
        )
        """,
        "CREATE INDEX audits_identity ON audits (identity, audited_at)",
        """
        CREATE TABLE escrow_holds (
            id INTEGER PRIMARY KEY,
            ln_url TEXT NOT NULL,
            identity TEXT NOT NULL,
            opened_at REAL NOT NULL,
            released_at REAL
        )
        """,
        "CREATE INDEX escrow_holds_ln_url ON escrow_holds (ln_url, released_at)",
        """
        CREATE TABLE forfeits (
            request_id TEXT PRIMARY KEY,
            ln_url TEXT NOT NULL,
            forfeited_at REAL NOT NULL,
            reason TEXT NOT NULL
        )
        """,
    ),
    # 6: files uploaded for fine-tuning and fine-tuning jobs with their events
    # (queenbee/tuning_store.py), each by owner (the API key id, or NULL on an open queen). IF NOT
    # EXISTS: the store runs these again on a ledger migrated while 6 was an empty reserved slot.
    (
        """
        CREATE TABLE IF NOT EXISTS files (
            id TEXT PRIMARY KEY,
            owner TEXT,
            created_at REAL NOT NULL,
            filename TEXT NOT NULL,
            purpose TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            content BLOB NOT NULL
        )
        """,
        "CREATE INDEX IF NOT EXISTS files_owner ON files (owner, created_at)",
        """
        CREATE TABLE IF NOT EXISTS fine_tuning_jobs (
            id TEXT PRIMARY KEY,
            owner TEXT,
            created_at REAL NOT NULL,
            status TEXT NOT NULL,
            job TEXT NOT NULL
        )
        """,
        "CREATE INDEX IF NOT EXISTS fine_tuning_jobs_owner ON fine_tuning_jobs (owner, created_at)",
        "CREATE INDEX IF NOT EXISTS fine_tuning_jobs_status ON fine_tuning_jobs (status)",
        """
        CREATE TABLE IF NOT EXISTS fine_tuning_events (
            seq INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            job_id TEXT NOT NULL,
            event TEXT NOT NULL
        )
        """,
        "CREATE INDEX IF NOT EXISTS fine_tuning_events_job ON fine_tuning_events (job_id, seq)",
    ),
    # 7: the prompt tokens the worker took from its cache, part of prompt_tokens (they may be priced
    # differently); 0 for older rows, which did not say.
    ("ALTER TABLE usage ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",),
    # 8: each worker identity's audit standing (queenbee/standings.py), so that a restart keeps pauses,
    # probation and cleared escrow; `recent` is its last audits' outcomes, oldest first ("1" a flag).
    (
        """
        CREATE TABLE audit_standings (
            identity TEXT PRIMARY KEY,
            ln_url TEXT NOT NULL,
            probation_left INTEGER NOT NULL,
            recent TEXT NOT NULL,
            audits INTEGER NOT NULL,
            flags INTEGER NOT NULL,
            passed_since_flag INTEGER NOT NULL,
            paused INTEGER NOT NULL,
            pause_reason TEXT NOT NULL,
            cleared INTEGER NOT NULL,
            paused_after INTEGER NOT NULL,
            updated_at REAL NOT NULL
        )
        """,
        "CREATE INDEX audit_standings_updated ON audit_standings (updated_at)",
    ),
)
"""Every schema change, in order; never edit one that has shipped, append a new one."""

SCHEMA_VERSION: Final = len(MIGRATIONS)


class LedgerError(Exception):
    """The ledger cannot be used."""


class LedgerUnavailable(LedgerError):
    """A record could be written neither to the database nor to the spool: it is not recorded."""


def _tokens(value: int) -> int:
    return max(0, min(int(value), MAX_TOKENS))


class Row(NamedTuple):
    """One usage row as stored: the table's columns, in the order `_INSERT` names them."""

    request_id: str
    started_at: float
    path: str
    model: str
    api_key_id: str | None
    worker_id: str | None
    ln_url: str | None
    prompt_tokens: int
    """What the client is billed."""
    completion_tokens: int
    ttft: float | None
    duration: float
    outcome: str
    status: int
    error_code: str | None
    attempts: int
    streamed: int
    worker_prompt_tokens: int
    """What the worker is credited with."""
    worker_completion_tokens: int
    usage_violation: str | None
    segment_of: str | None = None
    """For a worker segment (an answer that moved on), the request's id; None for a request's own row."""
    cached_tokens: int = 0
    """Of `prompt_tokens`, those the worker took from its cache."""

    @classmethod
    def rows_for(cls, record: RequestRecord) -> list[Row]:
        """The request's row, then one per worker it moved away from (billing nobody, crediting it)."""
        rows = [cls.from_record(record)]
        for number, segment in enumerate(record.segments, 1):
            rows.append(
                rows[0]._replace(
                    request_id=f"{record.request_id}/{number}",
                    worker_id=segment.worker_id,
                    ln_url=segment.ln_url,
                    prompt_tokens=0,
                    completion_tokens=0,
                    ttft=None,
                    outcome="error",
                    error_code="resumed_elsewhere",
                    worker_prompt_tokens=_tokens(record.prompt_tokens),
                    worker_completion_tokens=_tokens(segment.completion_tokens),
                    usage_violation=None,
                    segment_of=record.request_id,
                    cached_tokens=0,
                )
            )
        return rows

    @classmethod
    def from_record(cls, record: RequestRecord) -> Row:
        """The row for a finished request, token figures clamped to 0..MAX_TOKENS."""
        return cls(
            request_id=record.request_id,
            started_at=record.started_at,
            path=record.path,
            model=record.model,
            api_key_id=record.api_key_id,
            worker_id=record.worker_id,
            ln_url=record.ln_url,
            prompt_tokens=_tokens(record.prompt_tokens),
            completion_tokens=_tokens(record.completion_tokens),
            ttft=record.ttft,
            duration=record.duration,
            outcome=record.outcome,
            status=record.status,
            error_code=record.error_code,
            attempts=record.attempts,
            streamed=int(record.streamed),
            worker_prompt_tokens=_tokens(record.credited_prompt_tokens),
            worker_completion_tokens=_tokens(record.credited_completion_tokens),
            usage_violation=record.usage_violation,
            cached_tokens=_tokens(record.cached_tokens),
        )

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Row:
        """A row read back from the spool (fields it does not know are dropped); ValueError if it is none."""
        obj = {"segment_of": None, "cached_tokens": 0, **obj}  # spooled before segments, cached tokens
        missing = set(cls._fields) - set(obj)
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))}")
        for name, kinds in _FIELD_KINDS.items():
            value = obj[name]
            if isinstance(value, bool) or not isinstance(value, kinds):
                raise ValueError(f"{name}={value!r} is not {' or '.join(kind.__name__ for kind in kinds)}")
        if obj["outcome"] not in ("success", "error", "cancelled"):
            raise ValueError(f"outcome={obj['outcome']!r}")
        tokens = {name: _tokens(obj[name]) for name in _TOKEN_FIELDS}
        return cls(**{**{name: obj[name] for name in cls._fields}, **tokens})

    def to_json(self) -> dict[str, Any]:
        """The row as a JSON object, for the spool."""
        return self._asdict()


_TOKEN_FIELDS: Final = (
    "prompt_tokens",
    "completion_tokens",
    "worker_prompt_tokens",
    "worker_completion_tokens",
    "cached_tokens",
)
_TEXT: Final = (str,)
_MAYBE_TEXT: Final = (str, type(None))
_NUMBER: Final = (int, float)
_FIELD_KINDS: Final[dict[str, tuple[type, ...]]] = {
    "request_id": _TEXT,
    "started_at": _NUMBER,
    "path": _TEXT,
    "model": _TEXT,
    "api_key_id": _MAYBE_TEXT,
    "worker_id": _MAYBE_TEXT,
    "ln_url": _MAYBE_TEXT,
    "ttft": (int, float, type(None)),
    "duration": _NUMBER,
    "outcome": _TEXT,
    "status": (int,),
    "error_code": _MAYBE_TEXT,
    "attempts": (int,),
    "streamed": (int,),
    "usage_violation": _MAYBE_TEXT,
    "segment_of": _MAYBE_TEXT,
    **dict.fromkeys(_TOKEN_FIELDS, (int,)),
}

# DO NOTHING: a request id already recorded (a replayed spool line, a commit that reported an error but
# reached the disk, or an insert retried after its PostgreSQL connection was lost) keeps the row it has.
_INSERT: Final = (
    f"INSERT INTO usage ({', '.join(Row._fields)}) VALUES ({', '.join('?' * len(Row._fields))}) "
    "ON CONFLICT DO NOTHING"
)


def connect(target: Target, *, lock_timeout: float = 5.0, statement_timeout: float = 60.0) -> Database:
    """Open (creating if needed) a ledger with durable commits, and bring its schema up to date.

    `target` is a SQLite file (WAL mode, `synchronous=FULL`) or a `postgresql://` URL
    (`synchronous_commit=on`; once migrated, a statement may take at most `statement_timeout`). The
    connection is in autocommit mode: every statement outside a transaction is its own, committed when
    `execute` returns. Opening a ledger that is up to date only reads it, so it works while another
    process holds the write lock or the disk is full.
    """
    name = display_name(target)
    try:
        database = open_database(target, lock_timeout=lock_timeout)
    except open_errors() as exc:
        raise LedgerError(f"cannot open the ledger at {name}: {_one_line(exc)}") from None
    try:
        migrate(database, name)
        database.limit_statements(statement_timeout)
    except database_errors() as exc:
        database.close()
        raise LedgerError(f"the ledger at {name} is not usable: {_one_line(exc)}") from None
    except BaseException:
        database.close()
        raise
    return database


def ledger_errors() -> tuple[type[Exception], ...]:
    """What a write to a ledger raises when the database refuses or cannot be reached."""
    return (LedgerError, *open_errors())


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def schema_version(connection: Database | sqlite3.Connection) -> int:
    """The schema version a ledger is at (0 for a new, empty one)."""
    if isinstance(connection, Database):
        return connection.schema_version()
    version: int = connection.execute("PRAGMA user_version").fetchone()[0]
    return version


def migrate(connection: Database, path: Path | str = "the ledger") -> int:
    """Apply the migrations a ledger lacks, in one transaction, recording each; returns the version now.

    Safe when several processes open one new ledger at once: the write lock (SQLite) or an advisory
    lock (PostgreSQL) is taken before the version is read again, so a migration is applied once.
    """
    version = connection.schema_version()
    if version == SCHEMA_VERSION:
        return version  # no write lock needed, nor any disk space
    with connection.transaction():
        connection.lock_for_migration()
        version = connection.schema_version()
        if version > SCHEMA_VERSION:
            raise LedgerError(
                f"{path} has schema version {version}, newer than this queenbee knows ({SCHEMA_VERSION})"
            )
        for number in range(version, SCHEMA_VERSION):
            for statement in MIGRATIONS[number]:
                connection.execute(connection.ddl(statement))
            connection.record_version(number + 1)
    if version < SCHEMA_VERSION:
        log.info("ledger %s migrated from schema version %d to %d", path, version, SCHEMA_VERSION)
    return SCHEMA_VERSION


def insert(connection: Database, record: RequestRecord) -> None:
    """Write one record (a request id already recorded is left as it was); durable when this returns."""
    insert_rows(connection, Row.rows_for(record))


def insert_rows(connection: Database, rows: Sequence[Row]) -> int:
    """Write rows in one transaction, durable when this returns; how many were new (not yet recorded)."""
    with connection.transaction():
        return connection.executemany(_INSERT, rows)


def _close_unclaimed(attempt: asyncio.Future[Database]) -> None:
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result().close()


def retry_delay(
    failures: int, base: float, cap: float, *, uniform: Callable[[float, float], float] = random.uniform
) -> float:
    """Seconds to wait before the next try after `failures` failed attempts to reconnect: `base` when
    none failed, else doubling from it up to `cap`, drawn from the upper half (jitter keeps replicas
    that lost one database together from coming back in step)."""
    if failures <= 0:
        return base
    ceiling = min(max(base, cap), base * 2 ** min(failures, 30))
    return uniform(max(base, ceiling / 2), ceiling)


class _Replay(Enum):
    DONE = "done"  # the spool is empty (and removed)
    MORE = "more"  # a chunk went into the database; more lines wait
    FAILED = "failed"  # the database refused; try again later


@dataclass
class _Pending:
    row: Row
    committed: asyncio.Future[None]


class Ledger:
    """The queen's ledger: a request observer that stores every record before the response ends.

    `degraded` is true while the database refuses writes or rows wait in the spool (`spooled_rows`);
    `write_failures` counts the database transactions that failed, for the metrics.
    """

    REPLAY_CHUNK: Final = 2000
    """Spool lines per replay transaction: live writes get the thread between chunks."""
    CONNECT_TIMEOUT: Final = 5.0
    """Seconds an attempt to reach a PostgreSQL ledger may take."""
    STATEMENT_TIMEOUT: Final = 10.0
    """Seconds a PostgreSQL statement of the writer may take before its rows go to the spool."""
    REPORT_TIMEOUT: Final = 60.0
    """Seconds a PostgreSQL statement of a report may take."""

    def __init__(
        self,
        path: Target,
        *,
        spool: Path | None = None,
        write_timeout: float = 0.25,
        replay_interval: float = 1.0,
        max_replay_interval: float = 30.0,
        commit_timeout: float = 30.0,
        close_timeout: float = 30.0,
    ) -> None:
        self.path = path
        """The database: a SQLite file or a PostgreSQL URL."""
        self.name = display_name(path)
        """The database for logs and errors (a URL without its password)."""
        self.spool_path = spool if spool is not None else default_spool(path)
        self.write_timeout = write_timeout
        """Seconds a write waits for another process's lock before its rows go to the spool."""
        self.replay_interval = replay_interval
        """Seconds between attempts to replay the spool into a database that refused it."""
        self.max_replay_interval = max(replay_interval, max_replay_interval)
        """The longest wait between attempts to reach a database whose connection was lost: the wait
        doubles from `replay_interval` after each failed attempt (with jitter), up to this."""
        self.commit_timeout = commit_timeout
        """Seconds `request_finished` waits for its row to be stored before giving up."""
        self.close_timeout = close_timeout
        """Seconds `close` waits for the writes in flight and a last replay."""
        self.write_failures = 0
        # One thread owns the writing connection and the spool for their whole lives, so SQLite never
        # sees two threads and appends, replays and removals of the spool never interleave. Reports
        # read on a thread and connection of their own, never queued behind a write.
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queenbee-ledger")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queenbee-ledger-reports")
        # Connections lost (PostgreSQL) are opened again here, off the writer's thread.
        self._connector = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queenbee-ledger-connect")
        self._connection: Database | None = None
        self._read_connection: Database | None = None
        # A spool holds one queen's rows: PostgreSQL replicas on one host must not share one.
        self._spool_lock = SpoolLock(self.spool_path) if is_postgres(path) else None
        self._reconnect_failures = 0
        self._closed = False
        self._spooled_rows = 0
        self._spool_dirty = False  # the spool file exists: lines (perhaps only torn ones) to replay
        self._replay_offset = 0
        self._failing = False  # the last write to the database failed
        self._pending: list[_Pending] = []
        self._writes_in_flight = 0
        self._replay_not_before = 0.0
        """Loop time before which no replay is tried: set when a direct write finds the database refusing."""
        """Transactions submitted to the writer thread and not finished: while none is, a record is
        written at once rather than through the batching task (group commit only pays under load)."""
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def degraded(self) -> bool:
        """The database refuses writes, its connection is lost, or rows wait in the spool for it."""
        return (
            self._failing or self._spooled_rows > 0 or (self._task is not None and self._connection is None)
        )

    @property
    def spooled_rows(self) -> int:
        """Rows in the spool that are not in the database yet."""
        return self._spooled_rows

    @classmethod
    async def open(
        cls,
        path: Target,
        *,
        spool: Path | None = None,
        write_timeout: float = 0.25,
        replay_interval: float = 1.0,
        max_replay_interval: float = 30.0,
        commit_timeout: float = 30.0,
        close_timeout: float = 30.0,
    ) -> Ledger:
        """Open the ledger at `path` (a file or a PostgreSQL URL), migrate it as needed, start its writer.

        `spool` is where rows wait when the database refuses them (default: `ledger_db.default_spool`).
        Rows a previous run left in the spool are replayed by the writer as soon as the database takes
        them. Raises LedgerError if the database cannot be used, or another queen holds the spool.
        """
        ledger = cls(
            path,
            spool=spool,
            write_timeout=write_timeout,
            replay_interval=replay_interval,
            max_replay_interval=max_replay_interval,
            commit_timeout=commit_timeout,
            close_timeout=close_timeout,
        )
        if ledger._spool_lock is not None and not ledger._spool_lock.acquire():
            raise LedgerError(
                f"the spool {ledger.spool_path} is in use by another queen: give each replica its own "
                "--ledger-spool"
            )
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(ledger._writer, ledger._open_writer)
            await loop.run_in_executor(ledger._reader, ledger._open_reader)
        except BaseException:
            await loop.run_in_executor(ledger._writer, ledger._close_writer)
            ledger._shutdown_threads()
            if ledger._spool_lock is not None:
                ledger._spool_lock.release()
            raise
        ledger._task = asyncio.create_task(ledger._write_loop(), name=f"ledger {ledger.name}")
        log.info("usage ledger at %s", ledger.name)
        if ledger._spooled_rows:
            log.warning("ledger: %d rows wait in %s to be replayed", ledger._spooled_rows, ledger.spool_path)
        return ledger

    async def request_finished(self, record: RequestRecord) -> None:
        """Store the record: committed, or fsynced to the spool, when this returns.

        Raises LedgerUnavailable if it could be stored in neither (or not within `commit_timeout`).
        """
        if self._closing or self._task is None or self._task.done():
            raise LedgerUnavailable(f"the ledger at {self.name} is closed")
        if not self._pending and self._writes_in_flight == 0 and not self._spool_dirty:
            await self._write_now(record)
            return
        loop = asyncio.get_running_loop()
        pendings = [_Pending(row, loop.create_future()) for row in Row.rows_for(record)]
        for pending in pendings:
            # Retrieved here too, so a caller that gave up leaves no "exception never retrieved" behind.
            pending.committed.add_done_callback(lambda future: future.cancelled() or future.exception())
        self._pending.extend(pendings)
        self._wake.set()
        try:
            async with asyncio.timeout(self.commit_timeout):
                # Shielded: the rows are written whatever happens to the caller.
                for pending in pendings:
                    await asyncio.shield(pending.committed)
        except TimeoutError:
            raise LedgerUnavailable(
                f"the ledger did not store request {record.request_id} within {self.commit_timeout:g} s"
            ) from None

    async def _write_now(self, record: RequestRecord) -> None:
        """Store one record straight on the writer thread, the writer being idle (the same durability)."""
        rows = Row.rows_for(record)
        self._writes_in_flight += 1
        try:
            async with asyncio.timeout(self.commit_timeout):
                await self._in_writer(lambda: self._store(rows))
            if self._spool_dirty:  # the database just refused: give it a replay interval to recover
                self._replay_not_before = asyncio.get_running_loop().time() + self.replay_interval
                self._wake.set()
        except TimeoutError:
            raise LedgerUnavailable(
                f"the ledger did not store request {record.request_id} within {self.commit_timeout:g} s"
            ) from None
        finally:
            self._writes_in_flight -= 1

    async def write(self, function: Callable[[Database], T]) -> T:
        """Run `function` in one transaction on the writer's thread (off the request path: no spool).

        Raises the database's error (`ledger_db.database_errors`) if it refuses, LedgerError if the
        ledger is closed or its PostgreSQL connection is lost (the write loop is opening a new one).
        """

        def transaction() -> T:
            connection = self._require()
            try:
                with connection.transaction():
                    return function(connection)
            except database_errors():
                if not connection.usable:
                    self._close_writer()  # the write loop opens a new one
                raise

        try:
            return await self._in_writer(transaction)
        finally:
            if self._connection is None:
                self._wake.set()

    async def read(self, function: Callable[[Database], T]) -> T:
        """Run `function` on a connection of the reports' own, never queued behind a write.

        A PostgreSQL connection found lost is opened again, and `function` tried once more on it.
        """

        def run() -> T:
            connection = self._require_reader()
            try:
                return function(connection)
            except database_errors():
                if connection.usable:
                    raise
                self._close_reader()
                return function(self._require_reader())

        return await asyncio.get_running_loop().run_in_executor(self._reader, run)

    async def close(self) -> None:
        """Store the records already submitted, try a last replay, then close the files.

        Rows the database still refuses stay in the spool for the next start.
        """
        if self._task is None:
            return
        self._closing = True
        self._wake.set()
        try:
            async with asyncio.timeout(self.close_timeout):
                await self._task
        except TimeoutError:
            log.error("ledger: writes still in flight after %g s; closing anyway", self.close_timeout)
        finally:
            self._task = None
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._writer, self._close_writer)
            await loop.run_in_executor(self._reader, self._close_reader)
            self._shutdown_threads()
            self._closed = True
            if self._spool_lock is not None:
                self._spool_lock.release()
        if self._spooled_rows:
            log.warning("ledger: %d rows left in %s for the next start", self._spooled_rows, self.spool_path)

    # The event loop's side: one task batches the records and schedules the replays.

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_replay = loop.time()
        try:
            while True:
                next_replay = max(next_replay, self._replay_not_before)
                if self._connection is None and loop.time() >= next_replay and not await self._reconnect():
                    next_replay = loop.time() + self._retry_delay()
                if self._spool_dirty and self._connection is not None and loop.time() >= next_replay:
                    outcome = await self._in_writer(self._replay_step)
                    next_replay = loop.time() + (self._retry_delay() if outcome is _Replay.FAILED else 0)
                if self._pending:
                    was_dirty = self._spool_dirty
                    await self._write_pending()
                    if self._spool_dirty and not was_dirty:
                        next_replay = loop.time() + self.replay_interval  # the database just refused
                    continue
                if self._closing:
                    break
                self._wake.clear()
                retrying = self._spool_dirty or self._connection is None
                wait = max(0.0, next_replay - loop.time()) if retrying else None
                with suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
            await self._last_replay()
        finally:
            self._fail_pending(LedgerUnavailable(f"the ledger at {self.name} is closed"))

    async def _write_pending(self) -> None:
        batch, self._pending = self._pending, []
        self._writes_in_flight += 1
        try:
            await self._in_writer(lambda: self._store([pending.row for pending in batch]))
        except BaseException as exc:
            error = (
                exc if isinstance(exc, Exception) else LedgerUnavailable("the ledger's writer was stopped")
            )
            for pending in batch:
                if not pending.committed.done():
                    pending.committed.set_exception(error)
            if not isinstance(exc, Exception):
                raise
        else:
            for pending in batch:
                if not pending.committed.done():
                    pending.committed.set_result(None)
        finally:
            self._writes_in_flight -= 1

    async def _last_replay(self) -> None:
        if self._spool_dirty and self._connection is None:
            await self._reconnect()
        while self._spool_dirty and await self._in_writer(self._replay_step) is _Replay.MORE:
            pass

    def _fail_pending(self, error: Exception) -> None:
        batch, self._pending = self._pending, []
        for pending in batch:
            if not pending.committed.done():
                pending.committed.set_exception(error)

    async def _reconnect(self) -> bool:
        """Open a new connection for the writer, on a thread of its own: a database that takes long to
        answer a connection never holds up the spool's appends on the writer's thread."""
        attempt = asyncio.get_running_loop().run_in_executor(self._connector, self._connect_writer)
        try:
            connection = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            attempt.add_done_callback(_close_unclaimed)  # a connection nobody will use is closed
            raise
        except open_errors() as exc:
            if self._reconnect_failures == 0:
                log.warning("ledger: cannot connect to %s again: %s", self.name, _one_line(exc))
            self._reconnect_failures += 1
            return False
        await self._in_writer(lambda: self._adopt(connection))
        return True

    def _retry_delay(self) -> float:
        return retry_delay(self._reconnect_failures, self.replay_interval, self.max_replay_interval)

    async def _in_writer(self, function: Callable[[], T]) -> T:
        # Shielded: a transaction under way finishes (and is accounted for) even if this task is
        # cancelled, say by close's deadline.
        return await asyncio.shield(asyncio.get_running_loop().run_in_executor(self._writer, function))

    # The writer thread's side.

    def _open_writer(self) -> None:
        self._connection = connect(self.path)
        self._connection.close()
        # Migrated: the writer's own connection waits only `write_timeout` for another's lock.
        self._connection = self._connect_writer()
        try:
            spooled = ledger_spool.read(self.spool_path)
        except OSError as exc:
            # Replays will try again; meanwhile the database takes the rows, if it can.
            log.warning("ledger: cannot read the spool %s: %s", self.spool_path, exc)
            self._spool_dirty = True
            return
        self._spool_dirty = spooled.size > 0 or self.spool_path.exists()
        self._spooled_rows = len(spooled.objects)

    def _store(self, rows: list[Row]) -> None:
        """Commit the rows, or else spool them; LedgerUnavailable if neither works."""
        tried_database = False
        if not self.degraded:
            tried_database = True
            if self._commit(rows):
                return
        try:
            ledger_spool.append(self.spool_path, [row.to_json() for row in rows])
        except OSError as exc:
            spool_error: OSError = exc
        else:
            self._spool_dirty = True
            self._spooled_rows += len(rows)
            return
        # The spool is the fallback, not the preference: a degraded ledger whose spool fails tries the
        # database too before it gives up.
        if not tried_database and self._commit(rows):
            return
        log.error("ledger: cannot spool %d rows to %s either: %s", len(rows), self.spool_path, spool_error)
        raise LedgerUnavailable(
            f"cannot record {len(rows)} requests: the ledger at {self.name} and its spool both refuse "
            f"writes ({spool_error})"
        )

    def _commit(self, rows: Sequence[Row]) -> bool:
        """Try one transaction; whether it committed (a failure marks the ledger as failing).

        A lost PostgreSQL connection is closed here and opened again by the next try.
        """
        try:
            connection = self._writer_connection()
            added = insert_rows(connection, rows)
        except ledger_errors() as exc:
            self.write_failures += 1
            if not self._failing:
                log.warning(
                    "ledger: cannot commit to %s (%s); spooling to %s",
                    self.name,
                    _one_line(exc),
                    self.spool_path,
                )
            self._failing = True
            if self._connection is not None and not self._connection.usable:
                self._close_writer()
            return False
        if self._failing:
            log.info("ledger: %s takes writes again", self.name)
        self._failing = False
        if added < len(rows):
            log.debug("ledger: %d of %d rows were already recorded", len(rows) - added, len(rows))
        return True

    def _replay_step(self) -> _Replay:
        """Copy the next chunk of the spool into the database; remove the spool once all of it is in."""
        try:
            spooled = ledger_spool.read(self.spool_path, self._replay_offset, self.REPLAY_CHUNK)
        except OSError as exc:
            log.warning("ledger: cannot read the spool %s: %s", self.spool_path, exc)
            return _Replay.FAILED
        rows: list[Row] = []
        for obj in spooled.objects:
            try:
                rows.append(Row.from_json(obj))
            except ValueError as exc:
                log.warning("ledger: skipping a spool line that is not a usage row (%s): %s", exc, obj)
        for line in spooled.bad_lines:
            log.warning("ledger: skipping a torn spool line: %r", line[:200])
        if rows and not self._commit(rows):
            return _Replay.FAILED
        self._replay_offset = spooled.end
        self._spooled_rows = max(0, self._spooled_rows - len(spooled.objects))
        if spooled.end < spooled.size:
            return _Replay.MORE
        ledger_spool.remove(self.spool_path)
        self._replay_offset = 0
        self._spooled_rows = 0
        self._spool_dirty = False
        log.info("ledger: the spool %s is replayed into %s", self.spool_path, self.name)
        return _Replay.DONE

    def _connect_writer(self) -> Database:
        return open_database(
            self.path,
            lock_timeout=self.write_timeout,
            connect_timeout=self.CONNECT_TIMEOUT,
            statement_timeout=self.STATEMENT_TIMEOUT,
        )

    def _writer_connection(self) -> Database:
        """The writer's connection; LedgerError while it is lost (the write loop opens a new one)."""
        if self._closed:
            raise LedgerError(f"the ledger at {self.name} is closed")
        if self._connection is None:
            raise LedgerError(f"the connection to the ledger at {self.name} is lost; reconnecting")
        return self._connection

    def _adopt(self, connection: Database) -> None:
        """On the writer's thread: use a connection `_reconnect` opened."""
        if self._connection is not None or self._closed:
            connection.close()
            return
        self._connection = connection
        log.info("ledger: connected to %s again", self.name)
        self._reconnect_failures = 0

    def _close_writer(self) -> None:
        if self._connection is not None:
            with suppress(*database_errors()):
                self._connection.close()
            self._connection = None

    def _require(self) -> Database:
        return self._writer_connection()

    # The reports' thread.

    def _open_reader(self) -> None:
        self._read_connection = open_database(self.path, statement_timeout=self.REPORT_TIMEOUT)

    def _require_reader(self) -> Database:
        if self._closed:
            raise LedgerError(f"the ledger at {self.name} is closed")
        if self._read_connection is None:
            try:
                self._read_connection = open_database(self.path, statement_timeout=self.REPORT_TIMEOUT)
            except open_errors() as exc:
                raise LedgerError(f"cannot reach the ledger at {self.name}: {_one_line(exc)}") from None
        return self._read_connection

    def _close_reader(self) -> None:
        if self._read_connection is not None:
            with suppress(*database_errors()):
                self._read_connection.close()
            self._read_connection = None

    def _shutdown_threads(self) -> None:
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)
        self._connector.shutdown(wait=True)
