"""Who may use the queen: client API keys, the worker token, the admin key and the stats key.

Every secret may come from a file (--worker-token-file, --admin-key-file, --stats-key-file,
--api-keys-file) or a QUEENBEE_* variable, so that none need appear on a command line; `Secrets` reads
the files once, at startup.

Secrets are compared as SHA-256 digests with `hmac.compare_digest`, so how long a comparison takes says
nothing about how much of a guess was right. Plain client keys are not kept once they are loaded: the
rest of the queen (the ledger, the logs, the rate limiter) only ever sees a key's id.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from queenbee.errors import AuthenticationError
from queenbee.settings import QueenSettings

log = logging.getLogger("queenbee.auth")

Endpoint = Callable[[Request], Awaitable[Response]]

_NAME = re.compile(r"[A-Za-z0-9_.@:+-]{1,64}")
_OPTION = re.compile(r"(rpm|tpm)=(.*)")


class KeysFileError(ValueError):
    """The API keys file is missing or malformed."""


class SecretFileError(ValueError):
    """A secret's file is unusable, or a secret is given twice: the message names the option only."""


def read_secret_file(path: Path, option: str) -> SecretStr:
    """The first line of `path`, stripped; SecretFileError naming `option` if unreadable or empty."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretFileError(f"{option}: cannot read {path}: {exc.__class__.__name__}") from None
    lines = text.splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise SecretFileError(f"{option}: the first line of {path} is empty; it must be the secret")
    return SecretStr(secret)


def _one_secret(value: SecretStr | None, path: Path | None, option: str) -> SecretStr | None:
    if value is not None and path is not None:
        raise SecretFileError(f"{option}-file: give {option} or {option}-file, not both")
    if path is not None:
        return read_secret_file(path, f"{option}-file")
    return value


@dataclass(frozen=True)
class Secrets:
    """The queen's own secrets, from their options or their files; None means that guard is off."""

    worker_token: SecretStr | None = None
    """What workers must present to register; None lets any worker register."""
    admin_key: SecretStr | None = None
    """The key for /admin; None means the admin endpoints do not exist."""
    stats_key: SecretStr | None = None
    """The key for /stats, /metrics, /v1/workers and the dashboard; None leaves them public."""

    @classmethod
    def from_settings(cls, settings: QueenSettings) -> Secrets:
        """Read the secrets' files once; SecretFileError if one is unusable or a secret is given twice."""
        return cls(
            worker_token=_one_secret(settings.worker_token, settings.worker_token_file, "--worker-token"),
            admin_key=_one_secret(settings.admin_key, settings.admin_key_file, "--admin-key"),
            stats_key=_one_secret(settings.stats_key, settings.stats_key_file, "--stats-key"),
        )

    def may_see_stats(self, token: str) -> bool:
        """Whether `token` is the stats key or the admin key, in time that does not say which."""
        stats = self.stats_key is not None and secret_matches(self.stats_key, token)
        admin = self.admin_key is not None and secret_matches(self.admin_key, token)
        return stats or admin


