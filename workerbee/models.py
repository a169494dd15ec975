"""Turn a worker's ``--model`` value into local GGUF file(s), downloading them from the Hugging Face hub.

``--model`` is either a local ``.gguf`` path or ``hf-user/hf-repo[@revision][:filter]``. The filter picks the
GGUF file of the repo (usually the quantization, e.g. ``Q4_K_M``) by a case-insensitive match on its path in
the repo, subfolders included. A split GGUF (``name-00001-of-00003.gguf``) counts as one file: all its parts
are downloaded and the first one is loaded, which is how llama.cpp finds the others.

Downloads go through ``huggingface_hub`` into the standard Hugging Face cache, so other tools share the files,
``HF_ENDPOINT``/``HF_TOKEN``/``HF_HUB_CACHE`` work as everywhere else and a file already cached is never
fetched again. When the hub cannot be asked (``HF_HUB_OFFLINE=1``, no network, hub down) the model is
resolved from what the cache already holds.

Every failure the user can fix is a `ModelError` whose message is one line.
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, constants, hf_hub_download, is_offline_mode
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from workerbee import __version__

__all__ = [
    "ModelError",
    "ModelSpec",
    "ResolvedModel",
    "parse_model_spec",
    "resolve_model",
    "select_gguf_files",
]

_GGUF_SUFFIX = ".gguf"
# llama.cpp's gguf-split naming; it derives the other parts' names from the first one's.
_SPLIT_RE = re.compile(r"^(?P<stem>.+)-(?P<index>\d+)-of-(?P<count>\d+)\.gguf$", re.IGNORECASE)
# `user/repo`, optionally `@revision` (may hold slashes, e.g. refs/pr/1), optionally `:filter`.
_HUB_SPEC_RE = re.compile(r"^(?P<repo>[^/:@\s]+/[^/:@\s]+)(?:@(?P<revision>[^:\s]+))?(?::(?P<filter>.*))?$")
# The hub's rules for a namespace or repo name (mypy sees no export of huggingface_hub's validate_repo_id).
_REPO_PART_RE = re.compile(r"^(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?$", re.ASCII)
_WINDOWS_PATH_RE = re.compile(r"^[A-Za-z]:[\\/]")
_COMMIT_HASH_RE = re.compile(r"^[0-9a-f]{40}$")
_LIBRARY = "workerbee"


class ModelError(Exception):
    """One clear line for the user; str(exc) is that line."""


@dataclass(frozen=True)
class ModelSpec:
    """What ``--model`` asked for: a hub repo (with optional filter and revision) or a local file."""

    raw: str
    repo_id: str | None
    filter: str | None
    revision: str | None
    local_path: Path | None

    @property
    def default_id(self) -> str:
        """The model id clients use: the text typed for hub models, the file name without .gguf for files."""
        if self.local_path is None:
            return self.raw.strip()
        name = self.local_path.name
        return name[: -len(_GGUF_SUFFIX)] if name.lower().endswith(_GGUF_SUFFIX) else name


@dataclass(frozen=True)
class ResolvedModel:
    """The local file(s) a `ModelSpec` resolved to."""

    spec: ModelSpec
    path: Path
    parts: tuple[Path, ...]
    size_bytes: int


def parse_model_spec(raw: str) -> ModelSpec:
    """Parse a ``--model`` value; raise `ModelError` when it is neither a local path nor a hub repo spec.

    Anything that looks like a path (starts with ``/``, ``.`` or ``~``, has a drive letter or a backslash,
    or ends in ``.gguf`` with no ``:filter``) is local; ``user/repo[@rev][:filter]`` is a hub repo.
    Prefix a relative path with ``./`` to force it to be read as local.
    """
    text = raw.strip()
    if not text:
        raise ModelError("--model is empty: give a .gguf file or hf-user/hf-repo[:filter]")
    if text.startswith(("/", ".", "~")) or _WINDOWS_PATH_RE.match(text) or "\\" in text:
        return _local_spec(raw, text)
    match = _HUB_SPEC_RE.match(text)
    if match is None or (
        # `models/foo.gguf` is also a well-formed repo id, but nobody names a repo like a GGUF file.
        match["filter"] is None and match["revision"] is None and text.lower().endswith(_GGUF_SUFFIX)
    ):
        if text.lower().endswith(_GGUF_SUFFIX):
            return _local_spec(raw, text)
        raise ModelError(f"--model {text!r} is neither a .gguf file nor hf-user/hf-repo[@revision][:filter]")
    repo_id, revision, filter_ = match["repo"], match["revision"], match["filter"]
    if not all(_REPO_PART_RE.match(part) for part in repo_id.split("/")):
        raise ModelError(f"--model {text!r}: {repo_id!r} is not a valid Hugging Face repo id")
    if filter_ is not None and not filter_.strip():
        raise ModelError(f"--model {text!r}: the filter after ':' is empty (e.g. {repo_id}:Q4_K_M)")
    return ModelSpec(
        raw=raw,
        repo_id=repo_id,
        filter=filter_.strip() if filter_ is not None else None,
        revision=revision,
        local_path=None,
    )


def _local_spec(raw: str, text: str) -> ModelSpec:
    return ModelSpec(raw=raw, repo_id=None, filter=None, revision=None, local_path=Path(text).expanduser())


def select_gguf_files(repo_files: Sequence[str], filter: str | None, repo_id: str) -> list[str]:
    """Pick the GGUF model file to load among a repo's files.

    Returns one file, or all parts of one split set sorted by part number. A filter matches
    case-insensitively anywhere in a file's path; when it matches several files, the one where it matches
    as a whole word (``Q2_K`` in ``m-Q2_K.gguf`` but not in ``m-Q2_K_S.gguf``) wins. Multimodal projector
    files (``mmproj*``) are never picked: llama.cpp cannot load them as a model.
    Raises `ModelError`, listing the repo's GGUF files, when nothing or more than one file matches.
    """
    units = _group_gguf_files(repo_files)
    if not units:
        raise ModelError(f"{repo_id} has no GGUF model files")
    available = ", ".join(_describe(unit) for unit in units)
    if filter is None:
        if len(units) > 1:
            raise ModelError(
                f"{repo_id} has several GGUF files, add ':filter' to pick one (e.g. {repo_id}:Q4_K_M): "
                f"{available}"
            )
        chosen = units
    else:
        needle = filter.lower()
        chosen = [unit for unit in units if any(needle in name.lower() for name in unit)]
        if len(chosen) > 1:
            word = re.compile(rf"(?<![a-z0-9_]){re.escape(needle)}(?![a-z0-9_])")
            whole_word = [unit for unit in chosen if any(word.search(name.lower()) for name in unit)]
            if len(whole_word) == 1:
                chosen = whole_word
        if not chosen:
            raise ModelError(f"no GGUF file in {repo_id} matches {filter!r}; available: {available}")
        if len(chosen) > 1:
            matches = ", ".join(_describe(unit) for unit in chosen)
            raise ModelError(f"{filter!r} matches several GGUF files in {repo_id}: {matches}")
    unit = chosen[0]
    split = _SPLIT_RE.match(unit[0].rsplit("/", 1)[-1])
    if split is not None and len(unit) != int(split["count"]):
        raise ModelError(
            f"split GGUF {unit[0]} in {repo_id} is incomplete: "
            f"{len(unit)} of {int(split['count'])} parts present"
        )
    return list(unit)


def _group_gguf_files(repo_files: Sequence[str]) -> list[tuple[str, ...]]:
    """The repo's loadable GGUF files, the parts of each split set grouped (sorted) into one entry."""
    singles: list[tuple[str, ...]] = []
    splits: dict[tuple[str, str, int], list[tuple[int, str]]] = {}
    for name in sorted(set(repo_files)):
        folder, _, base = name.rpartition("/")
        if not base.lower().endswith(_GGUF_SUFFIX) or base.lower().startswith("mmproj"):
            continue
        match = _SPLIT_RE.match(base)
        if match is None:
            singles.append((name,))
        else:
            key = (folder, match["stem"], int(match["count"]))
            splits.setdefault(key, []).append((int(match["index"]), name))
    grouped = [tuple(name for _, name in sorted(parts)) for parts in splits.values()]
    return sorted(singles + grouped)


