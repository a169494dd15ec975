"""Tests for workerbee.models: --model parsing, GGUF selection, and downloads through a local fake hub."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub
from huggingface_hub import close_session, constants, file_download

from workerbee.models import (
    ModelError,
    ModelSpec,
    ResolvedModel,
    parse_model_spec,
    resolve_model,
    select_gguf_files,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Nothing listens on the discard port: a request missing the fake hub fails rather than leave the machine.
GUARD_ENDPOINT = "http://127.0.0.1:9"

QUANTS = "acme/Quants-GGUF"
SINGLE = "acme/Single-GGUF"
SPLIT = "acme/Split-GGUF"
GATED = "acme/Gated-GGUF"
SPLIT_PARTS = {
    "Big-Q4_K_M-00001-of-00003.gguf": b"a" * 100,
    "Big-Q4_K_M-00002-of-00003.gguf": b"b" * 50,
    "Big-Q4_K_M-00003-of-00003.gguf": b"c" * 7,
}
REPOS: dict[str, dict[str, bytes]] = {
    QUANTS: {
        "README.md": b"# Acme 7B",
        "Q4_K_M/Acme-7B-Q4_K_M.gguf": b"q4km" * 8,
        "Acme-7B-Q4_K_S.gguf": b"q4ks",
        "Acme-7B-Q8_0.gguf": b"q8" * 20,
        "Acme-7B-Q2_K.gguf": b"q2k",
        "Acme-7B-Q2_K_S.gguf": b"q2ks",
    },
    SINGLE: {"config.json": b"{}", "model-f16.gguf": b"single", "mmproj-model-f16.gguf": b"projector"},
    SPLIT: {**SPLIT_PARTS, "Big-Q8_0.gguf": b"q8"},
    GATED: {"model.gguf": b"gated"},
    "acme/Weights": {"model.safetensors": b"st"},
}


@pytest.fixture(autouse=True)
def _isolated_hf(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Keep huggingface_hub off the real hub, the user's token and the user's cache."""
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_HUB_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    # huggingface_hub reads these once, at import.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", GUARD_ENDPOINT)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", GUARD_ENDPOINT + "/{repo_id}/resolve/{revision}/{filename}"
    )
    yield
    close_session()


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    """A fake hub serving REPOS, with GATED gated."""
    with FakeHub(REPOS, gated={GATED}) as fake:
        yield fake
        # The shared client keeps connections to the hub alive; closing them first lets the hub stop at once.
        close_session()


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """An empty Hugging Face cache directory."""
    return tmp_path / "hf-cache"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn on huggingface_hub's offline mode, as HF_HUB_OFFLINE=1 at import would."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def resolve(text: str, hub: FakeHub, cache: Path, *, token: str | None = None) -> ResolvedModel:
    """Resolve `text` against the fake hub and cache."""
    return resolve_model(parse_model_spec(text), cache_dir=cache, endpoint=hub.url, token=token)


def model_error(text: str, hub: FakeHub, cache: Path) -> str:
    """The one-line ModelError message resolving `text` gives."""
    with pytest.raises(ModelError) as info:
        resolve(text, hub, cache)
    message = str(info.value)
    assert "\n" not in message
    return message


def closed_port_url() -> str:
    """The URL of a 127.0.0.1 port that nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# --- parse_model_spec ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "repo_id", "filter_", "revision"),
    [
        ("acme/Foo-GGUF:Q4_K_M", "acme/Foo-GGUF", "Q4_K_M", None),
        ("acme/Foo-GGUF", "acme/Foo-GGUF", None, None),
        ("acme/Foo-GGUF@v1.2:q8_0", "acme/Foo-GGUF", "q8_0", "v1.2"),
        ("acme/Foo-GGUF@refs/pr/3", "acme/Foo-GGUF", None, "refs/pr/3"),
        ("acme/Foo-GGUF:Foo-Q4_K_M.gguf", "acme/Foo-GGUF", "Foo-Q4_K_M.gguf", None),
        ("  acme/foo.bar_1:IQ4_XS ", "acme/foo.bar_1", "IQ4_XS", None),
    ],
)
def test_parse_hub_spec(text: str, repo_id: str, filter_: str | None, revision: str | None) -> None:
    """user/repo[@rev][:filter] is a hub spec whose default id is the text typed."""
    spec = parse_model_spec(text)
    assert (spec.repo_id, spec.filter, spec.revision, spec.local_path) == (repo_id, filter_, revision, None)
    assert spec.raw == text
    assert spec.default_id == text.strip()


@pytest.mark.parametrize(
    "text",
    [
        "./foo.gguf",
        "../models/foo.gguf",
        "/srv/models/foo.gguf",
        "foo.gguf",
        "models/foo.gguf",
        "models/sub/Foo.GGUF",
        "C:\\models\\foo.gguf",
        "C:/models/foo.gguf",
        "models\\foo.gguf",
        "./model.bin",
    ],
)
def test_parse_local_path(text: str) -> None:
    """Paths, relative, absolute or Windows-like, are local files."""
    spec = parse_model_spec(text)
    assert spec.repo_id is None
    assert spec.local_path == Path(text)


def test_parse_expands_home() -> None:
    """~ in a local path is the user's home."""
    assert parse_model_spec("~/models/foo.gguf").local_path == Path.home() / "models" / "foo.gguf"


