"""The ledger on PostgreSQL beside the ledger on SQLite, in the same run: what a request pays for its row.

    python -m bench.ledger_backends [--records 2000] [--concurrency 64] [--postgres-url URL]

Both ledgers are durable the same way (SQLite: WAL, `synchronous=FULL`, a file in a temporary
directory; PostgreSQL: `synchronous_commit=on` on a throwaway server with fsync on, on the same disk,
over loopback TCP, unless `--postgres-url` names another). Figures, each with its ratio PostgreSQL /
SQLite:

- one at a time: `request_finished` latency, p50 and p99, the writer idle (one commit per record);
- together: records per second with `--concurrency` records in flight (group commits);
- outage: `request_finished` p50 while PostgreSQL is stopped (rows go to the spool, fsynced), and the
  rows per second the replay copies in once it is back.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.postgres import PostgresServer, running_postgres
from queenbee.ledger import Ledger
from queenbee.ledger_db import Target
from queenbee.observer import RequestRecord


def record() -> RequestRecord:
    """A finished request like the queen's, with a fresh id."""
    return RequestRecord(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        started_at=time.time(),
        path="/v1/chat/completions",
        model="bench-model",
        outcome="success",
        status=200,
        worker_id="worker-a",
        ln_url="a@wallet.example",
        api_key_id="bench",
        prompt_tokens=30,
        completion_tokens=200,
        attempts=1,
    )


def percentile(values: list[float], share: float) -> float:
    """The value below which `share` of `values` fall."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def one_at_a_time(ledger: Ledger, count: int) -> list[float]:
    """Seconds each of `count` records took to store, one after another."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        await ledger.request_finished(record())
        latencies.append(time.perf_counter() - started)
    return latencies


async def together(ledger: Ledger, count: int, concurrency: int) -> float:
    """Records per second with `concurrency` in flight."""
    remaining = count

    async def client() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await ledger.request_finished(record())

    started = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(concurrency):
            group.create_task(client())
    return count / (time.perf_counter() - started)


async def measure(target: Target, spool: Path, records: int, concurrency: int) -> dict[str, float]:
    """The one-at-a-time and together figures of one backend."""
    ledger = await Ledger.open(target, spool=spool)
    try:
        await one_at_a_time(ledger, 50)  # warm up
        latencies = await one_at_a_time(ledger, records)
        rate = await together(ledger, records * 2, concurrency)
    finally:
        await ledger.close()
    return {
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "records_per_s": rate,
    }


async def outage(server: PostgresServer, url: str, spool: Path, records: int) -> dict[str, float]:
    """Latency while the server is down (the spool), and the replay's rate once it is back."""
    ledger = await Ledger.open(url, spool=spool, replay_interval=0.05, max_replay_interval=0.05)
    try:
        await asyncio.to_thread(server.stop)
        latencies = await one_at_a_time(ledger, records)
        await asyncio.to_thread(server.start)
        started = time.perf_counter()
        while ledger.degraded:  # noqa: ASYNC110 (the ledger has no event for it)
            await asyncio.sleep(0.01)
        replay = records / (time.perf_counter() - started)
    finally:
        await ledger.close()
    return {"spooled_p50_ms": statistics.median(latencies) * 1000, "replayed_rows_per_s": replay}


@contextmanager
def postgres(url: str | None) -> Iterator[tuple[PostgresServer | None, str]]:
    """The server to measure: the one at `url`, or a throwaway durable one."""
    if url is not None:
        yield None, url
        return
    with running_postgres(durable=True) as server:
        yield server, server.create_database()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Every figure, PostgreSQL beside SQLite."""
    with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp, postgres(args.postgres_url) as pg:
        server, url = pg
        root = Path(tmp)
        sqlite = await measure(root / "ledger.db", root / "ledger.db.spool", args.records, args.concurrency)
        postgresql = await measure(url, root / "pg.spool", args.records, args.concurrency)
        result: dict[str, Any] = {
            "records": args.records,
            "concurrency": args.concurrency,
            "sqlite": sqlite,
            "postgresql": postgresql,
            "ratio_pg_over_sqlite": {name: postgresql[name] / sqlite[name] for name in sqlite},
        }
        if server is not None:
            result["outage"] = await outage(server, url, root / "outage.spool", args.records)
    return result


def main() -> None:
    """Run the bench and print its figures as JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=2000, help="Records per one-at-a-time run.")
    parser.add_argument("--concurrency", type=int, default=64, help="Records in flight in the together run.")
    parser.add_argument(
        "--postgres-url",
        help="A PostgreSQL database to measure (default: a throwaway server; no outage run).",
    )
    print(json.dumps(asyncio.run(main_async(parser.parse_args())), indent=2))


if __name__ == "__main__":
    main()