def _describe(unit: tuple[str, ...]) -> str:
    return unit[0] if len(unit) == 1 else f"{unit[0]} ({len(unit)} parts)"


def resolve_model(
    spec: ModelSpec,
    *,
    cache_dir: Path | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> ResolvedModel:
    """Return the local file(s) for `spec`, downloading them into the Hugging Face cache if needed.

    Blocking. `cache_dir` defaults to Hugging Face's (``HF_HUB_CACHE``), `token` to ``HF_TOKEN`` or the saved
    login, `endpoint` to ``HF_ENDPOINT``. Raises `ModelError` with a one-line message on any failure the user
    can act on (unknown repo, no or ambiguous match, gated repo, no network and nothing cached, full disk).
    """
    if spec.repo_id is None:
        if spec.local_path is None:
            raise ModelError(f"--model {spec.raw!r} names neither a file nor a hub repo")
        return _resolve_local(spec, spec.local_path)
    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    if is_offline_mode():
        return _resolve_from_cache(spec, spec.repo_id, cache, why="HF_HUB_OFFLINE is set")
    return _resolve_from_hub(spec, spec.repo_id, cache, token=token, endpoint=endpoint)


def _resolve_local(spec: ModelSpec, path: Path) -> ResolvedModel:
    if not path.exists():
        raise ModelError(f"model file {path} does not exist")
    if not path.is_file():
        raise ModelError(f"model path {path} is not a file")
    if not path.name.lower().endswith(_GGUF_SUFFIX):
        raise ModelError(f"model file {path} is not a .gguf file")
    # absolute() and not resolve(): a symlink's own name is what llama.cpp uses to find the other split parts.
    path = path.absolute()
    parts: tuple[Path, ...] = (path,)
    split = _SPLIT_RE.match(path.name)
    if split is not None:
        count, width = int(split["count"]), len(split["index"])
        parts = tuple(
            path.with_name(f"{split['stem']}-{i:0{width}d}-of-{split['count']}{path.suffix}")
            for i in range(1, count + 1)
        )
        missing = [part.name for part in parts if not part.is_file()]
        if missing:
            raise ModelError(f"split GGUF {path} is incomplete: missing {', '.join(missing)}")
    return _resolved(spec, parts)


def _resolve_from_hub(
    spec: ModelSpec, repo_id: str, cache: Path, *, token: str | None, endpoint: str | None
) -> ResolvedModel:
    hub = (endpoint or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token, library_name=_LIBRARY, library_version=__version__)
    try:
        info = api.model_info(repo_id, revision=spec.revision)
    except (httpx2.RequestError, OSError) as exc:
        if not _is_unreachable(exc):
            raise _hub_error(exc, spec, repo_id, hub, cache, what=repo_id) from exc
        # The hub may be down while the model sits in the cache from an earlier run: use it then.
        return _resolve_from_cache(
            spec, repo_id, cache, why=f"the hub at {hub} cannot be reached ({_reason(exc)})"
        )
    if info.sha is None:
        raise ModelError(f"the hub at {hub} gave no commit for {repo_id}; is HF_ENDPOINT a Hugging Face hub?")
    files = [sibling.rfilename for sibling in info.siblings or ()]
    chosen = select_gguf_files(files, spec.filter, repo_id)

    # Downloading at the commit, not the branch, keeps the parts of a split set from two different commits
    # and lets hf_hub_download answer from the cache without any request.
    paths: list[Path] = []
    for filename in chosen:
        try:
            local = hf_hub_download(
                repo_id,
                filename,
                revision=info.sha,
                cache_dir=cache,
                token=token,
                endpoint=endpoint,
                library_name=_LIBRARY,
                library_version=__version__,
            )
        except (httpx2.RequestError, OSError) as exc:
            raise _hub_error(exc, spec, repo_id, hub, cache, what=filename) from exc
        paths.append(Path(local))
    _remember_revision(cache, repo_id, spec.revision or constants.DEFAULT_REVISION, info.sha)
    return _resolved(spec, tuple(paths))


def _remember_revision(cache: Path, repo_id: str, revision: str, commit: str) -> None:
    """Record which commit `revision` is, as hf_hub_download does for branches, for later offline runs.

    Downloads by commit hash leave ``refs/`` alone, so without this an offline run could not tell which
    cached snapshot ``main`` is. The layout is the documented one of the Hugging Face cache.
    """
    if revision == commit:
        return
    ref = _repo_cache(cache, repo_id) / "refs" / revision
    try:
        if not ref.is_file() or ref.read_text().strip() != commit:
            ref.parent.mkdir(parents=True, exist_ok=True)
            ref.write_text(commit)
    except OSError:
        pass  # A read-only shared cache still serves the files; only offline runs lose the shortcut.


def _resolve_from_cache(spec: ModelSpec, repo_id: str, cache: Path, *, why: str) -> ResolvedModel:
    """Resolve against the cache alone: the snapshot `spec.revision` last resolved to, and its GGUF files."""
    revision = spec.revision or constants.DEFAULT_REVISION
    repo_cache = _repo_cache(cache, repo_id)
    commit: str | None = revision if _COMMIT_HASH_RE.match(revision) else None
    if commit is None:
        try:
            commit = (repo_cache / "refs" / revision).read_text().strip()
        except OSError:
            commit = None
    snapshot = repo_cache / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        at = f"@{spec.revision}" if spec.revision else ""
        raise ModelError(f"{repo_id}{at} is not in the Hugging Face cache ({cache}) and {why}")
    # is_file() follows the cache's symlinks, so a blob lost to a half-done cleanup does not count.
    files = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()]
    try:
        chosen = select_gguf_files(files, spec.filter, repo_id)
    except ModelError as exc:
        raise ModelError(f"{why}, so only the Hugging Face cache was searched: {exc}") from exc
    return _resolved(spec, tuple(snapshot / name for name in chosen))


