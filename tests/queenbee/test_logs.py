"""Logs: one line per request, text or JSON lines, and never a prompt, completion, key or token."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import signal
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import websockets
from fake_worker import FakeWorker, answer
from queen_process import QueenProcess

from protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, ModelInfo, Register, encode
from queenbee.logs import JsonFormatter, NoPayloads

API_KEY = "sk-log-test-a1b2c3d4e5"
WRONG_KEY = "sk-log-test-wrong-f6g7h8"
WORKER_TOKEN = "wtok-log-test-9i8u7y"
WRONG_TOKEN = "wtok-log-test-wrong-5t4r"
ADMIN_KEY = "admin-log-test-3e2w1q"
PROMPT = "Tell me the secret recipe zx81-spectrum"
COMPLETION = "The secret recipe is qwerty-dvorak-42"
SECRETS = (API_KEY, WRONG_KEY, WORKER_TOKEN, WRONG_TOKEN, ADMIN_KEY, "zx81-spectrum", "qwerty-dvorak-42")


async def exercise(queen: QueenProcess) -> list[str]:
    """Drive a queen through everything that could leak; returns the ids of the requests that ran."""
    async with websockets.connect(queen.worker_url) as refused:
        intruder = Register(
            protocol_version=PROTOCOL_VERSION,
            instance_id="fake-" + uuid.uuid4().hex[:12],
            max_frame_bytes=MAX_FRAME_BYTES,
            worker_version="intruder",
            auth_key=WRONG_TOKEN,
            cpu_count=1,
            disk_space=1,
            vram=0,
            models=[ModelInfo(id="fake-model", n_ctx=512)],
        )
        await refused.send(encode(intruder))
        await asyncio.wait_for(refused.recv(), 10)  # the refusal, then the close
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(refused.recv(), 10)
    behaviour = functools.partial(answer, words=(COMPLETION,))
    worker = await FakeWorker(
        queen.worker_url, auth_key=WORKER_TOKEN, ln_url="payout@wallet.example", behaviour=behaviour
    ).connect()
    chat = {"model": "fake-model", "messages": [{"role": "user", "content": PROMPT}]}
    key = {"Authorization": f"Bearer {API_KEY}"}
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        whole = await client.post("/v1/chat/completions", json=chat, headers=key)
        streamed = await client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=key)
        invalid = await client.post("/v1/chat/completions", json={**chat, "temperature": 9}, headers=key)
        wrong = await client.post(
            "/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {WRONG_KEY}"}
        )
        usage = await client.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        not_admin = await client.get("/admin/usage", headers={"Authorization": f"Bearer {WRONG_KEY}"})
    await worker.close()
    assert [whole.status_code, streamed.status_code, invalid.status_code] == [200, 200, 400]
    assert COMPLETION in whole.text
    assert [wrong.status_code, usage.status_code, not_admin.status_code] == [401, 200, 401]
    stream_id = json.loads(streamed.text.split("\n\n")[0].removeprefix("data: "))["id"]
    return [whole.json()["id"], stream_id]


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_most_verbose_logs_hold_no_secrets(tmp_path: Path, log_format: str) -> None:
    """At TRACE (below DEBUG), the queen's whole log has one line per request and no secret in it."""
    options = ["--log-level", "trace", "--api-key", API_KEY, "--worker-token", WORKER_TOKEN]
    options += ["--admin-key", ADMIN_KEY, "--db", str(tmp_path / "ledger.db")]
    if log_format == "json":
        options.append("--log-json")
    queen = QueenProcess.start(tmp_path, *options)
    try:
        request_ids = await exercise(queen)
    finally:
        code = queen.stop()
    log = queen.log()
    # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
    assert code in {0, -signal.SIGTERM}, log
    for secret in SECRETS:
        assert secret not in log, f"the log holds {secret!r}"
    # The log was as verbose as it gets: uvicorn's ASGI message trace is in it.
    assert "ASGI [" in log
    assert "TRACE" in log
    assert "refused worker" in log
    if log_format == "json":
        entries = [json.loads(line) for line in log.splitlines() if line.strip()]
        assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
        lines = [entry["message"] for entry in entries if entry["logger"] == "queenbee.requests"]
    else:
        lines = [line for line in log.splitlines() if " queenbee.requests: " in line]
    for request_id in request_ids:
        [line] = [line for line in lines if f"request {request_id} " in line]
        for field in (
            "model=fake-model",
            "worker=worker-",
            "outcome=success",
            "completion_tokens=1",
            "ttft=",
        ):
            assert field in line, line


def test_json_formatter_writes_one_object_per_line() -> None:
    """Message, level, logger, UTC time, extra fields and exceptions, on one line."""
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord(
            "queenbee.test", logging.ERROR, __file__, 1, "hello %s", ("world",), sys.exc_info()
        )
    record.request_id = "chatcmpl-1"
    record.color_message = "\x1b[1mhello\x1b[0m"
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "hello world"
    assert (entry["level"], entry["logger"]) == ("ERROR", "queenbee.test")
    assert entry["time"].endswith("+00:00")
    assert entry["request_id"] == "chatcmpl-1"
    assert "ValueError: boom" in entry["exception"]
    assert "color_message" not in entry


def test_websockets_frame_dumps_are_dropped() -> None:
    """DEBUG records from the websockets library (frame dumps) are filtered; everything else passes."""
    import websockets.protocol

    dump = logging.LogRecord(
        "uvicorn.error", logging.DEBUG, websockets.protocol.__file__, 1, "< TEXT %s", ("x",), None
    )
    ours = logging.LogRecord("queenbee.app", logging.DEBUG, __file__, 1, "fine", None, None)
    warning = logging.LogRecord(
        "uvicorn.error", logging.WARNING, websockets.protocol.__file__, 1, "w", None, None
    )
    keep = NoPayloads()
    assert (keep.filter(dump), keep.filter(ours), keep.filter(warning)) == (False, True, True)
