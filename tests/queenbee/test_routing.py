"""The queen's HTTP edge and routing, against scripted workers over real websockets."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest
from fake_worker import FakeWorker, answer, content_chunk
from servers import QueenServer, eventually

from protocol import ChatJob, Chunk, ErrorCode, Job, Result, Usage

CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]}


def sse_payloads(body: str) -> list[Any]:
    """The data of every SSE event in a response body, JSON-decoded except [DONE]."""
    events = [block for block in body.split("\n\n") if block.strip()]
    payloads: list[Any] = []
    for event in events:
        assert event.startswith("data: "), event
        data = event[len("data: ") :]
        payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


async def test_non_streamed_answer_has_openai_shape(queen: QueenServer) -> None:
    """A plain request comes back as a chat.completion with the queen's id and the worker's usage."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await worker.close()
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "fake-model"
    assert body["choices"][0]["message"]["content"] == "Hello there"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    request = worker.jobs[0].request
    assert isinstance(request, ChatJob)
    assert request.body.model_dump(exclude_unset=True)["messages"] == CHAT["messages"]


async def test_stream_wire_format(queen: QueenServer) -> None:
    """SSE: role chunk first, content chunks, finish chunk, usage chunk when asked, then [DONE]."""
    worker = await FakeWorker(queen.worker_url).connect()
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json=request)
    await worker.close()
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = payloads[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert (
        "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "Hello there"
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "fake-model" for c in chunks)
    assert all("usage" in c for c in chunks)


async def test_stream_without_usage_option_has_no_usage_chunk(queen: QueenServer) -> None:
    """Without stream_options.include_usage no chunk carries usage."""
    worker = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await worker.close()
    chunks = sse_payloads(response.text)[:-1]
    assert all("usage" not in chunk for chunk in chunks)
    assert all(chunk["choices"] for chunk in chunks)


async def test_openai_sdk_streams_and_completes(queen: QueenServer) -> None:
    """The async openai SDK works unchanged against the queen, streamed and not."""
    worker = await FakeWorker(queen.worker_url).connect()
    client = openai.AsyncOpenAI(base_url=queen.openai_url, api_key="unused")
    whole = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}]
    )
    stream = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    await client.close()
    await worker.close()
    assert whole.choices[0].message.content == "Hello there"
    assert text == "Hello there"


@pytest.mark.parametrize(
    ("body", "param", "fragment"),
    [
        (b"{not json", None, "not valid JSON"),
        (b"[1, 2]", None, "JSON object"),
        (json.dumps({"messages": CHAT["messages"]}).encode(), "model", "model"),
        (json.dumps({"model": "fake-model", "messages": []}).encode(), "messages", "messages"),
        (json.dumps({**CHAT, "temperature": 5}).encode(), "temperature", "temperature"),
        (json.dumps({**CHAT, "frobnicate": True}).encode(), "frobnicate", "frobnicate"),
        (json.dumps({**CHAT, "stop": ["a", "b", "c", "d", "e"]}).encode(), "stop", "at most 4"),
        (
            json.dumps({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            "messages[0].role",
            "role",
        ),
    ],
)
async def test_bad_requests_are_400_with_openai_error(
    queen: QueenServer, body: bytes, param: str | None, fragment: str
) -> None:
    """Malformed JSON, invalid and unsupported fields: 400 (never 422 or 500) naming the parameter."""
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"]


async def test_unknown_model_is_404(queen: QueenServer) -> None:
    """A model nobody serves is a 404 with code model_not_found, which the SDK raises as NotFoundError."""
    worker = await FakeWorker(queen.worker_url).connect()
    client = openai.AsyncOpenAI(base_url=queen.openai_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as raised:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    await client.close()
    await worker.close()
    assert raised.value.code == "model_not_found"


async def test_busy_workers_give_503_with_retry_after(queen: QueenServer) -> None:
    """When the only worker is busy and the wait runs out, the client gets 503 with Retry-After."""
    release = asyncio.Event()

    async def slow(worker: FakeWorker, job: Job) -> None:
        await release.wait()
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=slow).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: bool(worker.jobs))
        second = await client.post("/v1/chat/completions", json=CHAT)
        release.set()
        assert (await first).status_code == 200
    await worker.close()
    assert second.status_code == 503
    assert second.headers["retry-after"].isdigit()
    assert second.json()["error"]["type"] == "service_unavailable"


async def test_waiting_request_gets_the_slot_when_it_frees(queen: QueenServer) -> None:
    """A request that finds every worker busy waits in line and runs when a slot frees."""
    release = asyncio.Event()

    async def first_slow(worker: FakeWorker, job: Job) -> None:
        if len(worker.jobs) == 1:
            await release.wait()
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=first_slow).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: bool(worker.jobs))
        second = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: queen.hive.queue_depth("fake-model") > 0)
        release.set()
        responses = await asyncio.gather(first, second)
    await worker.close()
    assert [response.status_code for response in responses] == [200, 200]
    assert len(worker.jobs) == 2


