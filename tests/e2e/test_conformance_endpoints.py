"""OpenAI conformance of /v1/completions, /v1/embeddings, /v1/models/{model} and error bodies, through the
openai SDK and httpx, a real queen and a real `workerbee --embeddings` running SmolLM2. Every response and
stream event is checked against OpenAI's JSON schemas.
"""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from fake_worker import FakeWorker
from schemas.openai_schemas import AsyncValidatingTransport, ValidatingTransport
from servers import QueenServer, hive_with_worker, smollm2_path
from test_spine import MODEL_ID

from protocol import Job, ModelInfo, Register, Result, Usage

PROMPT = "The capital of France is"
EMBEDDING_SIZE = 576
"""SmolLM2-135M's hidden size."""


@pytest.fixture(scope="module")
def hive() -> Iterator[QueenServer]:
    """A queen with one real worker serving SmolLM2, embeddings included."""
    with hive_with_worker("--embeddings") as queen:
        yield queen


@pytest.fixture
def client(hive: QueenServer) -> Iterator[openai.OpenAI]:
    """The openai SDK on a transport that checks every response against OpenAI's schemas."""
    transport = ValidatingTransport()
    sdk = openai.OpenAI(
        base_url=hive.openai_url,
        api_key="unused",
        max_retries=0,
        http_client=httpx.Client(transport=transport, timeout=120),
    )
    yield sdk
    sdk.close()
    assert transport.seen.names, "the test saw no response to validate"


@pytest.fixture
def http(hive: QueenServer) -> Iterator[httpx.Client]:
    """A plain HTTP client on the same validating transport, for what the SDK hides."""
    transport = ValidatingTransport()
    with httpx.Client(base_url=hive.base_url, transport=transport, timeout=120) as http_client:
        yield http_client
    assert transport.seen.names, "the test saw no response to validate"


@pytest.fixture(scope="module")
def tokenizer() -> Iterator[Any]:
    """SmolLM2's tokenizer (llama.cpp, vocabulary only)."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def tokens_of(tokenizer: Any, text: str) -> list[int]:
    """The tokens the worker makes of `text` (SmolLM2 adds no BOS)."""
    return [int(token) for token in tokenizer.tokenize(text.encode(), add_bos=False, special=True)]


def complete(client: openai.OpenAI, prompt: Any = PROMPT, **params: Any) -> Any:
    """A non-streamed text completion with deterministic defaults."""
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 8)
    return client.completions.create(model=MODEL_ID, prompt=prompt, **params)


def complete_streamed(client: openai.OpenAI, prompt: Any = PROMPT, **params: Any) -> list[Any]:
    """A streamed text completion's chunks, with deterministic defaults."""
    params.setdefault("temperature", 0)
    params.setdefault("max_tokens", 8)
    return list(client.completions.create(model=MODEL_ID, prompt=prompt, stream=True, **params))


def joined(chunks: list[Any], index: int = 0) -> str:
    """The text of one choice of a completion stream."""
    return "".join(choice.text for chunk in chunks for choice in chunk.choices if choice.index == index)


