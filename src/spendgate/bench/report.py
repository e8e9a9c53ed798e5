"""The printed report (rich tables) and the ``--json`` file."""

from __future__ import annotations

import json
import pathlib
import statistics
from typing import Any

from rich.console import Console
from rich.table import Table

from spendgate.bench.runner import EMPTY_PHASES, BenchReport
from spendgate.bench.stats import PhaseResult, latency_summary

# Which ceiling each phase is a fraction of.
_CEILING_OF = {
    "unary": "empty-unary",
    "unary-half": "empty-unary",
    "exhaust": "empty-unary",
    "empty-unary-metrics": "empty-unary",
    "stream": "empty-stream",
    "redis-pipelined": "redis",
}


# How the report names the generator's gRPC client.
_CLIENT_NAMES = {"h2": "own HTTP/2 client", "grpc": "grpcio client"}

# Below this many nodes Redis's own overhead drowns the memory per node; the figure is not printed.
SMALL_FLEET_NODES_MAX = 1000


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _micros(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _megabytes(value: int | None) -> str:
    return "-" if value is None else f"{value / 1_048_576:.1f} MB"


def phase_table(report: BenchReport) -> Table:
    """Throughput and latency per phase."""
    table = Table(title="Throughput and latency (measured window; latency in ms)", title_justify="left")
    for column in ("phase", "calls/s", "of ceiling", "p50", "p90", "p99", "p99.9", "max", "errors"):
        table.add_column(column, justify="left" if column == "phase" else "right", no_wrap=True)
    for name, result in report.phases.items():
        latency = latency_summary(result.histogram)
        ceiling_name = _CEILING_OF.get(name)
        ceiling = report.throughput(ceiling_name) if ceiling_name else None
        share = f"{100 * result.throughput / ceiling:.0f}% of {ceiling_name}" if ceiling and result.calls else ""
        if name == "redis-pipelined" and ceiling and result.calls:
            share = f"{result.throughput / ceiling:.1f}x redis"
        label = f"[bold]{name}[/]" if name not in EMPTY_PHASES else name
        if result.rate_target:
            label += f" @{result.rate_target:,.0f}/s"
        table.add_row(
            label,
            f"{result.throughput:,.0f}",
            share,
            _ms(latency["p50_ms"]),
            _ms(latency["p90_ms"]),
            _ms(latency["p99_ms"]),
            _ms(latency["p99.9_ms"]),
            _ms(latency["max_ms"]),
            f"{sum(result.errors.values()):,}",
        )
    return table


def cpu_table(report: BenchReport) -> Table:
    """Who used the CPU per phase: cores busy over the window, and CPU per call."""
    table = Table(
        title="CPU over the measured window (cores busy; 'other' is load from outside this benchmark)",
        title_justify="left",
    )
    columns = ("phase", "generator", "server", "redis", "other", "gen µs/call", "server µs/call", "redis µs/script")
    for column in columns:
        table.add_column(column, justify="left" if column == "phase" else "right", no_wrap=True)
    for name, result in report.phases.items():
        script_us = (result.redis_script_usec or 0) / result.redis_scripts if result.redis_scripts else None
        table.add_row(
            name,
            _cores(result.cores(result.generator_cpu_s)),
            _cores(result.cores(result.server_cpu_s)),
            _cores(result.cores(result.redis_cpu_s)),
            _cores(result.cores(result.other_cpu_s)),
            _micros(result.us_per_call(result.generator_cpu_s)),
            _micros(result.us_per_call(result.server_cpu_s)),
            _micros(script_us),
        )
    return table


def decisions_table(report: BenchReport) -> Table | None:
    """Decisions by reason per phase (phases that decide nothing are left out)."""
    phases = {name: result for name, result in report.phases.items() if result.decisions and name not in EMPTY_PHASES}
    if not phases:
        return None
    labels = sorted(
        {label for result in phases.values() for label in result.decisions}, key=lambda x: (x != "approved", x)
    )
    table = Table(title="Decisions in the measured window", title_justify="left")
    table.add_column("phase")
    for label in labels:
        table.add_column(label, justify="right")
    for name, result in phases.items():
        table.add_row(name, *(f"{result.decisions.get(label, 0):,}" for label in labels))
    return table


def errors_table(report: BenchReport) -> Table | None:
    """Errors by status code per phase, over the whole phase."""
    rows = [
        (name, code, count) for name, result in report.phases.items() for code, count in sorted(result.errors.items())
    ]
    if not rows:
        return None
    table = Table(title="Errors by status (whole phase)", title_justify="left")
    for column in ("phase", "status", "count"):
        table.add_column(column, justify="right" if column == "count" else "left")
    for name, code, count in rows:
        table.add_row(name, code, f"{count:,}")
    return table


def _capture_line(result: PhaseResult) -> str:
    latency = latency_summary(result.capture_histogram)
    return (
        f"{result.name}: {result.captures / result.window_s:,.0f} captures/s, p50 {_ms(latency['p50_ms'])} ms, "
        f"p99 {_ms(latency['p99_ms'])} ms"
    )


def redis_transport(system: dict[str, Any]) -> str:
    """How the server reached the benchmark's own Redis ('' when this run started no server, or no Redis)."""
    url = system.get("redis_server", {}).get("url", "")
    if not url or "target" in system:
        return ""
    return ", Redis over a Unix socket" if url.startswith("unix:") else ", Redis over TCP (loopback)"


def print_report(report: BenchReport, console: Console) -> None:
    """Print the whole report."""
    system = report.system
    options = report.options
    fleet = system.get("fleet", {})
    console.print()
    console.print(
        f"[bold]spendgate bench[/]: {system.get('mode')} server"
        + (f" {system['target']}" if "target" in system else "")
        + f", fleet {fleet.get('source')} ({fleet.get('accounts')} accounts, {fleet.get('pools')} pools, "
        f"{fleet.get('wallets'):,} wallets), {options.processes} generator processes "
        f"({_CLIENT_NAMES[options.client]}), "
        f"{options.duration_s:g} s per phase after {options.warmup_s:g} s warm-up, "
        f"{system.get('machine', {}).get('cpus')} CPUs" + redis_transport(system),
        highlight=False,
    )
    console.print(phase_table(report))
    console.print(cpu_table(report))
    for table in (decisions_table(report), errors_table(report)):
        if table is not None:
            console.print(table)
    for result in report.phases.values():
        if result.captures:
            console.print(f"  captures: {_capture_line(result)}", highlight=False)
        if result.start_histogram.get_total_count():
            lateness = latency_summary(result.start_histogram)
            console.print(
                f"  {result.name}: calls started {lateness['p50_ms'] * 1000:.0f} µs (p50) / "
                f"{lateness['p99_ms'] * 1000:.0f} µs (p99) after their scheduled time (included in the latency)",
                highlight=False,
            )
        if result.late_starts:
            console.print(
                f"  [yellow]{result.name}: {result.late_starts:,} calls started over 1 ms late: the generator or "
                "the machine fell behind the schedule[/]",
                highlight=False,
            )
    for name, why in report.skipped.items():
        console.print(f"  skipped {name}: {why}", highlight=False)
    ratios = report.ratios()
    headline = []
    if ratios["unary_vs_empty_unary_pct"] is not None:
        headline.append(
            f"unary Authorize = [bold]{ratios['unary_vs_empty_unary_pct']:.0f}%[/] of the empty-handler ceiling"
        )
    if ratios["stream_vs_unary_x"] is not None:
        headline.append(f"stream = [bold]{ratios['stream_vs_unary_x']:.1f}x[/] unary")
    if ratios["stream_vs_empty_stream_pct"] is not None:
        headline.append(f"{ratios['stream_vs_empty_stream_pct']:.0f}% of the empty stream")
    half = report.phases.get("unary-half")
    if half is not None and half.calls:
        headline.append(f"p99 at half load {_ms(latency_summary(half.histogram)['p99_ms'])} ms")
    if headline:
        console.print("  " + "; ".join(headline), highlight=False)
    per_call = [
        f"{name} {result.redis_scripts / result.calls:.2f}"
        for name, result in report.phases.items()
        if result.redis_scripts and result.calls and name not in EMPTY_PHASES
    ]
    if per_call:
        console.print("  Redis scripts per call: " + ", ".join(per_call), highlight=False)
    # Round trips as Redis served them (its reply writes): one script per call in fewer round trips is batching.
    trips = [
        f"{name} {trips_per_call:.2f}"
        for name, result in report.phases.items()
        if (trips_per_call := result.round_trips_per_call()) is not None and name not in EMPTY_PHASES
    ]
    if trips:
        console.print("  Redis round trips per call: " + ", ".join(trips), highlight=False)
    generator = [
        f"{name} {result.generator_cpu_s:.1f} CPU-s over {result.window_s:g} s"
        for name, result in report.phases.items()
        if result.generator_cpu_s
    ]
    if generator:
        console.print("  load generator CPU: " + ", ".join(generator), highlight=False)
    memory = []
    if "server_start_s" in system:
        memory.append(f"server serving {system['server_start_s']:.1f} s after start")
    if "plan_apply_s" in system:
        memory.append(f"plans applied in {system['plan_apply_s']:.1f} s")
    if "server_rss_bytes" in system:
        memory.append(f"server RSS {_megabytes(system['server_rss_bytes'])}")
    if "redis_bytes_per_node" in system and fleet.get("nodes", 0) >= SMALL_FLEET_NODES_MAX:
        memory.append(f"Redis {system['redis_bytes_per_node']:,.0f} bytes per idle node")
    if memory:
        console.print("  " + ", ".join(memory), highlight=False)
    for note in report.notes:
        console.print(f"  note: {note}", highlight=False)
    check = report.check
    if check is not None:
        if check.limits_ok:
            console.print(
                f"[bold green]PASS[/] no limit exceeded: {check.nodes_checked:,} nodes, "
                f"{check.windows_checked:,} limited windows checked with GetBudget",
                highlight=False,
            )
        else:
            console.print(
                f"[bold red]FAIL[/] {len(check.violations)} limit(s) exceeded, {len(check.errors)} node(s) unreadable",
                highlight=False,
            )
            for line in (check.violations + check.errors)[:20]:
                console.print(f"  {line}", highlight=False)
        money = check.money_ok
        if money is not None:
            colour, verdict = ("green", "PASS") if money else ("red", "FAIL")
            console.print(
                f"[bold {colour}]{verdict}[/] money accounted for: approved {check.approved_micros:,} micros, wallets' "
                f"spent + held grew {check.spent_held_delta_micros:,} micros"
                + (f" (up to {check.unknown_micros_max:,} more from failed calls)" if check.unknown_micros_max else ""),
                highlight=False,
            )
    if report.ledger is not None:
        from spendgate.bench.ledger_phase import print_ledger

        print_ledger(report.ledger, console)
    for phase, profile in report.profiles.items():
        console.print(profile_table(phase, profile))


def profile_table(phase: str, profile: dict[str, Any]) -> Table:
    """Where the server's busy time went during a phase: by area, and the busiest functions."""
    table = Table(
        title=f"Server profile, {phase}: {profile['samples']:,} py-spy samples, {profile['idle_percent']:.0f}% idle; "
        f"shares of the busy samples ({profile['file']})",
        title_justify="left",
    )
    table.add_column("%", justify="right")
    table.add_column("area")
    table.add_column("%", justify="right")
    table.add_column("function (self time)")
    areas, functions = profile["areas"], profile["self"]
    for index in range(max(len(areas), len(functions))):
        left = areas[index] if index < len(areas) else ("", "")
        right = functions[index] if index < len(functions) else ("", "")
        table.add_row(str(left[1]), str(left[0]), str(right[1]), str(right[0]))
    return table


# The figures the targets are about: (key, label, unit, target, whether higher is better).
TARGETS = (
    ("unary_vs_empty_unary_pct", "unary Authorize, % of the empty-handler ceiling", "%", 75.0, True),
    ("stream_vs_unary_x", "AuthorizeStream, times unary", "x", 3.0, True),
    ("half_load_p99_ms", "p99 at half load, ms", "ms", 3.0, False),
    ("ledger_writer_vs_server_x", "ledger writer, times the server's rate", "x", 5.0, True),
    # At most one round trip per decision, fewer under load: the closed-loop unary phase is under load.
    ("unary_round_trips_per_call", "Redis round trips per unary decision", "", 1.0, False),
)


def target_figures(report: BenchReport) -> dict[str, float | None]:
    """One run's figure for each of :data:`TARGETS` (None where its phases did not run)."""
    ratios = report.ratios()
    half = report.phases.get("unary-half")
    unary = report.phases.get("unary")
    return {
        "unary_vs_empty_unary_pct": ratios["unary_vs_empty_unary_pct"],
        "stream_vs_unary_x": ratios["stream_vs_unary_x"],
        "half_load_p99_ms": latency_summary(half.histogram)["p99_ms"] if half is not None and half.calls else None,
        "ledger_writer_vs_server_x": round(report.ledger.ratio, 2)
        if report.ledger is not None and report.ledger.ratio is not None
        else None,
        "unary_round_trips_per_call": unary.round_trips_per_call() if unary is not None else None,
    }


def rounds_table(figures: list[dict[str, float | None]]) -> Table:
    """Each target's figure in every round, its median and whether the median meets the target."""
    table = Table(
        title=f"Targets over {len(figures)} rounds (each round measures its own ceilings)", title_justify="left"
    )
    table.add_column("figure")
    for index in range(len(figures)):
        table.add_column(f"round {index + 1}", justify="right")
    table.add_column("median", justify="right")
    table.add_column("target", justify="right")
    for key, label, unit, target, higher in TARGETS:
        values = [round_figures[key] for round_figures in figures]
        median = _median(values)
        if median is None:
            continue
        digits = 1 if unit == "%" else 2
        met = median >= target if higher else median <= target
        verdict = f"{'≥' if higher else '≤'} {target:g}{unit}: " + ("[green]met[/]" if met else "[red]not met[/]")
        table.add_row(
            label,
            *("-" if value is None else f"{value:.{digits}f}" for value in values),
            f"[bold]{median:.{digits}f}[/]",
            verdict,
        )
    return table


def _median(values: list[float | None]) -> float | None:
    """The median of the values that are there (None if none is)."""
    seen = [value for value in values if value is not None]
    return round(statistics.median(seen), 3) if seen else None


def write_json(report: BenchReport, path: str) -> None:
    """Write every figure to ``path`` as JSON."""
    pathlib.Path(path).write_text(json.dumps(report.to_json(), indent=2) + "\n")


def write_rounds_json(reports: list[BenchReport], path: str) -> None:
    """Write every round's figures, and each target's figure per round, to ``path`` as JSON."""
    figures = [target_figures(report) for report in reports]
    targets = {
        key: {
            "rounds": [round_figures[key] for round_figures in figures],
            "median": _median([round_figures[key] for round_figures in figures]),
            "target": target,
            "higher_is_better": higher,
        }
        for key, _, _, target, higher in TARGETS
    }
    # "kind" tells this layout from a single run's (which has "phases" at the top).
    document = {"version": 1, "kind": "rounds", "targets": targets, "rounds": [report.to_json() for report in reports]}
    pathlib.Path(path).write_text(json.dumps(document, indent=2) + "\n")
