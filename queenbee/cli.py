"""The `queenbee` command: parse settings, configure logging, run uvicorn; `queenbee usage` reports usage."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

from queenbee.app import create_app
from queenbee.auth import KeysFileError, SecretFileError
from queenbee.http_limits import HeaderDeadlineProtocol, HostPatternError
from queenbee.ledger import LedgerError, connect
from queenbee.logs import configure_logging
from queenbee.server import DrainingServer
from queenbee.settings import QueenSettings
from queenbee.usage_report import usage_main

log = logging.getLogger("queenbee")


def load_settings(argv: list[str]) -> QueenSettings:
    """Settings from the command line over QUEENBEE_* variables over defaults; exits 2 on bad input."""
    try:
        return CliApp.run(QueenSettings, cli_args=argv)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            option = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
            print(f"queenbee: error: {option}: {error['msg']}", file=sys.stderr)
        raise SystemExit(2) from None


def uvicorn_config(settings: QueenSettings) -> uvicorn.Config:
    """The uvicorn configuration for `settings`: the CLI's and the tests' servers both use it.

    Beyond --max-connections uvicorn answers a plain-text 503 (not OpenAI's JSON): it has no hook for the
    body, and the cap protects the queen before any of its code runs.
    """
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=HeaderDeadlineProtocol.with_timeout(settings.header_timeout),
        limit_concurrency=settings.max_connections,
        ws="websockets-sansio",
        ws_max_size=settings.max_frame_bytes,
        # Frames are small JSON relayed as they come: compressing each costs the queen more CPU than
        # the bytes it saves on the workers' links (a 30 token/s stream is a few KB/s).
        ws_per_message_deflate=False,
        ws_ping_interval=settings.heartbeat_interval,
        ws_ping_timeout=settings.heartbeat_timeout,
        timeout_graceful_shutdown=round(settings.shutdown_grace),
        lifespan="on",
        # uvicorn's loggers propagate to the one handler main() sets up, so --log-json covers them too.
        log_config=None,
    )


def main(argv: list[str] | None = None) -> int:
    """Run the queen until interrupted, or `queenbee usage ...` to print the usage report."""
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["usage"]:
        return usage_main(args[1:])
    settings = load_settings(args)
    configure_logging(settings.log_level, json_lines=settings.log_json)
    try:
        config = uvicorn_config(settings)
        # Open (and migrate) the ledger once before serving, so a bad --db fails here in one line.
        connect(settings.db).close()
    except KeysFileError as exc:
        print(f"queenbee: error: --api-keys-file: {exc}", file=sys.stderr)
        return 2
    except (SecretFileError, HostPatternError) as exc:
        print(f"queenbee: error: {exc}", file=sys.stderr)
        return 2
    except LedgerError as exc:
        print(f"queenbee: error: --db: {exc}", file=sys.stderr)
        return 1
    DrainingServer(config, grace=settings.shutdown_grace).run()
    return 0
