"""A tiny local Hugging Face hub, so tests run huggingface_hub's real download code without the internet.

It serves only what `workerbee.models.resolve_model` makes huggingface_hub ask for:

* ``GET /api/models/{user}/{repo}`` and ``GET /api/models/{user}/{repo}/revision/{revision}``: the model info
  (``sha`` and ``siblings``), as ``HfApi.model_info`` reads it;
* ``HEAD`` and ``GET /{user}/{repo}/resolve/{revision}/{path}``: a file, with the ``X-Repo-Commit``,
  ``ETag``, ``X-Linked-Etag``, ``X-Linked-Size`` and ``Content-Length`` headers ``hf_hub_download`` checks,
  and ``Range`` requests for resumed downloads.

Errors carry the hub's ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
``GatedRepo``), which is how huggingface_hub tells them apart. Each repo has one commit, reachable as
``main`` or by its hash. Every request served is recorded in `FakeHub.requests`.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from types import TracebackType

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Served:
    """One request the fake hub answered."""

    method: str
    path: str
    range: str | None
    authorization: str | None


class _Truncated(Response):
    """Announce the whole file but send only its first bytes, then drop the connection, like a network cut."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": True})


class FakeHub:
    """A hub serving `repos` ({repo_id: {path: content}}) on 127.0.0.1; use it as a context manager."""

    def __init__(self, repos: Mapping[str, Mapping[str, bytes]], *, gated: Collection[str] = ()) -> None:
        self.repos = {repo_id: dict(files) for repo_id, files in repos.items()}
        self.gated = set(gated)
        self.requests: list[Served] = []
        # When True every request gets a 503, as when the hub is down.
        self.down = False
        self._cut_after: dict[tuple[str, str], int] = {}
        self._socket: socket.socket | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self._app = Starlette(
            routes=[
                Route("/api/models/{user}/{name}", self._model_info),
                Route("/api/models/{user}/{name}/revision/{revision:path}", self._model_info),
                Route(
                    "/{user}/{name}/resolve/{revision}/{path:path}", self._resolve, methods=["GET", "HEAD"]
                ),
            ]
        )

    def commit(self, repo_id: str) -> str:
        """The hash of the repo's only commit."""
        digest = hashlib.sha1(repo_id.encode())
        for path, content in sorted(self.repos[repo_id].items()):
            digest.update(path.encode() + b"\0" + content)
        return digest.hexdigest()

    def cut_next_download(self, repo_id: str, path: str, after: int) -> None:
        """Make the next GET of this file stop after `after` bytes, as if the connection broke."""
        self._cut_after[(repo_id, path)] = after

    def downloads(self) -> list[Served]:
        """The GET requests for file contents served so far."""
        return [r for r in self.requests if r.method == "GET" and "/resolve/" in r.path]

    def __enter__(self) -> FakeHub:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            self._record,
            interface="asgi3",
            http="h11",
            ws="none",
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, name="fake-hub", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError("the fake hub did not start")
            time.sleep(0.005)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()

    async def _record(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}
            self.requests.append(
                Served(scope["method"], scope["path"], headers.get("range"), headers.get("authorization"))
            )
            if self.down:
                await Response("hub down", status_code=503)(scope, receive, send)
                return
        await self._app(scope, receive, send)

    def _find(self, request: Request) -> tuple[str, Mapping[str, bytes]] | Response:
        repo_id = f"{request.path_params['user']}/{request.path_params['name']}"
        if repo_id not in self.repos:
            return _error(404, "RepoNotFound", "Repository not found")
        revision = request.path_params.get("revision", "main")
        if revision not in ("main", self.commit(repo_id)):
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo_id, self.repos[repo_id]

    async def _model_info(self, request: Request) -> Response:
        found = self._find(request)
        if isinstance(found, Response):
            return found
        repo_id, files = found
        return JSONResponse(
            {
                "_id": repo_id,
                "id": repo_id,
                "modelId": repo_id,
                "sha": self.commit(repo_id),
                "private": False,
                "gated": "auto" if repo_id in self.gated else False,
                "disabled": False,
                "siblings": [{"rfilename": path} for path in sorted(files)],
            }
        )

    async def _resolve(self, request: Request) -> Response:
        found = self._find(request)
        if isinstance(found, Response):
            return found
        repo_id, files = found
        commit = self.commit(repo_id)
        path = request.path_params["path"]
        if repo_id in self.gated:
            return _error(401, "GatedRepo", f"Access to model {repo_id} is restricted.", commit)
        if path not in files:
            return _error(404, "EntryNotFound", "Entry not found", commit)
        content = files[path]
        etag = f'"{hashlib.sha256(content).hexdigest()}"'
        headers = {
            "X-Repo-Commit": commit,
            "ETag": etag,
            "X-Linked-Etag": etag,
            "X-Linked-Size": str(len(content)),
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if request.method == "HEAD":
            return Response(b"", headers={**headers, "Content-Length": str(len(content))})
        start, status = 0, 200
        wanted = request.headers.get("range")
        if wanted is not None:
            match = _RANGE_RE.match(wanted)
            if match is None or int(match[1]) >= len(content):
                return Response(b"", status_code=416, headers={"Content-Range": f"bytes */{len(content)}"})
            start, status = int(match[1]), 206
            end = min(int(match[2]), len(content) - 1) if match[2] else len(content) - 1
            content = content[start : end + 1]
            headers["Content-Range"] = f"bytes {start}-{end}/{len(files[path])}"
        cut = self._cut_after.pop((repo_id, path), None)
        if cut is not None:
            return _Truncated(
                content[:cut], status_code=status, headers={**headers, "Content-Length": str(len(content))}
            )
        return Response(content, status_code=status, headers=headers)


def _error(status: int, code: str, message: str, commit: str | None = None) -> Response:
    headers = {"X-Error-Code": code, "X-Error-Message": message}
    if commit is not None:
        headers["X-Repo-Commit"] = commit
    return JSONResponse({"error": message}, status_code=status, headers=headers)
