"""The ledger when its disk fails: rows go to the spool and come back, nothing waits in line, sums hold.

Tests that take `db` run on both backends: a SQLite file, and a database on a real PostgreSQL (where
"locked" is another session's lock on the usage table).
"""

from __future__ import annotations

import asyncio
import json
import resource
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fake_worker import FakeWorker
from prometheus_client import CollectorRegistry, generate_latest
from queen_process import QueenProcess
from servers import TIME_UNIT, QueenServer, eventually
from test_ledger import ADMIN_KEY, API_KEY, CHAT, client, record, rows

from queenbee import ledger_spool
from queenbee.cli import main
from queenbee.ledger import MAX_TOKENS, MIGRATIONS, Ledger, LedgerUnavailable, Row, connect, insert
from queenbee.ledger_db import Target, default_spool, is_postgres
from queenbee.metrics import LedgerCollector
from queenbee.settings import QueenSettings
from queenbee.usage_report import usage_totals

OLD_BUSY_TIMEOUT = 5.0
"""Seconds every write waited for a lock before the group commit: what the timing bounds sit under."""


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """A migrated, empty ledger: a file, or a new database on a real PostgreSQL."""
    target: Target = (
        request.getfixturevalue("postgres_url") if request.param == "postgres" else tmp_path / "ledger.db"
    )
    connect(target).close()
    return target


def spool_path(db: Target) -> Path:
    """Where a queen keeps the ledger's spool by default."""
    return default_spool(db)


@pytest.fixture
def queen_settings(db: Target, tmp_path: Path) -> QueenSettings:
    """A queen with a named key, an admin key, and its ledger in tmp_path."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice {API_KEY}\n")
    return QueenSettings(
        queue_timeout=5.0,
        first_token_timeout=10.0,
        token_timeout=10.0,
        db=db,
        api_keys_file=keys,
        admin_key=ADMIN_KEY,
    )


@contextmanager
def locked(db: Target) -> Iterator[object]:
    """Another connection holds the database's write lock (as another process would) until the block ends."""
    if is_postgres(db):
        with psycopg.connect(str(db)) as session:  # one transaction, rolled back on the way out
            session.execute("LOCK TABLE usage IN EXCLUSIVE MODE")
            yield session
            session.rollback()
        return
    with closing(sqlite3.connect(db, isolation_level=None)) as connection:
        connection.execute("BEGIN EXCLUSIVE")
        try:
            yield connection
        finally:
            connection.execute("ROLLBACK")


def spooled_ids(db: Target) -> list[str]:
    """The request ids of the whole rows in the spool."""
    return [obj["request_id"] for obj in ledger_spool.read(spool_path(db)).objects]