async def test_n_choices_hold_n_slots_of_the_worker(queen: QueenServer) -> None:
    """A request with n=2 on a two-slot worker holds both slots: a plain request waits for them."""
    release = asyncio.Event()

    async def first_slow(worker: FakeWorker, job: Job) -> None:
        if len(worker.jobs) == 1:
            await release.wait()
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, parallel=2, behaviour=first_slow).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        first = asyncio.create_task(client.post("/v1/chat/completions", json={**CHAT, "n": 2}))
        await eventually(lambda: bool(worker.jobs))
        [session] = queen.hive.workers.values()
        assert (session.in_flight, session.free_slots) == (2, 0)
        second = asyncio.create_task(client.post("/v1/chat/completions", json=CHAT))
        await eventually(lambda: queen.hive.queue_depth("fake-model") > 0)
        assert len(worker.jobs) == 1  # not sent to the worker whose slots the choices hold
        release.set()
        responses = await asyncio.gather(first, second)
    await worker.close()
    assert [response.status_code for response in responses] == [200, 200]
    assert len(worker.jobs) == 2


async def test_failure_before_first_token_is_retried_elsewhere(queen: QueenServer) -> None:
    """A worker that errors before answering is invisible to the client: another worker answers."""

    async def broken(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job)

    bad = await FakeWorker(queen.worker_url, behaviour=broken).connect()
    good = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        responses = [await client.post("/v1/chat/completions", json=CHAT) for _ in range(3)]
    await bad.close()
    await good.close()
    assert [response.status_code for response in responses] == [200, 200, 200]
    assert len(good.jobs) == 3
    assert bad.jobs  # it was tried, and failed over


async def test_disconnect_before_first_token_is_retried(queen: QueenServer) -> None:
    """A worker that drops its connection on receiving a job does not fail the request."""

    async def crash(worker: FakeWorker, job: Job) -> None:
        await worker.abort()

    doomed = await FakeWorker(queen.worker_url, behaviour=crash).connect()
    # Make sure the doomed worker is chosen first: it registered first and both are unmeasured.
    good = await FakeWorker(queen.worker_url).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await good.close()
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello there"
    assert len(doomed.jobs) + len(good.jobs) >= 1


async def test_disconnect_mid_stream_raises_in_the_sdk(queen: QueenServer) -> None:
    """A worker lost after the first token ends the stream with an error event the SDK raises on."""

    async def die_mid_stream(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("Hel")))
        await asyncio.sleep(0.05)
        await worker.abort()

    worker = await FakeWorker(queen.worker_url, behaviour=die_mid_stream).connect()
    client = openai.AsyncOpenAI(base_url=queen.openai_url, api_key="unused", max_retries=0)
    received: list[str] = []
    stream = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "hi"}], stream=True
    )

    async def read_all() -> None:
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")

    with pytest.raises(openai.APIError) as raised:
        await read_all()
    await client.close()
    assert "".join(received) == "Hel"
    assert "went away" in raised.value.message
    del worker


