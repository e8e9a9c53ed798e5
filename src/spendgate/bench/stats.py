"""What a load generator measures, and how the measurements of several processes add up.

Latencies go into HDR histograms (microseconds, three significant figures), which are exact to merge: each
generator process encodes its histograms and the parent decodes and adds them.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from hdrh.histogram import HdrHistogram

LATENCY_MIN_US = 1
LATENCY_MAX_US = 60_000_000
SIGNIFICANT_FIGURES = 3
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
# A call that starts this late after its scheduled time (open loop) means the generator fell behind.
LATE_START_US = 1000


def new_histogram() -> HdrHistogram:
    """An empty latency histogram in microseconds, from 1 µs to 60 s."""
    return HdrHistogram(LATENCY_MIN_US, LATENCY_MAX_US, SIGNIFICANT_FIGURES)


def record_us(histogram: HdrHistogram, microseconds: float) -> None:
    """Record one latency, clamped into the histogram's range."""
    histogram.record_value(min(LATENCY_MAX_US, max(LATENCY_MIN_US, int(microseconds))))


def latency_summary(histogram: HdrHistogram) -> dict[str, float]:
    """The percentiles, mean and maximum of a histogram, in milliseconds (zeros when it is empty)."""
    if histogram.get_total_count() == 0:
        return {"count": 0, "p50_ms": 0.0, "p90_ms": 0.0, "p99_ms": 0.0, "p99.9_ms": 0.0, "max_ms": 0.0, "mean_ms": 0.0}
    summary: dict[str, float] = {"count": histogram.get_total_count()}
    for percentile in PERCENTILES:
        summary[f"p{percentile:g}_ms"] = histogram.get_value_at_percentile(percentile) / 1000
    summary["max_ms"] = histogram.get_max_value() / 1000
    summary["mean_ms"] = round(histogram.get_mean_value() / 1000, 4)
    return summary


@dataclasses.dataclass(slots=True)
class Recorder:
    """The measurements of one generator process in one phase (picklable once ``finish`` encoded them)."""

    calls: int = 0
    captures: int = 0
    calls_total: int = 0
    decisions: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    # Money the server approved over the whole phase (warm-up and drain included), and calls whose outcome
    # the generator does not know (they failed, so the server may or may not have applied them).
    approved_micros: int = 0
    unknown_outcomes: int = 0
    late_starts: int = 0
    cpu_s: float = 0.0
    window_s: float = 0.0
    histogram: HdrHistogram = dataclasses.field(default_factory=new_histogram)
    capture_histogram: HdrHistogram = dataclasses.field(default_factory=new_histogram)
    # Open loops: how late each measured call started after its scheduled time (the generator's own delay,
    # which the latency includes).
    start_histogram: HdrHistogram = dataclasses.field(default_factory=new_histogram)

    def finish(self) -> WorkerResult:
        """Freeze the measurements into something a pipe can carry."""
        return WorkerResult(
            calls=self.calls,
            captures=self.captures,
            calls_total=self.calls_total,
            decisions=dict(self.decisions),
            errors=dict(self.errors),
            approved_micros=self.approved_micros,
            unknown_outcomes=self.unknown_outcomes,
            late_starts=self.late_starts,
            cpu_s=self.cpu_s,
            window_s=self.window_s,
            histogram=self.histogram.encode(),
            capture_histogram=self.capture_histogram.encode(),
            start_histogram=self.start_histogram.encode(),
        )


@dataclasses.dataclass(frozen=True, slots=True)
class WorkerResult:
    """One generator process's measurements of one phase, with its histograms HDR-encoded."""

    calls: int
    captures: int
    calls_total: int
    decisions: dict[str, int]
    errors: dict[str, int]
    approved_micros: int
    unknown_outcomes: int
    late_starts: int
    cpu_s: float
    window_s: float
    histogram: bytes
    capture_histogram: bytes
    start_histogram: bytes
    # Set when the process failed to run the phase at all (the message says why).
    failure: str = ""


