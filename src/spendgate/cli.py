"""The ``spendgate`` command: run the server, and talk to a running one in dollars.

Amounts are typed as currency units (``0.25``, ``$50``, ``3,000``) and shown the same way. Exit codes:
0 approved or done, 1 denied, 2 an error (the message says what to fix).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from spendgate.client import AdminClient, BillingClient, Client, Event, Tls, TokenClient
from spendgate.domain import (
    AuthorizeResult,
    Limits,
    NodeBudget,
    NodeKind,
    SpendgateError,
    Window,
)
from spendgate.money import MoneyError, format_amount, parse_amount
from spendgate.settings import STANDALONE_LEDGER_WRITERS, load_settings

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


def _tls(options: dict[str, Any]) -> Tls | None:
    if not (options["tls_ca"] or options["tls_cert"]):
        return None
    for option in ("tls_ca", "tls_cert", "tls_key"):
        path = options[option]
        if path and not os.path.isfile(path):
            fail(f"--{option.replace('_', '-')} {path}: no such file")
    return Tls(ca_file=options["tls_ca"] or "", cert_file=options["tls_cert"] or "", key_file=options["tls_key"] or "")


def _client(context: click.Context) -> Client:
    options = context.find_root().params
    return Client(options["target"], token=options["token"], timeout_s=options["timeout"], tls=_tls(options))


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
@click.option("--tls-ca", envvar="SPENDGATE_TLS_CA", default=None, help="CA file to verify a TLS server with.")
@click.option("--tls-cert", envvar="SPENDGATE_TLS_CERT", default=None, help="Client certificate (mutual TLS).")
@click.option("--tls-key", envvar="SPENDGATE_TLS_KEY", default=None, help="Client key (mutual TLS).")
def cli(
    target: str, token: str | None, timeout: float, tls_ca: str | None, tls_cert: str | None, tls_key: str | None
) -> None:
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
@click.option(
    "--log-format",
    type=click.Choice(["json", "text"]),
    default=None,
    help="Log lines as JSON objects or as text [SPENDGATE_LOG_FORMAT, default json].",
)
@click.option(
    "--metrics-port",
    type=int,
    default=None,
    help="Serve Prometheus /metrics on this port [SPENDGATE_METRICS_PORT, default off].",
)
def serve(
    plan: str | None,
    host: str | None,
    port: int | None,
    unix_socket: str | None,
    redis_url: str | None,
    hold_ttl_s: float | None,
    log_level: str | None,
    log_format: str | None,
    metrics_port: int | None,
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
            log_format=log_format,
            metrics_port=metrics_port,
        )
    except SpendgateError as error:
        fail(str(error))
    configure_logging(settings.log_level, settings.log_format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency on every platform we support
        pass
    try:
        asyncio.run(run_server(settings))
    except SpendgateError as error:
        fail(str(error))


def configure_logging(level: str, log_format: str) -> None:
    """Send logs to stderr as JSON objects (for pipelines) or text (for people)."""
    handler = logging.StreamHandler()
    if log_format == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(message)s",
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


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


# ---------------------------------------------------------------------------------------------------------
# The control plane.


def _admin(context: click.Context) -> AdminClient:
    options = context.find_root().params
    return AdminClient(
        options["target"], token=options["token"], timeout_s=max(options["timeout"], 30.0), tls=_tls(options)
    )


_CHANGE_STYLE = {"added": "green", "changed": "yellow", "moved": "cyan", "removed": "red"}


@cli.command()
@click.argument("plan_file", type=click.File("r"))
@click.option("--dry-run", is_flag=True, help="Print the diff; change nothing.")
@click.option("--force", is_flag=True, help="Remove or move nodes even with held money or spend in open windows.")
@click.pass_context
def apply(context: click.Context, plan_file: Any, dry_run: bool, force: bool) -> None:
    """Make an account's tree match PLAN_FILE (YAML); idempotent. Prints the changes."""
    text = plan_file.read()
    last = None
    with (
        _admin(context) as admin,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=error_console,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task("applying" if not dry_run else "diffing", total=None)
        try:
            for update in admin.apply_plan(text, dry_run=dry_run, force=force):
                progress.update(task, completed=update.nodes_done, total=update.nodes_total or None)
                last = update
        except SpendgateError as error:
            fail(f"{type(error).__name__.removesuffix('Error')}: {error}")
    if last is None:
        fail("the server sent no answer")
    if not last.changes:
        console.print("no changes: the tree already matches the plan")
        return
    for change in last.changes:
        style = _CHANGE_STYLE.get(change.kind, "white")
        line = f"[{style}]{change.kind:>8}[/] {change.node_id}"
        if change.before and change.after:
            line += f"\n           {change.before}\n        -> {change.after}"
        else:
            line += f"  {change.after or change.before}"
        if change.unsafe_reason:
            line += f"\n           [bold red]unsafe:[/] {change.unsafe_reason}"
        console.print(line, highlight=False)
    verb = "would change" if dry_run else "changed"
    console.print(f"{verb} {len(last.changes)} node(s)", highlight=False)


def _bar(used: int, limit: int | None, width: int = 10) -> str:
    if not limit:
        return ""
    ratio = used / limit
    filled = min(width, round(ratio * width))
    colour = "green" if ratio < 0.5 else "yellow" if ratio < 0.8 else "red"
    return f"[{colour}]{'█' * filled}{'░' * (width - filled)}[/] {ratio:4.0%}"


@cli.command()
@click.argument("node", required=False, default="")
@click.option(
    "--window",
    type=click.Choice(["day", "week", "month", "total"]),
    default=None,
    help="Show only this window (by default every window with a limit).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the tree as JSON.")
@click.pass_context
def tree(context: click.Context, node: str, window: str | None, as_json: bool) -> None:
    """Show the hierarchy under NODE (everything by default) with spent / held / limit and utilization."""
    with _admin(context) as admin:
        entries = _call(lambda: admin.tree(node))
    if as_json:
        click.echo(json.dumps([{"depth": d, "shadow": s, "budget": _jsonable(b)} for d, b, s in entries], indent=2))
        return
    table = Table(box=None, pad_edge=False)
    for column in ("node", "window", "spent", "held", "limit", "utilization"):
        table.add_column(column, justify="right" if column in ("spent", "held", "limit") else "left", no_wrap=True)
    for depth, budget, shadow in entries:
        label = "  " * depth + budget.node_id + (" [red](frozen)[/]" if budget.frozen else "")
        label += " [dim](shadow)[/]" if shadow else ""
        rows = [
            w
            for w in budget.windows
            if (window is None and w.limit_micros is not None)
            or (window is not None and _WINDOW_NAMES[w.window] == window)
        ]
        if not rows:
            table.add_row(label, "", "", "", "", "")
        for index, w in enumerate(rows):
            used = w.spent_micros + w.held_micros
            table.add_row(
                label if index == 0 else "",
                _WINDOW_NAMES[w.window],
                format_amount(w.spent_micros, budget.currency),
                format_amount(w.held_micros, budget.currency),
                format_amount(w.limit_micros, budget.currency) if w.limit_micros is not None else "-",
                _bar(used, w.limit_micros),
            )
    console.print(table)


@cli.command()
@click.argument("node")
@click.option("--reason", required=True, help="Why (kept in the audit log and the event feed).")
@click.option("--void-holds", is_flag=True, help="Also void every open hold under the node.")
@click.pass_context
def freeze(context: click.Context, node: str, reason: str, void_holds: bool) -> None:
    """Freeze NODE: every authorization under it is denied from the very next call."""
    with _admin(context) as admin:
        voided, released = _call(lambda: admin.freeze(node, reason, void_holds=void_holds))
    message = f"[bold red]FROZEN[/] {node}: {reason}"
    if void_holds:
        message += f"; voided {voided} hold(s), released {format_amount(released)}"
    console.print(message, highlight=False)


@cli.command()
@click.argument("node")
@click.pass_context
def unfreeze(context: click.Context, node: str) -> None:
    """Let NODE spend again."""
    with _admin(context) as admin:
        was_frozen = _call(lambda: admin.unfreeze(node))
    console.print(f"[bold green]UNFROZEN[/] {node}" if was_frozen else f"{node} was not frozen", highlight=False)


def _limits_options(function: Callable[..., Any]) -> Callable[..., Any]:
    for name in ("total", "month", "week", "day", "per-transaction"):
        function = click.option(f"--{name}", default=None, metavar="AMOUNT", help=f"The {name} limit, e.g. 50.")(
            function
        )
    function = click.option("--velocity", type=int, default=None, help="Approved transactions per minute.")(function)
    return click.option("--service", "services", multiple=True, help="An allowed service; repeatable.")(function)


def _limits(
    per_transaction: str | None,
    day: str | None,
    week: str | None,
    month: str | None,
    total: str | None,
    velocity: int | None,
    services: tuple[str, ...],
) -> Limits:
    def money(value: str | None) -> int | None:
        if value is None:
            return None
        try:
            return parse_amount(value)
        except MoneyError as error:
            fail(str(error))

    return Limits(
        per_transaction_micros=money(per_transaction),
        day_micros=money(day),
        week_micros=money(week),
        month_micros=money(month),
        total_micros=money(total),
        velocity_per_minute=velocity,
        allowed_services=services,
    )


@cli.command("set-limits")
@click.argument("node")
@_limits_options
@click.option("--shadow", is_flag=True, help="Evaluate and report the limits, do not enforce them.")
@click.pass_context
def set_limits(context: click.Context, /, node: str, shadow: bool, **limits: Any) -> None:
    """Replace NODE's limits (every limit not given is removed)."""
    with _admin(context) as admin:
        result = _call(lambda: admin.set_limits(node, _limits(**limits), shadow=shadow))
    console.print(budget_table(result))


@cli.command()
@click.argument("node")
@click.option("--parent", required=True, help="The account or pool to create it under.")
@click.option("--pool", "is_pool", is_flag=True, help="Create a pool (a wallet by default).")
@_limits_options
@click.pass_context
def create(context: click.Context, /, node: str, parent: str, is_pool: bool, **limits: Any) -> None:
    """Create a wallet (or with --pool a pool) called NODE under --parent."""
    kind = NodeKind.POOL if is_pool else NodeKind.WALLET
    with _admin(context) as admin:
        result = _call(lambda: admin.create_node(node, parent, kind, _limits(**limits)))
    console.print(budget_table(result))


@cli.command()
@click.argument("node")
@click.argument("new_parent")
@click.option("--force", is_flag=True, help="Move even with held money or spend in open windows.")
@click.pass_context
def move(context: click.Context, node: str, new_parent: str, force: bool) -> None:
    """Move NODE under NEW_PARENT."""
    with _admin(context) as admin:
        result = _call(lambda: admin.move_node(node, new_parent, force=force))
    console.print(f"moved {node} under {result.parent_id}", highlight=False)


@cli.command()
@click.argument("node")
@click.option("--force", is_flag=True, help="Delete even with held money or spend in open windows.")
@click.pass_context
def delete(context: click.Context, node: str, force: bool) -> None:
    """Delete NODE and everything under it."""
    with _admin(context) as admin:
        removed = _call(lambda: admin.delete_node(node, force=force))
    console.print(f"deleted {', '.join(removed)}", highlight=False)


@cli.command()
@click.argument("node", required=False, default="")
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    type=click.Choice(["decision", "capture", "void", "alert", "freeze", "unfreeze", "config"]),
    help="Only these kinds of events; repeatable.",
)
@click.option("--count", type=int, default=0, help="Stop after this many events (0: until Ctrl-C).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def watch(context: click.Context, node: str, kinds: tuple[str, ...], count: int, as_json: bool) -> None:
    """Print the live feed of decisions, captures, alerts and freezes under NODE."""
    seen = 0
    with _admin(context) as admin:
        try:
            # The stream's errors (an unknown node, no access) arrive while iterating, not when it is opened.
            for event in admin.watch(node, kinds):
                if as_json:
                    click.echo(json.dumps(_jsonable(event)))
                else:
                    console.print(_describe_event(event), highlight=False)
                seen += 1
                if count and seen >= count:
                    break
        except KeyboardInterrupt:
            pass
        except SpendgateError as error:
            fail(f"{type(error).__name__.removesuffix('Error')}: {error}")


def _describe_event(event: Event) -> str:
    when = _time(event.at_ms)
    amount = format_amount(event.amount_micros)
    match event.kind:
        case "decision":
            verdict = "[green]approved[/]" if event.decision == "approved" else f"[red]denied[/] {event.deny_reason}"
            return f"{when} decision {event.node_id} {amount} {verdict}"
        case "alert":
            return (
                f"{when} [yellow]alert[/] {event.node_id} crossed {event.threshold_percent}% of its "
                f"{event.window} limit ({amount} spent or held)"
            )
        case "freeze":
            return f"{when} [bold red]freeze[/] {event.node_id}: {event.message}"
        case _:
            return f"{when} {event.kind} {event.node_id} {amount} {event.message}".rstrip()


@cli.group()
def token() -> None:
    """Issue, list and revoke bearer tokens."""


def _tokens(context: click.Context) -> TokenClient:
    options = context.find_root().params
    return TokenClient(options["target"], token=options["token"], timeout_s=options["timeout"], tls=_tls(options))


@token.command("create")
@click.option("--role", type=click.Choice(["agent", "reader", "admin"]), required=True)
@click.option("--scope", required=True, help="The wallet (agent) or account (reader, admin) the token is for.")
@click.option("--name", required=True, help="A name to recognise the token by.")
@click.pass_context
def token_create(context: click.Context, role: str, scope: str, name: str) -> None:
    """Issue a token; its secret is printed once and never stored."""
    with _tokens(context) as tokens:
        secret, info = _call(lambda: tokens.create_token(role, scope, name))
    error_console.print(
        f"token {info.token_id} ({info.role} for {info.scope_node_id}); keep the secret, it is not shown again:",
        highlight=False,
    )
    click.echo(secret)


@token.command("list")
@click.option("--account", default="", help="Only this account's tokens.")
@click.pass_context
def token_list(context: click.Context, account: str) -> None:
    """List tokens (without secrets)."""
    with _tokens(context) as tokens:
        infos = _call(lambda: tokens.list_tokens(account))
    table = Table()
    for column in ("id", "role", "scope", "account", "name", "created"):
        table.add_column(column, no_wrap=True)
    for info in infos:
        table.add_row(
            info.token_id, info.role, info.scope_node_id, info.account_id, info.name, _time(info.created_at_ms)
        )
    console.print(table)


@token.command("revoke")
@click.argument("token_id")
@click.pass_context
def token_revoke(context: click.Context, token_id: str) -> None:
    """Revoke a token: the next call with it fails on every replica."""
    with _tokens(context) as tokens:
        info = _call(lambda: tokens.revoke_token(token_id))
    console.print(f"revoked {info.token_id} ({info.role} for {info.scope_node_id})", highlight=False)


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(context: click.Context, arguments: tuple[str, ...]) -> None:
    """Load-test a server and measure this machine's ceilings (spendgate bench --help for the options)."""
    from spendgate.bench.command import main as bench_main

    # The harness parses its own options; --target and --token given before `bench` count as its own.
    root = context.find_root()
    forwarded = [
        f"--{name}={root.params[name]}"
        for name in ("target", "token")
        if root.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    bench_main([*forwarded, *arguments], prog_name="spendgate bench")


# ---------------------------------------------------------------------------------------------------------
# The ledger: billing exports, reports, and the operator's recovery tools.


def _billing(context: click.Context) -> BillingClient:
    options = context.find_root().params
    return BillingClient(
        options["target"], token=options["token"], timeout_s=max(options["timeout"], 30.0), tls=_tls(options)
    )


def _day_ms(text: str, time_zone: str, what: str) -> int:
    """Midnight at the start of a YYYY-MM-DD day (or YYYY-MM month) in a time zone, in ms."""
    import datetime

    from spendgate.windows import zone

    try:
        day = datetime.date.fromisoformat(text if len(text) > 7 else f"{text}-01")
    except ValueError:
        fail(f"{what} {text!r} is not a date: write it like 2026-11-01")
    return int(datetime.datetime.combine(day, datetime.time(), zone(time_zone)).timestamp() * 1000)


def _month_range(month: str, time_zone: str) -> tuple[int, int]:
    start = _day_ms(month, time_zone, "--month")
    year, number = (int(part) for part in month.split("-")[:2])
    following = f"{year + number // 12}-{number % 12 + 1:02d}"
    return start, _day_ms(following, time_zone, "--month")


def _time_zone_of(context: click.Context, node: str) -> str:
    with _client(context) as client:
        return _call(lambda: client.get_budget(node)).time_zone


@cli.command()
@click.option("--under", "node", required=True, help="A wallet, or everything under a pool or an account.")
@click.option("--since", default=None, help="First day (YYYY-MM-DD, the account's time zone).")
@click.option("--until", default=None, help="Day after the last (YYYY-MM-DD).")
@click.option("--service", default="", help="Only this service.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout (for spreadsheets and chargebacks).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def transactions(
    context: click.Context, node: str, since: str | None, until: str | None, service: str, as_csv: bool, as_json: bool
) -> None:
    """List settled transactions from the ledger, oldest first."""
    time_zone = _time_zone_of(context, node) if since or until else "UTC"
    since_ms = _day_ms(since, time_zone, "--since") if since else 0
    until_ms = _day_ms(until, time_zone, "--until") if until else 0
    with _billing(context) as billing:
        rows = _call(lambda: list(billing.transactions(node, since_ms=since_ms, until_ms=until_ms, service=service)))
    if as_json:
        for row in rows:
            click.echo(json.dumps(_jsonable(row) | {"metadata": dict(row.metadata)}, sort_keys=True))
        return
    columns = (
        "txn_id",
        "captured_at",
        "wallet_id",
        "pool_id",
        "account_id",
        "service",
        "amount",
        "amount_micros",
        "currency",
        "day",
        "month",
        "metadata",
    )
    values = [
        (
            row.txn_id,
            _time(row.captured_at_ms),
            row.wallet_id,
            row.chain[1] if len(row.chain) > 2 else "",
            row.account_id,
            row.service,
            format_amount(row.amount_micros, row.currency),
            str(row.amount_micros),
            row.currency,
            row.day,
            row.month,
            json.dumps(dict(row.metadata), sort_keys=True),
        )
        for row in rows
    ]
    if as_csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(columns)
        writer.writerows(values)
        return
    table = Table(title=f"{len(rows)} transaction(s) under {node}", title_justify="left")
    for column in ("captured_at", "wallet_id", "service", "amount"):
        table.add_column(column, justify="right" if column == "amount" else "left", no_wrap=True)
    for value in values:
        table.add_row(value[1], value[2], value[5], value[6])
    console.print(table)
    total = sum(row.amount_micros for row in rows)
    console.print(f"total {format_amount(total, rows[0].currency if rows else 'USD')}", highlight=False)


@cli.command()
@click.option(
    "--by",
    "group_by",
    type=click.Choice(["wallet", "pool", "account", "service"]),
    default="wallet",
    show_default=True,
    help="What to group by.",
)
@click.option("--period", type=click.Choice(["day", "month"]), default="month", show_default=True)
@click.option("--month", default=None, help="Only this month (YYYY-MM, the account's time zone).")
@click.option("--under", "node", default="", help="The subtree to report (every account you may see by default).")
@click.option("--csv", "as_csv", is_flag=True, help="CSV on stdout.")
@click.option("--json", "as_json", is_flag=True, help="JSON on stdout.")
@click.pass_context
def report(
    context: click.Context, group_by: str, period: str, month: str | None, node: str, as_csv: bool, as_json: bool
) -> None:
    """Spend per wallet, pool, account or service, per day or month, for chargebacks."""
    if node:
        roots = [node]
    else:
        with _admin(context) as admin:
            roots = [budget.node_id for depth, budget, _ in _call(lambda: admin.tree("")) if depth == 0]
    lines = []
    for root in roots:
        since_ms, until_ms = _month_range(month, _time_zone_of(context, root)) if month else (0, 0)
        with _billing(context) as billing:
            lines += _call(
                lambda root=root, since_ms=since_ms, until_ms=until_ms: billing.report(  # type: ignore[misc]
                    root, group_by=group_by, period=period, since_ms=since_ms, until_ms=until_ms
                )
            )
    if as_json:
        click.echo(json.dumps([_jsonable(line) for line in lines], indent=2))
        return
    if as_csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(("period", group_by, "amount", "amount_micros", "currency", "transactions"))
        for line in lines:
            writer.writerow(
                (
                    line.period,
                    line.group,
                    format_amount(line.amount_micros, line.currency),
                    line.amount_micros,
                    line.currency,
                    line.transaction_count,
                )
            )
        return
    table = Table(title=f"spend by {group_by} per {period}" + (f", {month}" if month else ""), title_justify="left")
    for column in ("period", group_by, "amount", "transactions"):
        table.add_column(column, justify="right" if column in ("amount", "transactions") else "left", no_wrap=True)
    for line in lines:
        table.add_row(
            line.period, line.group, format_amount(line.amount_micros, line.currency), str(line.transaction_count)
        )
    console.print(table)


def _direct_settings() -> Any:
    """Settings for the operator tools that talk to Redis and the database directly."""
    try:
        settings = load_settings()
    except SpendgateError as error:
        fail(str(error))
    if settings.embedded:
        fail("this command works on a deployment's Redis: set SPENDGATE_REDIS_URL (and SPENDGATE_DATABASE_URL)")
    return settings


@cli.command()
def migrate() -> None:
    """Apply the ledger's schema migrations (SPENDGATE_DATABASE_URL, or the embedded SQLite file)."""
    from spendgate.ledger import open_ledger

    settings = load_settings()

    async def run() -> int:
        ledger = open_ledger(settings.database_url, data_dir=settings.data_dir)
        try:
            return await ledger.migrate()
        finally:
            await ledger.close()

    version = _call(lambda: asyncio.run(run()))
    console.print(f"ledger schema at version {version}", highlight=False)


@cli.command()
@click.option(
    "--writers",
    type=int,
    default=STANDALONE_LEDGER_WRITERS,
    show_default=True,
    help="Writer loops in this process (two overlap one batch's commit with the next batch's read).",
)
@click.option("--consumer", default="", help="Consumer name in the outbox group (hostname-pid by default).")
@click.option("--once", is_flag=True, help="Drain what is in the outbox now, then exit.")
def ledger(writers: int, consumer: str, once: bool) -> None:
    """Run ledger writers outside the server: drain the outboxes into the database until SIGTERM."""
    settings = _direct_settings()
    configure_logging(settings.log_level, settings.log_format)
    from spendgate.app import run_ledger_writers

    written = _call(lambda: asyncio.run(run_ledger_writers(settings, writers=writers, consumer=consumer, once=once)))
    if once:
        console.print(f"wrote {written} transaction(s)", highlight=False)


@cli.command()
@click.option("--account", default="", help="Only this account.")
def reconcile(account: str) -> None:
    """Compare Redis's spent counters with the ledger plus the outbox; exit 1 on any drift."""
    settings = _direct_settings()
    from spendgate.app import reconcile_accounts

    reports = _call(lambda: asyncio.run(reconcile_accounts(settings, account)))
    drifted = 0
    table = Table(title="drift (Redis minus ledger and outbox)", title_justify="left")
    for column in ("account", "node", "window", "redis", "ledger", "outbox", "drift"):
        table.add_column(column, no_wrap=True)
    for report_ in reports:
        for row in report_.drifts:
            drifted += 1
            table.add_row(
                report_.account_id,
                row.node_id,
                f"{row.window.name.lower()} {row.window_id}",
                str(row.redis_spent_micros),
                str(row.ledger_spent_micros),
                str(row.outbox_spent_micros),
                str(row.drift_micros),
            )
    windows = sum(len(report_.rows) for report_ in reports)
    if drifted:
        console.print(table)
        console.print(f"[bold red]{drifted} of {windows} window(s) drifted[/]", highlight=False)
        sys.exit(EXIT_DENIED)
    console.print(
        f"[green]no drift[/]: {windows} window(s) in {len(reports)} account(s) agree with the ledger", highlight=False
    )


@cli.command()
@click.option("--account", default="", help="Only this account.")
def rebuild(account: str) -> None:
    """Restore configuration and spent counters from the ledger after Redis lost them."""
    settings = _direct_settings()
    from spendgate.app import rebuild_accounts

    restored = _call(lambda: asyncio.run(rebuild_accounts(settings, account)))
    for account_id, count in restored:
        console.print(f"rebuilt {account_id}: {count} window counter(s) restored from the ledger", highlight=False)
    if not restored:
        fail("the ledger holds no account configuration to rebuild from")


@cli.command()
@click.option("--account", required=True, help="The account whose wallets to size.")
@click.option(
    "--stage",
    type=click.Choice(["week1", "week3", "month2"]),
    default=None,
    help="Ramp-up stage: week1 2x expected, week3 4x, month2 busiest day + 20 %.",
)
@click.option("--multiplier", type=float, default=None, help="A safety multiplier instead of a stage.")
@click.option("--days", type=int, default=7, show_default=True, help="Days of actuals to read.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, writable=True),
    default=None,
    help="Write the recommended plan here (then: spendgate apply FILE).",
)
@click.pass_context
def recommend(
    context: click.Context, account: str, stage: str | None, multiplier: float | None, days: int, output: str | None
) -> None:
    """Recommend wallet limits from the ledger's actuals.

    Day limit = calls per day x average cost x multiplier; per transaction = 2x the priciest call.
    """
    if (stage is None) == (multiplier is None):
        fail("give either --stage or --multiplier")
    with _admin(context) as admin:
        wallets, plan_yaml, changes = _call(
            lambda: admin.recommend(account, stage=stage or "", multiplier=multiplier or 0.0, days=days)
        )
    table = Table(title=f"recommended limits for {account} from {days} day(s) of actuals", title_justify="left")
    for column in ("wallet", "calls/day", "avg cost", "priciest", "x", "day limit", "per transaction"):
        table.add_column(column, justify="left" if column == "wallet" else "right", no_wrap=True)
    for w in wallets:
        table.add_row(
            w["wallet_id"],
            f"{w['calls_per_day']:.2f}",
            format_amount(w["average_cost_micros"]),
            format_amount(w["priciest_micros"]),
            f"{w['multiplier']:g}" if w["multiplier"] else "busiest",
            format_amount(w["day_limit_micros"]),
            format_amount(w["per_transaction_micros"]),
        )
    console.print(table)
    for change in changes:
        console.print(
            f"[yellow]{change.kind:>8}[/] {change.node_id}\n           {change.before}\n        -> {change.after}",
            highlight=False,
        )
    if output:
        with open(output, "w") as handle:
            handle.write(plan_yaml)
        console.print(f"wrote {output}; apply it with: spendgate apply {output}", highlight=False)
    elif not changes:
        console.print("the current limits already match the recommendation")


@cli.command()
@click.option("--since", default=None, help="Only changes from this day on (YYYY-MM-DD, UTC).")
@click.option("--limit", type=int, default=100, show_default=True, help="The most records (up to 1000).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def audit(context: click.Context, since: str | None, limit: int, as_json: bool) -> None:
    """Show the audit log of admin changes: who, when, what before and after."""
    since_ms = _day_ms(since, "UTC", "--since") if since else 0
    with _billing(context) as billing:
        records = _call(lambda: billing.audit(since_ms=since_ms, limit=limit))
    if as_json:
        for record in records:
            click.echo(json.dumps(record, sort_keys=True))
        return
    table = Table(title=f"{len(records)} audit record(s)", title_justify="left")
    for column in ("when", "actor", "action", "node"):
        table.add_column(column, no_wrap=True)
    for record in records:
        table.add_row(_time(record["at_ms"]), record["actor"], record["action"], record["node_id"])
    console.print(table)
