"""The `queenbee` command: parse settings, configure logging, run uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

from queenbee.app import create_app
from queenbee.server import DrainingServer
from queenbee.settings import QueenSettings

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
    """The uvicorn configuration for `settings`."""
    return uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws="websockets-sansio",
        ws_max_size=settings.max_frame_bytes,
        ws_ping_interval=settings.heartbeat_interval,
        ws_ping_timeout=settings.heartbeat_timeout,
        timeout_graceful_shutdown=round(settings.shutdown_grace),
        lifespan="on",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the queen until interrupted."""
    settings = load_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    DrainingServer(uvicorn_config(settings), grace=settings.shutdown_grace).run()
    return 0
