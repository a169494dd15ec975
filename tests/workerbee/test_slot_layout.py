"""Where sequences sit in the KV cache: each step's batch in sequence-id order, busy slots kept together.

With a stream per sequence, llama.cpp decodes a batch as micro-batches of consecutive sequence ids, each
a pass of its own over the weights: 8 generating tokens in admission order [3, 0, 5, ...] take several
passes (about 1.2x the time of one on this machine), and 4 sequences in slots 0, 2, 4, 6 take four. The
recorder below reads every batch the scheduler decodes, on the real model.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from servers import smollm2_path

from protocol.openai import ChatCompletionRequest
from workerbee import scheduler
from workerbee.batching import BatchedModel
from workerbee.llama_context import TokenBatch
from workerbee.prompts import ModelConfig

CONFIG = ModelConfig(id="smol", path=smollm2_path(), n_ctx=512)
# Each starts with a word of its own, so that a request shares with another slot only the chat template.
TOPICS = [
    "Apples grow in orchards on hills, and pickers climb ladders to reach the highest branches in autumn.",
    "Bridges carry trains across wide rivers, and engineers inspect their steel beams every single spring.",
    "Candles burned in every window of the old house on the night the storm cut the power to the town.",
    "Dolphins swim beside the ferry each morning, and the children on deck count them as they leap.",
]
OTHER = "Echoes of a bell rang through the valley."


def chat(text: str, **fields: Any) -> ChatCompletionRequest:
    """A greedy request that generates exactly `max_tokens`."""
    body = {"model": "smol", "messages": [{"role": "user", "content": text}], "temperature": 0}
    return ChatCompletionRequest.model_validate({"max_tokens": 4, "ignore_eos": True, **body, **fields})


class Recorder:
    """Every batch decoded, as (sequence id, position, token) per token, in batch order."""

    def __init__(self, backend: BatchedModel, monkeypatch: pytest.MonkeyPatch) -> None:
        self.batches: list[list[tuple[int, int, int]]] = []
        context = backend.scheduler.context
        decode = context.decode

        def recording(batch: TokenBatch) -> None:
            raw = batch.raw
            self.batches.append([(raw.seq_id[i][0], raw.pos[i], raw.token[i]) for i in range(len(batch))])
            decode(batch)

        monkeypatch.setattr(context, "decode", recording)

    def seq_ids(self, batch: list[tuple[int, int, int]]) -> list[int]:
        """The batch's sequence ids, each once, in batch order."""
        return list(dict.fromkeys(seq_id for seq_id, _, _ in batch))


@pytest.fixture
def backend() -> Iterator[BatchedModel]:
    """A model batching four sequences, its slots empty."""
    model = BatchedModel.load(CONFIG, parallel=4, threads=1)
    yield model
    model.close()


async def run(
    backend: BatchedModel, request: ChatCompletionRequest, started: asyncio.Event | None = None
) -> None:
    """Run a streamed request to its end; `started` is set at its first chunk."""

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        if started is not None:
            started.set()

    await backend.chat(request.model_copy(update={"stream": True}), threading.Event(), on_chunk)


async def fill_slots(backend: BatchedModel, recorder: Recorder) -> dict[int, str]:
    """One request per topic, all at once (each generating while the next comes, so each takes a slot
    of its own): which slot each topic's prompt went to."""
    await asyncio.gather(*(run(backend, chat(topic, max_tokens=16)) for topic in TOPICS))
    holder: dict[int, str] = {}
    for batch in recorder.batches:
        for seq_id in recorder.seq_ids(batch):
            tokens = [token for sid, _, token in batch if sid == seq_id]
            text = backend.weights.detokenize(tokens)
            holder.update((seq_id, topic) for topic in TOPICS if topic[:20] in text)
    assert sorted(holder) == [0, 1, 2, 3], holder
    return holder


