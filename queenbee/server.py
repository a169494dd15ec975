"""The queen's uvicorn server, with a shutdown that lets requests in flight finish first.

uvicorn's own shutdown closes every websocket at once, which would cut the workers off in the middle of
the streams it is waiting for. This server stops accepting connections, refuses new requests, waits for
the ones in flight (up to the grace period), and only then lets uvicorn close the rest.
"""

from __future__ import annotations

import logging
import socket

import uvicorn

from queenbee.hive import Hive

log = logging.getLogger("queenbee.server")


class DrainingServer(uvicorn.Server):
    """A uvicorn server that drains the hive before closing connections."""

    def __init__(self, config: uvicorn.Config, *, grace: float) -> None:
        super().__init__(config)
        self.grace = grace

    def _hive(self) -> Hive | None:
        app = self.config.loaded_app if self.config.loaded else self.config.app
        # loaded_app may be wrapped in uvicorn's middleware; the starlette app is the innermost `.app`.
        while app is not None:
            state = getattr(app, "state", None)
            hive = getattr(state, "hive", None) if state is not None else None
            if isinstance(hive, Hive):
                return hive
            app = getattr(app, "app", None)
        return None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Stop listening, wait for requests in flight, then shut down as uvicorn does."""
        for server in self.servers:
            server.close()
        hive = self._hive()
        if hive is not None and not self.force_exit:
            hive.draining = True
            busy = hive.busy()
            if busy:
                log.info("shutting down: waiting up to %g s for %d request(s) in flight", self.grace, busy)
            if not await hive.wait_idle(self.grace):
                log.warning("shutting down with %d request(s) still in flight after the grace", hive.busy())
        await super().shutdown(sockets)
