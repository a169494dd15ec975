"""Access control: client API keys, worker tokens, per-key rate limits."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import websockets
from fake_worker import FakeWorker
from servers import QueenServer, running

from protocol import (
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    ErrorCode,
    ModelInfo,
    ProtocolError,
    Register,
    decode_queen_frame,
    encode,
)
from queenbee.auth import (
    ApiKey,
    ClientKeys,
    KeysFileError,
    Secrets,
    key_id,
    parse_keys_file,
    warn_if_exposed,
)
from queenbee.errors import RateLimited
from queenbee.ratelimit import Limits, RateLimiter
from queenbee.settings import QueenSettings
from workerbee.connection import QueenRefused, WorkerConnection

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}
KEY = "sk-auth-test-one"
OTHER_KEY = "sk-auth-test-two"
WORKER_TOKEN = "worker-token-auth-test"


@pytest.fixture
def queen_settings(tmp_path: Path) -> QueenSettings:
    """A queen with two client keys and a worker token."""
    return QueenSettings(
        queue_timeout=2.0, db=tmp_path / "ledger.db", api_key=[KEY, OTHER_KEY], worker_token=WORKER_TOKEN
    )


def bearer(key: str) -> dict[str, str]:
    """The Authorization header for `key`."""
    return {"Authorization": f"Bearer {key}"}


def registration(auth_key: str) -> Register:
    """A minimal worker registration presenting `auth_key`."""
    return Register(
        protocol_version=PROTOCOL_VERSION,
        instance_id="fake-" + uuid.uuid4().hex[:12],
        max_frame_bytes=MAX_FRAME_BYTES,
        worker_version="test",
        auth_key=auth_key,
        cpu_count=1,
        disk_space=1,
        vram=0,
        models=[ModelInfo(id="fake-model", n_ctx=512)],
    )


@pytest.mark.parametrize(
    "headers",
    [
        {},
        bearer("sk-wrong"),
        {"Authorization": KEY},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer"},
    ],
)
async def test_missing_or_wrong_key_is_401(queen: QueenServer, headers: dict[str, str]) -> None:
    """No key, a wrong key or a malformed header: 401 in OpenAI's shape, and the worker sees nothing."""
    worker = await FakeWorker(queen.worker_url, auth_key=WORKER_TOKEN).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    await worker.close()
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
    assert "sk-wrong" not in error["message"]
    assert worker.jobs == []


async def test_sdk_with_and_without_the_key(queen: QueenServer) -> None:
    """The SDK raises AuthenticationError for a bad key, and works with either configured key."""
    worker = await FakeWorker(queen.worker_url, auth_key=WORKER_TOKEN).connect()
    messages: Any = CHAT["messages"]
    bad = openai.AsyncOpenAI(base_url=queen.openai_url, api_key="sk-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await bad.chat.completions.create(model="fake-model", messages=messages)
    answers = []
    for key in (KEY, OTHER_KEY):
        good = openai.AsyncOpenAI(base_url=queen.openai_url, api_key=key, max_retries=0)
        answers.append(await good.chat.completions.create(model="fake-model", messages=messages))
        await good.close()
    await bad.close()
    await worker.close()
    assert [answer.choices[0].message.content for answer in answers] == ["Hello there"] * 2


async def test_models_need_a_key_but_health_and_metrics_do_not(queen: QueenServer) -> None:
    """/v1/models is an OpenAI route like the others; /health and /metrics stay open."""
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/v1/models", headers=bearer(KEY))).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


def test_keys_file_gives_names_and_limits() -> None:
    """Keys file lines: KEY, or NAME KEY with optional limits; comments and blank lines are skipped."""
    keys = parse_keys_file("# team keys\n\nsk-anonymous\nalice sk-alice rpm=5\nbob sk-bob tpm=100 rpm=2\n")
    assert [(key.id, key.rpm, key.tpm) for key in keys] == [
        (key_id("sk-anonymous"), None, None),
        ("alice", 5, None),
        ("bob", 2, 100),
    ]
    assert key_id("sk-anonymous").startswith("key-")
    assert "sk-alice" not in repr(keys)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("alice sk-secret-1 extra-token\n", "line 1"),
        ("ok sk-fine\nalice sk-secret-1 rpm=zero\n", "line 2"),
        ("al!ce sk-secret-1\n", "name"),
    ],
)
def test_keys_file_errors_name_the_line_not_the_secret(text: str, fragment: str) -> None:
    """A malformed line is reported by number, and the error never repeats what the line holds."""
    with pytest.raises(KeysFileError) as raised:
        parse_keys_file(text)
    assert fragment in str(raised.value)
    assert "sk-secret-1" not in str(raised.value)


def test_duplicate_keys_are_refused() -> None:
    """The same secret twice, or two keys with one name, is a configuration error."""
    with pytest.raises(KeysFileError):
        ClientKeys(parse_keys_file("a sk-same\nb sk-same\n"))
    with pytest.raises(KeysFileError):
        ClientKeys(parse_keys_file("a sk-one\na sk-two\n"))


