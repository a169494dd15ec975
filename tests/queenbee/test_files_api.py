"""The Files API for fine-tuning: uploads checked line by line, owned by their key, listed and deleted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from servers import QueenServer

from queenbee.settings import QueenSettings

KEY = "sk-files-owner"
OTHER_KEY = "sk-files-other"

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
GOOD = (json.dumps(CHAT) + "\n") * 3


@pytest.fixture
def queen(tmp_path: Path) -> Iterator[QueenServer]:
    """A queen with two client keys and a small upload limit."""
    settings = QueenSettings(
        db=tmp_path / "queen.db", api_key=[KEY, OTHER_KEY], fine_tuning_max_file_bytes=4096
    )
    server = QueenServer(settings).start()
    yield server
    server.stop()


@pytest.fixture
def sdk(queen: QueenServer) -> Iterator[openai.OpenAI]:
    """The real openai SDK with the owner's key."""
    with openai.OpenAI(base_url=queen.openai_url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
def other(queen: QueenServer) -> Iterator[openai.OpenAI]:
    """The real openai SDK with another key."""
    with openai.OpenAI(base_url=queen.openai_url, api_key=OTHER_KEY, max_retries=0) as client:
        yield client


def test_upload_list_retrieve_content_delete(sdk: openai.OpenAI) -> None:
    """A good file is stored as OpenAI shows files, read back byte for byte, listed, and deleted."""
    uploaded = sdk.files.create(file=("chats.jsonl", GOOD.encode()), purpose="fine-tune")
    assert uploaded.id.startswith("file-")
    assert (uploaded.filename, uploaded.purpose, uploaded.bytes) == ("chats.jsonl", "fine-tune", len(GOOD))
    assert sdk.files.retrieve(uploaded.id).model_dump() == uploaded.model_dump()
    assert sdk.files.content(uploaded.id).content == GOOD.encode()
    second = sdk.files.create(file=("more.jsonl", GOOD.encode()), purpose="fine-tune")
    assert [file.id for file in sdk.files.list()] == [second.id, uploaded.id]
    assert [file.id for file in sdk.files.list(order="asc")] == [uploaded.id, second.id]
    deleted = sdk.files.delete(uploaded.id)
    assert (deleted.id, deleted.deleted) == (uploaded.id, True)
    with pytest.raises(openai.NotFoundError):
        sdk.files.retrieve(uploaded.id)
    assert [file.id for file in sdk.files.list()] == [second.id]


def test_another_key_is_told_the_file_does_not_exist(sdk: openai.OpenAI, other: openai.OpenAI) -> None:
    """Files belong to the key that uploaded them: to another key they are 404s and absent from lists."""
    mine = sdk.files.create(file=("chats.jsonl", GOOD.encode()), purpose="fine-tune")
    for call in (other.files.retrieve, other.files.content, other.files.delete):
        with pytest.raises(openai.NotFoundError):
            call(mine.id)
    assert list(other.files.list()) == []
    assert sdk.files.retrieve(mine.id).id == mine.id  # the failed delete deleted nothing


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (GOOD + "{not json\n", "line 4: not valid JSON"),
        (json.dumps(CHAT) + "\n[1, 2]\n", "line 2: a line must be a JSON object"),
        ('{"prompt": "x", "completion": "y"}\n', "line 1: unsupported field 'completion'"),
        ('{"messages": []}\n', "line 1: 'messages' must be a non-empty list"),
        (
            json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n",
            'line 1: messages[0].role must be one of system, user or assistant, not "robot"',
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": 3}]}),
            "line 1: messages[0].content must be a string",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
            "line 1: the chat has no assistant message to learn from",
        ),
        (
            json.dumps({"messages": [{"role": "user", "content": "x", "weight": 1}, CHAT["messages"][1]]}),
            "line 1: messages[0] has an unsupported field 'weight'",
        ),
        (GOOD.encode() + b"\xff\xfe\n", "line 4: the file is not UTF-8 text"),
        ("\n\n", "the file holds no examples"),
    ],
)
def test_a_bad_line_is_a_400_naming_it(sdk: openai.OpenAI, content: str | bytes, expected: str) -> None:
    """Chat-format JSONL is checked on upload; the first bad line is named, with what is wrong."""
    data = content.encode() if isinstance(content, str) else content
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("bad.jsonl", data), purpose="fine-tune")
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "invalid_file_format"
    assert error["param"] == "file"
    assert expected in error["message"]
    assert list(sdk.files.list()) == []


def test_other_purposes_missing_fields_and_big_files_are_refused(
    queen: QueenServer, sdk: openai.OpenAI
) -> None:
    """Only fine-tune files, with both fields, up to the size limit (413 beyond it)."""
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.files.create(file=("chats.jsonl", GOOD.encode()), purpose="assistants")
    assert caught.value.body["param"] == "purpose"  # type: ignore[index]
    assert "'fine-tune' only" in caught.value.body["message"]  # type: ignore[index]
    headers = {"Authorization": f"Bearer {KEY}"}
    response = httpx.post(
        f"{queen.openai_url}/files", data={"purpose": "fine-tune"}, files={}, headers=headers
    )
    assert response.status_code == 415  # no file: not even multipart
    response = httpx.post(
        f"{queen.openai_url}/files", files={"purpose": (None, "fine-tune")}, headers=headers
    )
    assert (response.status_code, response.json()["error"]["param"]) == (400, "file")
    big = (json.dumps(CHAT) + "\n") * 100
    with pytest.raises(openai.APIStatusError) as too_big:
        sdk.files.create(file=("big.jsonl", big.encode()), purpose="fine-tune")
    assert too_big.value.status_code == 413
    response = httpx.post(f"{queen.openai_url}/files", json={"purpose": "fine-tune"}, headers=headers)
    assert response.status_code == 415
    assert list(sdk.files.list()) == []
