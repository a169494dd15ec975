"""The hive at a glance: the dashboard page at /, and the JSON it polls (/v1/workers and /stats).

These are public unless --stats-key is set, and so are kept free of secrets: a worker's payout address
(`ln_url`) and token never appear, and neither does anything about what was asked. Who is owed what is
the admin usage report's business. With a stats key, the page is opened as /?key=KEY and its script
sends the key in an Authorization header when it polls; the static files hold no data and stay public.
"""

from __future__ import annotations

import time
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from queenbee.auditing import AuditService
from queenbee.auth import stats_endpoint
from queenbee.hive import Hive
from queenbee.metrics import RecentActivity, Served
from queenbee.worker_session import WorkerSession

if TYPE_CHECKING:  # the replicas module needs the redis package, which a queen on its own does not
    from queenbee.replicas import ReplicaHive

# The page loads nothing but its own script and styles, so a worker that registers a model name full of
# markup gets it shown as text, never run.
_PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
    # The address may carry ?key=: never send it on in a Referer.
    "Referrer-Policy": "no-referrer",
}


def _gpus(worker: WorkerSession) -> list[dict[str, Any]]:
    registration = worker.registration
    # The registration's vram counts NVIDIA GPUs if there are any, else OpenCL ones: list the same set.
    api, gpus = ("cuda", registration.nv_gpus) if registration.nv_gpus else ("opencl", registration.cl_gpus)
    return [
        {"name": gpu.name, "api": api, "memory": gpu.memory, "memory_free": gpu.memory_free} for gpu in gpus
    ]


def worker_summary(
    worker: WorkerSession, served: Served, *, now: float, now_monotonic: float
) -> dict[str, Any]:
    """A connected worker as /v1/workers shows it: no payout address, no token."""
    registration = worker.registration
    return {
        "id": worker.id,
        "object": "worker",
        "version": registration.worker_version,
        "connected_at": round(worker.connected_at, 3),
        "uptime": round(max(0.0, now - worker.connected_at), 3),
        "hardware": {
            "cpu_count": registration.cpu_count,
            "memory": registration.memory,
            "disk_space": registration.disk_space,
            "vram": registration.vram,
            "gpus": _gpus(worker),
        },
        "models": [
            {"id": model.id, "n_ctx": model.n_ctx, "n_gpu_layers": model.n_gpu_layers}
            for model in registration.models
        ],
        "slots": {"total": worker.parallel, "busy": worker.in_flight, "free": worker.free_slots},
        "speed": {
            model: {
                "ttft": speed.ttft,
                "tokens_per_second": speed.tokens_per_second,
                "samples": speed.samples,
            }
            for model, speed in sorted(worker.speed.items())
        },
        "benched": worker.health.benched(now_monotonic),
        "served": {
            "requests": served.requests,
            "prompt_tokens": served.prompt_tokens,
            "completion_tokens": served.completion_tokens,
        },
    }


async def list_workers(request: Request) -> Response:
    """GET /v1/workers: the connected workers (of every replica, in a hive of them), in the order they
    connected, without secrets."""
    hive: Hive = request.state.hive
    activity: RecentActivity = request.state.activity
    now, now_monotonic = time.time(), time.monotonic()
    audits: AuditService | None = getattr(request.state, "audits", None)
    data = [
        worker_summary(worker, activity.served(worker.id), now=now, now_monotonic=now_monotonic)
        | ({"audit": audits.worker_view(worker)} if audits is not None and audits.enabled else {})
        # In a hive of replicas (--redis-url) every replica lists every worker, with the one it is on.
        | ({"replica": worker.replica or hive.replica_id} if hive.replica_id is not None else {})
        for worker in sorted(hive.workers.values(), key=lambda worker: worker.connected_at)
    ]
    return JSONResponse({"object": "list", "data": data})


async def stats(request: Request) -> Response:
    """GET /stats: load per model, throughput over the last minute, totals since the queen started; in a
    hive of replicas, also the whole hive's throughput and totals (`hive`)."""
    hive: Hive = request.state.hive
    activity: RecentActivity = request.state.activity
    workers = list(hive.workers.values())
    models = []
    for model in hive.models():
        serving = hive.serving(model)
        models.append(
            {
                "id": model,
                "workers": len(serving),
                "slots_total": sum(worker.parallel for worker in serving),
                "slots_busy": sum(worker.in_flight for worker in serving),
                "queue_depth": hive.queue_depth(model),
            }
        )
    busy = sum(worker.in_flight for worker in workers)
    free = sum(worker.free_slots for worker in workers)
    body: dict[str, Any] = {
        "uptime": round(time.monotonic() - activity.started, 3),
        "workers": len(workers),
        "slots": {"busy": busy, "free": free, "total": sum(worker.parallel for worker in workers)},
        "queue_depth": hive.queue_depth(),
        "models": models,
        "throughput": activity.throughput(),
        "totals": {
            "requests": activity.totals.requests,
            "failed": activity.failed,
            "prompt_tokens": activity.totals.prompt_tokens,
            "completion_tokens": activity.totals.completion_tokens,
        },
    }
    replicas: ReplicaHive | None = getattr(request.state, "replicas", None)
    if replicas is not None:
        # In a hive of replicas, the traffic of every replica's clients: "throughput" and "totals" above
        # are this replica's own.
        body["hive"] = replicas.stats()
    return JSONResponse(body)


def dashboard_routes() -> list[BaseRoute]:
    """The dashboard page, its static files, and the JSON it reads."""
    page = resources.files("queenbee").joinpath("static/index.html").read_text(encoding="utf-8")

    async def dashboard(request: Request) -> Response:
        """GET /: the dashboard page."""
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    return [
        Route("/", stats_endpoint(dashboard, key_in_query=True), methods=["GET"]),
        Route("/v1/workers", stats_endpoint(list_workers), methods=["GET"]),
        Route("/stats", stats_endpoint(stats), methods=["GET"]),
        Mount("/static", StaticFiles(packages=[("queenbee", "static")]), name="static"),
    ]
