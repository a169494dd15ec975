"""Verified workers end to end: real queens, real workerbee processes on the real SmolLM2 model and on
quantizations of it made here, the real openai SDK.

A lying worker is a real engine on a variant (Q4_0 or Q2_K) that reports the bundled Q4_1 file's id and
SHA-256: its hash cache beside the variant says so. Audits run on every delivered answer here
(`--audit-rate 1`) so that a handful of requests decide; bench/audit_calibration.py measures the rates at
scale.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import openai
import pytest
from openai import OpenAI
from pydantic import SecretStr
from servers import LoopThread, QueenServer, smollm2_path, start_worker, stop_process, wait_until

from protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, Register, Usage
from queenbee.settings import QueenSettings
from workerbee.answer_ids import WithTokenIds
from workerbee.auditor import Auditor
from workerbee.connection import WorkerConnection
from workerbee.file_hash import cache_path, file_sha256
from workerbee.llama_engine import LlamaEngine, ModelConfig

MODEL = "SmolLM2-135M-Instruct.Q4_1"
AUDITOR_TOKEN = "auditor-secret"
ADMIN_KEY = "admin-secret"
PROMPTS = [
    "Describe the sea in two sentences.",
    "Name three primary colors.",
    "Write a haiku about rain.",
    "Explain gravity to a child.",
    "How do birds fly?",
    "List five fruits.",
    "Tell me a short story about a cat.",
    "What is a volcano?",
]


def quantize(source: Path, target: Path, ftype: int) -> Path:
    """A quantization of the bundled model, made with llama.cpp's own quantizer (about a second)."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) == 0
    return target


