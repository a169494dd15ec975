"""The batching engine on the real SmolLM2 model, and its pure parts (text assembly, threads).

llama-cpp-python's own `Llama` (which the engine no longer uses) is the reference for greedy and seeded
answers.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from servers import eventually, smollm2_path

from protocol import ErrorCode
from protocol.openai import ChatCompletionRequest
from workerbee.batching import BatchedModel
from workerbee.detokenize import TextAssembler
from workerbee.errors import Cancelled, EngineError
from workerbee.prompts import ModelConfig
from workerbee.threads import ThreadTuner, choose_threads, thread_candidates

N_CTX = 1024
MAX_TOKENS = 24
PROMPTS = [
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "Explain recursion in one sentence.",
    "What is the capital of Iceland?",
]
SYSTEM = (
    "You are a careful assistant for a bakery. The bakery opens at seven in the morning and closes at "
    "six in the evening, every day but Monday. It sells sourdough, rye, baguettes, croissants and "
    "cinnamon buns. Answer in one short sentence and never invent products the bakery does not sell."
)


def user(text: str) -> list[dict[str, Any]]:
    """A one-message conversation."""
    return [{"role": "user", "content": text}]


def request(messages: list[dict[str, Any]], **fields: Any) -> ChatCompletionRequest:
    """A chat request for the test model, greedy and short unless told otherwise."""
    return ChatCompletionRequest.model_validate(
        {"model": "smol", "messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS, **fields}
    )


CONFIG = ModelConfig(id="smol", path=smollm2_path(), n_ctx=N_CTX)


@pytest.fixture(scope="module")
def model() -> Iterator[Any]:
    """llama-cpp-python's own Llama on SmolLM2, one thread: the reference."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(CONFIG.path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False)
    yield llama
    llama.close()


@pytest.fixture(scope="module")
def batched() -> Iterator[BatchedModel]:
    """The engine's model, batching four sequences."""
    backend = BatchedModel.load(CONFIG, parallel=4, threads=1)
    yield backend
    backend.close()


