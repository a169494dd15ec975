"""Statistics over benchmark runs, the ratio table, the targets, and docs/benchmarks.md."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from bench.inprocess import StepTiming
from bench.load import LoadRun, RequestResult
from bench.queen_alone import QueenRun

CANDIDATE = "queen+worker"
ALONE = "(a) llama-cpp-python alone"
SERVER = "(b) llama_cpp.server"


def percentile(values: Sequence[float], share: float) -> float:
    """The `share` (0-1) percentile, linearly interpolated; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = share * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Series:
    """All runs of one system at one concurrency, pooled over rounds."""

    system: str
    concurrency: int
    max_tokens: int
    runs: list[LoadRun] = field(default_factory=list)

    @property
    def results(self) -> list[RequestResult]:
        """Every request of every run."""
        return [result for run in self.runs for result in run.results]

    @property
    def ttft(self) -> float:
        """Median time to first content token."""
        return percentile([r.ttft for r in self.results if r.error is None], 0.5)

    @property
    def tpot(self) -> float:
        """Median time per output token."""
        return percentile([t for r in self.results if r.error is None and (t := r.tpot) is not None], 0.5)

    def latency(self, share: float) -> float:
        """End-to-end latency percentile."""
        return percentile([r.latency for r in self.results if r.error is None], share)

    @property
    def throughput(self) -> float:
        """Output tokens per second, all rounds' tokens over all rounds' wall time."""
        wall = sum(run.ended - run.started for run in self.runs)
        return sum(run.tokens for run in self.runs) / wall if wall else math.nan

    @property
    def complete(self) -> bool:
        """Whether every request ended without error with exactly max_tokens tokens."""
        return all(r.error is None and r.tokens == self.max_tokens for r in self.results)

    @property
    def errors(self) -> list[str]:
        """Errors seen, if any."""
        return [error for run in self.runs for error in run.errors]


def _ratio(value: float, reference: float) -> str:
    if math.isnan(value) or math.isnan(reference) or reference == 0:
        return "-"
    return f"{value / reference:.2f}x"


def _ms(seconds: float) -> str:
    return "-" if math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