def report(db: Target, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`queenbee usage --format json` on the ledger file."""
    assert main(["usage", "--db", str(db), "--format", "json"]) == 0
    result: dict[str, Any] = json.loads(capsys.readouterr().out)
    return result


async def admin_report(http: httpx.AsyncClient) -> dict[str, Any]:
    """GET /admin/usage as the admin."""
    response = await http.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


async def test_a_locked_database_spools_every_row_and_replays_it(
    queen: QueenServer, db: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the database locked requests still answer, reports count the spool, and replay empties it."""
    worker = await FakeWorker(queen.worker_url, parallel=5).connect()
    async with client(queen) as http:
        with locked(db):
            async with asyncio.timeout(OLD_BUSY_TIMEOUT * TIME_UNIT):
                answers = await asyncio.gather(
                    *(http.post("/v1/chat/completions", json=CHAT) for _ in range(5))
                )
            ids = {answer.json()["id"] for answer in answers}
            assert [answer.status_code for answer in answers] == [200] * 5
            assert set(spooled_ids(db)) == ids
            assert (await admin_report(http))["total"]["requests"] == 5
            by_command = report(db, capsys)
            assert by_command["total"]["requests"] == 5
            assert by_command["total"]["total_tokens"] == 5 * 5
        await eventually(lambda: not spool_path(db).exists())
        assert {row["request_id"] for row in rows(db)} == ids
        after = await admin_report(http)
    await worker.close()
    assert after["total"]["requests"] == 5  # in the database now, and counted once
    assert report(db, capsys)["total"]["requests"] == 5


async def test_a_locked_database_does_not_serialise_requests(queen: QueenServer, db: Target) -> None:
    """Eight requests with the database locked all finish within one of the old per-write lock waits."""
    worker = await FakeWorker(queen.worker_url, parallel=8).connect()
    async with client(queen) as http:
        with locked(db):
            started = time.monotonic()
            answers = await asyncio.gather(*(http.post("/v1/chat/completions", json=CHAT) for _ in range(8)))
            elapsed = time.monotonic() - started
        await eventually(lambda: len(rows(db)) == 8)
    await worker.close()
    assert [answer.status_code for answer in answers] == [200] * 8
    # One write at a time waited out its lock before: the eighth answer came after 8 x 5 s.
    assert elapsed < OLD_BUSY_TIMEOUT * TIME_UNIT


async def test_records_that_arrive_together_are_written_in_one_transaction(db: Target) -> None:
    """Group commit: records submitted while the database is locked cost it one attempt, then the spool."""
    ledger = await Ledger.open(db, write_timeout=0.05, replay_interval=60)
    try:
        with locked(db):
            await asyncio.gather(*(ledger.request_finished(record(f"r{n}", 1000.0 + n)) for n in range(20)))
            assert ledger.degraded
            assert ledger.spooled_rows == 20
            assert ledger.write_failures == 1
            # Degraded, the next record goes straight to the spool without trying the database.
            await ledger.request_finished(record("r20", 2000.0))
            assert (ledger.write_failures, ledger.spooled_rows) == (1, 21)
    finally:
        await ledger.close()  # the last replay, with the lock gone
    assert not spool_path(db).exists()
    assert len(rows(db)) == 21


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_rows_survive_a_file_size_limit(tmp_path: Path, db: Target) -> None:
    """Under RLIMIT_FSIZE the WAL cannot grow: every answered request has its row once the limit is gone."""
    queen = start_limited_queen(tmp_path, db, limit=64 * 1024)
    answered: set[str] = set()
    failed = 0
    try:
        worker = await FakeWorker(queen.worker_url).connect()
        async with client(queen) as http:
            for _ in range(20):
                try:
                    response = await http.post("/v1/chat/completions", json=CHAT)
                except httpx.TransportError:
                    failed += 1
                    continue
                if response.status_code == 200:
                    answered.add(response.json()["id"])
                else:
                    failed += 1
        await worker.close()
    finally:
        queen.stop()
    assert spool_path(db).exists(), queen.log()  # the database did refuse, and the spool took the rows
    assert (len(answered), failed) == (20, 0), queen.log()  # the spool had room for every row
    unlimited = QueenProcess.start(tmp_path, "--db", str(db), "--api-key", API_KEY)
    try:
        await eventually(lambda: not spool_path(db).exists())
    finally:
        unlimited.stop()
    assert answered <= {row["request_id"] for row in rows(db)}


def start_limited_queen(tmp_path: Path, db: Target, *, limit: int) -> QueenProcess:
    """A queen process that cannot make any file larger than `limit` bytes (writes fail with EFBIG)."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return QueenProcess.start(
        tmp_path,
        "--db",
        str(db),
        "--api-key",
        API_KEY,
        log_name="limited-queen.log",
        preexec_fn=limit_file_size,
    )


async def test_replay_is_idempotent_and_skips_torn_lines(db: Target) -> None:
    """Lines already in the database, garbage and a torn last line: each row ends up there exactly once."""
    with closing(connect(db)) as connection:
        insert(connection, record("already", 1000.0))
    lines = [
        json.dumps(Row.from_record(record("already", 1000.0)).to_json()),
        json.dumps(Row.from_record(record("new", 1001.0, completion_tokens=7)).to_json()),
        "this is not json",
        json.dumps({"request_id": "not-a-row"}),
        json.dumps(Row.from_record(record("new", 1001.0, completion_tokens=7)).to_json()),
    ]
    torn = json.dumps(Row.from_record(record("torn", 1002.0)).to_json())[:40]
    spool_path(db).write_text("\n".join(lines) + "\n" + torn)
    ledger = await Ledger.open(db)
    try:
        assert ledger.degraded  # rows wait in the spool
        await eventually(lambda: not spool_path(db).exists())
        assert not ledger.degraded
        assert ledger.spooled_rows == 0
    finally:
        await ledger.close()
    recorded = rows(db)
    assert sorted(row["request_id"] for row in recorded) == ["already", "new"]
    assert next(row for row in recorded if row["request_id"] == "new")["completion_tokens"] == 7


async def test_an_append_after_a_torn_line_starts_a_line_of_its_own(db: Target) -> None:
    """A crash's torn last line never swallows the row appended after it."""
    spool_path(db).write_text('{"request_id": "to')
    ledger = await Ledger.open(db, write_timeout=0.05, replay_interval=60)
    try:
        with locked(db):
            await ledger.request_finished(record("after", 1000.0))
            assert spooled_ids(db) == ["after"]
    finally:
        await ledger.close()
    assert [row["request_id"] for row in rows(db)] == ["after"]


def test_a_row_both_spooled_and_committed_is_counted_once(
    db: Target, capsys: pytest.CaptureFixture[str]
) -> None:
    """A replay interrupted before the spool was removed double-counts nothing in either report."""
    with closing(connect(db)) as connection:
        insert(connection, record("both", 1000.0))
    ledger_spool.append(
        spool_path(db),
        [Row.from_record(record(name, 1000.0)).to_json() for name in ("both", "spooled", "spooled")],
    )
    with closing(connect(db)) as connection:
        workers, keys = usage_totals(connection, None, None, spool=spool_path(db))
    assert [(row.name, row.requests, row.total_tokens) for row in keys] == [("alice", 2, 30)]
    assert [(row.name, row.requests) for row in workers] == [("a@wallet", 2)]
    assert report(db, capsys)["total"]["requests"] == 2


async def test_a_record_neither_database_nor_spool_takes_raises(db: Target) -> None:
    """With the database locked and the spool unwritable, request_finished raises LedgerUnavailable."""
    spool_path(db).mkdir()  # nothing can be appended to a directory
    ledger = await Ledger.open(db, write_timeout=0.05, replay_interval=60)
    try:
        with locked(db), pytest.raises(LedgerUnavailable, match="spool"):
            await ledger.request_finished(record("lost", 1000.0))
        assert ledger.degraded
        await ledger.request_finished(record("kept", 1001.0))  # the database is back
        assert not ledger.degraded
    finally:
        await ledger.close()
    assert [row["request_id"] for row in rows(db)] == ["kept"]


async def test_metrics_count_spooled_rows_and_write_failures(db: Target) -> None:
    """The collector exports the spool's size and the database's refusals."""
    ledger = await Ledger.open(db, write_timeout=0.05, replay_interval=60)
    registry = CollectorRegistry()
    registry.register(LedgerCollector(ledger))
    try:
        with locked(db):
            await ledger.request_finished(record("r1", 1000.0))
            await ledger.request_finished(record("r2", 1001.0))
            exposed = generate_latest(registry).decode()
    finally:
        await ledger.close()
    assert "queenbee_ledger_spooled_rows 2.0" in exposed
    assert "queenbee_ledger_write_failures_total 1.0" in exposed


async def test_close_leaves_the_spool_for_the_next_start(db: Target) -> None:
    """Rows still refused at close stay in the spool, and the next open replays them."""
    with locked(db):
        ledger = await Ledger.open(db, write_timeout=0.05, replay_interval=60)
        await ledger.request_finished(record("r1", 1000.0))
        await ledger.close()
        assert spooled_ids(db) == ["r1"]
    again = await Ledger.open(db)
    try:
        await eventually(lambda: not again.degraded)
    finally:
        await again.close()
    assert [row["request_id"] for row in rows(db)] == ["r1"]


def at_the_bound(db: Target, count: int) -> None:
    """`count` requests whose every token figure is far beyond the clamp bound."""
    huge = 2**62
    with closing(connect(db)) as connection:
        for n in range(count):
            insert(
                connection,
                record(
                    f"big{n}",
                    1000.0 + n,
                    prompt_tokens=huge,
                    completion_tokens=huge,
                    worker_prompt_tokens=huge,
                    worker_completion_tokens=huge,
                ),
            )


async def test_rows_at_the_clamp_bound_sum_in_both_reports(
    db: Target, queen_settings: QueenSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    """Token figures are clamped when stored, so sums of many huge rows neither overflow nor fail."""
    at_the_bound(db, 8)
    ledger_spool.append(
        spool_path(db), [Row.from_record(record("spooled", 2000.0, prompt_tokens=2**62)).to_json()]
    )
    expected = 9 * MAX_TOKENS
    by_command = report(db, capsys)
    assert by_command["total"]["prompt_tokens"] == expected
    assert by_command["workers"][0]["completion_tokens"] == 8 * MAX_TOKENS + 5
    queen = QueenServer(queen_settings).start()
    try:
        async with httpx.AsyncClient(base_url=queen.base_url) as http:
            by_admin = await admin_report(http)
    finally:
        queen.stop()
    assert by_admin["total"]["prompt_tokens"] == expected
    assert by_admin["total"]["total_tokens"] == expected + 8 * MAX_TOKENS + 5


def test_migration_2_clamps_the_rows_before_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A version-1 ledger with absurd token counts is clamped on upgrade, and its reports add up."""
    path = tmp_path / "old.db"
    with closing(sqlite3.connect(path, isolation_level=None)) as connection:
        for statement in MIGRATIONS[0]:
            connection.execute(statement)
        connection.execute("PRAGMA user_version = 1")
        for n in range(3):
            connection.execute(
                "INSERT INTO usage (request_id, started_at, path, model, worker_id, ln_url, prompt_tokens,"
                " completion_tokens, duration, outcome, status, attempts, streamed) VALUES"
                " (?, 1000, '/v1/chat/completions', 'm', 'w', 'a@wallet', ?, -5, 1, 'success', 200, 1, 0)",
                (f"old{n}", 2**62),
            )
    by_command = report(path, capsys)
    assert by_command["workers"][0]["prompt_tokens"] == 3 * MAX_TOKENS
    assert by_command["total"]["completion_tokens"] == 0