def test_completion_streamed_and_whole_agree(client: openai.OpenAI) -> None:
    """A text completion, streamed or not, gives the same text in text_completion objects."""
    whole = complete(client)
    assert whole.object == "text_completion"
    assert whole.id.startswith("cmpl-")
    assert whole.choices[0].text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None
    assert whole.usage.completion_tokens == 8
    chunks = complete_streamed(client)
    assert joined(chunks) == whole.choices[0].text
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completion_max_tokens_defaults_to_16(client: openai.OpenAI) -> None:
    """Without max_tokens a completion is at most 16 tokens, OpenAI's default for this endpoint."""
    response = client.completions.create(
        model=MODEL_ID, prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert response.usage is not None
    assert response.usage.completion_tokens == 16


def test_completion_prompt_list_gives_choices_per_prompt(client: openai.OpenAI) -> None:
    """A list of prompts with n=2 gives 2 choices per prompt, indexed prompt by prompt."""
    prompts = [PROMPT, "Once upon a time"]
    response = complete(client, prompts, n=2, max_tokens=4)
    assert [choice.index for choice in response.choices] == [0, 1, 2, 3]
    for position, prompt in enumerate(prompts):
        alone = complete(client, prompt, max_tokens=4).choices[0].text
        assert response.choices[2 * position].text == alone
        assert response.choices[2 * position + 1].text == alone


def test_completion_token_prompts(client: openai.OpenAI, tokenizer: Any) -> None:
    """Prompts given as token ids, one list or several, complete like their text."""
    text = complete(client).choices[0].text
    tokens = tokens_of(tokenizer, PROMPT)
    assert complete(client, tokens).choices[0].text == text
    several = complete(client, [tokens, tokens_of(tokenizer, "Once upon a time")])
    assert [choice.index for choice in several.choices] == [0, 1]
    assert several.choices[0].text == text


def test_completion_echo(client: openai.OpenAI) -> None:
    """echo puts the prompt before the completion, streamed or not."""
    plain = complete(client).choices[0].text
    echoed = complete(client, echo=True).choices[0].text
    assert echoed == PROMPT + plain
    assert joined(complete_streamed(client, echo=True)) == echoed


def test_completion_logprobs_in_legacy_shape(client: openai.OpenAI) -> None:
    """logprobs=N gives tokens, token_logprobs, top_logprobs and text_offset, streamed or not."""
    response = complete(client, logprobs=2, max_tokens=5)
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None
    assert logprobs.tokens is not None
    assert logprobs.token_logprobs is not None
    assert logprobs.top_logprobs is not None
    assert logprobs.text_offset is not None
    assert "".join(logprobs.tokens) == choice.text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == 5
    assert all(value <= 0 for value in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset[0] == len(PROMPT)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    streamed = [
        token
        for chunk in complete_streamed(client, logprobs=2, max_tokens=5)
        for c in chunk.choices
        for token in (c.logprobs.tokens if c.logprobs and c.logprobs.tokens else [])
    ]
    assert streamed == logprobs.tokens


def test_completion_stop(client: openai.OpenAI) -> None:
    """A stop sequence ends the completion and never appears in it, streamed or not."""
    full = complete(client, max_tokens=12).choices[0].text
    assert "." in full
    response = complete(client, max_tokens=12, stop=".")
    assert response.choices[0].text == full[: full.index(".")]
    assert response.choices[0].finish_reason == "stop"
    assert joined(complete_streamed(client, max_tokens=12, stop=["."])) == response.choices[0].text


def test_completion_seed_reproduces_sampling(client: openai.OpenAI) -> None:
    """The same seed gives the same sampled completion."""
    first = complete(client, temperature=1.0, seed=77, max_tokens=10)
    second = complete(client, temperature=1.0, seed=77, max_tokens=10)
    assert first.choices[0].text == second.choices[0].text


def test_completion_stream_usage(client: openai.OpenAI) -> None:
    """stream_options.include_usage ends a completion stream with a usage chunk."""
    chunks = complete_streamed(client, max_tokens=3, stream_options={"include_usage": True})
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"suffix": "and that is all."}, "suffix", "invalid_request"),
        ({"best_of": 2}, "best_of", "invalid_request"),
        ({"echo": True, "logprobs": 1}, "echo", "invalid_request"),
        ({"prompt": []}, "prompt", "invalid_request"),
        ({"logprobs": 6}, "logprobs", "invalid_request"),
        ({"prompt": [99999999]}, "prompt", "invalid_request"),
        ({"prompt": "word " * 5000}, "prompt", "context_length_exceeded"),
        ({"max_tokens": 5000}, "max_tokens", "context_length_exceeded"),
    ],
)
def test_completion_refusals_name_the_parameter(
    client: openai.OpenAI, params: dict[str, Any], param: str, code: str
) -> None:
    """What a completion cannot honour is a 400 naming the parameter, checked before generation."""
    body = {"prompt": PROMPT, **params}
    prompt = body.pop("prompt")
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=MODEL_ID, prompt=prompt, extra_body=body)
    assert raised.value.param == param
    assert raised.value.code == code


def vector(item: Any) -> list[float]:
    """An embedding as floats, decoding base64 (little-endian float32) if need be."""
    if isinstance(item, str):
        raw = base64.b64decode(item)
        return list(struct.unpack(f"<{len(raw) // 4}f", raw))
    return list(item)


def test_embedding_of_a_string(client: openai.OpenAI) -> None:
    """One string gives one unit-length vector of the model's size; usage counts its tokens."""
    response = client.embeddings.create(model=MODEL_ID, input="The quick brown fox")
    assert response.object == "list"
    assert response.model == MODEL_ID
    assert len(response.data) == 1
    values = response.data[0].embedding
    assert len(values) == EMBEDDING_SIZE
    assert math.isclose(math.sqrt(sum(v * v for v in values)), 1.0, rel_tol=1e-4)
    assert response.usage.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.prompt_tokens


def test_embeddings_of_a_list_and_of_tokens(http: httpx.Client, tokenizer: Any) -> None:
    """A list of strings gives one vector each, in order; token ids embed like their text."""
    texts = ["hello world", "a completely different sentence", "hello world"]
    body = http.post("/v1/embeddings", json={"model": MODEL_ID, "input": texts}).json()
    vectors = [vector(item["embedding"]) for item in body["data"]]
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert vectors[0] == pytest.approx(vectors[2])
    assert vectors[0] != pytest.approx(vectors[1])
    assert body["usage"]["prompt_tokens"] == sum(len(tokens_of(tokenizer, text)) for text in texts)
    tokens = {"model": MODEL_ID, "input": [tokens_of(tokenizer, "hello world")]}
    by_tokens = http.post("/v1/embeddings", json=tokens).json()
    assert vector(by_tokens["data"][0]["embedding"]) == pytest.approx(vectors[0], abs=1e-5)
    one_list = http.post(
        "/v1/embeddings", json={**tokens, "input": tokens_of(tokenizer, "hello world")}
    ).json()
    assert vector(one_list["data"][0]["embedding"]) == pytest.approx(vectors[0], abs=1e-5)