@dataclasses.dataclass(slots=True)
class PhaseResult:
    """The measurements of one phase over every generator process, and of the processes it drove."""

    name: str
    description: str
    concurrency: int
    rate_target: float
    calls: int = 0
    captures: int = 0
    calls_total: int = 0
    window_s: float = 0.0
    decisions: Counter[str] = dataclasses.field(default_factory=Counter)
    errors: Counter[str] = dataclasses.field(default_factory=Counter)
    approved_micros: int = 0
    unknown_outcomes: int = 0
    late_starts: int = 0
    generator_cpu_s: float = 0.0
    generator_processes: int = 0
    # CPU seconds of the server process and of redis-server over the measured window (None when unknown).
    server_cpu_s: float | None = None
    redis_cpu_s: float | None = None
    # CPU seconds the whole machine was busy over the window: what is left after the generators, the server
    # and Redis is other load, which makes the phase's figures noisy.
    machine_cpu_s: float | None = None
    # Scripts Redis ran over the window and the microseconds it spent in them (INFO commandstats; only for
    # the benchmark's own Redis).
    redis_scripts: int | None = None
    redis_script_usec: int | None = None
    # Reply writes Redis made in the window: its round trips (see RedisServer.round_trips).
    redis_round_trips: int | None = None
    # Calls per batch for the pipelined Redis phase (1 otherwise).
    batch_size: int = 1
    failures: list[str] = dataclasses.field(default_factory=list)
    histogram: HdrHistogram = dataclasses.field(default_factory=new_histogram)
    capture_histogram: HdrHistogram = dataclasses.field(default_factory=new_histogram)
    start_histogram: HdrHistogram = dataclasses.field(default_factory=new_histogram)

    def add(self, result: WorkerResult) -> None:
        """Add one generator process's measurements."""
        if result.failure:
            self.failures.append(result.failure)
            return
        self.generator_processes += 1
        self.calls += result.calls
        self.captures += result.captures
        self.calls_total += result.calls_total
        self.decisions.update(result.decisions)
        self.errors.update(result.errors)
        self.approved_micros += result.approved_micros
        self.unknown_outcomes += result.unknown_outcomes
        self.late_starts += result.late_starts
        self.generator_cpu_s += result.cpu_s
        # Every process measures the same window; keep the longest (they differ by scheduling noise only).
        self.window_s = max(self.window_s, result.window_s)
        self.histogram.decode_and_add(result.histogram)
        self.capture_histogram.decode_and_add(result.capture_histogram)
        self.start_histogram.decode_and_add(result.start_histogram)

    @property
    def throughput(self) -> float:
        """Calls per second over the measured window."""
        return self.calls / self.window_s if self.window_s > 0 else 0.0

    @property
    def other_cpu_s(self) -> float | None:
        """CPU seconds the machine spent on anything but this phase's processes (None when unknown)."""
        if self.machine_cpu_s is None:
            return None
        ours = self.generator_cpu_s + (self.server_cpu_s or 0.0) + (self.redis_cpu_s or 0.0)
        return max(0.0, self.machine_cpu_s - ours)

    def us_per_call(self, cpu_s: float | None) -> float | None:
        """CPU microseconds per call measured in the window (less sensitive to other load than rates)."""
        if cpu_s is None or not self.calls:
            return None
        return cpu_s / self.calls * 1e6

    def round_trips_per_call(self) -> float | None:
        """Redis round trips per call measured in the window (None where they were not counted)."""
        if self.redis_round_trips is None or not self.calls:
            return None
        return round(self.redis_round_trips / self.calls, 3)

    def cores(self, cpu_s: float | None) -> float | None:
        """CPU seconds over the window as a number of busy cores."""
        if cpu_s is None or self.window_s <= 0:
            return None
        return cpu_s / self.window_s

    def to_json(self) -> dict[str, Any]:
        """Every figure of the phase, for ``--json``."""
        figures: dict[str, Any] = {
            "name": self.name,
            "description": self.description,
            "concurrency": self.concurrency,
            "rate_target_per_s": self.rate_target,
            "batch_size": self.batch_size,
            "window_s": round(self.window_s, 4),
            "calls": self.calls,
            "calls_total": self.calls_total,
            "throughput_per_s": round(self.throughput, 1),
            "latency": latency_summary(self.histogram),
            "decisions": dict(sorted(self.decisions.items())),
            "errors": dict(sorted(self.errors.items())),
            "approved_micros": self.approved_micros,
            "unknown_outcomes": self.unknown_outcomes,
            "late_starts": self.late_starts,
            "generator": {
                "processes": self.generator_processes,
                "cpu_s": round(self.generator_cpu_s, 3),
                "cores": _round(self.cores(self.generator_cpu_s)),
                "cpu_us_per_call": _round(self.us_per_call(self.generator_cpu_s)),
            },
            "server": {
                "cpu_s": _round(self.server_cpu_s),
                "cores": _round(self.cores(self.server_cpu_s)),
                "cpu_us_per_call": _round(self.us_per_call(self.server_cpu_s)),
            },
            "redis": {"cpu_s": _round(self.redis_cpu_s), "cores": _round(self.cores(self.redis_cpu_s))},
            "machine": {"cpu_s": _round(self.machine_cpu_s), "cores": _round(self.cores(self.machine_cpu_s))},
            "other_cores": _round(self.cores(self.other_cpu_s)),
            "failures": self.failures,
        }
        if self.start_histogram.get_total_count():
            figures["start_lateness"] = latency_summary(self.start_histogram)
        if self.captures:
            figures["captures"] = self.captures
            figures["capture_latency"] = latency_summary(self.capture_histogram)
        if self.redis_cpu_s and self.calls:
            # Redis's own CPU per call: what one Redis core could do if nothing else limited it.
            figures["redis"]["cpu_us_per_call"] = _round(self.us_per_call(self.redis_cpu_s))
        if self.redis_scripts:
            figures["redis"]["scripts"] = self.redis_scripts
            figures["redis"]["us_per_script"] = round((self.redis_script_usec or 0) / self.redis_scripts, 2)
            if self.calls:
                figures["redis"]["scripts_per_call"] = round(self.redis_scripts / self.calls, 3)
        if (round_trips_per_call := self.round_trips_per_call()) is not None:
            figures["redis"]["round_trips"] = self.redis_round_trips
            figures["redis"]["round_trips_per_call"] = round_trips_per_call
        return figures


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
