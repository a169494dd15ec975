"""The queen facing the internet: Origin and Host checks, secrets from files, the stats key, warnings."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import websockets
from fake_worker import FakeWorker
from servers import TIME_UNIT, running

from protocol import ErrorCode, ProtocolError, Welcome, decode_queen_frame, encode
from queenbee.app import create_app
from queenbee.auth import ClientKeys, Secrets, warn_if_exposed
from queenbee.http_limits import HostPatternError
from queenbee.settings import QueenSettings

WORKER_TOKEN = "edge-worker-token"
ADMIN_KEY = "edge-admin-key"
STATS_KEY = "edge-stats-key"
ERROR_FIELDS = {"message", "type", "param", "code"}


def secret_file(tmp_path: Path, name: str, secret: str) -> Path:
    """A file whose first line is `secret`, padded the way editors and `echo` leave files."""
    path = tmp_path / name
    path.write_text(f"  {secret}  \nsecond line, ignored\n", encoding="utf-8")
    return path


def raw_upgrade(port: int, host: str) -> bytes:
    """Ask for a /worker websocket with `host` in the Host header; the queen's answer, body included."""
    request = (
        f"GET /worker HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", port), timeout=10 * TIME_UNIT) as sock:
        sock.sendall(request.encode())
        answer = b""
        while b"\r\n\r\n" not in answer and (data := sock.recv(4096)):
            answer += data
        head, _, body = answer.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length and (data := sock.recv(4096)):
            body += data
    return head + b"\r\n\r\n" + body


