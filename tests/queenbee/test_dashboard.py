"""The hive at a glance: /v1/workers, /stats, and the dashboard page in a real headless Chromium."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import headless_chromium
from fake_worker import FakeWorker
from playwright.async_api import ConsoleMessage, Error, Request, async_playwright
from servers import TIME_UNIT, QueenServer

from protocol import GpuInfo, Register
from queenbee.settings import QueenSettings

LN_URL = "secret-payout@wallet.example"
WORKER_TOKEN = "dashboard-worker-token"
PROMPT = "the dashboard must never show this prompt"


@pytest.fixture
def queen_settings(tmp_path: Path) -> QueenSettings:
    """A queen that requires a worker token, with its ledger in tmp_path."""
    return QueenSettings(queue_timeout=2.0, db=tmp_path / "ledger.db", worker_token=WORKER_TOKEN)


class GpuWorker(FakeWorker):
    """A scripted worker that reports a GPU and some memory."""

    def registration(self) -> Register:
        """The fake's registration, with hardware in it."""
        return (
            super()
            .registration()
            .model_copy(
                update={
                    "cpu_count": 16,
                    "memory": 65536,
                    "vram": 24564,
                    "nv_gpu_count": 1,
                    "nv_gpus": [
                        GpuInfo(name="NVIDIA GeForce RTX 4090", memory=24564, memory_free=20000, index=0)
                    ],
                }
            )
        )


def gpu_worker(queen: QueenServer, **options: Any) -> GpuWorker:
    """A GPU worker with a payout address and the queen's token."""
    return GpuWorker(queen.worker_url, ln_url=LN_URL, auth_key=WORKER_TOKEN, **options)


async def chat(queen: QueenServer, model: str = "fake-model") -> httpx.Response:
    """One chat completion with the secret prompt."""
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPT}]}
        return await client.post("/v1/chat/completions", json=body)


async def test_workers_lists_hardware_load_speed_and_service(queen: QueenServer) -> None:
    """/v1/workers: id, hardware with GPUs, models, slots, measured speed, uptime, what it served."""
    worker = await gpu_worker(queen, parallel=2).connect()
    assert (await chat(queen)).status_code == 200
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        listing = (await client.get("/v1/workers")).json()
    await worker.close()
    assert listing["object"] == "list"
    [entry] = listing["data"]
    assert entry["id"] == worker.worker_id
    assert entry["hardware"]["cpu_count"] == 16
    assert entry["hardware"]["gpus"] == [
        {"name": "NVIDIA GeForce RTX 4090", "api": "cuda", "memory": 24564, "memory_free": 20000}
    ]
    assert [model["id"] for model in entry["models"]] == ["fake-model"]
    assert entry["slots"] == {"total": 2, "busy": 0, "free": 2}
    assert entry["speed"]["fake-model"]["samples"] == 1
    assert entry["speed"]["fake-model"]["tokens_per_second"] > 0
    assert entry["uptime"] >= 0
    assert entry["served"] == {"requests": 1, "prompt_tokens": 3, "completion_tokens": 2}
    assert entry["benched"] is False


async def test_stats_summarise_load_and_throughput(queen: QueenServer) -> None:
    """/stats: models with their workers and slots, throughput over the last minute, totals."""
    worker = await gpu_worker(queen).connect()
    assert (await chat(queen)).status_code == 200
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        stats = (await client.get("/stats")).json()
    await worker.close()
    assert stats["workers"] == 1
    assert stats["slots"] == {"busy": 0, "free": 1, "total": 1}
    assert stats["models"] == [
        {"id": "fake-model", "workers": 1, "slots_total": 1, "slots_busy": 0, "queue_depth": 0}
    ]
    assert stats["totals"] == {"requests": 1, "failed": 0, "prompt_tokens": 3, "completion_tokens": 2}
    assert stats["throughput"]["requests_per_minute"] > 0
    assert stats["throughput"]["completion_tokens_per_second"] > 0


async def test_no_public_endpoint_reveals_worker_secrets_or_prompts(queen: QueenServer) -> None:
    """Payout address, worker token and prompts appear in none of the pages anyone may fetch."""
    worker = await gpu_worker(queen).connect()
    assert (await chat(queen)).status_code == 200
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        pages = {
            path: (await client.get(path)).text
            for path in (
                "/",
                "/v1/workers",
                "/stats",
                "/metrics",
                "/health",
                "/v1/models",
                "/static/dashboard.js",
                "/admin/usage",
            )
        }
    await worker.close()
    for path, text in pages.items():
        for secret in (LN_URL, WORKER_TOKEN, PROMPT):
            assert secret not in text, f"{path} reveals {secret!r}"