async def test_a_full_batch_is_decoded_in_sequence_id_order(
    backend: BatchedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests admitted in the slots' reverse order (each goes where its prompt is cached) still go to
    llama.cpp as one run of ids, 0 to 3, in every step where all four generate."""
    recorder = Recorder(backend, monkeypatch)
    holder = await fill_slots(backend, recorder)
    recorder.batches.clear()
    tasks = []
    for seq_id in (3, 2, 1, 0):  # each admitted while the ones before it generate
        started = asyncio.Event()
        tasks.append(asyncio.ensure_future(run(backend, chat(holder[seq_id], max_tokens=24), started)))
        await asyncio.wait_for(started.wait(), 60)
    await asyncio.gather(*tasks)
    full = [batch for batch in recorder.batches if len(recorder.seq_ids(batch)) == 4]
    assert full, "the four never generated together"
    for batch in recorder.batches:
        ids = recorder.seq_ids(batch)
        assert ids == sorted(ids), ids
    # Each went back to the slot that held its prompt: reuse is not traded away for the order.
    assert backend.scheduler.stats.reused_tokens > 4 * 20


async def test_a_newcomer_takes_the_free_slot_next_to_the_busy_ones(
    backend: BatchedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slots 0 and 2 generate; of the free 1 and 3, both sharing only the chat template with the
    newcomer, slot 1 keeps the busy ids in one run, though slot 3 was used longer ago."""
    recorder = Recorder(backend, monkeypatch)
    holder = await fill_slots(backend, recorder)
    await run(backend, chat(holder[1]))  # slot 1 is now the most recently used
    busy = []
    for seq_id in (0, 2):
        started = asyncio.Event()
        busy.append(asyncio.ensure_future(run(backend, chat(holder[seq_id], max_tokens=40), started)))
        await asyncio.wait_for(started.wait(), 60)
    recorder.batches.clear()
    await run(backend, chat(OTHER, max_tokens=2))
    fed = {seq_id for batch in recorder.batches for seq_id, _, _ in batch if seq_id not in (0, 2)}
    assert fed == {1}
    await asyncio.gather(*busy)


async def test_a_burst_of_prompts_is_read_a_share_of_a_step_at_a_time(
    backend: BatchedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three newcomers at once, the step's share of prompt tokens shrunk to one token: each step reads
    one prompt whole (a short prompt is never split) and the next waits for the next step, in the order
    they came; the first to come gets its first token after its own prompt, not after all three."""
    monkeypatch.setattr(scheduler, "STEP_TARGET_SECONDS", 1e-9)
    monkeypatch.setattr(scheduler, "MIN_PROMPT_CHUNK", 1)
    recorder = Recorder(backend, monkeypatch)
    await asyncio.gather(*(run(backend, chat(topic, max_tokens=4)) for topic in TOPICS[:3]))
    prompts_per_batch = [
        sum(1 for seq_id in recorder.seq_ids(batch) if sum(1 for sid, _, _ in batch if sid == seq_id) > 1)
        for batch in recorder.batches
    ]
    assert max(prompts_per_batch) == 1, prompts_per_batch
    assert sum(prompts_per_batch) == 3
    # Whole: every prompt went in one batch, all its tokens (it shares only the template's first ones).
    fed = [batch for batch, count in zip(recorder.batches, prompts_per_batch, strict=True) if count]
    assert all(len(batch) > 10 for batch in fed)


async def test_a_short_prompt_is_not_held_up_behind_a_long_one(
    backend: BatchedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long prompt read a chunk a step beside a generating sequence, and a short newcomer behind it:
    the short one is read whole in the next step, beside the long one's next chunk, not after it."""
    monkeypatch.setattr(scheduler, "STEP_TARGET_SECONDS", 1e-9)
    monkeypatch.setattr(scheduler, "MIN_PROMPT_CHUNK", 8)
    started = asyncio.Event()
    generating = asyncio.ensure_future(run(backend, chat(TOPICS[0], max_tokens=40), started))
    await asyncio.wait_for(started.wait(), 60)
    long_text = " ".join(TOPICS * 3)  # some 200 tokens: read 8 a step
    long_tokens: list[int] = []

    async def on_long_chunk(chunk: dict[str, Any], tokens: int) -> None:
        long_tokens.append(tokens)

    long_request = chat(long_text, max_tokens=2, stream=True)
    long = asyncio.ensure_future(backend.chat(long_request, threading.Event(), on_long_chunk))
    await asyncio.sleep(0.05)  # it is submitted first
    await asyncio.wait_for(run(backend, chat(OTHER, max_tokens=1)), 60)
    assert sum(long_tokens) == 0  # the short one was read and answered while the long one was read
    await asyncio.wait_for(asyncio.gather(generating, long), 120)
