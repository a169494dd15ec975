"""The queen's ASGI application: routes, error handlers, and the lifespan that owns runtime state."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import TYPE_CHECKING, TypedDict

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute

from queenbee.api.files import create_file, delete_file, file_content, list_files, retrieve_file
from queenbee.api.fine_tuning import (
    cancel_job,
    create_job,
    list_checkpoints,
    list_events,
    list_jobs,
    retrieve_job,
)
from queenbee.api.messages import count_tokens, create_message, is_messages_path
from queenbee.api.responses import create_response, delete_response, list_input_items, retrieve_response
from queenbee.auditing import AuditCollector, AuditService, auditor_secret, reinstate_worker
from queenbee.auth import ClientKeys, Secrets, client_endpoint, stats_endpoint, warn_if_exposed
from queenbee.dashboard import dashboard_routes
from queenbee.direct_routes import DirectRoutes
from queenbee.errors import QueenError, anthropic_error
from queenbee.gc_guard import CollectorGuard
from queenbee.hive import Hive
from queenbee.http_limits import check_host_patterns
from queenbee.ledger import Ledger
from queenbee.metrics import QueenMetrics, RecentActivity, metrics_endpoint
from queenbee.model_files import download_model, upload_model
from queenbee.observer import Observers, RequestLog, RequestObserver
from queenbee.openai_api import (
    chat_completions,
    completions,
    embeddings,
    health,
    list_models,
    retrieve_model,
)
from queenbee.ratelimit import RateLimiter
from queenbee.response_store import ResponseStore
from queenbee.settings import QueenSettings
from queenbee.training_queue import FineTunedModels, TrainingQueue
from queenbee.tuning_store import TuningStore
from queenbee.usage_report import admin_usage
from queenbee.worker_endpoint import worker_endpoint

if TYPE_CHECKING:
    from queenbee.replicas import ReplicaHive

log = logging.getLogger("queenbee.app")

_HTTP_ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error"}


class QueenState(TypedDict):
    """What every request handler finds in `request.state`."""

    hive: Hive
    settings: QueenSettings
    observer: RequestObserver
    clients: ClientKeys
    secrets: Secrets
    limiter: RateLimiter
    ledger: Ledger
    responses: ResponseStore
    metrics: QueenMetrics
    activity: RecentActivity
    tuning: TuningStore
    training: TrainingQueue
    fine_tuned: FineTunedModels
    audits: AuditService
    replicas: ReplicaHive | None
    """This queen's membership of a hive of replicas (--redis-url), or None."""


# Each API's errors in its own shape: the Messages API's are Anthropic's, every other OpenAI's.


