"""The usage ledger: one durable row per request, versioned schema, and the usage report.

Tests that take `db` run on both backends: a SQLite file and a database on a real PostgreSQL.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fake_worker import FakeWorker, completion
from ledger_records import record
from queen_process import QueenProcess
from servers import QueenServer, eventually

from protocol import Chunk, ErrorCode, Job, PromptTokensDetails, Result, Usage
from queenbee import ledger as ledger_module
from queenbee.cli import main
from queenbee.ledger import SCHEMA_VERSION, LedgerError, connect, insert, schema_version
from queenbee.ledger_db import Target, is_postgres
from queenbee.settings import QueenSettings
from queenbee.usage_report import parse_when, usage_totals

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
API_KEY = "sk-ledger-test-key"
ADMIN_KEY = "admin-ledger-test-key"
LN_URL = "worker-one@wallet.example"


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    """Where the test queen keeps its ledger: a SQLite file, or a new database on a real PostgreSQL."""
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return tmp_path / "ledger.db"


@pytest.fixture
def queen_settings(db: Target, tmp_path: Path) -> QueenSettings:
    """A queen with a named key (from a keys file), an admin key, and its ledger in tmp_path."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"alice {API_KEY}\n")
    return QueenSettings(
        queue_timeout=2.0,
        first_token_timeout=10.0,
        token_timeout=10.0,
        db=db,
        api_keys_file=keys,
        admin_key=ADMIN_KEY,
    )


def rows(db: Target) -> list[dict[str, Any]]:
    """Every usage row, read through a connection of the test's own (as another process would)."""
    if is_postgres(db):
        with psycopg.connect(str(db), row_factory=psycopg.rows.dict_row) as pg:
            return list(pg.execute("SELECT * FROM usage ORDER BY id").fetchall())
    with closing(sqlite3.connect(db)) as connection:
        connection.row_factory = sqlite3.Row
        return [dict(row) for row in connection.execute("SELECT * FROM usage ORDER BY id")]


def client(queen: QueenServer | QueenProcess) -> httpx.AsyncClient:
    """An HTTP client for the queen with the test key."""
    return httpx.AsyncClient(
        base_url=queen.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
    )


async def test_success_is_committed_before_the_response_ends(queen: QueenServer, db: Target) -> None:
    """The row is readable from another connection as soon as the client has the response."""
    worker = await FakeWorker(queen.worker_url, ln_url=LN_URL).connect()
    async with client(queen) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
        [row] = rows(db)
    await worker.close()
    assert response.status_code == 200
    assert row["request_id"] == response.json()["id"]
    assert row["outcome"] == "success"
    assert row["status"] == 200
    assert row["api_key_id"] == "alice"
    assert row["worker_id"] == worker.worker_id
    assert row["ln_url"] == LN_URL
    assert row["model"] == "fake-model"
    assert (row["prompt_tokens"], row["completion_tokens"]) == (3, 2)
    assert row["ttft"] is None  # a whole answer has no first token the queen could time
    assert row["duration"] > 0
    assert row["streamed"] == 0


