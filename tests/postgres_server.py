"""A real PostgreSQL server for tests (bench/postgres.py, which the ledger bench uses too): a free
loopback port, a temporary directory, fsync off; run as the `postgres` user when the tests run as root.
If the binaries are missing, starting one fails with a message saying to run scripts/install."""

from bench.postgres import PostgresServer, running_postgres

__all__ = ["PostgresServer", "running_postgres"]