def posing_as(variant: Path, reference: Path, folder: Path) -> Path:
    """A copy of `variant` named like the reference, whose hash cache claims the reference's SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    liar = folder / reference.name
    shutil.copyfile(variant, liar)
    stat = liar.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": file_sha256(reference)}
    cache_path(liar).write_text(json.dumps(stamp))
    return liar


@pytest.fixture
def sdk() -> Iterator[Callable[..., OpenAI]]:
    """Makes openai clients for a queen (`sdk(queen, api_key)`), closed when the test ends: a client left
    to the garbage collector leaves its pooled socket unclosed."""
    opened: list[OpenAI] = []

    def make(queen: QueenServer, api_key: str = "unused") -> OpenAI:
        client = OpenAI(base_url=queen.openai_url, api_key=api_key, max_retries=0)
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


@pytest.fixture(scope="module")
def variants(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Q4_0 and Q2_K of the bundled Q4_1 model, each also as a liar's copy claiming to be Q4_1."""
    folder = tmp_path_factory.mktemp("variants")
    reference = smollm2_path()
    made = {
        "Q4_0": quantize(reference, folder / "q4_0.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0),
        "Q2_K": quantize(reference, folder / "q2_k.gguf", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K),
    }
    return made | {f"{name} posing": posing_as(path, reference, folder / name) for name, path in made.items()}


def queen_settings(tmp_path: Path, **fields: Any) -> QueenSettings:
    """A queen that audits every delivered answer and releases escrow after one passed audit."""
    return QueenSettings(
        db=tmp_path / "queen.db",
        auditor_token=SecretStr(AUDITOR_TOKEN),
        admin_key=SecretStr(ADMIN_KEY),
        audit_rate=1.0,
        escrow_audits=1,
        escrow_seconds=0,
        queue_timeout=60,
        first_token_timeout=60,
        **fields,
    )


@pytest.fixture
def stopping() -> Iterator[list[Any]]:
    """Worker processes to stop at the end of the test."""
    processes: list[Any] = []
    yield processes
    for process in processes:
        stop_process(process)


def worker(
    queen: QueenServer, processes: list[Any], name: str, *extra: str, model: Path | None = None
) -> Any:
    """Start a workerbee process with its own identity and payout address."""
    process = start_worker(
        queen.worker_url,
        "--instance-id-file",
        str(Path(queen.settings.db).parent / f"{name}.id"),
        "--ln-url",
        f"{name}@example.com",
        *extra,
        model=model,
    )
    processes.append(process)
    return process


def identity(queen: QueenServer, name: str) -> str:
    """The instance id of the worker started as `name`."""
    return (Path(queen.settings.db).parent / f"{name}.id").read_text().strip()


def audits_of(queen: QueenServer) -> Any:
    """The running queen's audit service."""
    assert queen.server is not None
    return queen.server.config.app.state.audits


def ask(client: OpenAI, prompt: str) -> str:
    """A greedy streamed answer (what audits can check), as the client saw it."""
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=48,
        temperature=0,
        stream=True,
    )
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def admin(queen: QueenServer, path: str) -> Any:
    """GET an admin-only JSON endpoint."""
    response = httpx.get(f"{queen.base_url}{path}", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_worker_serving_q4_0_as_q4_1_is_paused_within_two_audits_and_forfeits_the_flagged_pay(
    tmp_path: Path, variants: dict[str, Path], stopping: list[Any], sdk: Callable[..., OpenAI]
) -> None:
    """The liar's first two audits flag it and pause it, and it gets no traffic after that; an honest
    worker with --parallel 2 beside it is never flagged; the usage report splits each address's tokens
    into payable, escrowed and forfeited, to the token.

    Requests run three at a time, so the liar may have served a third before its second audit ended:
    what is asserted is what the issue promises (paused by its second audit, nothing served after the
    pause, no pay), not how many requests happened to reach it."""
    # A liar that keeps the real file for challenges is modelled by switching challenges off here.
    queen = QueenServer(queen_settings(tmp_path, possession_challenges=False)).start()
    try:
        worker(queen, stopping, "auditor", "--auditor-token", AUDITOR_TOKEN)
        worker(queen, stopping, "honest", "--parallel", "2")
        worker(queen, stopping, "liar", model=variants["Q4_0 posing"])
        wait_until(lambda: len(queen.hive.serving(MODEL)) == 3, timeout=120)
        service = audits_of(queen)
        liar = service.standing(identity(queen, "liar"))
        honest = service.standing(identity(queen, "honest"))
        client = sdk(queen, "unused")
        with ThreadPoolExecutor(3) as pool:
            for round_ in range(6):
                list(pool.map(lambda prompt: ask(client, prompt), PROMPTS[round_ % 4 : round_ % 4 + 3]))
                wait_until(lambda: service.pending == 0, timeout=60)
                if liar.paused and honest.audits >= 2:
                    break
        wait_until(lambda: liar.paused and service.pending == 0, timeout=60)
        assert liar.paused_after == 2, (liar.audits, liar.flags)
        assert liar.flags == liar.audits
        assert honest.audits >= 2
        assert honest.flags == 0
        view = {item["id"]: item.get("audit") for item in admin(queen, "/v1/workers")["data"]}
        liar_view = next(v for v in view.values() if v and v.get("paused"))
        assert liar_view["flags"] == liar.flags
        assert "nats below the model's best" in liar_view["pause_reason"]
        assert sum(1 for v in view.values() if v == {"trusted": True}) == 1
        metrics = httpx.get(f"{queen.base_url}/metrics").text
        assert "queenbee_workers_paused_total 1.0" in metrics
        assert f"queenbee_audits_flagged_total {float(liar.flags)}" in metrics
        # Paused: no more traffic goes to the liar (once what it had in flight at the pause is done).
        session = next(w for w in queen.hive.workers.values() if w.identity == identity(queen, "liar"))
        wait_until(lambda: session.in_flight == 0 and service.pending == 0, timeout=60)

        def served_by_liar() -> int:
            rows = {row["ln_url"]: row for row in admin(queen, "/admin/usage")["workers"]}
            return int(rows["liar@example.com"]["succeeded"])

        served = served_by_liar()
        assert served >= liar.audits
        for prompt in PROMPTS[:3]:
            ask(client, prompt)
        wait_until(lambda: service.pending == 0, timeout=60)
        assert served_by_liar() == served
        usage = admin(queen, "/admin/usage")
        by_address = {row["ln_url"]: row for row in usage["workers"]}
        liar_row, honest_row = by_address["liar@example.com"], by_address["honest@example.com"]
        assert liar_row["payable_tokens"] == 0
        assert liar_row["forfeited_tokens"] > 0
        assert liar_row["forfeited_tokens"] + liar_row["escrowed_tokens"] == liar_row["total_tokens"]
        # The honest worker passed an audit and has been connected long enough: its pay is released.
        assert honest_row["payable_tokens"] == honest_row["total_tokens"] > 0
        assert honest_row["forfeited_tokens"] == honest_row["escrowed_tokens"] == 0
    finally:
        queen.stop()


def test_a_possession_challenge_pauses_a_worker_whose_file_is_not_the_one_it_claims(
    tmp_path: Path, variants: dict[str, Path], stopping: list[Any]
) -> None:
    """A Q2_K worker claiming the Q4_1 file's hash cannot hash a range of that file: paused at once,
    before it served anything."""
    queen = QueenServer(queen_settings(tmp_path)).start()
    try:
        worker(queen, stopping, "auditor", "--auditor-token", AUDITOR_TOKEN)
        wait_until(lambda: len(queen.hive.serving(MODEL)) == 1, timeout=120)
        worker(queen, stopping, "liar", model=variants["Q2_K posing"])
        wait_until(lambda: len(queen.hive.serving(MODEL)) == 2, timeout=120)
        service = audits_of(queen)
        wait_until(lambda: service.counts.challenges == 1, timeout=60)
        standing = service.standing(identity(queen, "liar"))
        assert standing.paused
        assert "could not prove it holds the file" in standing.pause_reason
        assert service.counts.challenges_failed == 1
        liar = next(w for w in queen.hive.serving(MODEL) if w.id not in service.trusted)
        assert liar.health.benched(time.monotonic() + 10**9)
    finally:
        queen.stop()


def test_a_pinned_model_id_is_refused_to_a_worker_whose_file_has_another_hash(
    tmp_path: Path, variants: dict[str, Path], stopping: list[Any]
) -> None:
    """--model-pin: an honest Q2_K file served under the Q4_1 id is refused that id, and the worker,
    left with nothing to serve, stops with the reason; the pinned file itself is welcome."""
    pin = f"{MODEL}={file_sha256(smollm2_path())}"
    queen = QueenServer(queen_settings(tmp_path, model_pin=[pin])).start()
    try:
        refused = worker(queen, stopping, "q2k", "--alias", MODEL, model=variants["Q2_K"])
        refused.wait(timeout=120)
        code, stderr = stop_process(refused)
        assert code == 1
        assert f"'{MODEL}' is pinned to the file with SHA-256 {file_sha256(smollm2_path())}" in stderr
        assert file_sha256(variants["Q2_K"]) in stderr
        worker(queen, stopping, "pinned")
        wait_until(lambda: len(queen.hive.serving(MODEL)) == 1, timeout=120)
    finally:
        queen.stop()


def test_a_wrong_auditor_token_is_refused(tmp_path: Path, stopping: list[Any]) -> None:
    """A worker presenting another auditor token is refused once and stops, never trusted."""
    queen = QueenServer(queen_settings(tmp_path)).start()
    try:
        process = worker(queen, stopping, "impostor", "--auditor-token", "not-the-token")
        process.wait(timeout=120)
        code, stderr = stop_process(process)
        assert code == 1
        assert "the auditor token is not this queen's" in stderr
        assert queen.hive.serving(MODEL) == []
    finally:
        queen.stop()


def test_a_trusted_only_key_sends_its_prompts_to_auditors_alone(
    tmp_path: Path, stopping: list[Any], sdk: Callable[..., OpenAI]
) -> None:
    """A key named by --trusted-only-key is served by the auditor only (a 503 saying why while none is
    connected); another key is served by whichever worker routing picks."""
    keys = tmp_path / "keys.txt"
    keys.write_text("vip sk-vip\nplain sk-plain\n")
    queen = QueenServer(queen_settings(tmp_path, api_keys_file=keys, trusted_only_key=["vip"])).start()
    try:
        worker(queen, stopping, "stranger")
        wait_until(lambda: len(queen.hive.serving(MODEL)) == 1, timeout=120)
        vip = sdk(queen, "sk-vip")
        with pytest.raises(openai.APIStatusError) as refused:
            ask(vip, PROMPTS[0])
        assert refused.value.status_code == 503
        assert "this API key's prompts go only to the queen's auditors" in refused.value.message
        ask(sdk(queen, "sk-plain"), PROMPTS[0])
        worker(queen, stopping, "auditor", "--auditor-token", AUDITOR_TOKEN)
        wait_until(lambda: len(audits_of(queen).trusted) == 1, timeout=120)
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda prompt: ask(vip, prompt), PROMPTS[:3]))
        usage = admin(queen, "/admin/usage")
        by_key = {row["api_key"]: row for row in usage["api_keys"]}
        by_address = {row["ln_url"]: row for row in usage["workers"]}
        assert by_key["vip"]["succeeded"] == 3
        assert by_address["auditor@example.com"]["succeeded"] == 3
        assert by_address["stranger@example.com"]["succeeded"] == 1  # the plain key's request only
    finally:
        queen.stop()