def _repo_cache(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _resolved(spec: ModelSpec, parts: tuple[Path, ...]) -> ResolvedModel:
    try:
        size = sum(part.stat().st_size for part in parts)
    except OSError as exc:
        raise ModelError(f"cannot read model file {exc.filename}: {exc.strerror}") from exc
    return ResolvedModel(spec=spec, path=parts[0], parts=parts, size_bytes=size)


def _is_unreachable(exc: Exception) -> bool:
    """Whether `exc` says the hub could not be asked at all, rather than what it answered."""
    if isinstance(exc, HfHubHTTPError):
        return exc.response.status_code >= 500
    return isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def _reason(exc: Exception) -> str:
    if isinstance(exc, HfHubHTTPError):
        return f"HTTP {exc.response.status_code}"
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _hub_error(
    exc: Exception, spec: ModelSpec, repo_id: str, hub: str, cache: Path, *, what: str
) -> ModelError:
    """Translate what huggingface_hub raised into the one line the user needs."""
    # Order matters: the hub's HTTP errors are OSErrors too.
    if isinstance(exc, GatedRepoError):
        return ModelError(
            f"{repo_id} is a gated repo: accept its terms at {hub}/{repo_id} "
            "and set HF_TOKEN to a token of that account"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelError(
            f"repo {repo_id} not found on {hub} (if it is private, set HF_TOKEN to a token that can read it)"
        )
    if isinstance(exc, RevisionNotFoundError):
        return ModelError(f"revision {spec.revision!r} not found in {repo_id}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return ModelError(f"{what} is no longer in {repo_id} on {hub}; try again")
    if isinstance(exc, HfHubHTTPError):
        status = exc.response.status_code
        if status in (401, 403):
            return ModelError(f"the hub at {hub} refused access to {repo_id} (HTTP {status}): check HF_TOKEN")
        return ModelError(f"the hub at {hub} failed on {what} with HTTP {status}; try again later")
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return ModelError(
            f"no space left on device while downloading {what} into {cache}; free space or set HF_HUB_CACHE"
        )
    if isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return ModelError(
            f"cannot write {what} into {cache}: {os.strerror(exc.errno)}; set HF_HUB_CACHE elsewhere"
        )
    if _is_unreachable(exc) or isinstance(exc, FileNotFoundError):
        # hf_hub_download reports a failed HEAD request as a FileNotFoundError (LocalEntryNotFoundError).
        cause = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
        return ModelError(f"cannot download {what} from {hub}: {_reason(cause)}")
    return ModelError(f"cannot download {what} from {repo_id}: {_reason(exc)}")
