"""Stored Responses API responses: what `store` keeps, so that `previous_response_id` can continue them.

Rows live in the ledger's database (a SQLite file or PostgreSQL; `responses`, made by the ledger's
migration 3), one per response: its owner (the API key id, or None on an open queen), the response
object, the input items of its request, and the conversation before them (`history`), so that
continuing a response needs one read. A response belongs to its key: another key is told it does not
exist. Rows older than the retention are deleted as new ones are stored, and never read back.

The database blocks, so every call runs on the store's own thread, never on the event loop; a
PostgreSQL connection found lost is opened again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from queenbee.ledger import connect
from queenbee.ledger_db import Database, Reconnecting, Target

T = TypeVar("T")


@dataclass(frozen=True)
class StoredResponse:
    """One stored response and the conversation it was made from."""

    id: str
    response: dict[str, Any]
    input_items: list[dict[str, Any]]
    history: list[dict[str, Any]]
    """The items before this response's input, oldest first (what previous_response_id carried)."""

    def conversation(self) -> list[dict[str, Any]]:
        """Every item up to and including this response's output: the history of the next turn."""
        return [*self.history, *self.input_items, *self.response.get("output", [])]


class ResponseStore:
    """The `responses` table of the queen's database, used from a thread of its own."""

    def __init__(self, path: Target, retention: float) -> None:
        self.path = path
        self.retention = retention
        """Seconds a stored response is kept."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="response-store")
        self._connection = Reconnecting(path, connect)
        self._closed = False

    @classmethod
    async def open(cls, path: Target, retention: float) -> ResponseStore:
        """Open the store in the (already migrated) database at `path`."""
        store = cls(path, retention)
        await store._run(store._open)
        return store

    async def close(self) -> None:
        """Close the connection and the thread."""
        await self._run(self._close)
        self._executor.shutdown(wait=True)

    async def put(
        self,
        owner: str | None,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        history: list[dict[str, Any]],
    ) -> None:
        """Store a response (replacing one with its id), and forget the expired ones."""
        await self._run(lambda: self._put(owner, response, input_items, history))

    async def get(self, owner: str | None, response_id: str) -> StoredResponse | None:
        """The response `response_id` if `owner` stored it and it has not expired, else None."""
        return await self._run(lambda: self._get(owner, response_id))

    async def delete(self, owner: str | None, response_id: str) -> bool:
        """Delete `owner`'s response `response_id`; whether there was one."""
        return await self._run(lambda: self._delete(owner, response_id))

    async def _run(self, function: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, lambda: self._connection.run(function)
        )

    def _open(self) -> None:
        self._connection.open()

    def _close(self) -> None:
        self._closed = True
        self._connection.close()

    def _require(self) -> Database:
        if self._closed:
            raise RuntimeError("the response store is closed")
        return self._connection.get()

    def _put(
        self,
        owner: str | None,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        history: list[dict[str, Any]],
    ) -> None:
        now = time.time()
        with self._require().transaction() as connection:
            connection.execute("DELETE FROM responses WHERE created_at < ?", (now - self.retention,))
            connection.execute(
                "INSERT INTO responses (id, owner, created_at, response, input_items, history) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner, "
                "created_at = excluded.created_at, response = excluded.response, "
                "input_items = excluded.input_items, history = excluded.history",
                (
                    response["id"],
                    owner,
                    now,
                    json.dumps(response, ensure_ascii=False),
                    json.dumps(input_items, ensure_ascii=False),
                    json.dumps(history, ensure_ascii=False),
                ),
            )

    def _get(self, owner: str | None, response_id: str) -> StoredResponse | None:
        row = (
            self._require()
            .execute(
                "SELECT response, input_items, history FROM responses "
                "WHERE id = ? AND owner IS NOT DISTINCT FROM ? AND created_at >= ?",
                (response_id, owner, time.time() - self.retention),
            )
            .fetchone()
        )
        if row is None:
            return None
        return StoredResponse(response_id, json.loads(row[0]), json.loads(row[1]), json.loads(row[2]))

    def _delete(self, owner: str | None, response_id: str) -> bool:
        cursor = self._require().execute(
            "DELETE FROM responses WHERE id = ? AND owner IS NOT DISTINCT FROM ?", (response_id, owner)
        )
        return cursor.rowcount > 0