def reference(model: Any, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    """What llama-cpp-python's create_chat_completion answers, alone."""
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    response = model.create_chat_completion(messages=messages, **kwargs)
    text: str = response["choices"][0]["message"]["content"]
    return text


@pytest.fixture(scope="module")
def expected(model: Any) -> dict[str, str]:
    """llama-cpp-python's greedy answers to PROMPTS."""
    return {prompt: reference(model, user(prompt)) for prompt in PROMPTS}


async def answer(backend: BatchedModel, chat: ChatCompletionRequest) -> tuple[str, Any, list[dict[str, Any]]]:
    """Run a request: (text, usage, streamed chunks)."""
    chunks: list[dict[str, Any]] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        chunks.append(chunk)

    usage, response = await backend.chat(chat, threading.Event(), on_chunk)
    if response is not None:
        return response["choices"][0]["message"]["content"], usage, chunks
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    return text, usage, chunks


async def test_alone_equals_llama_cpp_python(batched: BatchedModel, expected: dict[str, str]) -> None:
    """At temperature 0 a request alone answers exactly what create_chat_completion answers."""
    for prompt in PROMPTS:
        text, usage, _ = await answer(batched, request(user(prompt)))
        assert text == expected[prompt]
        assert usage.completion_tokens <= MAX_TOKENS


async def test_four_at_once_equal_each_alone(batched: BatchedModel, expected: dict[str, str]) -> None:
    """Four requests decoded in one batch answer what each answers alone, streamed or not."""
    alone = [await answer(batched, request(user(prompt))) for prompt in PROMPTS]
    together = await asyncio.gather(
        *(
            answer(batched, request(user(prompt), stream=index % 2 == 0))
            for index, prompt in enumerate(PROMPTS)
        )
    )
    assert [text for text, _, _ in together] == [text for text, _, _ in alone]
    assert [text for text, _, _ in together] == [expected[prompt] for prompt in PROMPTS]
    assert [usage for _, usage, _ in together] == [usage for _, usage, _ in alone]
    assert batched.scheduler.stats.max_running == 4


async def test_stream_has_the_engines_chunk_shape(batched: BatchedModel, expected: dict[str, str]) -> None:
    """A stream is a role chunk, content chunks, and a final chunk with the finish reason."""
    prompt = PROMPTS[0]
    text, usage, chunks = await answer(batched, request(user(prompt), stream=True))
    assert text == expected[prompt]
    first, *middle, last = (chunk["choices"][0] for chunk in chunks)
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert all(set(choice["delta"]) == {"content"} and choice["finish_reason"] is None for choice in middle)
    assert last["delta"] == {}
    assert last["finish_reason"] in {"stop", "length"}
    assert all(chunk["system_fingerprint"] == batched.fingerprint for chunk in chunks)
    assert usage.prompt_tokens == len(batched.prompts.chat_prompt(request(user(prompt))))


async def test_whole_response_shape(batched: BatchedModel) -> None:
    """A non-streamed answer is a chat.completion body without the queen's fields."""
    chunks: list[dict[str, Any]] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        chunks.append(chunk)

    _, response = await batched.chat(request(user(PROMPTS[3])), threading.Event(), on_chunk)
    assert chunks == []
    assert response is not None
    assert response["object"] == "chat.completion"
    [choice] = response["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert choice["logprobs"] is None


async def test_stop_sequence_split_across_tokens_never_leaks(
    batched: BatchedModel, expected: dict[str, str]
) -> None:
    """A stop sequence spread over several tokens ends the answer before it, streamed or not."""
    full = expected[PROMPTS[0]]
    start = full.index("primary")
    stop = full[start : start + 12]  # "primary colo": more than one token
    assert len(batched.weights.tokenize(stop, add_bos=False)) > 1
    for stream in (True, False):
        text, _, chunks = await answer(batched, request(user(PROMPTS[0]), stop=[stop, "zzz"], stream=stream))
        assert text == full[:start]
        assert all(stop[:2] not in (chunk["choices"][0]["delta"].get("content") or "") for chunk in chunks)
        if stream:
            assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_multibyte_characters_are_never_split(batched: BatchedModel, model: Any) -> None:
    """Emoji that the model emits byte by byte arrive whole, in chunks that are valid text."""
    messages = user("List five emojis that describe happiness.")
    # Tokens 16 to 18 are the three pieces of one 4-byte emoji; 40 tokens end on a whole character.
    text, _, chunks = await answer(batched, request(messages, max_tokens=40, stream=True))
    assert text == reference(model, messages, max_tokens=40)
    assert "🌾" in text
    contents = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks]
    assert all("\ufffd" not in content for content in contents)


async def test_ignore_eos_generates_exactly_max_tokens(batched: BatchedModel) -> None:
    """With ignore_eos an answer that would end early runs to exactly max_tokens."""
    messages = user("Reply with the single word OK.")
    _, usage, _ = await answer(batched, request(messages, max_tokens=48))
    assert usage.completion_tokens < 48
    _, usage, chunks = await answer(batched, request(messages, max_tokens=48, ignore_eos=True, stream=True))
    assert usage.completion_tokens == 48
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_seed_reproduces_alone_in_a_batch_and_in_llama_cpp(batched: BatchedModel, model: Any) -> None:
    """A seeded sampled answer is the same twice, beside others, and as llama-cpp-python samples it."""
    messages = user("Invent a name for a cat.")
    seeded = request(messages, temperature=1.0, seed=1234, max_tokens=12)
    first, _, _ = await answer(batched, seeded)
    second, _, _ = await answer(batched, seeded)
    beside = await asyncio.gather(
        answer(batched, seeded), *(answer(batched, request(user(prompt))) for prompt in PROMPTS[:3])
    )
    assert first == second == beside[0][0]
    assert first == reference(
        model,
        messages,
        temperature=1.0,
        seed=1234,
        max_tokens=12,
        top_k=0,
        top_p=1.0,
        min_p=0.0,
        repeat_penalty=1.0,
    )


async def test_logit_bias_changes_the_answer(batched: BatchedModel, expected: dict[str, str]) -> None:
    """A banned first token changes the greedy answer; an unknown token id is refused."""
    first_token = batched.weights.tokenize(expected[PROMPTS[3]], add_bos=False)[0]
    text, _, _ = await answer(batched, request(user(PROMPTS[3]), logit_bias={str(first_token): -100}))
    assert text != expected[PROMPTS[3]]
    with pytest.raises(EngineError) as raised:
        await answer(batched, request(user(PROMPTS[3]), logit_bias={"999999": 5}))
    assert raised.value.code is ErrorCode.INVALID_REQUEST


async def test_too_long_a_request_is_refused(batched: BatchedModel) -> None:
    """A prompt plus max_tokens beyond the context is refused before decoding."""
    with pytest.raises(EngineError) as raised:
        await answer(batched, request(user("word " * 600), max_tokens=600))
    assert raised.value.code is ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert raised.value.param == "max_tokens"


async def test_shared_prefix_is_reused_and_copied_between_slots(batched: BatchedModel, model: Any) -> None:
    """A long shared system prompt is decoded once: later requests reuse it, from any slot."""
    conversations = [
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        for question in ("When do you open?", "Do you sell rye?", "Are you open on Monday?")
    ]
    prefix = len(batched.prompts.chat_prompt(request(conversations[0][:1])))
    stats = batched.scheduler.stats
    await answer(batched, request(conversations[0]))
    reused = stats.reused_tokens
    # The second takes the slot holding the prefix and keeps it busy; the third copies it from there.
    long_one = asyncio.ensure_future(
        answer(batched, request(conversations[1], max_tokens=48, ignore_eos=True))
    )
    await eventually(lambda: stats.reused_tokens >= reused + prefix - 8)
    third, _, _ = await answer(batched, request(conversations[2]))
    await long_one
    assert stats.reused_tokens >= reused + 2 * (prefix - 8)
    assert stats.copies >= 1
    assert third == reference(model, conversations[2])


async def test_cancel_frees_the_sequence_within_a_step() -> None:
    """A cancelled request stops at the next step, its KV cells are freed, and the slot serves again."""
    backend = BatchedModel.load(CONFIG, parallel=1, threads=1)
    try:
        cancel = threading.Event()
        seen = asyncio.Event()
        generated_at_cancel = 0

        async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
            nonlocal generated_at_cancel
            if chunk["choices"][0]["delta"].get("content") and not cancel.is_set():
                generated_at_cancel = backend.scheduler.stats.generated_tokens
                cancel.set()
                seen.set()

        endless = request(user(PROMPTS[1]), max_tokens=900, ignore_eos=True, stream=True)
        with pytest.raises(Cancelled) as raised:
            await backend.chat(endless, cancel, on_chunk)
        assert seen.is_set()
        assert backend.scheduler.stats.generated_tokens <= generated_at_cancel + 2
        # What the request used goes back with the cancel: its prompt, and every token it generated.
        assert raised.value.usage is not None
        assert raised.value.usage.prompt_tokens == len(backend.prompts.chat_prompt(endless))
        assert raised.value.usage.completion_tokens == backend.scheduler.stats.generated_tokens > 0
        assert raised.value.usage.total_tokens == sum(
            (raised.value.usage.prompt_tokens, raised.value.usage.completion_tokens)
        )
        [slot] = backend.scheduler.slot_states()
        assert not slot.busy
        assert slot.cached_tokens == 0
        assert slot.kv_last_position == -1
        text, _, _ = await answer(backend, request(user(PROMPTS[3])))
        assert text
    finally:
        backend.close()


async def test_cancelling_the_coroutine_stops_the_sequence(batched: BatchedModel) -> None:
    """A request whose task is cancelled leaves the batch and the backend keeps serving."""
    cancel = threading.Event()
    started = asyncio.Event()

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        started.set()

    task = asyncio.ensure_future(
        batched.chat(
            request(user(PROMPTS[1]), max_tokens=900, ignore_eos=True, stream=True), cancel, on_chunk
        )
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancel.is_set()
    text, _, _ = await answer(batched, request(user(PROMPTS[3])))
    assert text


async def streamed_tokens(
    backend: BatchedModel, chat: ChatCompletionRequest
) -> tuple[Any, list[tuple[dict[str, Any], int]]]:
    """Stream a request: its usage, and every chunk with the token count it came with."""
    chunks: list[tuple[dict[str, Any], int]] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        chunks.append((chunk, tokens))

    usage, _ = await backend.chat(chat, threading.Event(), on_chunk)
    return usage, chunks


@pytest.mark.parametrize("fields", [{}, {"max_tokens": 9, "ignore_eos": True}], ids=["stop", "length"])
async def test_chunk_tokens_add_up_to_the_completion_tokens(
    batched: BatchedModel, fields: dict[str, Any]
) -> None:
    """Each generated token is counted by the content chunk that carries its text; role and finish: none."""
    usage, chunks = await streamed_tokens(batched, request(user(PROMPTS[0]), stream=True, **fields))
    (_, role_tokens), *middle, (_, finish_tokens) = chunks
    assert role_tokens == finish_tokens == 0
    assert all(tokens >= 1 for _, tokens in middle)
    assert sum(tokens for _, tokens in chunks) == usage.completion_tokens > 0


async def test_chunk_tokens_with_a_stop_sequence_count_at_most_the_completion(
    batched: BatchedModel, expected: dict[str, str]
) -> None:
    """Tokens of a stop sequence that no chunk carries text of are counted in usage only."""
    text = expected[PROMPTS[1]]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    usage, chunks = await streamed_tokens(batched, request(user(PROMPTS[1]), stream=True, stop=stop))
    content = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk, _ in chunks)
    assert content == text[: text.index(stop)]
    assert 0 < sum(tokens for _, tokens in chunks) <= usage.completion_tokens


def test_assembler_holds_back_a_stop_sequence_split_across_pieces() -> None:
    """Text that may begin a stop sequence waits; once it is one, neither it nor what follows is sent."""
    assembler = TextAssembler(["END"])
    assert assembler.feed(b"Hello E") == "Hello "
    assert assembler.feed(b"N") == ""
    assert assembler.feed(b"D and more") == ""
    assert assembler.stopped
    assert assembler.text == "Hello "
    assert assembler.finish() == ""


def test_assembler_releases_a_false_start() -> None:
    """Held-back text goes out once the next piece shows it is no stop sequence."""
    assembler = TextAssembler(["END"])
    assert assembler.feed(b"the EN") == "the "
    assert assembler.feed(b"GINE") == "ENGIN"
    assert assembler.feed(b"S E") == "ES "
    assert assembler.finish() == "E"
    assert assembler.text == "the ENGINES E"
    assert not assembler.stopped


def test_assembler_cuts_at_the_earliest_of_several_stops() -> None:
    """With several stop sequences the answer ends at whichever comes first."""
    assembler = TextAssembler(["world", "lo w", ""])
    assert assembler.feed(b"hello world") == "hel"
    assert assembler.stopped


def test_assembler_never_splits_a_character() -> None:
    """A 4-byte character split over three tokens comes out whole, once."""
    assembler = TextAssembler()
    pieces = [b" **", b"\xf0\x9f", b"\x8c", b"\xbe", b"**"]
    assert [assembler.feed(piece) for piece in pieces] == [" **", "", "", "🌾", "**"]


def test_assembler_drops_an_unfinished_last_character() -> None:
    """When generation stops between a character's bytes, the answer ends at the last whole character."""
    assembler = TextAssembler()
    assert assembler.feed(b"ok \xf0\x9f\x92") == "ok "
    assert assembler.finish() == ""
    assert assembler.text == "ok "


def test_assembler_replaces_bytes_that_are_never_utf8() -> None:
    """Invalid bytes become U+FFFD where they occur rather than vanishing or stalling the text."""
    assembler = TextAssembler()
    assert assembler.feed(b"a\xffb") == "a\ufffdb"


def test_thread_choice_prefers_fewer_threads_unless_clearly_faster() -> None:
    """The chooser interleaves candidates, takes medians, and needs a clear margin to add threads."""
    calls: list[int] = []
    timings = {1: [0.10, 0.30, 0.10], 2: [0.095, 0.095, 0.50], 4: [0.05, 0.05, 0.06]}

    def step(threads: int) -> float:
        calls.append(threads)
        return timings[threads][calls.count(threads) - 1]

    choice = choose_threads(step, [1, 2, 4])
    assert calls == [1, 2, 4] * 3
    assert choice.timings == {1: 0.10, 2: 0.095, 4: 0.05}
    assert choice.threads == 4
    assert choose_threads(lambda threads: {1: 0.1, 2: 0.095}[threads], [1, 2]).threads == 1
    assert choose_threads(lambda threads: {1: 0.4, 2: 0.1}[threads], [1, 2]).threads == 2
    assert "1: 100.0 ms" in choice.describe()


def test_thread_candidates() -> None:
    """One, half, and all but one of the CPUs, without duplicates: never every core."""
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1]
    assert thread_candidates(4) == [1, 2, 3]
    assert thread_candidates(8) == [1, 4, 7]


