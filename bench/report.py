"""Statistics over benchmark runs: the tables, the ratios, the targets, and the report's text.

Ratios to reference (a) are taken within each block of adjacent runs (same round, same concurrency),
then the median over rounds: on a machine whose speed drifts with other tenants' load, a ratio of two
runs a few seconds apart means more than a ratio of two averages taken minutes apart.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from bench.inprocess import StepTiming
from bench.load import LoadRun, RequestResult
from bench.queen_alone import QueenRun

CANDIDATE = "queen+worker"
ALONE = "(a) llama-cpp-python alone"
SERVER = "(b) llama_cpp.server"


def alone_name(threads: int) -> str:
    """The name of reference (a) run with `threads` threads."""
    return f"{ALONE}, {threads} thread{'s' if threads > 1 else ''}"


def fixed_name(threads: int) -> str:
    """The name of a queen+worker series whose worker has --threads fixed."""
    return f"{CANDIDATE}, --threads {threads}"


def percentile(values: Sequence[float], share: float) -> float:
    """The `share` (0-1) percentile, linearly interpolated; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = share * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _median(values: Iterable[float]) -> float:
    kept = [value for value in values if not math.isnan(value)]
    return statistics.median(kept) if kept else math.nan


@dataclass(frozen=True)
class Measured:
    """One run of one system in the block of concurrency `level` of round `round`."""

    system: str
    level: int
    round: int
    run: LoadRun
    steal: float
    """Share of the machine's CPU time the host took (steal) during the run."""


@dataclass(frozen=True)
class Series:
    """Runs of one system pooled over rounds."""

    runs: list[Measured]
    max_tokens: int

    @property
    def results(self) -> list[RequestResult]:
        """Every request that ended without error."""
        return [r for m in self.runs for r in m.run.results if r.error is None]

    @property
    def ttft(self) -> float:
        """Median time to first content token."""
        return percentile([r.ttft for r in self.results], 0.5)

    @property
    def tpot(self) -> float:
        """Median time per output token after the first."""
        return percentile([t for r in self.results if (t := r.tpot) is not None], 0.5)

    def latency(self, share: float) -> float:
        """End-to-end latency percentile."""
        return percentile([r.latency for r in self.results], share)

    @property
    def throughput(self) -> float:
        """Output tokens per second: all runs' tokens over all runs' wall time."""
        wall = sum(m.run.ended - m.run.started for m in self.runs)
        return sum(m.run.tokens for m in self.runs) / wall if wall else math.nan

    @property
    def steal(self) -> float:
        """Mean host steal over the runs."""
        return _median(m.steal for m in self.runs)

    @property
    def complete(self) -> bool:
        """Whether every request ended without error with exactly max_tokens tokens."""
        requests = [r for m in self.runs for r in m.run.results]
        return all(r.error is None and r.tokens == self.max_tokens for r in requests)