@contextmanager
def in_process(
    queen: QueenServer,
    engine_type: type[LlamaEngine],
    name: str,
    *,
    model: Path | None = None,
    auditor: bool = False,
) -> Iterator[LlamaEngine]:
    """A real engine of `engine_type` (a scripted subclass, say) connected as a worker of its own, on
    `model` (the bundled file by default) claiming the bundled file's hash; with `auditor`, an auditor."""
    loop = LoopThread()
    config = ModelConfig(
        id=MODEL, path=model or smollm2_path(), n_ctx=1024, sha256=file_sha256(smollm2_path())
    )
    engine = loop.run(engine_type.load([config], threads=1))
    scorer = loop.run(asyncio.to_thread(Auditor.for_models, engine.models, 1)) if auditor else None
    registration = Register(
        protocol_version=PROTOCOL_VERSION,
        worker_version="test",
        instance_id=f"{name}-instance",
        max_frame_bytes=MAX_FRAME_BYTES,
        ln_url=f"{name}@example.com",
        auditor_token=AUDITOR_TOKEN if auditor else "",
        cpu_count=1,
        disk_space=0,
        vram=0,
        models=engine.model_infos(),
    )
    side_jobs = {"audit": scorer.audit} if scorer is not None else {}
    connection = WorkerConnection(queen.worker_url, engine, lambda: registration, side_jobs=side_jobs)
    stop = asyncio.Event()
    running = loop.submit(connection.run(stop))
    try:
        yield engine
    finally:
        loop.loop.call_soon_threadsafe(stop.set)
        running.result(timeout=60)
        if scorer is not None:
            loop.run(asyncio.to_thread(scorer.close))
        loop.run(asyncio.to_thread(engine.close))
        loop.close()