@dataclass(frozen=True)
class ApiKey:
    """A client key as the queen keeps it: an id for the records, the secret's digest, its limits."""

    id: str
    digest: bytes = field(repr=False)
    rpm: int | None = None
    """Requests per minute for this key; None means the queen's --rate-limit-rpm."""
    tpm: int | None = None
    """Tokens per minute for this key; None means the queen's --rate-limit-tpm."""


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def key_id(secret: str) -> str:
    """A short, stable id for a key that has no name: safe to log and store, useless to authenticate."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:8]


def secret_matches(expected: SecretStr, given: str) -> bool:
    """Whether `given` is the secret, in time that does not depend on where they differ."""
    return hmac.compare_digest(_digest(expected.get_secret_value()), _digest(given))


def parse_keys_file(text: str, source: str = "keys file") -> list[ApiKey]:
    """The keys in a keys file: one per line, 'KEY' or 'NAME KEY', optionally followed by rpm=N tpm=N.

    Error messages name the line but never repeat its content, which may be a secret.
    """
    keys: list[ApiKey] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        positional: list[str] = []
        limits: dict[str, int] = {}
        for token in line.split():
            option = _OPTION.fullmatch(token)
            if option is None:
                positional.append(token)
                continue
            value = option.group(2)
            if not value.isdigit() or int(value) < 1:
                raise KeysFileError(f"{source}, line {number}: {option.group(1)} must be a positive integer")
            limits[option.group(1)] = int(value)
        if len(positional) == 1:
            name, secret = key_id(positional[0]), positional[0]
        elif len(positional) == 2:
            name, secret = positional
            if not _NAME.fullmatch(name):
                raise KeysFileError(
                    f"{source}, line {number}: a key's name is 1 to 64 letters, digits or _.@:+-"
                )
        else:
            raise KeysFileError(f"{source}, line {number}: expected 'KEY' or 'NAME KEY [rpm=N] [tpm=N]'")
        keys.append(ApiKey(name, _digest(secret), rpm=limits.get("rpm"), tpm=limits.get("tpm")))
    return keys


class ClientKeys:
    """The API keys clients may use; none at all means the queen is open."""

    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self.keys = tuple(keys)
        if len({key.digest for key in self.keys}) != len(self.keys):
            raise KeysFileError("the same API key is configured twice")
        if len({key.id for key in self.keys}) != len(self.keys):
            raise KeysFileError("two API keys have the same name")

    @classmethod
    def from_settings(cls, settings: QueenSettings) -> ClientKeys:
        """The keys from --api-key and --api-keys-file; raises KeysFileError if the file is unusable."""
        plain = [secret.get_secret_value() for secret in settings.api_key]
        keys = [ApiKey(key_id(secret), _digest(secret)) for secret in plain]
        if settings.api_keys_file is not None:
            keys += load_keys_file(settings.api_keys_file)
        return cls(keys)

    @property
    def open(self) -> bool:
        """Whether any client may call without a key."""
        return not self.keys

    def authenticate(self, authorization: str | None, api_key: str | None = None) -> ApiKey | None:
        """The key an Authorization header (or Anthropic's x-api-key header) carries.

        None on an open queen; AuthenticationError otherwise.
        """
        if self.open:
            return None
        token = bearer_token(authorization) or (api_key or "").strip() or None
        if token is None:
            raise AuthenticationError(
                "You didn't provide an API key. Send it in an Authorization header: 'Bearer YOUR_KEY'."
            )
        digest = _digest(token)
        found: ApiKey | None = None
        # No early exit: the work is the same whichever key matches, or none.
        for key in self.keys:
            if hmac.compare_digest(key.digest, digest):
                found = key
        if found is None:
            raise AuthenticationError("Incorrect API key provided.")
        return found


def load_keys_file(path: Path) -> list[ApiKey]:
    """Read and parse a keys file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read {path}: {exc.__class__.__name__}") from None
    return parse_keys_file(text, str(path))


def bearer_token(authorization: str | None) -> str | None:
    """The token of an 'Authorization: Bearer TOKEN' header, or None if there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def worker_refusal(secrets: Secrets, auth_key: str) -> str | None:
    """Why a worker presenting `auth_key` may not register, or None if it may."""
    if secrets.worker_token is None:
        return None
    if not auth_key:
        return "this queen requires a worker token: start workerbee with --auth-key"
    if not secret_matches(secrets.worker_token, auth_key):
        return "the worker token (--auth-key) is wrong"
    return None


def require_admin(request: Request) -> None:
    """Let the request through only with the admin key; without one configured, admin routes do not exist."""
    secrets: Secrets = request.state.secrets
    if secrets.admin_key is None:
        raise HTTPException(404, "Not Found")
    token = bearer_token(request.headers.get("authorization"))
    if token is None or not secret_matches(secrets.admin_key, token):
        raise AuthenticationError("This endpoint needs the admin key.")


def stats_endpoint(endpoint: Endpoint, *, key_in_query: bool = False) -> Endpoint:
    """Guard a stats endpoint: with a stats key configured, the caller needs it (or the admin key).

    `key_in_query` also accepts `?key=KEY`, for the dashboard page, which a browser opens by address.
    """

    async def guarded(request: Request) -> Response:
        secrets: Secrets = request.state.secrets
        if secrets.stats_key is not None:
            token = bearer_token(request.headers.get("authorization"))
            if token is None and key_in_query:
                token = request.query_params.get("key") or None
            if token is None:
                raise AuthenticationError(
                    "This endpoint needs the stats key. Send it in an Authorization header: 'Bearer KEY'."
                )
            if not secrets.may_see_stats(token):
                raise AuthenticationError("Incorrect stats key provided.")
        return await endpoint(request)

    guarded.__name__ = endpoint.__name__
    guarded.__doc__ = endpoint.__doc__
    return guarded


def client_endpoint(endpoint: Endpoint) -> Endpoint:
    """Guard a client endpoint: the caller needs a client key and must be within its rate limits.

    A wrapper around the route's handler rather than a middleware, so that its errors go through the
    app's one error mapping like every other.
    """

    async def guarded(request: Request) -> Response:
        clients: ClientKeys = request.state.clients
        key = clients.authenticate(request.headers.get("authorization"), request.headers.get("x-api-key"))
        request.state.api_key_id = key.id if key is not None else None
        limiter = request.state.limiter
        # Only a hive's limiter (--redis-url) asks Redis: a queen on its own admits without awaiting.
        lease = await limiter.admit_shared(key) if limiter.shared else limiter.admit(key)
        request.state.lease = lease
        try:
            return await endpoint(request)
        finally:
            # A request forwarded to a worker settles its lease when it ends (streams outlive this
            # handler); one refused before that, a 400 say, used nothing and frees its slot here.
            if not lease.handed_over:
                lease.settle(0)

    guarded.__name__ = endpoint.__name__
    guarded.__doc__ = endpoint.__doc__
    return guarded


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the queen reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: QueenSettings, clients: ClientKeys, secrets: Secrets) -> None:
    """Say loudly at startup what anyone on the network can do to a queen with no keys."""
    if is_loopback(settings.host):
        return
    if clients.open:
        log.warning(
            "NO API KEYS: the queen listens on %s and anyone who can reach it may use it; "
            "set --api-key or --api-keys-file",
            settings.host,
        )
    if secrets.worker_token is None:
        log.warning(
            "NO WORKER TOKEN: the queen listens on %s and anyone who can reach it may register a worker "
            "and receive prompts; set --worker-token-file (or --worker-token)",
            settings.host,
        )
    if secrets.stats_key is None:
        log.warning(
            "NO STATS KEY: the queen listens on %s and /stats, /metrics, /v1/workers and the dashboard "
            "are public (workers' hardware, models, throughput); set --stats-key-file (or --stats-key)",
            settings.host,
        )