async def test_only_listed_browser_origins_may_open_the_worker_socket(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A foreign Origin gets 403 before any registration and one log line; none or a listed one registers."""
    caplog.set_level(logging.WARNING, logger="queenbee.workers")
    with running(tmp_path, worker_origin=["https://hive.example"]) as queen:
        with pytest.raises(websockets.InvalidStatus) as refused:
            await websockets.connect(queen.worker_url, origin=websockets.Origin("https://evil.example"))
        workerbee_like = await FakeWorker(queen.worker_url).connect()
        async with websockets.connect(
            queen.worker_url, origin=websockets.Origin("https://hive.example")
        ) as listed:
            await listed.send(encode(FakeWorker(queen.worker_url).registration()))
            welcome = decode_queen_frame(await asyncio.wait_for(listed.recv(), 10 * TIME_UNIT))
        await workerbee_like.close()
    assert refused.value.response.status_code == 403
    assert isinstance(welcome, Welcome)
    [line] = [record.getMessage() for record in caplog.records if "Origin" in record.getMessage()]
    assert "https://evil.example" in line


async def test_other_host_headers_are_refused_in_openai_shape(tmp_path: Path) -> None:
    """With --allowed-host, another Host (DNS rebinding) gets a JSON 400, over HTTP and websocket alike."""
    with running(tmp_path, allowed_host=["queen.example", "*.hive.example"]) as queen:
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            rebound = await client.get("/v1/models", headers={"Host": "evil.example"})
            named = await client.get("/v1/models", headers={"Host": "queen.example:8000"})
            sub = await client.get("/health", headers={"Host": "a.hive.example"})
        upgrade = raw_upgrade(queen.port, "evil.example")
        allowed_upgrade = raw_upgrade(queen.port, "queen.example")
    assert rebound.status_code == 400
    assert set(rebound.json()["error"]) == ERROR_FIELDS
    assert rebound.json()["error"]["code"] == "invalid_host"
    assert (named.status_code, sub.status_code) == (200, 200)
    assert upgrade.startswith(b"HTTP/1.1 400")
    assert b'"invalid_host"' in upgrade
    assert allowed_upgrade.startswith(b"HTTP/1.1 101")


def test_a_host_pattern_that_cannot_match_is_a_startup_error(tmp_path: Path) -> None:
    """A wildcard anywhere but a leading '*.' stops the queen before it serves, naming the option."""
    with pytest.raises(HostPatternError, match="--allowed-host"):
        create_app(QueenSettings(db=tmp_path / "ledger.db", allowed_host=["queen*.example"]))


async def test_secrets_come_from_their_files(tmp_path: Path) -> None:
    """Worker token, admin key and stats key are each read from the first line of their file."""
    files = {
        "worker_token_file": secret_file(tmp_path, "worker-token", WORKER_TOKEN),
        "admin_key_file": secret_file(tmp_path, "admin-key", ADMIN_KEY),
        "stats_key_file": secret_file(tmp_path, "stats-key", STATS_KEY),
    }
    with running(tmp_path, **files) as queen:
        async with websockets.connect(queen.worker_url) as tokenless:
            await tokenless.send(encode(FakeWorker(queen.worker_url).registration()))
            refusal = decode_queen_frame(await asyncio.wait_for(tokenless.recv(), 10 * TIME_UNIT))
        worker = await FakeWorker(queen.worker_url, auth_key=WORKER_TOKEN).connect()
        async with httpx.AsyncClient(base_url=queen.base_url) as client:
            usage = await client.get("/admin/usage", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            stats = await client.get("/stats", headers={"Authorization": f"Bearer {STATS_KEY}"})
            anonymous = await client.get("/stats")
        await worker.close()
    assert isinstance(refusal, ProtocolError)
    assert refusal.code is ErrorCode.UNAUTHORIZED
    assert worker.worker_id is not None
    assert (usage.status_code, stats.status_code, anonymous.status_code) == (200, 200, 401)


@pytest.mark.parametrize(
    ("args", "env", "option"),
    [
        (["--worker-token-file", "{missing}"], {}, "--worker-token-file"),
        (["--stats-key-file", "{empty}"], {}, "--stats-key-file"),
        ([], {"QUEENBEE_ADMIN_KEY_FILE": "{missing}"}, "--admin-key-file"),
        (["--admin-key", "sk-on-the-command-line", "--admin-key-file", "{secret}"], {}, "--admin-key-file"),
    ],
    ids=["missing", "empty", "from-environment", "key-and-file"],
)
def test_unusable_secret_stops_the_queen_naming_the_option_not_the_secret(
    tmp_path: Path, args: list[str], env: dict[str, str], option: str
) -> None:
    """A missing or empty secret file, or a secret given twice: exit 2, one line naming the option."""
    (tmp_path / "empty").write_text("\n  \n", encoding="utf-8")
    secret = secret_file(tmp_path, "secret", "sk-in-the-file")
    paths = {"missing": str(tmp_path / "missing"), "empty": str(tmp_path / "empty"), "secret": str(secret)}
    done = subprocess.run(
        [sys.executable, "-m", "queenbee", "--db", str(tmp_path / "ledger.db")]
        + [arg.format(**paths) for arg in args],
        capture_output=True,
        text=True,
        timeout=60 * TIME_UNIT,
        env={**os.environ, **{name: value.format(**paths) for name, value in env.items()}},
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"queenbee: error: {option}: ")
    assert len(done.stderr.strip().splitlines()) == 1
    assert "sk-on-the-command-line" not in done.stderr
    assert "sk-in-the-file" not in done.stderr


async def test_stats_key_guards_stats_metrics_workers_and_the_dashboard(tmp_path: Path) -> None:
    """With --stats-key, the four need it (or the admin key) as a bearer; the page also takes ?key=."""
    guarded = ("/stats", "/metrics", "/v1/workers", "/")
    with running(tmp_path, stats_key=STATS_KEY, admin_key=ADMIN_KEY) as queen:
        async with httpx.AsyncClient(base_url=queen.base_url) as client:

            async def statuses(headers: dict[str, str]) -> list[int]:
                return [(await client.get(path, headers=headers)).status_code for path in guarded]

            anonymous = [await client.get(path) for path in guarded]
            wrong = await statuses({"Authorization": "Bearer not-the-key"})
            with_stats_key = await statuses({"Authorization": f"Bearer {STATS_KEY}"})
            with_admin_key = await statuses({"Authorization": f"Bearer {ADMIN_KEY}"})
            page_by_address = await client.get("/", params={"key": STATS_KEY})
            json_by_address = await client.get("/stats", params={"key": STATS_KEY})
            health = await client.get("/health")
    assert [response.status_code for response in anonymous] == [401] * 4
    assert all(set(response.json()["error"]) == ERROR_FIELDS for response in anonymous)
    assert wrong == [401] * 4
    assert with_stats_key == [200] * 4
    assert with_admin_key == [200] * 4
    assert page_by_address.status_code == 200
    assert page_by_address.headers["referrer-policy"] == "no-referrer"
    assert json_by_address.status_code == 401
    assert health.status_code == 200


def test_startup_warnings_consider_the_token_file_and_the_stats_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On the network, a token file silences NO WORKER TOKEN; no stats key warns that stats are public."""
    caplog.set_level(logging.WARNING, logger="queenbee.auth")
    token_file = secret_file(tmp_path, "worker-token", WORKER_TOKEN)
    exposed_stats = QueenSettings(host="0.0.0.0", worker_token_file=token_file)
    warn_if_exposed(exposed_stats, ClientKeys([]), Secrets.from_settings(exposed_stats))
    first = [record.getMessage() for record in caplog.records]
    caplog.clear()
    locked = QueenSettings(host="0.0.0.0", worker_token_file=token_file, stats_key=STATS_KEY)
    warn_if_exposed(locked, ClientKeys([]), Secrets.from_settings(locked))
    second = [record.getMessage() for record in caplog.records]
    assert not any("NO WORKER TOKEN" in message for message in first)
    [stats_warning] = [message for message in first if "NO STATS KEY" in message]
    for endpoint in ("/stats", "/metrics", "/v1/workers", "dashboard"):
        assert endpoint in stats_warning
    assert not any("NO STATS KEY" in message for message in second)