async def test_page_and_assets_are_served_with_a_strict_policy(queen: QueenServer) -> None:
    """/ is HTML that may load only its own assets; the assets are served from the package."""
    async with httpx.AsyncClient(base_url=queen.base_url) as client:
        page = await client.get("/")
        assets = [
            await client.get(f"/static/{name}") for name in ("dashboard.js", "dashboard.css", "favicon.svg")
        ]
        missing = await client.get("/static/nothing.js")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "/static/dashboard.js" in page.text
    assert [asset.status_code for asset in assets] == [200, 200, 200]
    assert assets[0].headers["content-type"].split(";")[0] in {"text/javascript", "application/javascript"}
    assert missing.status_code == 404
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}


async def test_dashboard_in_a_headless_browser(queen: QueenServer, tmp_path: Path) -> None:
    """The page loads without console errors, shows the worker, and picks up a new one by itself."""
    worker = await gpu_worker(queen, models=("alpha-model",)).connect()
    assert (await chat(queen, "alpha-model")).status_code == 200
    problems: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"console {message.type}: {message.text}")

    def on_failed(request: Request) -> None:
        problems.append(f"request failed: {request.url} {request.failure}")

    def on_page_error(error: Error) -> None:
        problems.append(f"page error: {error}")

    timeout_ms = 15_000 * TIME_UNIT
    async with async_playwright() as playwright:
        browser = await headless_chromium(playwright, tmp_path)
        try:
            page = await browser.new_page()
            page.on("console", on_console)
            page.on("pageerror", on_page_error)
            page.on("requestfailed", on_failed)
            await page.goto(queen.base_url + "/", wait_until="load", timeout=timeout_ms)
            row = page.locator(f'#workers tr[data-worker-id="{worker.worker_id}"]')
            await row.wait_for(timeout=timeout_ms)
            row_text = await row.inner_text()
            models_text = await page.locator("#models").inner_text()
            status = await page.locator("#status").inner_text()
            served = await page.locator("#stat-tokens").inner_text()
            # Without a reload, the page finds a worker that connects after it was opened.
            late = await gpu_worker(queen, models=("beta-model",)).connect()
            await page.locator(f'#workers tr[data-worker-id="{late.worker_id}"]').wait_for(timeout=timeout_ms)
            await late.close()
            page_text = await page.locator("body").inner_text()
        finally:
            await browser.close()
    await worker.close()
    assert problems == []
    assert "alpha-model" in row_text
    assert "NVIDIA GeForce RTX 4090" in row_text
    assert "16 CPUs" in row_text
    assert "1 request\n" in row_text
    assert "alpha-model" in models_text
    assert status == "live"
    assert served == "5"
    assert LN_URL not in page_text


async def test_dashboard_behind_a_stats_key_in_a_headless_browser(tmp_path: Path) -> None:
    """With --stats-key the bare page is refused; opened as /?key=KEY it polls with the key and goes live."""
    stats_key = "dashboard-stats-key"
    settings = QueenSettings(queue_timeout=2.0, db=tmp_path / "ledger.db", stats_key=stats_key)
    queen = QueenServer(settings).start()
    worker = await FakeWorker(queen.worker_url).connect()
    problems: list[str] = []
    timeout_ms = 15_000 * TIME_UNIT
    try:
        async with async_playwright() as playwright:
            browser = await headless_chromium(playwright, tmp_path)
            try:
                refused = await browser.new_page()
                bare = await refused.goto(queen.base_url + "/", timeout=timeout_ms)
                await refused.close()
                # A page of its own: what the refused one logs (its favicon, say) is not this one's problem.
                page = await browser.new_page()
                page.on("console", lambda message: problems.append(f"console {message.type}: {message.text}"))
                page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
                await page.goto(f"{queen.base_url}/?key={stats_key}", wait_until="load", timeout=timeout_ms)
                row = page.locator(f'#workers tr[data-worker-id="{worker.worker_id}"]')
                await row.wait_for(timeout=timeout_ms)
                status = await page.locator("#status").inner_text()
            finally:
                await browser.close()
    finally:
        await worker.close()
        queen.stop()
    assert bare is not None
    assert bare.status == 401
    assert problems == []
    assert status == "live"