def ask_whole(client: OpenAI, prompt: str) -> Any:
    """A greedy whole (non-streamed) answer, as the client received it."""
    return client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=48, temperature=0
    )


def until_audited(service: Any, name: str, audits: int, send: Any) -> Any:
    """Send requests (each once, in turn) until the worker `name` has had `audits` audits; its standing.

    Routing picks among the workers, so a bounded number of requests is sent, not an exact one.
    """
    standing = service.standing(f"{name}-instance")
    for round_ in range(4 * len(PROMPTS)):
        send(PROMPTS[round_ % len(PROMPTS)])
        wait_until(lambda: service.pending == 0, timeout=60)
        if standing.audits >= audits:
            return standing
    raise AssertionError(f"worker {name} had {standing.audits} audits, not {audits}: {service.counts}")


class Inflating(LlamaEngine):
    """The real engine, reporting 1% more completion tokens than it generated (at least one more)."""

    generated: list[int]
    reported: list[int]

    async def chat(self, chat: Any, cancel: Any, on_chunk: Any, resume: Any = None) -> Any:
        """Run the chat, then inflate its usage."""
        usage, response = await super().chat(chat, cancel, on_chunk, resume)
        extra = max(1, usage.completion_tokens // 100)
        self.generated = [*getattr(self, "generated", []), usage.completion_tokens]
        self.reported = [*getattr(self, "reported", []), usage.completion_tokens + extra]
        inflated = Usage(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens + extra,
            total_tokens=usage.total_tokens + extra,
        )
        return inflated, response


def test_a_worker_inflating_its_usage_by_one_percent_is_never_paid_for_it(
    tmp_path: Path, sdk: Callable[..., OpenAI]
) -> None:
    """Streamed or whole, the client is billed, and the worker credited, the token ids the worker
    returned, never its report of more (which the usage bounds alone would let through)."""
    queen = QueenServer(queen_settings(tmp_path)).start()
    try:
        with in_process(queen, Inflating, "inflater") as engine:
            assert isinstance(engine, Inflating)
            wait_until(lambda: MODEL in queen.hive.models(), timeout=60)
            client = sdk(queen, "unused")
            chunks = list(
                client.chat.completions.create(
                    model=MODEL,
                    messages=[{"role": "user", "content": PROMPTS[0]}],
                    max_tokens=40,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
            )
            streamed = chunks[-1].usage
            whole = ask_whole(client, PROMPTS[1]).usage
            assert streamed is not None
            assert whole is not None
            assert len(engine.generated) == 2
            assert all(r > g > 0 for r, g in zip(engine.reported, engine.generated, strict=True))
            # Each answer's completion is its ids: exactly what the engine generated.
            assert [streamed.completion_tokens, whole.completion_tokens] == engine.generated
            credited = next(
                r for r in admin(queen, "/admin/usage")["workers"] if r["ln_url"] == "inflater@example.com"
            )
            assert credited["completion_tokens"] == sum(engine.generated)
    finally:
        queen.stop()


def test_a_whole_answer_from_a_q4_0_worker_posing_as_q4_1_is_flagged_and_paused_for_good(
    tmp_path: Path, variants: dict[str, Path], sdk: Callable[..., OpenAI]
) -> None:
    """Whole (non-streamed) answers carry their token ids and are audited as streams are: the liar's are
    flagged and it is paused within two audits, by answers its client received whole. Its standing is
    in the ledger: after the queen restarts, the liar coming back is paused before it serves anything,
    until the operator reinstates it (admin key only), on probation."""
    settings = queen_settings(tmp_path, possession_challenges=False)
    queen = QueenServer(settings).start()
    try:
        with (
            in_process(queen, LlamaEngine, "auditor", auditor=True),
            in_process(queen, LlamaEngine, "liar", model=variants["Q4_0"]),
        ):
            wait_until(lambda: len(queen.hive.serving(MODEL)) == 2, timeout=60)
            service = audits_of(queen)
            client = sdk(queen, "unused")
            liar = until_audited(service, "liar", 2, lambda prompt: ask_whole(client, prompt))
            assert liar.paused
            assert liar.paused_after == 2
            assert liar.flags == liar.audits
            assert "nats below the model's best" in liar.pause_reason
            assert service.counts.unauditable == 0
            session = next(w for w in queen.hive.workers.values() if w.identity == "liar-instance")
            wait_until(lambda: session.in_flight == 0 and service.pending == 0, timeout=60)
            served = {row["ln_url"]: row["succeeded"] for row in admin(queen, "/admin/usage")["workers"]}
    finally:
        queen.stop()
    queen = QueenServer(settings).start()
    try:
        with (
            in_process(queen, LlamaEngine, "auditor", auditor=True),
            in_process(queen, LlamaEngine, "liar", model=variants["Q4_0"]),
        ):
            wait_until(lambda: len(queen.hive.serving(MODEL)) == 2, timeout=60)
            kept = audits_of(queen).known_standing("liar-instance")
            assert kept is not None
            assert (kept.paused, kept.audits, kept.flags, kept.pause_reason) == (
                True,
                liar.audits,
                liar.flags,
                liar.pause_reason,
            )
            client = sdk(queen, "unused")
            for prompt in PROMPTS[:3]:
                ask_whole(client, prompt)
            now = {row["ln_url"]: row["succeeded"] for row in admin(queen, "/admin/usage")["workers"]}
            assert now["liar@example.com"] == served["liar@example.com"]
            assert now["auditor@example.com"] == served.get("auditor@example.com", 0) + 3
            view = [item.get("audit") for item in admin(queen, "/v1/workers")["data"]]
            assert any(audit and audit.get("paused") for audit in view)
            # Only the operator lifts a pause: the liar comes back on probation, its pay escrowed.
            url = f"{queen.base_url}/admin/workers/liar-instance/reinstate"
            assert httpx.post(url).status_code == 401
            unknown = httpx.post(url.replace("liar-instance", "nobody"), headers=ADMIN)
            assert unknown.status_code == 404
            assert unknown.json()["error"]["param"] == "identity"
            reinstated = httpx.post(url, headers=ADMIN)
            assert reinstated.status_code == 200, reinstated.text
            body = reinstated.json()
            assert (body["paused"], body["probation"], body["escrow_cleared"]) == (False, True, False)
            session = next(w for w in queen.hive.workers.values() if w.identity == "liar-instance")
            assert not session.health.benched(time.monotonic())
    finally:
        queen.stop()


class Retexting(LlamaEngine):
    """The real engine, relaying whole answers with text its token ids do not spell."""

    async def chat(self, chat: Any, cancel: Any, on_chunk: Any, resume: Any = None) -> Any:
        """Run the chat, then put words in the answer's mouth, keeping its ids."""
        usage, response = await super().chat(chat, cancel, on_chunk, resume)
        assert isinstance(response, WithTokenIds)
        choices = [
            {
                **choice,
                "message": {**choice["message"], "content": "Certainly! " + choice["message"]["content"]},
            }
            for choice in response["choices"]
        ]
        return usage, WithTokenIds({**response, "choices": choices}, response.token_ids)


def test_a_whole_answer_whose_ids_do_not_spell_its_text_is_flagged(
    tmp_path: Path, sdk: Callable[..., OpenAI]
) -> None:
    """A worker on the real file whose whole answers' text is not what their ids detokenize to is
    flagged on its first audit, and that request's pay is forfeited."""
    queen = QueenServer(queen_settings(tmp_path, possession_challenges=False)).start()
    try:
        with (
            in_process(queen, LlamaEngine, "auditor", auditor=True),
            in_process(queen, Retexting, "retexter"),
        ):
            wait_until(lambda: len(queen.hive.serving(MODEL)) == 2, timeout=60)
            service = audits_of(queen)
            client = sdk(queen, "unused")
            answers: list[str] = []

            def send(prompt: str) -> None:
                answers.append(ask_whole(client, prompt).choices[0].message.content or "")

            retexter = until_audited(service, "retexter", 1, send)
            assert retexter.flags == 1
            assert any(answer.startswith("Certainly! ") for answer in answers)
            with closing(sqlite3.connect(queen.settings.db)) as ledger:
                audits = ledger.execute(
                    "SELECT flagged, reasons FROM audits WHERE ln_url = ?", ("retexter@example.com",)
                )
                [(flagged, reasons)] = audits.fetchall()
            assert flagged == 1
            assert "the token ids do not detokenize to the relayed text" in reasons
            usage = {row["ln_url"]: row for row in admin(queen, "/admin/usage")["workers"]}
            assert usage["retexter@example.com"]["forfeited_tokens"] > 0
    finally:
        queen.stop()
