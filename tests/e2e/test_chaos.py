"""Chaos: many concurrent streams across several real workers while one of them is SIGKILLed.

CI runs the short form; set CHAOS_STREAMS (and CHAOS_TOKENS) for a longer soak.
"""

from __future__ import annotations

import asyncio
import os
import signal

import openai
from servers import TIME_UNIT, QueenServer, eventually, start_worker, stop_process, wait_until
from test_spine import MESSAGES, MODEL_ID

from queenbee.settings import QueenSettings

STREAMS = int(os.environ.get("CHAOS_STREAMS", "9"))
TOKENS = int(os.environ.get("CHAOS_TOKENS", "24"))
WORKERS = 3


async def test_killing_a_worker_mid_stream_loses_no_request() -> None:
    """Every stream ends (in full, or with an error only if its worker died under it); survivors serve on."""
    queen = QueenServer(QueenSettings(queue_timeout=120, first_token_timeout=60, token_timeout=30)).start()
    workers = [
        start_worker(queen.worker_url, "--ln-url", f"bee{index}@example.com") for index in range(WORKERS)
    ]
    client = openai.AsyncOpenAI(base_url=queen.openai_url, api_key="unused", max_retries=0, timeout=120)
    try:
        await asyncio.to_thread(
            wait_until,
            lambda: len(queen.hive.workers) == WORKERS or any(w.poll() is not None for w in workers),
            120,
        )
        assert all(worker.poll() is None for worker in workers)

        async def one_stream(index: int) -> tuple[str, int]:
            stream = await client.chat.completions.create(
                model=MODEL_ID,
                messages=MESSAGES,  # type: ignore[arg-type]
                max_tokens=TOKENS,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            completion_tokens = -1
            try:
                async for chunk in stream:
                    if chunk.usage is not None:
                        completion_tokens = chunk.usage.completion_tokens
            except openai.APIError as exc:
                return f"error: {exc.message}", completion_tokens
            return "ok", completion_tokens

        tasks = [asyncio.create_task(one_stream(index)) for index in range(STREAMS)]
        # Kill a worker while it is in the middle of a request.
        await eventually(lambda: any(w.in_flight for w in queen.hive.workers.values()), timeout=60)
        victim_session = next(w for w in queen.hive.workers.values() if w.in_flight)
        victim_index = int(victim_session.registration.ln_url.removeprefix("bee").split("@")[0])
        workers[victim_index].send_signal(signal.SIGKILL)
        async with asyncio.timeout(300 * TIME_UNIT):  # nothing may hang
            outcomes = await asyncio.gather(*tasks)
        await eventually(lambda: len(queen.hive.workers) == WORKERS - 1, timeout=30)
        after = await client.chat.completions.create(
            model=MODEL_ID,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=4,
        )
    finally:
        await client.close()
        codes = [stop_process(worker)[0] for worker in workers]
        queen.stop()
    succeeded = [tokens for outcome, tokens in outcomes if outcome == "ok"]
    failed = [outcome for outcome, _ in outcomes if outcome != "ok"]
    assert all(tokens == TOKENS for tokens in succeeded), "every finished stream is complete"
    assert len(failed) <= 1, "only the stream under way on the killed worker may fail"
    assert all("went away" in outcome for outcome in failed)
    assert len(succeeded) >= STREAMS - 1
    assert after.choices[0].message.content
    assert codes.count(-signal.SIGKILL) == 1
    assert codes.count(0) == WORKERS - 1