async def test_error_frame_mid_stream_ends_stream_with_error_then_done(queen: QueenServer) -> None:
    """On the wire, a failure after the first token is an error event followed by [DONE]."""

    async def fail_mid_stream(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        await worker.fail(job, message="out of memory")

    worker = await FakeWorker(queen.worker_url, behaviour=fail_mid_stream).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    await worker.close()
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    error = payloads[-2]["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert "out of memory" in error["message"]


async def test_client_error_from_worker_is_relayed_not_retried(queen: QueenServer) -> None:
    """A context-length error from the worker is the client's 400, and no other worker is tried."""

    async def too_long(worker: FakeWorker, job: Job) -> None:
        await worker.fail(job, code=ErrorCode.CONTEXT_LENGTH_EXCEEDED, message="too long")

    first = await FakeWorker(queen.worker_url, behaviour=too_long).connect()
    second = await FakeWorker(queen.worker_url, behaviour=too_long).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await first.close()
    await second.close()
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert len(first.jobs) + len(second.jobs) == 1


async def test_two_requests_run_at_once_on_two_workers(queen: QueenServer) -> None:
    """Two requests in flight at the same time land on two different workers."""
    both_started = asyncio.Event()
    started: list[str] = []

    async def wait_for_the_other(worker: FakeWorker, job: Job) -> None:
        started.append(worker.worker_id or "")
        if len(started) == 2:
            both_started.set()
        await asyncio.wait_for(both_started.wait(), 10)
        await answer(worker, job)

    one = await FakeWorker(queen.worker_url, behaviour=wait_for_the_other).connect()
    two = await FakeWorker(queen.worker_url, behaviour=wait_for_the_other).connect()
    async with httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client:
        responses = await asyncio.gather(
            client.post("/v1/chat/completions", json=CHAT), client.post("/v1/chat/completions", json=CHAT)
        )
    await one.close()
    await two.close()
    assert [response.status_code for response in responses] == [200, 200]
    assert sorted(started) == sorted([one.worker_id, two.worker_id])


async def test_closing_a_stream_cancels_it_on_the_worker(queen: QueenServer) -> None:
    """A client that closes its stream makes the queen send a cancel, and the slot frees."""

    async def endless(worker: FakeWorker, job: Job) -> None:
        await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("", role=True)))
        while not worker.cancelled.is_set():
            await worker.send(Chunk(request_id=job.request_id, chunk=content_chunk("la ")))
            await asyncio.sleep(0.01)
        await worker.fail(job, code=ErrorCode.CANCELLED, message="cancelled")

    worker = await FakeWorker(queen.worker_url, behaviour=endless).connect()
    async with (
        httpx.AsyncClient(base_url=queen.base_url, timeout=30) as client,
        client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response,
    ):
        async for line in response.aiter_lines():
            if "la " in line:
                break
    await asyncio.wait_for(worker.cancelled.wait(), 10)
    session = queen.hive.workers[worker.worker_id]
    await eventually(lambda: session.in_flight == 0)
    await worker.close()
    assert worker.cancels == [worker.jobs[0].request_id]


async def test_garbage_frames_do_not_break_the_connection(queen: QueenServer) -> None:
    """Invalid and unknown frames get a protocol error back; the worker keeps serving."""

    async def noisy(worker: FakeWorker, job: Job) -> None:
        await worker.send_raw("this is not json")
        await worker.send_raw(json.dumps({"type": "teleport", "request_id": job.request_id}))
        await worker.send_raw(json.dumps({"type": "chunk"}))
        await worker.send_raw(b"\x00\x01binary")
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=noisy).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await worker.close()
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello there"


async def test_models_and_health_list_connected_workers(queen: QueenServer) -> None:
    """GET /v1/models lists what connected workers serve; it empties when they leave."""
    worker = await FakeWorker(queen.worker_url, models=("alpha", "beta")).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        models = (await client.get("/v1/models")).json()
        health = (await client.get("/health")).json()
        await worker.close()
        await eventually(lambda: not queen.hive.models())
        after = (await client.get("/v1/models")).json()
    assert models["object"] == "list"
    assert [model["id"] for model in models["data"]] == ["alpha", "beta"]
    assert all(model["object"] == "model" for model in models["data"])
    assert health["status"] == "ok"
    assert health["workers"] == 1
    assert after["data"] == []


async def test_unknown_route_is_404_in_openai_shape(queen: QueenServer) -> None:
    """Even routing errors use OpenAI's error body."""
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.get("/v1/nothing-here")
    assert response.status_code == 404
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_result_for_unknown_request_is_ignored(queen: QueenServer) -> None:
    """A frame for a request the queen does not know is dropped without harm."""

    async def stray_then_answer(worker: FakeWorker, job: Job) -> None:
        usage = Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
        await worker.send(Result(request_id="chatcmpl-unknown", usage=usage, response={}))
        await answer(worker, job)

    worker = await FakeWorker(queen.worker_url, behaviour=stray_then_answer).connect()
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        response = await client.post("/v1/chat/completions", json=CHAT)
    await worker.close()
    assert response.status_code == 200
