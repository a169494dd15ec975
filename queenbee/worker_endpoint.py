"""The /worker websocket: registration handshake, then the session's reader until the worker leaves."""

from __future__ import annotations

import asyncio
import logging
import uuid

from starlette.websockets import WebSocket, WebSocketDisconnect

from protocol import (
    ErrorCode,
    FrameError,
    ProtocolError,
    Register,
    Welcome,
    check_registration,
    decode_worker_frame,
    encode,
)
from queenbee.auditing import AuditService
from queenbee.auth import Secrets, worker_refusal
from queenbee.hive import Hive
from queenbee.settings import QueenSettings
from queenbee.worker_session import WorkerSession

log = logging.getLogger("queenbee.workers")

CLOSE_POLICY_VIOLATION = 1008
CLOSE_PROTOCOL_ERROR = 1002


async def _receive_registration(websocket: WebSocket, settings: QueenSettings) -> Register:
    async with asyncio.timeout(settings.register_timeout):
        message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    data = message.get("text")
    if data is None:
        data = message.get("bytes") or b""
    return check_registration(decode_worker_frame(data, limit=settings.max_frame_bytes))


async def worker_endpoint(websocket: WebSocket) -> None:
    """Accept a worker: it must register first; then it serves until it disconnects."""
    hive: Hive = websocket.state.hive
    settings: QueenSettings = websocket.state.settings
    secrets: Secrets = websocket.state.secrets
    peer = f"{websocket.client.host}:{websocket.client.port}" if websocket.client else "unknown"
    # A browser always sends Origin and workerbee never does: refuse web pages (cross-site websocket
    # hijacking) before accepting, so that uvicorn answers the upgrade with 403.
    origin = websocket.headers.get("origin")
    if origin is not None and origin not in settings.worker_origin:
        log.warning("refused worker websocket from %s: Origin %r is not allowed", peer, origin[:200])
        await websocket.close(code=CLOSE_POLICY_VIOLATION)
        return
    await websocket.accept()
    try:
        registration = await _receive_registration(websocket, settings)
    except FrameError as exc:
        log.warning("refused worker from %s: %s", peer, exc.message)
        await websocket.send_text(encode(ProtocolError(code=exc.code, message=exc.message)))
        await websocket.close(code=CLOSE_PROTOCOL_ERROR, reason=exc.message[:120])
        return
    except TimeoutError:
        log.warning("refused worker from %s: no registration within %g s", peer, settings.register_timeout)
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason="registration timeout")
        return
    except WebSocketDisconnect:
        return
    refusal = worker_refusal(secrets, registration.auth_key)
    if refusal is not None:
        # The worker treats UNAUTHORIZED as final: it logs the reason once and exits instead of retrying.
        log.warning("refused worker from %s: %s", peer, refusal)
        await websocket.send_text(encode(ProtocolError(code=ErrorCode.UNAUTHORIZED, message=refusal)))
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason=f"unauthorized: {refusal}"[:120])
        return
    audits: AuditService = websocket.state.audits
    admission = audits.admit(registration)
    if admission.refusal is not None:
        # Final for the worker too: a wrong auditor token or only pinned models with other files.
        log.warning("refused worker from %s: %s", peer, admission.refusal)
        message = admission.refusal[:4000]
        await websocket.send_text(encode(ProtocolError(code=ErrorCode.UNAUTHORIZED, message=message)))
        await websocket.close(code=CLOSE_POLICY_VIOLATION, reason=f"refused: {message}"[:120])
        return
    for model_id, why in admission.refused_models.items():
        log.warning("worker from %s is refused '%s': %s", peer, model_id, why)
    registration = admission.registration
    worker = WorkerSession(
        f"worker-{uuid.uuid4().hex[:12]}",
        websocket,
        registration,
        on_slot_free=hive.slot_freed,
        on_cache_summary=hive.cache_summary,
        cancel_grace=settings.cancel_grace,
        max_frame_bytes=settings.max_frame_bytes,
        max_buffer_bytes=settings.max_request_buffer_bytes,
        max_response_bytes=settings.max_response_bytes,
        health=hive.health_of(registration.instance_id),
    )
    # Into rotation first, welcome second, with nothing awaited between: the welcome takes the session's
    # send lock before any job can, so the worker always reads it first, and is routable once welcomed.
    hive.add(worker)
    await worker.send(
        Welcome(
            worker_id=worker.id,
            max_frame_bytes=settings.max_frame_bytes,
            refused_models=admission.refused_models,
        )
    )
    hive.spawn(audits.joined(worker, admission.trusted))
    log.info(
        "worker %s connected from %s: models=%s parallel=%d",
        worker.id,
        peer,
        ",".join(sorted(worker.models)),
        worker.parallel,
    )
    try:
        reason = await worker.run_reader()
    finally:
        hive.remove(worker)
        audits.left(worker)
    log.info("worker %s left: %s", worker.id, reason)
