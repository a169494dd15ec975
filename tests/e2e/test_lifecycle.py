"""Start, stop and restart: real worker and queen processes shut down cleanly and find each other again."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
import sys

import httpx
import openai
from fake_worker import FakeWorker, content_chunk
from servers import TIME_UNIT, QueenServer, eventually, start_worker, stop_process, wait_until
from test_spine import MESSAGES, MODEL_ID

from protocol import Chunk, Job, Result, Usage
from queenbee.settings import QueenSettings


def test_worker_finishes_its_stream_on_sigterm() -> None:
    """SIGTERM mid-stream: the worker completes the answer in full, leaves the hive, and exits 0."""
    queen = QueenServer(QueenSettings(queue_timeout=60, first_token_timeout=60)).start()
    worker = start_worker(queen.worker_url)
    try:
        wait_until(lambda: MODEL_ID in queen.hive.models() or worker.poll() is not None, timeout=120)
        client = openai.OpenAI(base_url=queen.openai_url, api_key="unused")
        stream = client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=60,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 3:
                worker.send_signal(signal.SIGTERM)
        code, stderr = stop_process(worker)
        wait_until(lambda: not queen.hive.workers)
    finally:
        if worker.poll() is None:
            worker.kill()
        queen.stop()
    assert code == 0, stderr
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 60
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_worker_reconnects_after_the_queen_restarts() -> None:
    """A worker that loses its queen keeps retrying and registers again with the queen that comes back."""
    first = QueenServer(QueenSettings()).start()
    port = first.port
    worker = start_worker(first.worker_url, "--reconnect-max-delay", "0.5")
    second: QueenServer | None = None
    try:
        wait_until(lambda: MODEL_ID in first.hive.models() or worker.poll() is not None, timeout=120)
        first.stop()
        second = QueenServer(QueenSettings(), port=port).start()
        wait_until(lambda: MODEL_ID in second.hive.models() or worker.poll() is not None, timeout=60)
        assert worker.poll() is None
        response = openai.OpenAI(base_url=second.openai_url, api_key="unused").chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
        )
    finally:
        code, stderr = stop_process(worker)
        if second is not None:
            second.stop()
    assert response.choices[0].message.content
    assert code == 0, stderr


async def test_queen_lets_streams_finish_on_sigterm() -> None:
    """SIGTERM on the queen: it stops taking requests, lets the stream in flight end, then exits 0."""
    queen = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "queenbee", "--host", "127.0.0.1", "--port", "0", "--shutdown-grace", "30"],
        stderr=asyncio.subprocess.PIPE,
    )
    assert queen.stderr is not None
    port = None
    while port is None:
        line = (await queen.stderr.readline()).decode()
        assert line, "the queen exited before it started"
        match = re.search(r"running on http://127\.0\.0\.1:(\d+)", line)
        port = int(match.group(1)) if match else None
    release = asyncio.Event()

    async def slow_stream(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("still ")))
        await release.wait()
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("here", finish_reason="stop")))
        await worker.send(
            Result(
                request_id=job.request_id, usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3)
            )
        )

    worker = await FakeWorker(f"ws://127.0.0.1:{port}/worker", behaviour=slow_stream).connect()
    text = ""
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30 * TIME_UNIT) as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ) as response,
    ):
        async for line in response.aiter_lines():
            if '"still "' in line:
                queen.send_signal(signal.SIGTERM)
                await eventually(lambda: _refuses_connections(port))
                release.set()
            if line.startswith("data: {"):
                text += _content(line)
    stderr = (await asyncio.wait_for(queen.stderr.read(), 30 * TIME_UNIT)).decode()
    code = await asyncio.wait_for(queen.wait(), 30 * TIME_UNIT)
    await worker.close()
    assert text == "still here"
    # uvicorn re-raises the signal after a clean shutdown, so supervisors see how it ended.
    assert code in {0, -signal.SIGTERM}
    assert "Traceback" not in stderr
    assert "Application shutdown complete" in stderr


def _refuses_connections(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) != 0


def _content(line: str) -> str:
    import json

    payload = json.loads(line[len("data: ") :])
    return "".join(choice["delta"].get("content") or "" for choice in payload.get("choices", []))