def test_embeddings_as_base64(http: httpx.Client) -> None:
    """encoding_format base64 carries the same float32 values as the float format."""
    body = {"model": MODEL_ID, "input": "hello world"}
    floats = http.post("/v1/embeddings", json=body).json()["data"][0]["embedding"]
    encoded = http.post("/v1/embeddings", json={**body, "encoding_format": "base64"}).json()
    assert isinstance(encoded["data"][0]["embedding"], str)
    assert vector(encoded["data"][0]["embedding"]) == pytest.approx(floats, abs=1e-6)


@pytest.mark.parametrize(
    ("params", "param", "code"),
    [
        ({"dimensions": 64}, "dimensions", "invalid_request"),
        ({"input": ""}, "input", "invalid_request"),
        ({"input": []}, "input", "invalid_request"),
        ({"encoding_format": "int8"}, "encoding_format", "invalid_request"),
        ({"input": "word " * 5000}, "input", "context_length_exceeded"),
    ],
)
def test_embedding_refusals_name_the_parameter(
    http: httpx.Client, params: dict[str, Any], param: str, code: str
) -> None:
    """What embeddings cannot honour is a 400 naming the parameter."""
    response = http.post("/v1/embeddings", json={"model": MODEL_ID, "input": "hello", **params})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == param
    assert response.json()["error"]["code"] == code


def test_retrieve_model(client: openai.OpenAI) -> None:
    """GET /v1/models/{model} gives the model object; the list has it too."""
    model = client.models.retrieve(MODEL_ID)
    assert model.id == MODEL_ID
    assert model.object == "model"
    assert [listed.id for listed in client.models.list()] == [MODEL_ID]


def test_unknown_model_is_a_404_in_openai_shape(http: httpx.Client) -> None:
    """An unknown model is a 404 model_not_found naming model, for every endpoint."""
    answers = [
        http.get("/v1/models/no-such-model"),
        http.post("/v1/completions", json={"model": "no-such-model", "prompt": "x"}),
        http.post("/v1/embeddings", json={"model": "no-such-model", "input": "x"}),
    ]
    for response in answers:
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert response.json()["error"]["param"] == "model"


def test_http_errors_are_in_openai_shape(http: httpx.Client) -> None:
    """Unknown routes, bad JSON and wrong methods also answer with OpenAI's error object."""
    assert http.get("/v1/nowhere").status_code == 404
    json_body = {"Content-Type": "application/json"}
    assert http.post("/v1/completions", content=b"{not json", headers=json_body).status_code == 400
    assert http.post("/v1/completions", content=b"{}").status_code == 415
    assert http.get("/v1/completions").status_code == 405


class EmbeddingsFakeWorker(FakeWorker):
    """A scripted worker that says it serves its models' embeddings."""

    def registration(self) -> Register:
        """The registration, with embeddings on."""
        frame = super().registration()
        models = [ModelInfo(id=model.id, n_ctx=model.n_ctx, embeddings=True) for model in frame.models]
        return frame.model_copy(update={"models": models})


async def embed_answer(worker: FakeWorker, job: Job) -> None:
    """A one-vector embeddings answer."""
    response = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": [1.0, 0.0]}]}
    usage = Usage(prompt_tokens=1, completion_tokens=0, total_tokens=1)
    await worker.send(Result(request_id=job.request_id, usage=usage, response=response))


async def test_embeddings_go_only_to_workers_that_serve_them(queen: QueenServer) -> None:
    """Embeddings requests reach only workers with embeddings on; with none, they are a 400 naming model."""
    plain = await FakeWorker(queen.worker_url, models=("m",), parallel=4, behaviour=embed_answer).connect()
    transport = AsyncValidatingTransport()
    async with httpx.AsyncClient(base_url=queen.base_url, transport=transport, timeout=30) as http_client:
        refused = await http_client.post("/v1/embeddings", json={"model": "m", "input": "x"})
        assert refused.status_code == 400
        assert refused.json()["error"]["param"] == "model"
        capable = await EmbeddingsFakeWorker(
            queen.worker_url, models=("m",), behaviour=embed_answer
        ).connect()
        for _ in range(3):
            answer = await http_client.post("/v1/embeddings", json={"model": "m", "input": "x"})
            assert answer.status_code == 200
        await capable.close()
    await plain.close()
    assert plain.jobs == []
    assert len(capable.jobs) == 3