def run_steps(tuner: ThreadTuner, speed: dict[int, float], steps: int, size: int = 4) -> list[int]:
    """Feed the tuner `steps` steps of one size, each as fast as `speed` says for its count."""
    used = []
    for _ in range(steps):
        threads = tuner.threads_for(size)
        used.append(threads)
        tuner.record(threads, size, speed[threads])
    return used


def test_tuner_moves_to_a_faster_count_after_a_trial() -> None:
    """After `interval` steps a short trial runs the next count; if it is clearly faster, it stays."""
    tuner = ThreadTuner([1, 2], 1, interval=8, trial_steps=3)
    used = run_steps(tuner, {1: 0.10, 2: 0.05}, 20)
    assert used[:8] == [1] * 8
    assert used[8:11] == [2, 2, 2]
    assert tuner.current == 2
    assert tuner.switches == 1
    assert used[11:19] == [2] * 8
    assert used[19] == 1  # the next trial, interval steps later, goes the other way


def test_tuner_stops_a_bad_trial_after_one_step_and_backs_off() -> None:
    """A trial step twice as slow ends the trial; the next trial waits twice as long."""
    tuner = ThreadTuner([1, 2], 1, interval=8, trial_steps=3)
    used = run_steps(tuner, {1: 0.10, 2: 0.50}, 40)
    trials = [index for index, threads in enumerate(used) if threads == 2]
    assert trials == [8, 25]
    assert tuner.current == 1


def test_tuner_tries_at_once_when_the_current_count_slows_down() -> None:
    """Steps half again as slow as when the count was chosen start a trial before the interval."""
    tuner = ThreadTuner([1, 2], 2, interval=1000, trial_steps=3)
    run_steps(tuner, {1: 0.10, 2: 0.05}, 10)
    used = run_steps(tuner, {1: 0.10, 2: 0.40}, 10)
    assert 1 in used
    assert tuner.current == 1


def test_tuner_compares_only_steps_of_one_size() -> None:
    """A trial is dropped when the batch changes size, and a fixed single candidate never trials."""
    tuner = ThreadTuner([1, 2], 1, interval=4, trial_steps=3)
    run_steps(tuner, {1: 0.1, 2: 0.05}, 4, size=4)
    assert tuner.threads_for(4) == 2
    assert tuner.threads_for(9) == 1
    assert tuner.threads_for(4) == 1
    lonely = ThreadTuner([1], 1, interval=2)
    assert set(run_steps(lonely, {1: 0.1}, 10)) == {1}