def _ratio(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}x"


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
    measured: list[Measured]
    max_tokens: int
    ceilings: list[list[StepTiming]]
    threads: list[StepTiming]
    thread_log: list[str]
    prefix: dict[str, float]
    memory: dict[str, int]
    queen: list[QueenRun]
    same_tokens: bool | None
    levels: tuple[int, ...]

    def series(self, system: str, level: int | None = None) -> Series:
        """The runs of `system` (in the block of `level`, or all of them)."""
        runs = [m for m in self.measured if m.system == system and (level is None or m.level == level)]
        return Series(runs, self.max_tokens)

    def alone(self) -> Series:
        """Reference (a) at its faster thread count over the whole run."""
        variants = [self.series(name) for name in self.systems() if name.startswith(ALONE)]
        return max(variants, key=lambda series: series.throughput, default=Series([], self.max_tokens))

    def _per_round(self, system: str, level: int) -> list[float]:
        """tok/s of `system` over the faster (a)'s in the same block, one ratio per round."""
        ratios = []
        for round_index in sorted({m.round for m in self.measured}):
            block = [m for m in self.measured if (m.level, m.round) == (level, round_index)]
            ours = [m for m in block if m.system == system]
            alone = [m.run.throughput for m in block if m.system.startswith(ALONE)]
            if ours and alone:
                ratios.append(Series(ours, self.max_tokens).throughput / max(alone))
        return ratios

    def throughput_ratio(self, system: str, level: int) -> float:
        """Median over rounds of tok/s ÷ (a)'s tok/s in the same block."""
        return _median(self._per_round(system, level))

    def systems(self) -> list[str]:
        """Every system measured: (a) variants, the queen+worker, (b), then the fixed-thread workers."""
        seen = {m.system for m in self.measured}
        alone = sorted(name for name in seen if name.startswith(ALONE))
        rest = sorted(seen - {*alone, CANDIDATE, SERVER})
        return [*alone, *(name for name in (CANDIDATE, SERVER) if name in seen), *rest]

    def absolute_table(self) -> list[str]:
        """Every system's figures at every concurrency."""
        rows = []
        for system in self.systems():
            if system.startswith(ALONE):
                rows.append(self._row("1", system, self.series(system)))
        for level in self.levels:
            for system in self.systems():
                series = self.series(system, level)
                if series.runs and not system.startswith(ALONE):
                    rows.append(self._row(str(level), system, series))
        header = [
            "conc",
            "system",
            "requests",
            "TTFT p50",
            "TPOT p50",
            "e2e p50",
            "e2e p99",
            "tok/s",
            "all complete",
            "host steal",
        ]
        return _table(header, rows)

    @staticmethod
    def _row(level: str, system: str, series: Series) -> list[str]:
        return [
            level,
            system,
            str(len(series.results)),
            _ms(series.ttft),
            _ms(series.tpot),
            _ms(series.latency(0.5)),
            _ms(series.latency(0.99)),
            f"{series.throughput:.1f}",
            "yes" if series.complete else "NO",
            f"{series.steal:.0%}",
        ]

    def ratio_table(self) -> list[str]:
        """The queen+worker's figures as ratios to (a) alone and to (b) at the same concurrency."""
        alone = self.alone()
        rows = []
        for level in self.levels:
            ours, server = self.series(CANDIDATE, level), self.series(SERVER, level)
            if not ours.runs or not server.runs:
                continue
            per_round = ", ".join(f"{ratio:.2f}" for ratio in self._per_round(CANDIDATE, level))
            rows.append(
                [
                    str(level),
                    f"{_ratio(self.throughput_ratio(CANDIDATE, level))} ({per_round})",
                    _ratio(ours.throughput / server.throughput),
                    _ratio(ours.ttft / alone.ttft),
                    _ratio(ours.ttft / server.ttft),
                    _ratio(ours.tpot / alone.tpot),
                    _ratio(ours.tpot / server.tpot),
                    _ratio(ours.latency(0.5) / server.latency(0.5)),
                    _ratio(ours.latency(0.99) / server.latency(0.99)),
                ]
            )
        header = [
            "conc",
            "tok/s ÷ (a) (per round)",
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
        """Median over rounds of the best raw tok/s with `sequences` per call over the best with one.

        "Best" is over the thread counts tried: the ratio is what batching adds to the fastest single
        stream llama.cpp gave in that round.
        """
        ratios = []
        for timings in self.ceilings:
            batched = [t.tokens_per_second for t in timings if t.sequences == sequences]
            single = [t.tokens_per_second for t in timings if t.sequences == 1]
            if batched and single:
                ratios.append(max(batched) / max(single))
        return _median(ratios)

    def targets(self) -> list[tuple[str, str, bool]]:
        """(target, measured, met) for each target of the issue."""
        out: list[tuple[str, str, bool]] = []
        if not self.alone().runs:
            return out
        one = self.throughput_ratio(CANDIDATE, 1)
        out.append(("1 stream: tok/s >= 0.95x (a)", _ratio(one), one >= 0.95))
        four = self.series(CANDIDATE, 4)
        if four.runs:
            out.append(("4 streams: all complete in full", "yes" if four.complete else "no", four.complete))
            ratio = self.throughput_ratio(CANDIDATE, 4)
            out.append(("4 streams: aggregate tok/s >= 1.3x (a)", _ratio(ratio), ratio >= 1.3))
            server = self.series(SERVER, 4)
            if server.runs:
                ttft = four.ttft / server.ttft
                out.append(("4 streams: median TTFT <= 0.5x (b)'s", _ratio(ttft), ttft <= 0.5))
        if self.series(CANDIDATE, 8).runs:
            ratio = self.throughput_ratio(CANDIDATE, 8)
            out.append(("8 streams: aggregate tok/s >= 1.6x (a)", _ratio(ratio), ratio >= 1.6))
        return out

    def bound_notes(self) -> list[str]:
        """For each throughput target, what llama.cpp itself allows on this machine."""
        notes = []
        for sequences, goal in ((4, 1.3), (8, 1.6)):
            ceiling = self.ceiling_ratio(sequences)
            reached = self.throughput_ratio(CANDIDATE, sequences)
            if math.isnan(ceiling) or math.isnan(reached):
                continue
            notes.append(
                f"- {sequences} streams: raw `llama_decode` with {sequences} sequences per call gives "
                f"{ceiling:.2f}x the tokens per second of one sequence per call here (each at its best "
                f"thread count, median over rounds): "
                f"the most any engine on llama.cpp can get from batching on this machine. The target asks "
                f"{goal}x; the queen+worker reached {reached:.2f}x of (a), "
                f"{reached / ceiling:.0%} of that ceiling."
            )
        return notes

    def text(self) -> str:
        """The report (Markdown)."""
        lines = ["## Machine", "", *(f"- {line}" for line in self.machine), "", "## Settings", ""]
        lines += [f"- {line}" for line in self.settings]
        lines += ["", "## Results", "", *self.absolute_table(), ""]
        lines += [
            "Ratios of the queen+worker to the references (tok/s ÷ (a): median of per-round ratios):",
            "",
        ]
        lines += [*self.ratio_table(), ""]
        if self.same_tokens is not None:
            same = "identical" if self.same_tokens else "NOT identical"
            lines += [f"Texts of (a) and the queen+worker at concurrency 1: {same}.", ""]
        rows = [[target, measured, "yes" if met else "**no**"] for target, measured, met in self.targets()]
        lines += ["## Targets", "", *_table(["target", "measured", "met"], rows), ""]
        lines += ["What llama.cpp allows here:", "", *self.bound_notes(), ""]
        lines += ["## Raw batched decoding (llama_decode alone, 64 tokens of context, median step)", ""]
        rows = [
            [str(index + 1), str(t.threads), str(t.sequences), _ms(t.seconds), f"{t.tokens_per_second:.1f}"]
            for index, timings in enumerate(self.ceilings)
            for t in timings
        ]
        lines += [*_table(["round", "threads", "sequences per call", "step", "tok/s"], rows), ""]
        lines += [*self._thread_lines(), *self._extra_lines()]
        return "\n".join(lines)

    def _thread_lines(self) -> list[str]:
        lines = [
            "## Thread count",
            "",
            "What the worker logged about its thread count (startup, then switches):",
            "",
        ]
        lines += [f"    {line}" for line in self.thread_log] or ["    (nothing logged)"]
        lines += ["", "Decode steps in the benchmark process, nothing else running (counts interleaved):", ""]
        rows = [
            [str(t.threads), str(t.sequences), _ms(t.seconds), f"{t.tokens_per_second:.1f}"]
            for t in self.threads
        ]
        lines += [*_table(["threads", "sequences per step", "median step", "tok/s"], rows), ""]
        fixed = [system for system in self.systems() if system.startswith(f"{CANDIDATE}, ")]
        if fixed:
            lines += ["Serving through the queen, every run adjacent to the others of its block:", ""]
            rows = []
            for level in self.levels:
                for system in [CANDIDATE, *fixed]:
                    series = self.series(system, level)
                    label = f"{CANDIDATE} (tuned)" if system == CANDIDATE else system
                    per_round = ", ".join(f"{ratio:.2f}" for ratio in self._per_round(system, level))
                    rows.append(
                        [str(level), label, f"{series.throughput:.1f}", _ms(series.tpot), per_round or "-"]
                    )
            lines += [*_table(["conc", "system", "tok/s", "TPOT p50", "tok/s ÷ (a), per round"], rows), ""]
        return lines

    def _extra_lines(self) -> list[str]:
        lines: list[str] = []
        if self.prefix:
            lines += ["## Prefix reuse (long shared system prompt, sequential requests)", ""]
            lines += [*_table(["case", "TTFT"], [[k, _ms(v)] for k, v in self.prefix.items()]), ""]
        if self.memory:
            lines += ["## Memory (resident, after the runs)", ""]
            rows = [[k, f"{v / 2**20:.0f} MiB"] for k, v in self.memory.items()]
            lines += [*_table(["process", "RSS"], rows), ""]
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
                "req/s/core",
            ]
            lines += [*_table(header, rows), ""]
        return lines