@pytest.mark.parametrize(
    ("text", "default_id"),
    [("/srv/Foo-Q4_K_M.gguf", "Foo-Q4_K_M"), ("./Bar.GGUF", "Bar"), ("C:\\m\\baz.gguf", "C:\\m\\baz")],
)
def test_local_default_id(text: str, default_id: str) -> None:
    """A file's default id is its name without .gguf."""
    # A Windows path is a single name on POSIX; it only has to be stable.
    assert parse_model_spec(text).default_id == default_id


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "llama3",
        "acme/Foo-GGUF:",
        "acme/Foo-GGUF: ",
        "acme--x/Foo:Q4",
        "-acme/Foo:Q4",
        "acme/Foo..x",
        "acme/Foo GGUF",
        "a/b/c:Q4",
        "https://huggingface.co/acme/Foo-GGUF",
    ],
)
def test_parse_rejects_nonsense(text: str) -> None:
    """Empty text, bad repo ids and empty filters are one-line errors."""
    with pytest.raises(ModelError) as info:
        parse_model_spec(text)
    assert "\n" not in str(info.value)


# --- select_gguf_files --------------------------------------------------------------------------------------

FILES = [
    "README.md",
    "Q4_K_M/Acme-Q4_K_M.gguf",
    "Acme-Q4_K_S.gguf",
    "Acme-Q2_K.gguf",
    "Acme-Q2_K_S.gguf",
    "Acme-Q8_0-00002-of-00002.gguf",
    "Acme-Q8_0-00001-of-00002.gguf",
    "mmproj-Acme-f16.gguf",
]


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ("q4_k_m", ["Q4_K_M/Acme-Q4_K_M.gguf"]),
        ("Q2_K", ["Acme-Q2_K.gguf"]),
        ("q2_k_s", ["Acme-Q2_K_S.gguf"]),
        ("Q8_0", ["Acme-Q8_0-00001-of-00002.gguf", "Acme-Q8_0-00002-of-00002.gguf"]),
        ("Acme-Q4_K_S.gguf", ["Acme-Q4_K_S.gguf"]),
    ],
)
def test_select_by_filter(filter_: str, expected: list[str]) -> None:
    """A filter picks one file or one split set, case-insensitively, whole words winning over prefixes."""
    assert select_gguf_files(FILES, filter_, "acme/x") == expected


def test_select_without_filter_single_gguf() -> None:
    """Without a filter a lone GGUF (or split set) is picked; projectors and other files do not count."""
    assert select_gguf_files(["a.json", "m.gguf", "mmproj-f16.gguf"], None, "acme/x") == ["m.gguf"]
    parts = ["s-00001-of-00002.gguf", "s-00002-of-00002.gguf"]
    assert select_gguf_files(["README.md", *reversed(parts)], None, "acme/x") == parts


@pytest.mark.parametrize(
    ("files", "filter_", "expected_in_message"),
    [
        (FILES, None, ["add ':filter'", "Acme-Q2_K.gguf", "Acme-Q8_0-00001-of-00002.gguf (2 parts)"]),
        (FILES, "Q5_K_M", ["no GGUF file", "'Q5_K_M'", "Q4_K_M/Acme-Q4_K_M.gguf", "Acme-Q2_K_S.gguf"]),
        (FILES, "Q4_K", ["several", "Q4_K_M/Acme-Q4_K_M.gguf", "Acme-Q4_K_S.gguf"]),
        (["model.safetensors", "mmproj-f16.gguf"], None, ["acme/x has no GGUF model files"]),
        (["s-00001-of-00003.gguf", "s-00003-of-00003.gguf"], None, ["incomplete", "2 of 3"]),
    ],
)
def test_select_errors(files: list[str], filter_: str | None, expected_in_message: list[str]) -> None:
    """No match, several matches or a broken split set: one line that lists what there is."""
    with pytest.raises(ModelError) as info:
        select_gguf_files(files, filter_, "acme/x")
    message = str(info.value)
    assert "\n" not in message
    for part in expected_in_message:
        assert part in message
    assert "mmproj" not in message
    assert "README" not in message