async def test_stream_row_exists_when_done_arrives(queen: QueenServer, db: Target) -> None:
    """A streamed request's row is committed by the time the client reads [DONE]."""
    worker = await FakeWorker(queen.worker_url, ln_url=LN_URL).connect()
    seen_at_done: list[dict[str, Any]] = []
    async with (
        client(queen) as http,
        http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                seen_at_done = rows(db)
    await worker.close()
    assert [row["outcome"] for row in seen_at_done] == ["success"]
    assert seen_at_done[0]["streamed"] == 1
    assert seen_at_done[0]["completion_tokens"] == 2
    assert seen_at_done[0]["duration"] >= seen_at_done[0]["ttft"] >= 0


async def test_errors_are_recorded(queen: QueenServer, db: Target) -> None:
    """Requests that fail, at the queen or at the worker, get a row with their status and code."""

    async def too_long(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job, code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, message="too long")

    worker = await FakeWorker(queen.worker_url, behaviour=too_long).connect()
    async with client(queen) as http:
        unknown = await http.post("/v1/chat/completions", json={**CHAT, "model": "nope"})
        refused = await http.post("/v1/chat/completions", json=CHAT)
    await worker.close()
    assert (unknown.status_code, refused.status_code) == (404, 400)
    first, second = rows(db)
    assert (first["outcome"], first["status"], first["error_code"]) == ("error", 404, "model_not_found")
    assert first["worker_id"] is None
    assert (second["outcome"], second["status"], second["error_code"]) == (
        "error",
        400,
        "context_length_exceeded",
    )
    assert all(row["api_key_id"] == "alice" for row in (first, second))


async def test_client_going_away_is_recorded_as_cancelled(queen: QueenServer, db: Target) -> None:
    """A stream the client abandons ends up in the ledger as cancelled, with its worker."""

    async def endless(worker: FakeWorker, job: Job) -> None:
        while not worker.cancelled.is_set():
            await worker.send(Chunk(request_id=job.request_id, chunk={"choices": []}))
            await asyncio.sleep(0.01)
        await worker.fail(job, code=ErrorCode.CANCELLED, message="cancelled")

    worker = await FakeWorker(queen.worker_url, behaviour=endless, ln_url=LN_URL).connect()
    async with (
        client(queen) as http,
        http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        async for _ in response.aiter_lines():
            break
    await eventually(lambda: len(rows(db)) == 1)
    await worker.close()
    [row] = rows(db)
    assert row["outcome"] == "cancelled"
    assert row["worker_id"] == worker.worker_id
    assert row["ln_url"] == LN_URL


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
async def test_ledger_is_wal_and_holds_no_secret(queen: QueenServer, db: Target) -> None:
    """The file is in WAL mode, and the API key's secret is nowhere in it."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with client(queen) as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    await worker.close()
    with closing(sqlite3.connect(db)) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert schema_version(connection) == SCHEMA_VERSION
    assert isinstance(db, Path)
    stored = b"".join(path.read_bytes() for path in db.parent.glob(db.name + "*"))
    assert API_KEY.encode() not in stored


async def test_rows_survive_sigkill_right_after_the_response(tmp_path: Path, db: Target) -> None:
    """A queen killed the moment its client has the answer has already committed the row."""
    queen = QueenProcess.start(tmp_path, "--db", str(db), "--api-key", API_KEY)
    try:
        worker = await FakeWorker(queen.worker_url, ln_url=LN_URL).connect()
        async with client(queen) as http:
            whole = await http.post("/v1/chat/completions", json=CHAT)
            streamed = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
            queen.kill()
        await worker.abort()
    finally:
        queen.kill()
    assert whole.status_code == streamed.status_code == 200
    assert streamed.text.endswith("data: [DONE]\n\n")
    stream_id = json.loads(streamed.text.split("\n\n")[0][len("data: ") :])["id"]
    recorded = {row["request_id"]: row for row in rows(db)}
    assert set(recorded) == {whole.json()["id"], stream_id}
    assert all(row["ln_url"] == LN_URL and row["completion_tokens"] == 2 for row in recorded.values())


def test_migrations_are_versioned_and_idempotent(db: Target) -> None:
    """A new database is brought to the latest version; opening it again changes nothing."""
    with closing(connect(db)) as connection:
        assert schema_version(connection) == SCHEMA_VERSION
        insert(connection, record("r1", 100.0))
        insert(connection, record("r1", 100.0, prompt_tokens=99))  # a request id is recorded once
    with closing(connect(db)) as connection:
        assert schema_version(connection) == SCHEMA_VERSION
        assert connection.execute("SELECT COUNT(*), SUM(prompt_tokens) FROM usage").fetchone() == (1, 10)


def test_a_failing_migration_leaves_the_ledger_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each migration is one transaction: a failure rolls it back, version and tables alike."""
    path = tmp_path / "ledger.db"
    connect(path).close()
    broken = (("CREATE TABLE payouts (id INTEGER)", "THIS IS NOT SQL"),)
    monkeypatch.setattr(ledger_module, "MIGRATIONS", ledger_module.MIGRATIONS + broken)
    monkeypatch.setattr(ledger_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with pytest.raises(LedgerError):
        connect(path)
    with closing(sqlite3.connect(path)) as connection:
        assert schema_version(connection) == SCHEMA_VERSION
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert "payouts" not in tables


def test_a_ledger_from_a_newer_queen_is_refused(tmp_path: Path) -> None:
    """A schema version this queen does not know is an error, not a silent downgrade."""
    path = tmp_path / "future.db"
    with closing(sqlite3.connect(path)) as connection:
        connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(LedgerError, match="newer"):
        connect(path)
    with closing(sqlite3.connect(path)) as connection:
        assert schema_version(connection) == SCHEMA_VERSION + 1


def fill(path: Target) -> None:
    """Five requests: two workers (one without ln_url), two keys, every outcome."""
    with closing(connect(path)) as connection:
        insert(connection, record("r1", 1000.0, ln_url="a@wallet", api_key_id="alice", cached_tokens=4))
        insert(connection, record("r2", 2000.0, ln_url="a@wallet", api_key_id="bob", completion_tokens=7))
        insert(connection, record("r3", 2500.0, ln_url="", worker_id="worker-b", api_key_id="bob"))
        nothing = {"prompt_tokens": 0, "completion_tokens": 0}
        insert(
            connection,
            record("r4", 3000.0, outcome="error", status=404, worker_id=None, ln_url=None, **nothing),
        )
        insert(
            connection, record("r5", 3500.0, outcome="cancelled", status=499, api_key_id="alice", **nothing)
        )


def test_usage_totals_per_worker_and_key(db: Target) -> None:
    """Tokens add up per ln_url and per key; requests that reached no worker count only per key."""
    fill(db)
    with closing(connect(db)) as connection:
        workers, keys = usage_totals(connection, None, None)
        later_workers, _ = usage_totals(connection, 1500.0, 3000.0)
    by_url = {row.name: row for row in workers}
    assert set(by_url) == {"a@wallet", ""}
    assert (by_url["a@wallet"].requests, by_url["a@wallet"].total_tokens) == (3, 15 + 17)
    assert by_url["a@wallet"].cancelled == 1
    assert by_url["a@wallet"].cached_tokens == 4
    assert by_url[""].total_tokens == 15
    assert by_url[""].cached_tokens == 0
    by_key = {row.name: row for row in keys}
    assert {name: row.requests for name, row in by_key.items()} == {"alice": 3, "bob": 2}
    assert by_key["alice"].failed == 1
    assert (by_key["alice"].cached_tokens, by_key["bob"].cached_tokens) == (4, 0)
    assert {row.name: row.total_tokens for row in later_workers} == {"a@wallet": 17, "": 15}


def test_workers_are_credited_what_they_generated(db: Target) -> None:
    """Per-worker totals sum the credited figures, per-key totals what clients are billed."""
    with closing(connect(db)) as connection:
        insert(connection, record("r1", 1000.0, completion_tokens=2, worker_completion_tokens=9))
        insert(
            connection,
            record("r2", 1001.0, worker_prompt_tokens=4, usage_violation="prompt_tokens: 900 > 40"),
        )
        stored = [
            tuple(row)
            for row in connection.execute(
                "SELECT worker_prompt_tokens, worker_completion_tokens, usage_violation "
                "FROM usage ORDER BY id"
            )
        ]
        workers, keys = usage_totals(connection, None, None)
    assert stored == [(10, 9, None), (4, 5, "prompt_tokens: 900 > 40")]
    [worker] = workers
    assert (worker.prompt_tokens, worker.completion_tokens, worker.violations) == (14, 14, 1)
    [key] = keys
    assert (key.prompt_tokens, key.completion_tokens) == (20, 7)


def test_usage_command_prints_json_and_tables(db: Target, capsys: pytest.CaptureFixture[str]) -> None:
    """`queenbee usage` reports totals as JSON or tables, over a time range, cached prompt tokens too."""
    fill(db)
    assert main(["usage", "--db", str(db), "--format", "json", "--since", "1500", "--until", "3000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["since"] == "1970-01-01T00:25:00Z"
    assert [(row["ln_url"], row["total_tokens"]) for row in report["workers"]] == [("a@wallet", 17), ("", 15)]
    assert [row["violations"] for row in report["workers"]] == [0, 0]
    assert [(row["api_key"], row["requests"]) for row in report["api_keys"]] == [("bob", 2)]
    assert report["total"]["total_tokens"] == 32
    assert report["total"]["cached_tokens"] == 0
    assert main(["usage", "--db", str(db), "--format", "json"]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert [(row["ln_url"], row["cached_tokens"]) for row in everything["workers"]] == [
        ("a@wallet", 4),
        ("", 0),
    ]
    assert [(row["api_key"], row["cached_tokens"]) for row in everything["api_keys"]] == [
        ("bob", 0),
        ("alice", 4),
    ]
    assert everything["total"]["cached_tokens"] == 4
    assert main(["usage", "--db", str(db)]) == 0
    table = capsys.readouterr().out
    header = next(line for line in table.splitlines() if line.startswith("ln_url"))
    assert header.split()[:7] == [
        "ln_url",
        "requests",
        "succeeded",
        "failed",
        "cancelled",
        "prompt_tokens",
        "cached_tokens",
    ]
    alice = next(line for line in table.splitlines() if line.startswith("alice"))
    assert alice.split()[5:7] == ["10", "4"]
    assert "a@wallet" in table
    assert "(none)" in table
    assert "alice" in table
    assert "total" in table


def test_usage_command_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A missing ledger exits 1; an unreadable time exits 2; each with one line on stderr."""
    assert main(["usage", "--db", str(tmp_path / "missing.db")]) == 1
    assert "no ledger" in capsys.readouterr().err
    fill(tmp_path / "ledger.db")
    with pytest.raises(SystemExit) as raised:
        main(["usage", "--db", str(tmp_path / "ledger.db"), "--since", "last tuesday"])
    assert raised.value.code == 2
    assert "last tuesday" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1700000000", 1700000000.0),
        ("2024-01-02", 1704153600.0),
        ("2024-01-02T03:00:00Z", 1704164400.0),
        ("2024-01-02T05:00:00+02:00", 1704164400.0),
        ("90s", 10_000.0 - 90),
        ("2h", 10_000.0 - 7200),
        ("1d", 10_000.0 - 86400),
    ],
)
def test_parse_when(text: str, expected: float) -> None:
    """Dates, times, epoch seconds and times ago all give seconds since the epoch."""
    assert parse_when(text, now=10_000.0) == expected


async def test_admin_usage_needs_the_admin_key(queen: QueenServer) -> None:
    """/admin/usage answers the admin key only; the client key is not enough; it shows cached tokens."""

    async def cached(worker: FakeWorker, job: Job) -> None:
        usage = Usage(
            prompt_tokens=3,
            completion_tokens=1,
            total_tokens=4,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=2),
        )
        await worker.send(Result(request_id=job.request_id, usage=usage, response=completion("Hi")))

    worker = await FakeWorker(queen.worker_url, ln_url=LN_URL, behaviour=cached).connect()
    async with client(queen) as http:
        await http.post("/v1/chat/completions", json=CHAT)
        as_client = await http.get("/admin/usage")
        anonymous = await http.get("/admin/usage", headers={"Authorization": ""})
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        report = await http.get("/admin/usage", params={"since": "1h"}, headers=admin)
        table = await http.get("/admin/usage", params={"format": "table"}, headers=admin)
        bad = await http.get("/admin/usage", params={"since": "soon"}, headers=admin)
    await worker.close()
    assert as_client.status_code == anonymous.status_code == 401
    assert as_client.json()["error"]["code"] == "invalid_api_key"
    assert report.status_code == 200
    assert report.json()["workers"][0]["ln_url"] == LN_URL
    assert report.json()["workers"][0]["cached_tokens"] == 2
    assert report.json()["api_keys"][0]["api_key"] == "alice"
    assert report.json()["api_keys"][0]["cached_tokens"] == 2
    assert table.headers["content-type"].startswith("text/plain")
    assert LN_URL in table.text
    assert bad.status_code == 400


async def test_admin_usage_does_not_exist_without_an_admin_key(tmp_path: Path) -> None:
    """With no --admin-key there is no admin endpoint at all."""
    queen = QueenServer(QueenSettings(db=tmp_path / "ledger.db")).start()
    try:
        async with httpx.AsyncClient(base_url=queen.base_url) as http:
            response = await http.get("/admin/usage", headers={"Authorization": "Bearer anything"})
    finally:
        queen.stop()
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}
