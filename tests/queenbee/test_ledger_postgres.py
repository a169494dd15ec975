"""The ledger on a real PostgreSQL: migrations two queens race, kill -9 under traffic, an outage under
traffic (spooled, degraded, replayed, nothing twice), the stores and escrow on the same database."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path

import httpx
import openai
import psycopg
import pytest
from fake_worker import FakeWorker
from ledger_records import record
from postgres_server import PostgresServer, running_postgres
from queen_process import QueenProcess
from servers import TIME_UNIT, QueenServer, eventually

from queenbee import escrow
from queenbee.cli import main
from queenbee.ledger import SCHEMA_VERSION, Ledger, LedgerError, Row, connect, insert, retry_delay
from queenbee.ledger_spool import append
from queenbee.response_store import ResponseStore
from queenbee.settings import QueenSettings
from queenbee.tuning_store import StoredFile, TuningStore
from queenbee.usage_report import usage_totals

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
API_KEY = "sk-postgres-test-key"
ADMIN_KEY = "admin-postgres-test-key"
LN_URL = "worker@wallet.example"


def usage_ids(url: str) -> list[str]:
    """Every usage row's request id, duplicates kept (there must be none), read as another process would."""
    with psycopg.connect(url) as connection:
        return [row[0] for row in connection.execute("SELECT request_id FROM usage ORDER BY id")]


def client(base_url: str) -> httpx.AsyncClient:
    """An HTTP client for a queen with the test key."""
    return httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)


def answer_id(response: httpx.Response, *, streamed: bool) -> str:
    """The request id of a whole or streamed chat answer the client received to its end."""
    if not streamed:
        return str(response.json()["id"])
    assert response.text.endswith("data: [DONE]\n\n"), response.text[-200:]
    return str(json.loads(response.text.split("\n\n")[0][len("data: ") :])["id"])


@contextmanager
def queen_on(url: str, tmp_path: Path) -> Iterator[QueenServer]:
    """An in-process queen with its ledger on `url`, its spool in tmp_path, the test keys."""
    settings = QueenSettings(
        db=url,
        ledger_spool=tmp_path / "queen.spool",
        api_key=[API_KEY],
        admin_key=ADMIN_KEY,
        queue_timeout=5.0,
        first_token_timeout=10.0,
        token_timeout=10.0,
    )
    queen = QueenServer(settings).start()
    try:
        yield queen
    finally:
        queen.stop()


def test_two_queens_migrating_one_empty_database_at_once(postgres_url: str, tmp_path: Path) -> None:
    """Six connections and two queen processes open one new database together: each migration is
    applied and recorded once, in order, and both queens serve."""
    barrier = threading.Barrier(6)
    errors: list[BaseException] = []

    def open_it() -> None:
        barrier.wait()
        try:
            connect(postgres_url).close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with psycopg.connect(postgres_url) as pg:
        versions = [row[0] for row in pg.execute("SELECT version FROM queenbee_schema ORDER BY applied_at")]
    assert versions == list(range(1, SCHEMA_VERSION + 1))

    fresh = postgres_url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(fresh, autocommit=True) as pg:
        pg.execute("CREATE DATABASE racing")
    racing = fresh.rsplit("/", 1)[0] + "/racing"
    queens: list[QueenProcess] = []

    def start(name: str) -> None:
        queens.append(
            QueenProcess.start(
                tmp_path,
                "--db",
                racing,
                "--ledger-spool",
                str(tmp_path / f"{name}.spool"),
                log_name=f"{name}.log",
            )
        )

    try:
        starters = [threading.Thread(target=start, args=(name,)) for name in ("a", "b")]
        for starter in starters:
            starter.start()
        for starter in starters:
            starter.join()
        assert len(queens) == 2, [queen.log() for queen in queens]
        for queen in queens:
            assert httpx.get(f"{queen.base_url}/health", timeout=10).json()["status"] == "ok"
        with psycopg.connect(racing) as pg:
            raced = [row[0] for row in pg.execute("SELECT version FROM queenbee_schema ORDER BY applied_at")]
        assert raced == list(range(1, SCHEMA_VERSION + 1))
    finally:
        for queen in queens:
            queen.kill()
        with psycopg.connect(fresh, autocommit=True) as pg:
            pg.execute("DROP DATABASE racing WITH (FORCE)")