# --- resolve_model: local files -----------------------------------------------------------------------------


def test_local_file(tmp_path: Path) -> None:
    """An existing .gguf file resolves to itself."""
    model = tmp_path / "Foo-Q4_K_M.gguf"
    model.write_bytes(b"gguf" * 3)
    resolved = resolve_model(parse_model_spec(str(model)))
    assert (resolved.path, resolved.parts, resolved.size_bytes) == (model, (model,), 12)


def test_local_split_file(tmp_path: Path) -> None:
    """Any part of a local split set resolves to the first part and the size of all parts."""
    for i in (1, 2, 3):
        (tmp_path / f"big-0000{i}-of-00003.gguf").write_bytes(b"x" * i)
    resolved = resolve_model(parse_model_spec(str(tmp_path / "big-00002-of-00003.gguf")))
    assert resolved.path == tmp_path / "big-00001-of-00003.gguf"
    assert [p.name for p in resolved.parts] == [f"big-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert resolved.size_bytes == 6
    (tmp_path / "big-00003-of-00003.gguf").unlink()
    with pytest.raises(ModelError, match=r"incomplete: missing big-00003-of-00003\.gguf"):
        resolve_model(parse_model_spec(str(tmp_path / "big-00001-of-00003.gguf")))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("missing.gguf", "does not exist"),
        ("model.bin", "is not a .gguf file"),
        ("folder.gguf", "is not a file"),
    ],
)
def test_local_file_errors(tmp_path: Path, name: str, message: str) -> None:
    """A missing file, a non-GGUF file or a directory is a one-line error."""
    (tmp_path / "model.bin").write_bytes(b"bin")
    (tmp_path / "folder.gguf").mkdir()
    with pytest.raises(ModelError, match=message) as info:
        resolve_model(parse_model_spec(str(tmp_path / name)))
    assert "\n" not in str(info.value)


# --- resolve_model: the hub ---------------------------------------------------------------------------------


def test_filter_picks_file_in_subfolder(hub: FakeHub, cache: Path) -> None:
    """A lower-case filter picks the file in its subfolder and downloads it into the HF cache layout."""
    resolved = resolve(f"{QUANTS}:q4_k_m", hub, cache)
    commit = hub.commit(QUANTS)
    expected = cache / "models--acme--Quants-GGUF" / "snapshots" / commit / "Q4_K_M" / "Acme-7B-Q4_K_M.gguf"
    assert resolved.path == expected
    assert resolved.parts == (expected,)
    assert resolved.path.read_bytes() == REPOS[QUANTS]["Q4_K_M/Acme-7B-Q4_K_M.gguf"]
    assert resolved.size_bytes == 32
    assert resolved.spec.default_id == f"{QUANTS}:q4_k_m"
    assert (cache / "models--acme--Quants-GGUF" / "refs" / "main").read_text() == commit
    assert [r.path for r in hub.downloads()] == [f"/{QUANTS}/resolve/{commit}/Q4_K_M/Acme-7B-Q4_K_M.gguf"]


def test_no_filter_single_gguf(hub: FakeHub, cache: Path) -> None:
    """Without a filter the repo's only GGUF model is used; its projector is left alone."""
    resolved = resolve(SINGLE, hub, cache)
    assert resolved.path.name == "model-f16.gguf"
    assert resolved.path.read_bytes() == b"single"
    assert len(hub.downloads()) == 1


def test_no_filter_several_ggufs(hub: FakeHub, cache: Path) -> None:
    """Without a filter a repo with several GGUFs is an error listing them, and nothing is downloaded."""
    message = model_error(QUANTS, hub, cache)
    for name in ("Q4_K_M/Acme-7B-Q4_K_M.gguf", "Acme-7B-Q8_0.gguf", "Acme-7B-Q2_K_S.gguf"):
        assert name in message
    assert hub.downloads() == []


def test_filter_matching_nothing(hub: FakeHub, cache: Path) -> None:
    """A filter matching no file is an error listing the available GGUFs."""
    message = model_error(f"{QUANTS}:Q5_K_M", hub, cache)
    assert "no GGUF file in acme/Quants-GGUF matches 'Q5_K_M'" in message
    assert "Acme-7B-Q8_0.gguf" in message