async def _queen_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, QueenError)
    body = exc.anthropic_body() if is_messages_path(request.url.path) else exc.body()
    return JSONResponse(body, status_code=exc.status, headers=exc.headers())


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if is_messages_path(request.url.path):
        return JSONResponse(
            anthropic_error(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=exc.headers,
        )
    body = {
        "error": {
            "message": str(exc.detail),
            "type": _HTTP_ERROR_TYPES.get(exc.status_code, "invalid_request_error"),
            "param": None,
            "code": None,
        }
    }
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error while handling %s %s", request.method, request.url.path)
    if is_messages_path(request.url.path):
        return JSONResponse(anthropic_error(500, "Internal server error."), status_code=500)
    body = {
        "error": {"message": "Internal server error.", "type": "internal_error", "param": None, "code": None}
    }
    return JSONResponse(body, status_code=500)


def create_app(settings: QueenSettings) -> DirectRoutes:
    """Build the queen's application for `settings`.

    Raises KeysFileError if the API keys file cannot be used, SecretFileError if a secret's file cannot,
    HostPatternError for a bad --allowed-host: better now than at the first request.
    """
    clients = ClientKeys.from_settings(settings)
    secrets = Secrets.from_settings(settings)
    auditor_secret(settings)  # an unusable --auditor-token-file fails here, not at startup
    check_host_patterns(settings.allowed_host)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[QueenState]:
        hive = Hive(settings)
        # Also on app.state, for operators' tools and tests that hold the app rather than a request.
        app.state.hive = hive
        warn_if_exposed(settings, clients, secrets)
        ledger = await Ledger.open(settings.db, spool=settings.ledger_spool)
        # After the ledger: its migrations make the table the store uses.
        responses = await ResponseStore.open(settings.db, settings.responses_retention)
        limiter = RateLimiter.from_settings(settings, clients)
        metrics = QueenMetrics(hive)
        metrics.watch_ledger(ledger)
        activity = RecentActivity(hive)
        audits = AuditService(settings, hive, ledger)
        app.state.audits = audits
        metrics.registry.register(AuditCollector(audits))
        await audits.load()  # the standings a restart must not forget, before any worker joins
        audits.start()
        collector = CollectorGuard(freeze=settings.gc_freeze, observe=metrics.gc_pause)
        hive.on_join = collector.worker_joined
        hive.on_leave = collector.worker_left
        collector.start(len(hive.workers))
        app.state.collector = collector
        # The ledger first: a record is durable before anything else hears of it.
        observer = Observers([ledger, RequestLog(), metrics, activity])
        tuning = await TuningStore.open(settings.db)
        fine_tuned = FineTunedModels()
        training = TrainingQueue(hive, tuning, fine_tuned, observer, settings)
        await training.load()
        training_task = asyncio.create_task(training.run())
        replicas: ReplicaHive | None = None
        if settings.redis_url is not None:
            # Imported only here: a queen on its own needs neither the module nor the redis package.
            from queenbee.ratelimit_redis import SharedRateLimiter
            from queenbee.replicas import ReplicaCollector, ReplicaHive

            replicas = ReplicaHive.from_settings(hive, settings)
            app.state.replicas = replicas
            metrics.registry.register(ReplicaCollector(replicas))
            # The hive's limits: a key cannot multiply them by the number of replicas.
            limiter = SharedRateLimiter.shared_from_settings(settings, clients, replicas.redis)
            replicas.limiter = limiter
            replicas.activity = activity
            replicas.start()
        yield {
            "hive": hive,
            "settings": settings,
            "observer": observer,
            "clients": clients,
            "secrets": secrets,
            "limiter": limiter,
            "ledger": ledger,
            "responses": responses,
            "metrics": metrics,
            "activity": activity,
            "tuning": tuning,
            "training": training,
            "fine_tuned": fine_tuned,
            "audits": audits,
            "replicas": replicas,
        }
        # First: a job still training stays `running` in the store, and is queued again at the next start
        # rather than counted as lost when the workers are closed below.
        training_task.cancel()
        with suppress(asyncio.CancelledError):
            await training_task
        await audits.close()
        if replicas is not None:
            await replicas.close()
        for worker in list(hive.workers.values()):
            await worker.close(1001, "queen shutting down")
        await tuning.close()
        await responses.close()
        await ledger.close()
        await collector.close()

    routes = [
        Route("/v1/chat/completions", client_endpoint(chat_completions), methods=["POST"]),
        Route("/v1/completions", client_endpoint(completions), methods=["POST"]),
        Route("/v1/embeddings", client_endpoint(embeddings), methods=["POST"]),
        Route("/v1/responses", client_endpoint(create_response), methods=["POST"]),
        Route("/v1/responses/{response_id}", client_endpoint(retrieve_response), methods=["GET"]),
        Route("/v1/responses/{response_id}", client_endpoint(delete_response), methods=["DELETE"]),
        Route("/v1/responses/{response_id}/input_items", client_endpoint(list_input_items), methods=["GET"]),
        Route("/v1/messages", client_endpoint(create_message), methods=["POST"]),
        Route("/v1/messages/count_tokens", client_endpoint(count_tokens), methods=["POST"]),
        Route("/v1/models", client_endpoint(list_models), methods=["GET"]),
        Route("/worker/models/{sha256}", upload_model, methods=["PUT"]),
        Route("/worker/models/{sha256}", download_model, methods=["GET"]),
        Route("/v1/files", client_endpoint(create_file), methods=["POST"]),
        Route("/v1/files", client_endpoint(list_files), methods=["GET"]),
        Route("/v1/files/{file_id}", client_endpoint(retrieve_file), methods=["GET"]),
        Route("/v1/files/{file_id}", client_endpoint(delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", client_endpoint(file_content), methods=["GET"]),
        Route("/v1/fine_tuning/jobs", client_endpoint(create_job), methods=["POST"]),
        Route("/v1/fine_tuning/jobs", client_endpoint(list_jobs), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}", client_endpoint(retrieve_job), methods=["GET"]),
        Route("/v1/fine_tuning/jobs/{job_id}/cancel", client_endpoint(cancel_job), methods=["POST"]),
        Route("/v1/fine_tuning/jobs/{job_id}/events", client_endpoint(list_events), methods=["GET"]),
        Route(
            "/v1/fine_tuning/jobs/{job_id}/checkpoints", client_endpoint(list_checkpoints), methods=["GET"]
        ),
        Route("/v1/models/{model:path}", client_endpoint(retrieve_model), methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", stats_endpoint(metrics_endpoint), methods=["GET"]),
        Route("/admin/usage", admin_usage, methods=["GET"]),
        Route("/admin/workers/{identity}/reinstate", reinstate_worker, methods=["POST"]),
        WebSocketRoute("/worker", worker_endpoint),
        *dashboard_routes(),
    ]
    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            QueenError: _queen_error,
            HTTPException: _http_error,
            Exception: _unexpected_error,
        },
    )
    # The POST endpoints with a fixed path skip Starlette's router and middleware (queenbee/direct_routes.py).
    direct = {
        route.path: route.endpoint
        for route in routes
        if isinstance(route, Route) and route.methods == {"POST"} and "{" not in route.path
    }
    return DirectRoutes(
        app,
        direct,
        # Outermost, so that a request for another Host (DNS rebinding) reaches nothing, websockets included.
        allowed_hosts=settings.allowed_host,
        queen_error=_queen_error,
        http_error=_http_error,
        unexpected_error=_unexpected_error,
    )