async def test_a_queen_killed_under_traffic_loses_no_row_its_clients_saw_end(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of a queen with requests in flight: every answer a client received to its end has its
    row in PostgreSQL, once; `queenbee usage --db postgresql://` counts them."""
    queen = QueenProcess.start(
        tmp_path,
        "--db",
        postgres_url,
        "--ledger-spool",
        str(tmp_path / "queen.spool"),
        "--api-key",
        API_KEY,
    )
    finished: list[str] = []
    enough = asyncio.Event()
    try:
        worker = await FakeWorker(queen.worker_url, ln_url=LN_URL, parallel=8).connect()

        async def traffic(streamed: bool) -> None:
            async with client(queen.base_url) as http:
                while True:
                    try:
                        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": streamed})
                    except httpx.HTTPError:
                        return  # the queen is gone: this answer did not reach its end
                    if response.status_code != 200:
                        return
                    with suppress(AssertionError, ValueError, KeyError):
                        finished.append(answer_id(response, streamed=streamed))
                    if len(finished) >= 40:
                        enough.set()

        tasks = [asyncio.create_task(traffic(streamed=n % 2 == 0)) for n in range(6)]
        async with asyncio.timeout(60 * TIME_UNIT):
            await enough.wait()
        queen.kill()
        async with asyncio.timeout(30 * TIME_UNIT):
            await asyncio.gather(*tasks)
        await worker.abort()
    finally:
        queen.kill()
    recorded = usage_ids(postgres_url)
    assert len(recorded) == len(set(recorded))
    assert set(finished) <= set(recorded)
    assert len(finished) >= 40
    assert main(["usage", "--db", postgres_url, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"]["requests"] == len(recorded)
    assert [row["ln_url"] for row in report["workers"]] == [LN_URL]


def test_usage_command_reads_postgres(postgres_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`queenbee usage --db postgresql://...` prints the totals of the rows there, spool included."""
    with closing(connect(postgres_url)) as connection:
        insert(connection, record("r1", 1000.0, cached_tokens=3))
        insert(connection, record("r2", 2000.0, api_key_id="bob", completion_tokens=7))
    assert main(["usage", "--db", postgres_url, "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(row["ln_url"], row["requests"], row["total_tokens"]) for row in report["workers"]] == [
        ("a@wallet", 2, 32)
    ]
    assert [(row["api_key"], row["total_tokens"], row["cached_tokens"]) for row in report["api_keys"]] == [
        ("bob", 17, 0),
        ("alice", 15, 3),
    ]


def test_usage_command_counts_a_spooled_row_once(
    postgres_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Rows in the spool given by --spool count too; one also in the database counts once."""
    with closing(connect(postgres_url)) as connection:
        insert(connection, record("both", 1000.0))
    spool = tmp_path / "replica.spool"
    append(spool, [Row.from_record(record(name, 1000.0)).to_json() for name in ("both", "spooled")])
    assert main(["usage", "--db", postgres_url, "--spool", str(spool), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["requests"] == 2


def test_usage_command_on_an_unreachable_database(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """No server there: exit 1 with one line naming the database, never its password."""
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{postgres.port}/no_such_database"
    assert main(["usage", "--db", url]) == 1
    error = capsys.readouterr().err
    assert error.startswith("queenbee usage: error:")
    assert "no_such_database" in error
    assert "s3cret-pw" not in error
    assert len(error.strip().splitlines()) == 1


async def test_a_replayed_spool_and_a_retried_insert_keep_one_row_each(
    postgres_url: str, tmp_path: Path
) -> None:
    """A row already in the database and again in the spool (a commit whose answer was lost) is kept
    once when the spool is replayed; the spool goes."""
    with closing(connect(postgres_url)) as connection:
        insert(connection, record("already", 1000.0))
        insert(connection, record("already", 1000.0, prompt_tokens=99))  # the retry after a lost answer
    spool = tmp_path / "queen.spool"
    append(spool, [Row.from_record(record(name, 1000.0)).to_json() for name in ("already", "new")])
    ledger = await Ledger.open(postgres_url, spool=spool)
    try:
        await eventually(lambda: not spool.exists())
    finally:
        await ledger.close()
    assert sorted(usage_ids(postgres_url)) == ["already", "new"]
    with psycopg.connect(postgres_url) as pg:
        assert pg.execute("SELECT prompt_tokens FROM usage WHERE request_id = 'already'").fetchone() == (10,)


async def test_two_ledgers_cannot_share_one_spool(postgres_url: str, tmp_path: Path) -> None:
    """A second queen given the spool another holds is refused at startup, saying why."""
    spool = tmp_path / "queen.spool"
    first = await Ledger.open(postgres_url, spool=spool)
    try:
        with pytest.raises(LedgerError, match="in use by another queen"):
            await Ledger.open(postgres_url, spool=spool)
    finally:
        await first.close()
    second = await Ledger.open(postgres_url, spool=spool)  # free again once the first has closed
    await second.close()


async def test_a_locked_table_spools_and_replays(postgres_url: str, tmp_path: Path) -> None:
    """Another session locking the usage table: the record goes to the spool within the lock timeout,
    and lands in the table once the lock is gone."""
    spool = tmp_path / "queen.spool"
    ledger = await Ledger.open(postgres_url, spool=spool, replay_interval=0.1)
    try:
        with psycopg.connect(postgres_url) as locker:
            locker.execute("LOCK TABLE usage IN EXCLUSIVE MODE")
            async with asyncio.timeout(10 * TIME_UNIT):
                await ledger.request_finished(record("while-locked", 1000.0))
            assert ledger.degraded
            assert ledger.spooled_rows == 1
            assert spool.exists()
        await eventually(lambda: not ledger.degraded)
    finally:
        await ledger.close()
    assert usage_ids(postgres_url) == ["while-locked"]


async def test_an_outage_under_traffic_spools_degrades_and_replays_every_row_once(tmp_path: Path) -> None:
    """PostgreSQL stopped and started again while clients keep asking: every answer is served, /health
    says degraded with the rows spooled, /admin/usage says 503, and after the restart every answer's
    row is in the database exactly once and the queen is ok again."""
    with running_postgres() as server:
        url = server.create_database()
        with queen_on(url, tmp_path) as queen:
            worker = await FakeWorker(queen.worker_url, ln_url=LN_URL, parallel=4).connect()
            served: list[str] = []
            failures: list[str] = []
            stop = asyncio.Event()

            async def traffic(streamed: bool) -> None:
                async with client(queen.base_url) as http:
                    while not stop.is_set():
                        response = await http.post("/v1/chat/completions", json={**CHAT, "stream": streamed})
                        if response.status_code != 200:
                            failures.append(response.text)
                            continue
                        served.append(answer_id(response, streamed=streamed))
                        await asyncio.sleep(0.01)

            async with client(queen.base_url) as http:
                tasks = [asyncio.create_task(traffic(streamed=n % 2 == 0)) for n in range(3)]
                await eventually(lambda: len(served) >= 10, timeout=30 * TIME_UNIT)
                await asyncio.to_thread(server.stop)
                before = len(served)
                await eventually(lambda: len(served) >= before + 20, timeout=30 * TIME_UNIT)
                health = (await http.get("/health")).json()
                admin = await http.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                metrics = (await http.get("/metrics")).text
                await asyncio.to_thread(server.start)
                after_restart = len(served)
                await eventually(lambda: len(served) >= after_restart + 10, timeout=30 * TIME_UNIT)
                stop.set()
                await asyncio.gather(*tasks)

                async def healthy() -> bool:
                    body = (await http.get("/health")).json()
                    return body["status"] == "ok" and body["ledger_spooled_rows"] == 0

                async with asyncio.timeout(60 * TIME_UNIT):
                    while not await healthy():  # noqa: ASYNC110 (a queen over HTTP has no event to wait on)
                        await asyncio.sleep(0.1)
                report = await http.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            await worker.close()
        recorded = usage_ids(url)
    assert failures == []
    assert health["status"] == "degraded"
    assert health["ledger_spooled_rows"] > 0
    spooled_metric = next(
        line for line in metrics.splitlines() if line.startswith("queenbee_ledger_spooled_rows ")
    )
    assert float(spooled_metric.split()[1]) > 0
    assert admin.status_code == 503
    assert admin.json()["error"]["code"] == "ledger_unavailable"
    assert len(recorded) == len(set(recorded))
    assert set(recorded) == set(served)
    assert report.status_code == 200
    assert report.json()["total"]["requests"] == len(served)


async def test_stores_and_escrow_on_postgres(postgres_url: str) -> None:
    """Files, jobs, events, stored responses and escrow holds work on PostgreSQL as on SQLite,
    owners kept apart (an open queen's owner is NULL)."""
    tuning = await TuningStore.open(postgres_url)
    try:
        for owner, name in ((None, "open.jsonl"), ("key-a", "a.jsonl")):
            await tuning.put_file(StoredFile(f"file-{name}", owner, 1000.5, name, "fine-tune", b"\x00{}\n"))
        stored = await tuning.get_file(None, "file-open.jsonl")
        assert stored is not None
        assert stored.content == b"\x00{}\n"
        assert await tuning.get_file("key-a", "file-open.jsonl") is None
        page = await tuning.list_files("key-a", purpose=None, limit=10, after=None, ascending=False)
        assert [item["id"] for item in page.data] == ["file-a.jsonl"]
        job = {"id": "ftjob-1", "created_at": 1000, "status": "queued"}
        await tuning.put_job(None, job)
        await tuning.put_job(None, {**job, "status": "running"})
        assert await tuning.jobs_with_status("running") == [(None, {**job, "status": "running"})]
        for n in range(3):
            await tuning.add_event("ftjob-1", {"id": f"ev-{n}", "message": str(n)})
        events = await tuning.list_events("ftjob-1", limit=2, after=None)
        assert ([event["id"] for event in events.data], events.has_more) == (["ev-2", "ev-1"], True)
        assert await tuning.delete_file(None, "file-open.jsonl")
        assert not await tuning.delete_file(None, "file-open.jsonl")
    finally:
        await tuning.close()
    responses = await ResponseStore.open(postgres_url, retention=3600)
    try:
        await responses.put(None, {"id": "resp-1", "output": []}, [{"role": "user"}], [])
        await responses.put(None, {"id": "resp-1", "output": [{"n": 2}]}, [{"role": "user"}], [])
        again = await responses.get(None, "resp-1")
        assert again is not None
        assert again.response["output"] == [{"n": 2}]
        assert await responses.get("key-a", "resp-1") is None
        assert await responses.delete(None, "resp-1")
    finally:
        await responses.close()
    with closing(connect(postgres_url)) as connection:
        insert(connection, record("before", 100.0, worker_prompt_tokens=7, worker_completion_tokens=11))
        with connection.transaction():
            assert escrow.open_hold(connection, "a@wallet", "worker-a", 200.0)
            assert not escrow.open_hold(connection, "a@wallet", "worker-a", 201.0)
        insert(connection, record("held", 300.0, worker_prompt_tokens=5, worker_completion_tokens=13))
        insert(connection, record("flagged", 310.0, worker_prompt_tokens=3, worker_completion_tokens=17))
        escrow.forfeit(connection, "flagged", "a@wallet", "flagged", 400.0)
        escrow.forfeit(connection, "flagged", "a@wallet", "again", 401.0)  # kept once
        [worker], _ = usage_totals(connection, None, None)
        assert (worker.payable, worker.escrowed, worker.forfeited) == (18, 18, 20)
        assert escrow.release_holds(connection, "worker-a", 500.0) == 1
        [worker], _ = usage_totals(connection, None, None)
        assert (worker.payable, worker.escrowed, worker.forfeited) == (36, 0, 20)


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [(0, 1.0, 1.0), (1, 1.0, 2.0), (3, 4.0, 8.0), (4, 8.0, 16.0), (5, 15.0, 30.0), (40, 15.0, 30.0)],
)
def test_reconnection_backs_off_exponentially_with_jitter_up_to_a_cap(
    failures: int, low: float, high: float
) -> None:
    """The wait doubles per failed reconnection from the replay interval, capped, drawn from the upper
    half of the range: both ends checked."""
    assert retry_delay(failures, 1.0, 30.0, uniform=lambda a, b: a) == low
    assert retry_delay(failures, 1.0, 30.0, uniform=lambda a, b: b) == high


async def test_a_lost_connection_is_opened_again_for_rows_audits_and_stores(tmp_path: Path) -> None:
    """A PostgreSQL restart: while it is down rows spool and an audit's write fails; once it is back the
    ledger reconnects by itself, replays, takes audits again, and the stores' next calls just work."""
    with running_postgres() as server:
        url = server.create_database()
        spool = tmp_path / "queen.spool"
        ledger = await Ledger.open(url, spool=spool, replay_interval=0.05, max_replay_interval=0.2)
        tuning = await TuningStore.open(url)
        try:
            await ledger.request_finished(record("before", 1000.0))
            await tuning.put_job(None, {"id": "ftjob-1", "created_at": 1, "status": "queued"})
            await asyncio.to_thread(server.stop)
            await ledger.request_finished(record("during", 1001.0))
            assert ledger.degraded
            assert ledger.spooled_rows == 1
            with pytest.raises(LedgerError):
                await ledger.write(lambda connection: escrow.open_hold(connection, "a@wallet", "w", 1.0))
            await asyncio.to_thread(server.start)
            await eventually(lambda: not ledger.degraded, timeout=30 * TIME_UNIT)
            assert await ledger.write(lambda connection: escrow.open_hold(connection, "a@wallet", "w", 2.0))
            await ledger.request_finished(record("after", 1002.0))
            assert await tuning.get_job(None, "ftjob-1") is not None  # its lost connection, replaced
        finally:
            await tuning.close()
            await ledger.close()
        assert usage_ids(url) == ["before", "during", "after"]
        assert not spool.exists()


def test_a_queen_refuses_to_start_on_an_unreachable_database(
    postgres: PostgresServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """`queenbee --db postgresql://...` with no such database exits 1 with one line, no password."""
    url = f"postgresql://postgres:s3cret-pw@127.0.0.1:{postgres.port}/no_such_database"
    assert main(["--db", url, "--port", "0"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("queenbee: error: --db:")
    assert "no_such_database" in error
    assert "s3cret-pw" not in error


async def test_files_and_stored_responses_through_the_sdk_on_postgres(
    postgres_url: str, tmp_path: Path
) -> None:
    """The openai SDK against a queen on PostgreSQL: a file uploaded, listed, read and deleted; a stored
    response retrieved and continued by previous_response_id; both kept in the database's tables."""
    with queen_on(postgres_url, tmp_path) as queen:
        worker = await FakeWorker(queen.worker_url).connect()
        async with openai.AsyncOpenAI(base_url=queen.openai_url, api_key=API_KEY, max_retries=0) as sdk:
            chats = (
                json.dumps(
                    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Ho"}]}
                )
                + "\n"
            ).encode()
            uploaded = await sdk.files.create(file=("chats.jsonl", chats), purpose="fine-tune")
            assert [file.id async for file in sdk.files.list()] == [uploaded.id]
            assert (await sdk.files.content(uploaded.id)).content == chats
            with psycopg.connect(postgres_url) as pg:
                assert pg.execute("SELECT filename, bytes FROM files").fetchall() == [
                    ("chats.jsonl", len(chats))
                ]
            assert (await sdk.files.delete(uploaded.id)).deleted
            first = await sdk.responses.create(model="fake-model", input="One")
            assert (await sdk.responses.retrieve(first.id)).output_text == first.output_text == "Hello there"
            second = await sdk.responses.create(
                model="fake-model", input="Two", previous_response_id=first.id
            )
            assert second.previous_response_id == first.id
        await worker.close()
    conversation = [(message.role, message.text()) for message in worker.jobs[1].request.body.messages]
    assert conversation == [("user", "One"), ("assistant", "Hello there"), ("user", "Two")]
    with psycopg.connect(postgres_url) as pg:
        assert sorted(row[0] for row in pg.execute("SELECT id FROM responses")) == sorted(
            [first.id, second.id]
        )