def test_ambiguous_filter(hub: FakeHub, cache: Path) -> None:
    """A filter matching several files is an error listing them."""
    message = model_error(f"{QUANTS}:Q4_K", hub, cache)
    assert "'Q4_K' matches several GGUF files" in message
    assert "Q4_K_M/Acme-7B-Q4_K_M.gguf" in message
    assert "Acme-7B-Q4_K_S.gguf" in message


def test_split_set(hub: FakeHub, cache: Path) -> None:
    """A split set downloads every part under its own name; the first is the path, the size is the total."""
    resolved = resolve(f"{SPLIT}:q4_k_m", hub, cache)
    assert [p.name for p in resolved.parts] == list(SPLIT_PARTS)
    assert resolved.path == resolved.parts[0]
    assert {p.parent for p in resolved.parts} == {resolved.path.parent}
    assert [p.read_bytes() for p in resolved.parts] == list(SPLIT_PARTS.values())
    assert resolved.size_bytes == 157
    assert len(hub.downloads()) == 3


def test_second_resolve_uses_cache(hub: FakeHub, cache: Path) -> None:
    """Resolving again asks the hub for the repo listing only, never for a file."""
    first = resolve(f"{SPLIT}:Q4_K_M", hub, cache)
    hub.requests.clear()
    assert resolve(f"{SPLIT}:Q4_K_M", hub, cache) == first
    assert [(r.method, r.path) for r in hub.requests] == [("GET", f"/api/models/{SPLIT}")]