@dataclass
class Results:
    """Everything one benchmark run measured."""

    machine: list[str]
    settings: list[str]
    series: dict[tuple[str, int], Series]
    ceiling: list[StepTiming]
    threads: list[StepTiming]
    chosen_threads: int
    prefix: dict[str, float]
    memory: dict[str, int]
    queen: list[QueenRun]
    same_tokens: bool | None
    concurrencies: tuple[int, ...]

    def get(self, system: str, concurrency: int) -> Series | None:
        """The series of one system at one concurrency, if measured."""
        return self.series.get((system, concurrency))

    def absolute_table(self) -> list[str]:
        """Every system's figures at every concurrency."""
        rows = []
        for concurrency in self.concurrencies:
            for system in (ALONE, CANDIDATE, SERVER):
                series = self.get(system, concurrency)
                if series is None:
                    continue
                rows.append(
                    [
                        str(concurrency),
                        system,
                        str(len(series.results)),
                        _ms(series.ttft),
                        _ms(series.tpot),
                        _ms(series.latency(0.5)),
                        _ms(series.latency(0.99)),
                        f"{series.throughput:.1f}",
                        "yes" if series.complete else f"NO ({len(series.errors)} errors)",
                    ]
                )
        header = [
            "conc",
            "system",
            "requests",
            "TTFT p50",
            "TPOT p50",
            "e2e p50",
            "e2e p99",
            "tok/s",
            "complete",
        ]
        return _table(header, rows)

    def ratio_table(self) -> list[str]:
        """The candidate's figures as ratios to (a) alone and to (b) at the same concurrency."""
        alone = self.get(ALONE, 1)
        rows = []
        for concurrency in self.concurrencies:
            ours = self.get(CANDIDATE, concurrency)
            server = self.get(SERVER, concurrency)
            if ours is None or alone is None or server is None:
                continue
            rows.append(
                [
                    str(concurrency),
                    _ratio(ours.throughput, alone.throughput),
                    _ratio(ours.throughput, server.throughput),
                    _ratio(ours.ttft, alone.ttft),
                    _ratio(ours.ttft, server.ttft),
                    _ratio(ours.tpot, alone.tpot),
                    _ratio(ours.tpot, server.tpot),
                    _ratio(ours.latency(0.5), server.latency(0.5)),
                    _ratio(ours.latency(0.99), server.latency(0.99)),
                ]
            )
        header = [
            "conc",
            "tok/s ÷ (a)",
            "tok/s ÷ (b)",
            "TTFT ÷ (a)",
            "TTFT ÷ (b)",
            "TPOT ÷ (a)",
            "TPOT ÷ (b)",
            "e2e p50 ÷ (b)",
            "e2e p99 ÷ (b)",
        ]
        return _table(header, rows)

    def ceiling_ratio(self, sequences: int) -> float:
        """Raw llama_decode throughput with `sequences` per call over one sequence per call."""
        by_count = {timing.sequences: timing for timing in self.ceiling}
        if sequences not in by_count or 1 not in by_count:
            return math.nan
        return by_count[sequences].tokens_per_second / by_count[1].tokens_per_second

    def targets(self) -> list[tuple[str, str, bool]]:
        """(target, measured, met) for each target of the issue."""
        alone = self.get(ALONE, 1)
        out: list[tuple[str, str, bool]] = []
        if alone is None:
            return out
        one = self.get(CANDIDATE, 1)
        if one is not None:
            ratio = one.throughput / alone.throughput
            out.append(("1 stream: tok/s >= 0.95x (a)", f"{ratio:.2f}x", ratio >= 0.95))
        four, server4 = self.get(CANDIDATE, 4), self.get(SERVER, 4)
        if four is not None:
            out.append(("4 streams: all complete in full", "yes" if four.complete else "no", four.complete))
            ratio = four.throughput / alone.throughput
            out.append(("4 streams: aggregate tok/s >= 1.3x (a)", f"{ratio:.2f}x", ratio >= 1.3))
            if server4 is not None:
                ttft = four.ttft / server4.ttft
                out.append(("4 streams: median TTFT <= 0.5x (b)'s", f"{ttft:.2f}x", ttft <= 0.5))
        eight = self.get(CANDIDATE, 8)
        if eight is not None:
            ratio = eight.throughput / alone.throughput
            out.append(("8 streams: aggregate tok/s >= 1.6x (a)", f"{ratio:.2f}x", ratio >= 1.6))
        return out

    def bound_notes(self) -> list[str]:
        """For each throughput target, what llama.cpp itself allows on this machine."""
        notes = []
        alone = self.get(ALONE, 1)
        for sequences, goal in ((4, 1.3), (8, 1.6)):
            ours = self.get(CANDIDATE, sequences)
            ceiling = self.ceiling_ratio(sequences)
            if ours is None or alone is None or math.isnan(ceiling):
                continue
            reached = ours.throughput / alone.throughput
            notes.append(
                f"- {sequences} streams: raw `llama_decode` with {sequences} sequences per call decodes "
                f"{ceiling:.2f}x the tokens per second of one sequence per call on this machine (the "
                f"ceiling for any engine here); the target asks {goal}x, the worker reached {reached:.2f}x "
                f"of (a) ({reached / ceiling:.0%} of the ceiling)."
            )
        return notes

    def text(self) -> str:
        """The printed report (Markdown)."""
        lines = ["## Machine", "", *(f"- {line}" for line in self.machine), "", "## Settings", ""]
        lines += [f"- {line}" for line in self.settings]
        lines += [
            "",
            "## Results",
            "",
            *self.absolute_table(),
            "",
            "Ratios (queen+worker over the reference):",
        ]
        lines += ["", *self.ratio_table(), ""]
        if self.same_tokens is not None:
            same = "identical" if self.same_tokens else "NOT identical"
            lines += [f"Texts of (a) and queen+worker at concurrency 1: {same}.", ""]
        lines += ["## Targets", "", *_table(["target", "measured", "met"], self._target_rows()), ""]
        lines += ["What llama.cpp allows here:", "", *self.bound_notes(), ""]
        lines += ["## Raw batched decoding (llama_decode alone, 64 tokens of context)", ""]
        rows = [
            [
                str(t.sequences),
                str(t.threads),
                _ms(t.seconds),
                f"{t.tokens_per_second:.1f}",
                f"{self.ceiling_ratio(t.sequences):.2f}x",
            ]
            for t in self.ceiling
        ]
        lines += [*_table(["sequences", "threads", "step", "tok/s", "÷ 1 sequence"], rows), ""]
        lines += ["## Thread count", "", f"Chosen: {self.chosen_threads} thread(s).", ""]
        lines += [
            "Decode steps on an otherwise idle machine (this process only, candidates interleaved):",
            "",
        ]
        rows = [
            [str(t.threads), str(t.sequences), _ms(t.seconds), f"{t.tokens_per_second:.1f}"]
            for t in self.threads
        ]
        lines += [*_table(["threads", "sequences per step", "median step", "tok/s"], rows), ""]
        loaded = [s for (system, _), s in sorted(self.series.items()) if system.startswith(f"{CANDIDATE}, ")]
        if loaded:
            lines += ["Serving through the queen (queen, worker and clients share the machine):", ""]
            rows = []
            for series in loaded:
                chosen = self.get(CANDIDATE, series.concurrency)
                for label, item in (
                    (f"{CANDIDATE}, {self.chosen_threads} threads", chosen),
                    (series.system, series),
                ):
                    if item is not None:
                        rows.append(
                            [label, str(series.concurrency), f"{item.throughput:.1f}", _ms(item.tpot)]
                        )
            lines += [*_table(["system", "conc", "tok/s", "TPOT p50"], rows), ""]
        if self.prefix:
            lines += ["## Prefix reuse (long shared system prompt, sequential requests)", ""]
            lines += [*_table(["case", "TTFT"], [[k, _ms(v)] for k, v in self.prefix.items()]), ""]
        if self.memory:
            lines += ["## Memory (resident, after the runs)", ""]
            lines += [
                *_table(["process", "RSS"], [[k, f"{v / 2**20:.0f} MiB"] for k, v in self.memory.items()])
            ]
            lines += [""]
        if self.queen:
            lines += ["## The queen alone (instant scripted worker; queen pinned to one core)", ""]
            rows = [
                [
                    "streamed" if run.streamed else "whole",
                    str(run.concurrency),
                    str(len(run.run.results)),
                    _ms(percentile([r.latency for r in run.run.results], 0.5)),
                    _ms(percentile([r.latency for r in run.run.results], 0.99)),
                    f"{run.requests_per_second:.0f}",
                    f"{run.cpu_per_request * 1000:.2f} ms",
                    f"{1 / run.cpu_per_request:.0f}",
                ]
                for run in self.queen
            ]
            header = [
                "mode",
                "conc",
                "requests",
                "latency p50",
                "latency p99",
                "req/s",
                "queen CPU/req",
                "req/s per core",
            ]
            lines += [*_table(header, rows), ""]
        return "\n".join(lines)

    def _target_rows(self) -> list[list[str]]:
        return [[target, measured, "yes" if met else "**no**"] for target, measured, met in self.targets()]