def test_unreadable_keys_file_stops_the_queen(tmp_path: Path) -> None:
    """`queenbee --api-keys-file MISSING` exits 2 with one line naming the option."""
    done = subprocess.run(
        [sys.executable, "-m", "queenbee", "--api-keys-file", str(tmp_path / "missing.txt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("queenbee: error: --api-keys-file: cannot read")


def test_open_queen_on_the_network_warns(caplog: pytest.LogCaptureFixture) -> None:
    """No keys and no worker token on a non-loopback address: loud warnings; on loopback, none."""
    caplog.set_level(logging.WARNING, logger="queenbee.auth")
    warn_if_exposed(QueenSettings(host="0.0.0.0"), ClientKeys([]), Secrets())
    exposed = [record.getMessage() for record in caplog.records]
    caplog.clear()
    warn_if_exposed(QueenSettings(host="127.0.0.1"), ClientKeys([]), Secrets())
    warn_if_exposed(QueenSettings(host="::1"), ClientKeys([]), Secrets())
    locked = QueenSettings(host="0.0.0.0", worker_token="t", stats_key="s")
    warn_if_exposed(locked, ClientKeys([ApiKey("a", b"digest")]), Secrets.from_settings(locked))
    assert any("NO API KEYS" in message for message in exposed)
    assert any("NO WORKER TOKEN" in message for message in exposed)
    assert caplog.records == []


def test_queen_warns_at_startup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The warning comes from the queen's startup itself."""
    caplog.set_level(logging.WARNING, logger="queenbee.auth")
    with running(tmp_path, host="0.0.0.0"):
        pass
    assert any("NO API KEYS" in record.getMessage() for record in caplog.records)


async def test_worker_with_a_wrong_or_missing_token_is_refused(queen: QueenServer) -> None:
    """The queen answers a bad token with an UNAUTHORIZED frame and closes with 1008 and a reason."""
    for token, says in (("not-the-token", "wrong"), ("", "--auth-key")):
        async with websockets.connect(queen.worker_url) as websocket:
            await websocket.send(encode(registration(token)))
            reply = decode_queen_frame(await asyncio.wait_for(websocket.recv(), 10))
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(websocket.recv(), 10)
        assert isinstance(reply, ProtocolError)
        assert reply.code is ErrorCode.UNAUTHORIZED
        assert says in reply.message
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008
        assert closed.value.rcvd.reason.startswith("unauthorized")
    assert queen.hive.workers == {}


async def test_worker_with_the_token_is_welcomed(queen: QueenServer) -> None:
    """The right token registers the worker."""
    worker = await FakeWorker(queen.worker_url, auth_key=WORKER_TOKEN).connect()
    assert worker.worker_id in queen.hive.workers
    await worker.close()


async def test_refused_workerbee_stops_without_retrying(queen: QueenServer) -> None:
    """A real worker connection refused for its token raises QueenRefused after one attempt."""
    attempts = 0

    def wrong_token() -> Register:
        nonlocal attempts
        attempts += 1
        return registration("not-the-token")

    # A tiny backoff: if the worker retried, it would do so many times within the wait below.
    connection = WorkerConnection(queen.worker_url, object(), wrong_token, reconnect_max_delay=0.01)
    with pytest.raises(QueenRefused, match="worker token"):
        await asyncio.wait_for(connection.run(asyncio.Event()), 10)
    assert attempts == 1


async def test_requests_per_minute_limit(tmp_path: Path) -> None:
    """Past its RPM a key gets 429 with Retry-After in OpenAI's shape; other keys are unaffected."""
    with running(tmp_path, api_key=[KEY, OTHER_KEY], rate_limit_rpm=2) as queen:
        worker = await FakeWorker(queen.worker_url).connect()
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            allowed = [
                await client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY)) for _ in "ab"
            ]
            limited = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY))
            other = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(OTHER_KEY))
        sdk = openai.AsyncOpenAI(base_url=queen.openai_url, api_key=KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            await sdk.chat.completions.create(model="fake-model", messages=CHAT["messages"])
        await sdk.close()
        await worker.close()
    assert [response.status_code for response in allowed] == [200, 200]
    assert limited.status_code == 429
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    error = limited.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert other.status_code == 200
    assert len(worker.jobs) == 3


async def test_tokens_per_minute_limit_with_per_key_override(tmp_path: Path) -> None:
    """A key from the keys file with its own TPM is stopped once its usage reaches it; others are not."""
    keys = tmp_path / "keys.txt"
    keys.write_text(f"small {KEY} tpm=5\nlarge {OTHER_KEY}\n")
    with running(tmp_path, api_keys_file=keys, rate_limit_tpm=1000) as queen:
        worker = await FakeWorker(queen.worker_url).connect()
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            first = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY))
            second = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(KEY))
            other = await client.post("/v1/chat/completions", json=CHAT, headers=bearer(OTHER_KEY))
        await worker.close()
    assert first.status_code == 200
    assert first.json()["usage"]["total_tokens"] == 5
    assert second.status_code == 429
    assert second.json()["error"]["type"] == "tokens"
    assert second.headers["retry-after"].isdigit()
    assert other.status_code == 200


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_rate_limit_window_slides() -> None:
    """A limited key is admitted again once its oldest request leaves the minute, as Retry-After said."""
    clock = Clock()
    limiter = RateLimiter(Limits(rpm=2), clock=clock)
    key = ApiKey("k", b"digest")
    limiter.admit(key)
    clock.now += 20
    limiter.admit(key)
    with pytest.raises(RateLimited) as raised:
        limiter.admit(key)
    assert raised.value.retry_after == 40
    clock.now += 40
    limiter.admit(key)
    with pytest.raises(RateLimited):
        limiter.admit(key)


async def test_token_limit_waits_for_usage_to_leave_the_window() -> None:
    """Over its TPM a key waits until enough of its tokens are older than a minute."""
    clock = Clock()
    limiter = RateLimiter(Limits(tpm=100), {"k": Limits(tpm=100)}, clock=clock)
    key = ApiKey("k", b"digest")

    limiter.admit(key).settle(60)
    clock.now += 30
    limiter.admit(key).settle(50)
    with pytest.raises(RateLimited) as raised:
        limiter.admit(key)
    assert raised.value.type == "tokens"
    assert raised.value.retry_after == 30
    clock.now += 30
    limiter.admit(key)
