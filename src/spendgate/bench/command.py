"""``spendgate bench`` / ``python -m spendgate.bench``: the command line of the load-test harness."""

from __future__ import annotations

import dataclasses
import sys

import click
from rich.console import Console

from spendgate.bench.loadgen import CLIENTS
from spendgate.bench.report import print_report, rounds_table, target_figures, write_json, write_rounds_json
from spendgate.bench.runner import ALL_PHASES, DEFAULT_PHASES, BenchOptions, BenchReport, run_bench
from spendgate.money import MoneyError, parse_amount
from spendgate.settings import STANDALONE_LEDGER_WRITERS

EXIT_CHECK_FAILED = 1
EXIT_ERROR = 2
QUICK_DURATION_S = 0.3
QUICK_WARMUP_S = 0.1
REPORT_WIDTH = 150
# --rounds at most (each round is a whole benchmark).
ROUNDS_MAX = 20


def _micros(text: str, what: str) -> int:
    try:
        micros = parse_amount(text)
    except MoneyError as error:
        raise click.BadParameter(str(error), param_hint=what) from None
    if micros <= 0:
        raise click.BadParameter("must be more than zero", param_hint=what)
    return micros


def _environment(pairs: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    environment = []
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator or not name.startswith("SPENDGATE_"):
            raise click.BadParameter(f"{pair!r} must look like SPENDGATE_NAME=VALUE", param_hint="--server-env")
        environment.append((name, value))
    return tuple(environment)


def _phases(text: str) -> tuple[str, ...]:
    if text in ("", "default"):
        return DEFAULT_PHASES
    if text == "all":
        return ALL_PHASES
    return tuple(part.strip() for part in text.split(",") if part.strip())


@click.command(
    "bench",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110},
    epilog="Phases: " + ", ".join(ALL_PHASES) + " (all but the last run by default).",
)
@click.option("--target", default="", help="Drive this running server (host:port) instead of starting one.")
@click.option(
    "--token",
    default="",
    envvar="SPENDGATE_TOKEN",
    help="Bearer token for --target (a root or admin token: the check reads every node) [SPENDGATE_TOKEN].",
)
@click.option("--embedded", is_flag=True, help="Run the server inside this process instead of as `spendgate serve`.")
@click.option(
    "--plan",
    "plans",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A plan file to spend from; repeatable (one per account). Default: examples/fleet.yaml.",
)
@click.option("--accounts", type=int, default=0, help="Generate a fleet with this many accounts...")
@click.option("--pools", type=int, default=0, help="...this many pools per account...")
@click.option("--wallets", type=int, default=0, help="...and this many wallets per pool.")
@click.option("--apply-plan", is_flag=True, help="With --target: apply the fleet's plans to it first (AdminService).")
@click.option(
    "--concurrency",
    type=int,
    default=64,
    show_default=True,
    help="Calls in flight (closed loop), over all generator processes.",
)
@click.option(
    "--stream-concurrency", type=int, default=0, help="Messages in flight on the streams [default: --concurrency]."
)
@click.option(
    "--rate",
    type=float,
    default=0.0,
    help="Open loop at this many calls/s for the unary and stream phases [default: closed loop].",
)
@click.option(
    "--flow",
    type=click.Choice(["one-shot", "authorize-capture"]),
    default="one-shot",
    show_default=True,
    help="One-shot (capture=true) or authorize, then capture each approval.",
)
@click.option(
    "--duration",
    "duration_s",
    type=float,
    default=None,
    help="Seconds each phase measures [default 5; 0.3 with --quick].",
)
@click.option(
    "--warmup",
    "warmup_s",
    type=float,
    default=None,
    help="Seconds each phase runs before measuring [default 1; 0.1 with --quick].",
)
@click.option("--processes", type=int, default=2, show_default=True, help="Load generator processes.")
@click.option(
    "--client",
    type=click.Choice(CLIENTS),
    default="h2",
    show_default=True,
    help="The generator's gRPC client for the unary and stream phases: the benchmark's own HTTP/2 client "
    "(cheap per call) or grpcio (costs about as much CPU per call as the server).",
)
@click.option(
    "--streams", type=int, default=4, show_default=True, help="AuthorizeStream streams per generator process."
)
@click.option("--amount", default="0.000001", show_default=True, help="Amount per authorization, in currency units.")
@click.option(
    "--exhaust-amount", default="0.25", show_default=True, help="Amount per authorization in the exhaust phase."
)
@click.option(
    "--batch",
    "batch_size",
    type=int,
    default=64,
    show_default=True,
    help="Scripts per pipelined round trip (redis-pipelined).",
)
@click.option("--phases", "phases_text", default="default", help="Comma-separated phases to run, or 'all'.")
@click.option(
    "--timeout", "timeout_s", type=float, default=5.0, show_default=True, help="Deadline of each call, in seconds."
)
@click.option(
    "--redis-server", default="", help="The redis-server binary to start for the benchmark [default: found on PATH]."
)
@click.option(
    "--redis-socket",
    type=click.Choice(["tcp", "unix"]),
    default="tcp",
    show_default=True,
    help="How the server this run starts, and the generators' redis phases, reach the benchmark's own Redis: TCP "
    "on loopback (as a Redis on another machine is reached), or a Unix socket (as a Redis on the server's own "
    "machine can be). A --target server keeps its own Redis.",
)
@click.option("--json", "json_path", default="", help="Write every figure to this file as JSON.")
@click.option(
    "--work-dir", default="", help="Where generated plans and server logs go [default: a new temporary directory]."
)
@click.option(
    "--py-spy",
    "py_spy_dir",
    default="",
    help="Record a py-spy flame graph of the server during each phase into this directory.",
)
@click.option(
    "--server-env",
    multiple=True,
    metavar="NAME=VALUE",
    help="A SPENDGATE_* setting for the server this run starts (e.g. SPENDGATE_LEDGER=off); repeatable.",
)
@click.option(
    "--database-url",
    default="",
    envvar="SPENDGATE_BENCH_DATABASE_URL",
    help="PostgreSQL the ledger phase creates its database through (and drops it after) "
    "[default: postgresql://postgres@127.0.0.1:5432/postgres; SPENDGATE_BENCH_DATABASE_URL].",
)
@click.option(
    "--ledger-writers",
    type=int,
    default=STANDALONE_LEDGER_WRITERS,
    show_default=True,
    help="Ledger phase: writer loops of `spendgate ledger --writers N`, and of the server under load.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, ROUNDS_MAX),
    default=1,
    show_default=True,
    help="Run everything this many times (with fresh servers, unless --target) and end with each target's "
    "median: one run on a small shared machine is noisy.",
)
@click.option("--quick", is_flag=True, help="Short phases (for smoke tests): 0.3 s after 0.1 s warm-up.")
def bench_command(
    target: str,
    token: str,
    embedded: bool,
    plans: tuple[str, ...],
    accounts: int,
    pools: int,
    wallets: int,
    apply_plan: bool,
    concurrency: int,
    stream_concurrency: int,
    rate: float,
    flow: str,
    duration_s: float | None,
    warmup_s: float | None,
    processes: int,
    client: str,
    streams: int,
    amount: str,
    exhaust_amount: str,
    batch_size: int,
    phases_text: str,
    timeout_s: float,
    redis_server: str,
    redis_socket: str,
    json_path: str,
    work_dir: str,
    py_spy_dir: str,
    server_env: tuple[str, ...],
    database_url: str,
    ledger_writers: int,
    rounds: int,
    quick: bool,
) -> None:
    """Load-test spendgate and measure this machine's ceilings, so the results read as ratios.

    Starts its own redis-server and `spendgate serve` (auth off) over the example fleet or a generated one,
    or drives --target; runs each phase with several load generator processes; prints throughput, latency
    percentiles (HDR histograms), decisions by reason, errors by status and everyone's CPU; then checks with
    GetBudget on every node that no limit was exceeded and that every approved micro-unit is accounted for.
    Exits 1 when the check fails.
    """
    try:
        options = BenchOptions(
            target=target,
            token=token,
            embedded=embedded,
            plans=plans,
            accounts=accounts,
            pools=pools,
            wallets=wallets,
            apply_plan=apply_plan,
            concurrency=concurrency,
            stream_concurrency=stream_concurrency,
            rate=rate,
            one_shot=flow == "one-shot",
            duration_s=duration_s if duration_s is not None else QUICK_DURATION_S if quick else 5.0,
            warmup_s=warmup_s if warmup_s is not None else QUICK_WARMUP_S if quick else 1.0,
            processes=processes,
            client=client,
            streams=streams,
            amount_micros=_micros(amount, "--amount"),
            exhaust_amount_micros=_micros(exhaust_amount, "--exhaust-amount"),
            batch_size=batch_size,
            phases=_phases(phases_text),
            timeout_s=timeout_s,
            redis_server=redis_server,
            redis_unix_socket=redis_socket == "unix",
            json_path=json_path,
            work_dir=work_dir,
            py_spy_dir=py_spy_dir,
            server_environment=_environment(server_env),
            database_url=database_url,
            ledger_writers=ledger_writers,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    console = Console()
    if not console.is_terminal:
        # Piped or captured output would otherwise be 80 columns wide, too narrow for the tables.
        console = Console(width=REPORT_WIDTH)
    progress = Console(stderr=True)
    if not progress.is_terminal:
        progress = Console(stderr=True, width=REPORT_WIDTH)
    reports: list[BenchReport] = []
    for index in range(rounds):
        if rounds > 1:
            console.rule(f"round {index + 1} of {rounds}")
        round_options = options
        if rounds > 1 and options.work_dir:
            round_options = dataclasses.replace(options, work_dir=f"{options.work_dir}/round-{index + 1}")
        try:
            report = run_bench(round_options, progress)
        except (RuntimeError, ValueError, OSError) as error:
            Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False)
            if json_path and reports:
                # The rounds that finished are kept.
                write_rounds_json(reports, json_path)
            sys.exit(EXIT_ERROR)
        print_report(report, console)
        reports.append(report)
    if rounds > 1:
        console.print(rounds_table([target_figures(report) for report in reports]))
    if json_path:
        if rounds > 1:
            write_rounds_json(reports, json_path)
        else:
            write_json(reports[0], json_path)
        console.print(f"  figures written to {json_path}", highlight=False)
    if not all(report.passed for report in reports):
        sys.exit(EXIT_CHECK_FAILED)


def main(args: list[str] | None = None, prog_name: str = "python -m spendgate.bench") -> None:
    """Run the command (``python -m spendgate.bench``)."""
    bench_command.main(args=args, prog_name=prog_name)