@pytest.mark.usefixtures("offline")
def test_offline_uses_cache(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With HF_HUB_OFFLINE a cached model resolves without a single request."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    online = resolve(f"{SPLIT}:Q4_K_M", hub, cache)
    single = resolve(f"{QUANTS}:Q8_0", hub, cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub.requests.clear()
    assert resolve(f"{SPLIT}:Q4_K_M", hub, cache) == online
    assert resolve(f"{QUANTS}:q8_0", hub, cache).path == single.path
    assert hub.requests == []


@pytest.mark.usefixtures("offline")
def test_offline_without_cache(hub: FakeHub, cache: Path) -> None:
    """With HF_HUB_OFFLINE and nothing cached the error says so, and no request is made."""
    message = model_error(f"{QUANTS}:Q8_0", hub, cache)
    assert message == f"{QUANTS} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set"
    assert hub.requests == []


def test_offline_cache_without_match(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, a filter matching no cached file, or a split set missing a part, is an error."""
    resolved = resolve(f"{SPLIT}:Q4_K_M", hub, cache)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = model_error(f"{SPLIT}:Q8_0", hub, cache)
    assert message.startswith("HF_HUB_OFFLINE is set, so only the Hugging Face cache was searched: no GGUF")
    assert "Big-Q4_K_M-00001-of-00003.gguf (3 parts)" in message
    resolved.parts[2].unlink()
    assert "incomplete: 2 of 3 parts" in model_error(f"{SPLIT}:Q4_K_M", hub, cache)


def test_unknown_repo(hub: FakeHub, cache: Path) -> None:
    """A repo the hub does not have is a one-line error."""
    message = model_error("acme/Nope-GGUF:Q4_K_M", hub, cache)
    assert message.startswith(f"repo acme/Nope-GGUF not found on {hub.url}")


def test_repo_without_gguf(hub: FakeHub, cache: Path) -> None:
    """A repo with no GGUF file is a one-line error."""
    assert model_error("acme/Weights", hub, cache) == "acme/Weights has no GGUF model files"


def test_gated_repo(hub: FakeHub, cache: Path) -> None:
    """A gated repo the token cannot read is a one-line error pointing at HF_TOKEN."""
    message = model_error(GATED, hub, cache)
    assert message.startswith(f"{GATED} is a gated repo")
    assert "HF_TOKEN" in message


def test_revision(hub: FakeHub, cache: Path) -> None:
    """@revision picks the commit; an unknown revision is a one-line error."""
    commit = hub.commit(QUANTS)
    resolved = resolve(f"{QUANTS}@{commit}:Q8_0", hub, cache)
    assert resolved.path.parent.name == commit
    assert hub.requests[0].path == f"/api/models/{QUANTS}/revision/{commit}"
    assert model_error(f"{QUANTS}@nope:Q8_0", hub, cache) == f"revision 'nope' not found in {QUANTS}"


def test_unreachable_hub(cache: Path) -> None:
    """A hub nobody listens for is a one-line error when nothing is cached."""
    url = closed_port_url()
    with pytest.raises(ModelError) as info:
        resolve_model(parse_model_spec(f"{QUANTS}:Q8_0"), cache_dir=cache, endpoint=url)
    message = str(info.value)
    assert message.startswith(
        f"{QUANTS} is not in the Hugging Face cache ({cache}) and the hub at {url} cannot"
    )
    assert "ConnectError" in message
    assert "\n" not in message


def test_unreachable_or_down_hub_falls_back_to_cache(hub: FakeHub, cache: Path) -> None:
    """When the hub is down or unreachable a model cached earlier is still used."""
    cached = resolve(f"{QUANTS}:Q8_0", hub, cache)
    unreachable = resolve_model(
        parse_model_spec(f"{QUANTS}:Q8_0"), cache_dir=cache, endpoint=closed_port_url()
    )
    assert unreachable == cached
    hub.down = True
    assert resolve(f"{QUANTS}:Q8_0", hub, cache) == cached
    assert "the hub at" in model_error(f"{SINGLE}", hub, cache)
    assert "HTTP 503" in model_error(f"{SINGLE}", hub, cache)


def test_token(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_TOKEN is sent to the hub, and an explicit token wins over it."""
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")
    resolve(f"{QUANTS}:Q8_0", hub, cache)
    assert {r.authorization for r in hub.requests} == {"Bearer hf_from_env"}
    hub.requests.clear()
    resolve(f"{QUANTS}:Q2_K", hub, cache, token="hf_explicit")
    assert {r.authorization for r in hub.requests} == {"Bearer hf_explicit"}


def test_disk_full(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk during the download is a one-line error naming the cache."""

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(file_download, "http_get", no_space)
    message = model_error(f"{QUANTS}:Q8_0", hub, cache)
    assert message.startswith(f"no space left on device while downloading Acme-7B-Q8_0.gguf into {cache}")


def test_interrupted_download_resumes(hub: FakeHub, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A download cut short goes on from where it stopped with a Range request."""
    # huggingface_hub writes (and so resumes after) whole chunks only, 10 MiB by default.
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 5)
    hub.cut_next_download(QUANTS, "Acme-7B-Q8_0.gguf", after=15)
    resolved = resolve(f"{QUANTS}:Q8_0", hub, cache)
    assert resolved.path.read_bytes() == REPOS[QUANTS]["Acme-7B-Q8_0.gguf"]
    assert [r.range for r in hub.downloads()] == [None, "bytes=15-"]


def test_environment_variables(hub: FakeHub, tmp_path: Path) -> None:
    """HF_ENDPOINT, HF_HUB_CACHE and HF_TOKEN are honoured, and HF_HUB_OFFLINE=1 then needs no hub."""
    script = textwrap.dedent(
        f"""
        import json
        from workerbee.models import parse_model_spec, resolve_model
        resolved = resolve_model(parse_model_spec("{SPLIT}:Q4_K_M"))
        print(json.dumps([str(resolved.path), resolved.size_bytes]))
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env |= {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_CACHE": str(tmp_path / "env-cache"),
        "HF_TOKEN": "hf_subprocess",
    }

    def run(extra: dict[str, str]) -> list[object]:
        done = subprocess.run(
            [sys.executable, "-c", script],
            cwd=REPO_ROOT,
            env=env | extra,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        result: list[object] = json.loads(done.stdout)
        return result

    online = run({})
    snapshot = tmp_path / "env-cache" / "models--acme--Split-GGUF" / "snapshots" / hub.commit(SPLIT)
    assert online == [str(snapshot / "Big-Q4_K_M-00001-of-00003.gguf"), 157]
    # huggingface_hub 2.x also fetches HF_ENDPOINT/api/agent-harnesses (telemetry) daily, without the token.
    model_requests = [r for r in hub.requests if r.path != "/api/agent-harnesses"]
    assert len(model_requests) == 7  # model info, then a HEAD and a GET per part
    assert {r.authorization for r in model_requests} == {"Bearer hf_subprocess"}
    hub.requests.clear()
    assert run({"HF_HUB_OFFLINE": "1"}) == online
    assert hub.requests == []


def test_spec_is_hashable() -> None:
    """Specs are frozen values, usable as dict keys."""
    spec = parse_model_spec(f"{QUANTS}:Q8_0")
    assert {spec: 1}[ModelSpec(f"{QUANTS}:Q8_0", QUANTS, "Q8_0", None, None)] == 1
