"""Finished requests as the ledger's tests write them, with defaults for what a test does not care about."""

from __future__ import annotations

from typing import Any

from queenbee.observer import RequestRecord

DEFAULTS: dict[str, Any] = {
    "path": "/v1/chat/completions",
    "model": "m",
    "outcome": "success",
    "status": 200,
    "worker_id": "worker-a",
    "ln_url": "a@wallet",
    "api_key_id": "alice",
    "prompt_tokens": 10,
    "completion_tokens": 5,
    "attempts": 1,
}


def record(request_id: str, started_at: float, **fields: Any) -> RequestRecord:
    """A finished request: DEFAULTS, with `fields` in their place."""
    return RequestRecord(request_id=request_id, started_at=started_at, **{**DEFAULTS, **fields})
