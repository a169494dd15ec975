"""Files uploaded for fine-tuning, fine-tuning jobs and their events, in the queen's database.

The tables are the ledger's migration 6 (`files`, `fine_tuning_jobs`, `fine_tuning_events`). Every row
has an owner, the API key id that made it (None on an open queen): another key is told it does not
exist. A job is stored as its OpenAI object (JSON), with its status beside it for the queue's queries;
an event as its OpenAI object too, in the order it happened.

The database blocks (SQLite, or PostgreSQL through psycopg), so every call runs on the store's own
thread, never on the event loop; a PostgreSQL connection found lost is opened again.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from queenbee.ledger import MIGRATIONS, connect
from queenbee.ledger_db import Database, Reconnecting, Target

T = TypeVar("T")

TABLES_MIGRATION = 5
"""The index in MIGRATIONS of the migration that makes these tables (it takes a ledger to version 6)."""


@dataclass(frozen=True)
class StoredFile:
    """One uploaded file: its OpenAI object's fields and its content."""

    id: str
    owner: str | None
    created_at: float
    """Seconds since the epoch (OpenAI shows whole seconds; the store orders by the fraction too)."""
    filename: str
    purpose: str
    content: bytes

    def to_object(self) -> dict[str, Any]:
        """The file as OpenAI's API shows it."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": int(self.created_at),
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclass(frozen=True)
class Page:
    """A page of a list, newest first, and whether more follow it."""

    data: list[dict[str, Any]]
    has_more: bool


class TuningStore:
    """The fine-tuning tables of the queen's database, used from a thread of its own."""

    def __init__(self, path: Target) -> None:
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tuning-store")
        self._connection = Reconnecting(path, connect)
        self._closed = False

    @classmethod
    async def open(cls, path: Target) -> TuningStore:
        """Open the store in the (already migrated) database at `path` (a file or a PostgreSQL URL)."""
        store = cls(path)
        await store._run(store._open)
        return store

    async def close(self) -> None:
        """Close the connection and the thread."""
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    # Files.

    async def put_file(self, file: StoredFile) -> None:
        """Store an uploaded file."""
        await self._run(
            lambda: self._write(
                "INSERT INTO files (id, owner, created_at, filename, purpose, bytes, content) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    file.id,
                    file.owner,
                    file.created_at,
                    file.filename,
                    file.purpose,
                    len(file.content),
                    file.content,
                ),
            )
        )

    async def get_file(self, owner: str | None, file_id: str) -> StoredFile | None:
        """`owner`'s file `file_id`, or None."""
        row = await self._run(
            lambda: (
                self._require()
                .execute(
                    "SELECT id, owner, created_at, filename, purpose, content FROM files "
                    "WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
                    (file_id, owner),
                )
                .fetchone()
            )
        )
        return (
            None if row is None else StoredFile(row[0], row[1], float(row[2]), row[3], row[4], bytes(row[5]))
        )

    async def list_files(
        self, owner: str | None, *, purpose: str | None, limit: int, after: str | None, ascending: bool
    ) -> Page:
        """`owner`'s files, newest first (oldest with `ascending`), after the file `after`."""

        def query() -> Page:
            order = "ASC" if ascending else "DESC"
            sql = (
                "SELECT id, created_at, filename, purpose, bytes FROM files "
                "WHERE owner IS NOT DISTINCT FROM ?"
            )
            args: list[Any] = [owner]
            if purpose is not None:
                sql += " AND purpose = ?"
                args.append(purpose)
            if after is not None:
                mark = self._require().execute(
                    "SELECT created_at FROM files WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
                    (after, owner),
                )
                found = mark.fetchone()
                if found is not None:
                    compare = ">" if ascending else "<"
                    sql += f" AND (created_at, id) {compare} (?, ?)"
                    args += [found[0], after]
            sql += f" ORDER BY created_at {order}, id {order} LIMIT ?"
            args.append(limit + 1)
            rows = self._require().execute(sql, args).fetchall()
            data = [
                StoredFile(row[0], owner, float(row[1]), row[2], row[3], b"").to_object() | {"bytes": row[4]}
                for row in rows[:limit]
            ]
            return Page(data, len(rows) > limit)

        return await self._run(query)

    async def delete_file(self, owner: str | None, file_id: str) -> bool:
        """Delete `owner`'s file `file_id`; whether there was one."""
        return await self._run(
            lambda: (
                self._write(
                    "DELETE FROM files WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (file_id, owner)
                )
                > 0
            )
        )

    # Jobs.

    async def put_job(self, owner: str | None, job: dict[str, Any]) -> None:
        """Store a job object (replacing the one with its id)."""
        await self._run(
            lambda: self._write(
                "INSERT INTO fine_tuning_jobs (id, owner, created_at, status, job) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET status = excluded.status, job = excluded.job",
                (job["id"], owner, job["created_at"], job["status"], json.dumps(job)),
            )
        )

    async def claim_job(self, owner: str | None, job: dict[str, Any], *, expected: str) -> bool:
        """Store `job` only if its stored status is still `expected`; whether it was stored.

        One statement, so that of several queens sharing the database (replicas) only one starts a
        queued job, and a job cancelled meanwhile stays cancelled.
        """
        changed = await self._run(
            lambda: self._write(
                "UPDATE fine_tuning_jobs SET status = ?, job = ? "
                "WHERE id = ? AND owner IS NOT DISTINCT FROM ? AND status = ?",
                (job["status"], json.dumps(job), job["id"], owner, expected),
            )
        )
        return changed == 1

    async def get_job(self, owner: str | None, job_id: str) -> dict[str, Any] | None:
        """`owner`'s job `job_id`, or None."""
        row = await self._run(
            lambda: (
                self._require()
                .execute(
                    "SELECT job FROM fine_tuning_jobs WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
                    (job_id, owner),
                )
                .fetchone()
            )
        )
        return None if row is None else dict(json.loads(row[0]))

    async def list_jobs(self, owner: str | None, *, limit: int, after: str | None) -> Page:
        """`owner`'s jobs, newest first, after the job `after`."""

        def query() -> Page:
            sql = "SELECT job FROM fine_tuning_jobs WHERE owner IS NOT DISTINCT FROM ?"
            args: list[Any] = [owner]
            if after is not None:
                found = (
                    self._require()
                    .execute(
                        "SELECT created_at FROM fine_tuning_jobs "
                        "WHERE id = ? AND owner IS NOT DISTINCT FROM ?",
                        (after, owner),
                    )
                    .fetchone()
                )
                if found is not None:
                    sql += " AND (created_at, id) < (?, ?)"
                    args += [found[0], after]
            sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
            args.append(limit + 1)
            rows = self._require().execute(sql, args).fetchall()
            return Page([json.loads(row[0]) for row in rows[:limit]], len(rows) > limit)

        return await self._run(query)

    async def jobs_with_status(self, *statuses: str) -> list[tuple[str | None, dict[str, Any]]]:
        """(owner, job) of every job in one of `statuses`, oldest first (what the queue works on)."""
        marks = ", ".join("?" * len(statuses))
        rows = await self._run(
            lambda: (
                self._require()
                .execute(
                    f"SELECT owner, job FROM fine_tuning_jobs WHERE status IN ({marks}) "
                    "ORDER BY created_at, id",
                    statuses,
                )
                .fetchall()
            )
        )
        return [(row[0], json.loads(row[1])) for row in rows]

    # Events.

    async def add_event(self, job_id: str, event: dict[str, Any]) -> None:
        """Append an event object to a job's events."""
        await self._run(
            lambda: self._write(
                "INSERT INTO fine_tuning_events (id, job_id, event) VALUES (?, ?, ?)",
                (event["id"], job_id, json.dumps(event)),
            )
        )

    async def list_events(self, job_id: str, *, limit: int, after: str | None) -> Page:
        """A job's events, newest first, after (older than) the event `after`."""

        def query() -> Page:
            sql = "SELECT event FROM fine_tuning_events WHERE job_id = ?"
            args: list[Any] = [job_id]
            if after is not None:
                sql += " AND seq < (SELECT seq FROM fine_tuning_events WHERE id = ? AND job_id = ?)"
                args += [after, job_id]
            sql += " ORDER BY seq DESC LIMIT ?"
            args.append(limit + 1)
            rows = self._require().execute(sql, args).fetchall()
            return Page([json.loads(row[0]) for row in rows[:limit]], len(rows) > limit)

        return await self._run(query)

    async def _run(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._connection.run(function)
        )

    def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        return self._require().execute(sql, args).rowcount

    def _open(self) -> None:
        self._connection.open()
        connection = self._require()
        if not connection.postgres:
            # A ledger migrated while migration 6 was an empty reserved slot is at a later version
            # without these tables; its statements are idempotent (IF NOT EXISTS).
            for statement in MIGRATIONS[TABLES_MIGRATION]:
                connection.execute(statement)

    def _close(self) -> None:
        self._closed = True
        self._connection.close()

    def _require(self) -> Database:
        if self._closed:
            raise RuntimeError("the fine-tuning store is closed")
        return self._connection.get()
