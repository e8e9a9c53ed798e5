"""The ``spendgate`` command: run the server, and talk to a running one in dollars.

Amounts are typed as currency units (``0.25``, ``$50``, ``3,000``) and shown the same way. Exit codes:
0 approved or done, 1 denied, 2 an error (the message says what to fix).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.table import Table

from spendgate.client import Client
from spendgate.domain import (
    AuthorizeResult,
    NodeBudget,
    SpendgateError,
    Window,
)
from spendgate.money import MoneyError, format_amount, parse_amount
from spendgate.settings import load_settings

EXIT_DENIED = 1
EXIT_ERROR = 2
T = TypeVar("T")

_WINDOW_NAMES = {
    Window.DAY: "day",
    Window.WEEK: "week",
    Window.MONTH: "month",
    Window.TOTAL: "total",
    Window.MINUTE: "minute",
    Window.NONE: "",
}

console = Console()
error_console = Console(stderr=True, soft_wrap=True)


def fail(message: str) -> NoReturn:
    """Print an error and exit with the error code."""
    error_console.print(f"[bold red]error:[/] {message}", highlight=False)
    sys.exit(EXIT_ERROR)


def _amount(text: str) -> int:
    try:
        micros = parse_amount(text)
    except MoneyError as error:
        fail(str(error))
    if micros == 0:
        fail("the amount must be more than zero")
    return micros


def _client(context: click.Context) -> Client:
    options = context.find_root().params
    return Client(options["target"], token=options["token"], timeout_s=options["timeout"])


def _call(action: Callable[[], T]) -> T:
    try:
        return action()
    except SpendgateError as error:
        fail(f"{type(error).__name__.removesuffix('Error')}: {error}")


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: _jsonable(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, Window | type(None)):
        return value.name.lower() if isinstance(value, Window) else None
    if hasattr(value, "name") and hasattr(value, "value"):
        return value.name.lower()
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    return value


@click.group()
@click.option(
    "--target",
    envvar="SPENDGATE_TARGET",
    default="127.0.0.1:50051",
    show_default=True,
    help="The server to talk to (host:port or unix:/path).",
)
@click.option("--token", envvar="SPENDGATE_TOKEN", default=None, help="Bearer token sent with every call.")
@click.option(
    "--timeout",
    envvar="SPENDGATE_TIMEOUT_S",
    default=5.0,
    show_default=True,
    type=float,
    help="Seconds to wait for each call.",
)
def cli(target: str, token: str | None, timeout: float) -> None:
    """spendgate: real-time spend authorization for fleets of AI agents."""


@cli.command()
@click.option(
    "--plan",
    "plan",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="A plan file (YAML) to load at start, e.g. examples/fleet.yaml.",
)
@click.option("--host", default=None, help="Interface to listen on [SPENDGATE_HOST, default 127.0.0.1].")
@click.option("--port", type=int, default=None, help="TCP port [SPENDGATE_PORT, default 50051].")
@click.option("--unix-socket", default=None, help="Also listen on this unix socket [SPENDGATE_UNIX_SOCKET].")
@click.option(
    "--redis-url",
    default=None,
    help="Redis to use [SPENDGATE_REDIS_URL]; without one the embedded in-process store runs.",
)
@click.option(
    "--hold-ttl",
    "hold_ttl_s",
    type=float,
    default=None,
    help="Seconds an uncaptured hold lives [SPENDGATE_HOLD_TTL_S, default 300].",
)
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING [SPENDGATE_LOG_LEVEL].")
def serve(
    plan: str | None,
    host: str | None,
    port: int | None,
    unix_socket: str | None,
    redis_url: str | None,
    hold_ttl_s: float | None,
    log_level: str | None,
) -> None:
    """Run the server until SIGTERM or Ctrl-C (in-flight calls finish first)."""
    from spendgate.app import serve as run_server

    try:
        settings = load_settings(
            plan=plan,
            host=host,
            port=port,
            unix_socket=unix_socket,
            redis_url=redis_url,
            hold_ttl_s=hold_ttl_s,
            log_level=log_level,
        )
    except SpendgateError as error:
        fail(str(error))
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we support
        pass
    try:
        asyncio.run(run_server(settings))
    except SpendgateError as error:
        fail(str(error))


def _print_decision(result: AuthorizeResult, amount_micros: int) -> None:
    currency = "USD"
    if result.approved:
        console.print(
            f"[bold green]APPROVED[/] {format_amount(amount_micros, currency)}  "
            f"authorization [bold]{result.authorization_id}[/]",
            highlight=False,
        )
        if result.hold_expires_at_ms:
            console.print(f"  held until {_time(result.hold_expires_at_ms)}", highlight=False)
    else:
        where = ""
        if result.denied_by is not None:
            window = _WINDOW_NAMES[result.denied_by.window]
            where = f" by {result.denied_by.node_id}" + (f" ({window})" if window else "")
        console.print(f"[bold red]DENIED[/] {result.deny_reason.name.lower()}{where}", highlight=False)
    console.print(f"  {result.message}", highlight=False)
    if result.remaining is not None:
        remaining = result.remaining
        console.print(
            f"  remaining: {format_amount(remaining.remaining_micros, currency)} of "
            f"{format_amount(remaining.limit_micros, currency)} "
            f"({remaining.node_id} {_WINDOW_NAMES[remaining.window]})",
            highlight=False,
        )


def _time(ms: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@cli.command()
@click.argument("wallet")
@click.argument("amount")
@click.option("--service", default="", help="What is being paid for (a host or category).")
@click.option("--capture", is_flag=True, help="Settle at once (one-shot) instead of holding.")
@click.option("--currency", default="USD", show_default=True)
@click.option("--meta", "metadata", multiple=True, metavar="KEY=VALUE", help="A metadata label; repeatable.")
@click.option("--key", "idempotency_key", default=None, help="Idempotency key (a fresh one by default).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def authorize(
    context: click.Context,
    wallet: str,
    amount: str,
    service: str,
    capture: bool,
    currency: str,
    metadata: tuple[str, ...],
    idempotency_key: str | None,
    as_json: bool,
) -> None:
    """Ask to spend AMOUNT (in currency units, e.g. 0.25 or $1) from WALLET."""
    micros = _amount(amount)
    labels = {}
    for item in metadata:
        key, separator, value = item.partition("=")
        if not separator:
            fail(f"--meta {item!r} must look like KEY=VALUE")
        labels[key] = value
    with _client(context) as client:
        result = _call(
            lambda: client.authorize(
                wallet,
                micros,
                currency=currency,
                service=service,
                capture=capture,
                metadata=labels,
                idempotency_key=idempotency_key,
            )
        )
    if as_json:
        click.echo(json.dumps(_jsonable(result), indent=2))
    else:
        _print_decision(result, micros)
    if not result.approved:
        sys.exit(EXIT_DENIED)


@cli.command()
@click.argument("authorization_id")
@click.argument("amount")
@click.option("--key", "idempotency_key", default=None, help="Idempotency key (a fresh one by default).")
@click.pass_context
def capture(context: click.Context, authorization_id: str, amount: str, idempotency_key: str | None) -> None:
    """Settle AMOUNT of a hold; the rest of the hold is released."""
    micros = _amount(amount)
    with _client(context) as client:
        result = _call(lambda: client.capture(authorization_id, micros, idempotency_key=idempotency_key))
    console.print(
        f"[bold green]CAPTURED[/] {format_amount(result.captured_micros)}, released "
        f"{format_amount(result.released_micros)}  ({result.authorization_id})",
        highlight=False,
    )


@cli.command()
@click.argument("authorization_id")
@click.pass_context
def void(context: click.Context, authorization_id: str) -> None:
    """Release a hold without spending."""
    with _client(context) as client:
        result = _call(lambda: client.void(authorization_id))
    console.print(
        f"[bold yellow]VOIDED[/] released {format_amount(result.released_micros)}  ({result.authorization_id})",
        highlight=False,
    )


def budget_table(budget: NodeBudget) -> Table:
    """A node's windows as a table."""
    currency = budget.currency
    title = f"{budget.node_id} ({budget.kind.name.lower()}"
    title += f" in {budget.parent_id})" if budget.parent_id else ")"
    table = Table(title=title, title_justify="left")
    for column in ("window", "id", "limit", "spent", "held", "remaining"):
        table.add_column(column, justify="left" if column in ("window", "id") else "right")
    for window in budget.windows:
        limit = window.limit_micros
        table.add_row(
            _WINDOW_NAMES[window.window],
            window.window_id,
            format_amount(limit, currency) if limit is not None else "-",
            format_amount(window.spent_micros, currency),
            format_amount(window.held_micros, currency),
            format_amount(window.remaining_micros, currency) if window.remaining_micros is not None else "-",
        )
    return table


@cli.command()
@click.argument("node")
@click.option("--json", "as_json", is_flag=True, help="Print the budget as JSON.")
@click.pass_context
def budget(context: click.Context, node: str, as_json: bool) -> None:
    """Show a node's limits and what is spent, held and remaining in each window."""
    with _client(context) as client:
        result = _call(lambda: client.get_budget(node))
    if as_json:
        click.echo(json.dumps(_jsonable(result), indent=2))
        return
    console.print(budget_table(result))
    extras = []
    if result.per_transaction_micros is not None:
        extras.append(f"per transaction {format_amount(result.per_transaction_micros, result.currency)}")
    if result.velocity_per_minute is not None:
        extras.append(f"velocity {result.velocity_used}/{result.velocity_per_minute} this minute")
    if result.allowed_services:
        extras.append("services " + ", ".join(result.allowed_services))
    if result.frozen:
        extras.append(f"[bold red]FROZEN[/]: {result.frozen_reason}")
    if extras:
        console.print("  " + "; ".join(extras), highlight=False)


def main() -> None:
    """Entry point of the ``spendgate`` command."""
    cli()
