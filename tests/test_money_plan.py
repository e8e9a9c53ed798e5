"""Money as integer micro-units (parsing what people type, showing it back) and plan validation.

Plan errors must say where the mistake is and what is wrong, since operators fix them from the message alone.
"""

from __future__ import annotations

import copy
import decimal
import pathlib
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import FLEET_YAML, USD, nested_plan
from spendgate.domain import InvalidArgumentError, Limits, NodeKind
from spendgate.money import MONEY_MICROS_MAX, MoneyError, format_amount, parse_amount
from spendgate.plan import PlanError, load_plan, parse_plan

# ---------------------------------------------------------------------------------------------------------
# Money.


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("0.25", 250_000),
        ("$50", 50 * USD),
        ("3,000", 3_000 * USD),
        ("$3,000.50", 3_000 * USD + 500_000),
        ("1,234,567.5", 1_234_567_500_000),
        ("1_000", 1_000 * USD),
        (".5", 500_000),
        ("7.", 7 * USD),
        ("0", 0),
        ("0.000001", 1),
        ("12.345678", 12_345_678),
        ("  $ 12.5  ", 12_500_000),
        ("50 USD", 50 * USD),
        ("1000000000", MONEY_MICROS_MAX),
        (7, 7 * USD),
        (0, 0),
        (1.5, 1_500_000),
        (0.1, 100_000),
        (0.000001, 1),
        (decimal.Decimal("0.000001"), 1),
        (decimal.Decimal("2.50"), 2_500_000),
    ],
)
def test_parse_amount_reads_what_people_type_exactly(text: Any, micros: int) -> None:
    assert parse_amount(text) == micros
    assert type(parse_amount(text)) is int


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not an amount: write it like 0.25, $50 or 3,000"),
        ("abc", "'abc' is not an amount"),
        ("-1", "'-1' is not an amount"),
        ("1e3", "'1e3' is not an amount"),
        ("$", "is not an amount"),
        ("1.2.3", "is not an amount"),
        ("12 dollars", "is not an amount"),
        # A decimal comma is refused, never read as a thousands separator ("1,5" is not $15).
        ("1,5", "'1,5' is not an amount"),
        ("0,25", "'0,25' is not an amount"),
        ("0,250", "'0,250' is not an amount"),
        ("1,0000", "'1,0000' is not an amount"),
        ("12,34,567", "'12,34,567' is not an amount"),
        (",500", "',500' is not an amount"),
        (-1, "-1 is not a non-negative amount"),
        (-0.5, "is not a non-negative amount"),
        (float("nan"), "is not a non-negative amount"),
        (float("inf"), "is not a non-negative amount"),
        (decimal.Decimal("-0.01"), "is not a non-negative amount"),
        (True, "True is not an amount"),
        ("0.0000001", "has more than 6 decimal places"),
        (0.0000001, "has more than 6 decimal places"),
        ("1000000000.000001", "is above the largest amount spendgate accepts ($1,000,000,000.00)"),
        (10**10, "is above the largest amount"),
    ],
)
def test_parse_amount_refuses_what_is_not_money(text: Any, message: str) -> None:
    with pytest.raises(MoneyError, match=re.escape(message)):
        parse_amount(text)


def test_a_money_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not an amount"):
        parse_amount("x")


@pytest.mark.parametrize(
    ("micros", "currency", "text"),
    [
        (0, "USD", "$0.00"),
        (1, "USD", "$0.000001"),
        (10, "USD", "$0.00001"),
        (500_000, "USD", "$0.50"),
        (1_234_500_000, "USD", "$1,234.50"),
        (50 * USD, "USD", "$50.00"),
        (MONEY_MICROS_MAX, "USD", "$1,000,000,000.00"),
        (-1_500_000, "USD", "-$1.50"),
        (12_000_001, "EUR", "12.000001 EUR"),
        (3 * USD, "JPY", "3.00 JPY"),
    ],
)
def test_format_amount_shows_money_as_people_read_it(micros: int, currency: str, text: str) -> None:
    assert format_amount(micros, currency) == text


@settings(max_examples=200, deadline=None)
@given(st.integers(0, MONEY_MICROS_MAX))
def test_formatting_then_parsing_gives_back_the_same_micros(micros: int) -> None:
    assert parse_amount(format_amount(micros)) == micros
    assert parse_amount(format_amount(micros, "EUR")) == micros


# ---------------------------------------------------------------------------------------------------------
# Plans that are right.


def test_the_example_fleet_loads_with_its_limits() -> None:
    plan = load_plan(FLEET_YAML)

    assert (plan.account_id, plan.currency, plan.time_zone) == ("acme", "USD", "UTC")
    kinds = [node.kind for node in plan.nodes]
    assert kinds.count(NodeKind.ACCOUNT) == 1
    assert kinds.count(NodeKind.POOL) == 3
    assert kinds.count(NodeKind.WALLET) == 7
    nodes = {node.node_id: node for node in plan.nodes}
    assert nodes["acme"].limits == Limits(month_micros=10_000 * USD)
    assert nodes["sales-agents"].parent_id == "acme"
    assert nodes["sales-agents"].limits.month_micros == 2_000 * USD
    assert nodes["research-agent-01"].parent_id == "research-agents"
    assert nodes["research-agent-01"].limits == Limits(per_transaction_micros=USD, day_micros=50 * USD)
    assert nodes["content-agent-02"].limits.day_micros == 20 * USD
    # Parents come before their children.
    seen: set[str] = set()
    for node in plan.nodes:
        assert node.parent_id is None or node.parent_id in seen
        seen.add(node.node_id)


def test_every_option_of_a_plan_is_read() -> None:
    plan = parse_plan(
        {
            "account": {"id": "acme", "currency": "EUR", "time_zone": "Europe/Paris", "limits": {"month": "$3,000"}},
            "pools": [
                {
                    "id": "p",
                    "frozen": "incident 42",
                    "limits": {"week": 0.5, "total": "1_000"},
                    "pools": [{"id": "inner", "wallets": [{"id": "deep", "frozen": True}]}],
                    "wallets": [
                        {
                            "id": "w",
                            "shadow": True,
                            "limits": {
                                "per_transaction": 1,
                                "day": 50,
                                "velocity_per_minute": 60,
                                "allowed_services": ["api.example.com", "search"],
                            },
                            "breaker": {"multiplier": 3, "recent_minutes": 2, "trailing_minutes": 30, "min_spend": 1},
                        }
                    ],
                }
            ],
            "wallets": [{"id": "direct", "breaker": True}],
        }
    )

    assert (plan.currency, plan.time_zone) == ("EUR", "Europe/Paris")
    nodes = {node.node_id: node for node in plan.nodes}
    assert [node.node_id for node in plan.nodes] == ["acme", "p", "inner", "deep", "w", "direct"]
    assert nodes["acme"].limits.month_micros == 3_000 * USD
    assert (nodes["p"].frozen_reason, nodes["p"].limits.week_micros, nodes["p"].limits.total_micros) == (
        "incident 42",
        500_000,
        1_000 * USD,
    )
    assert (nodes["inner"].kind, nodes["inner"].parent_id) == (NodeKind.POOL, "p")
    assert (nodes["deep"].kind, nodes["deep"].parent_id, nodes["deep"].frozen_reason) == (
        NodeKind.WALLET,
        "inner",
        "frozen in plan",
    )
    w = nodes["w"]
    assert w.shadow
    assert w.limits == Limits(
        per_transaction_micros=USD,
        day_micros=50 * USD,
        velocity_per_minute=60,
        allowed_services=("api.example.com", "search"),
    )
    assert w.breaker is not None
    assert (w.breaker.multiplier, w.breaker.recent_minutes, w.breaker.trailing_minutes) == (3.0, 2, 30)
    assert w.breaker.min_spend_micros == USD
    assert nodes["direct"].breaker is not None
    assert nodes["direct"].breaker.multiplier == 5.0
    assert nodes["direct"].parent_id == "acme"


def test_a_plan_may_be_as_deep_as_the_scripts_walk() -> None:
    assert len(parse_plan(nested_plan(32)).nodes) == 32
    with pytest.raises(PlanError, match=re.escape("wallets[0]: the tree is deeper than 32 levels")):
        parse_plan(nested_plan(33))


# ---------------------------------------------------------------------------------------------------------
# Plans that are wrong: the message says where and what.

GOOD: dict[str, Any] = {
    "account": {"id": "acme", "limits": {"month": 100}},
    "pools": [{"id": "p", "limits": {"month": 50}, "wallets": [{"id": "w1"}, {"id": "w2", "limits": {"day": 5}}]}],
}


def broken(change: Any) -> dict[str, Any]:
    plan = copy.deepcopy(GOOD)
    change(plan)
    return plan


PLAN_ERRORS = [
    pytest.param(
        lambda p: p.update(wallet=[]),
        "plan: unknown key(s) wallet; allowed: account, pools, wallets",
        id="unknown-top-level-key",
    ),
    pytest.param(
        lambda p: p["account"].update(limit={}),
        "plan: account: unknown key(s) limit; allowed: breaker, currency, frozen, id, limits, shadow, time_zone",
        id="unknown-account-key",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][1]["limits"].update(daily=5),
        "pools[0].wallets[1].limits: unknown key(s) daily; allowed: allowed_services, day, month, per_transaction, "
        "total, velocity_per_minute, week",
        id="unknown-limit",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][0].update(pools=[]),
        "pools[0].wallets[0]: unknown key(s) pools; allowed:",
        id="wallet-with-children",
    ),
    pytest.param(
        lambda p: p["pools"][0]["limits"].update(month="abc"),
        "pools[0].limits.month: 'abc' is not an amount: write it like 0.25, $50 or 3,000",
        id="amount-not-a-number",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][1]["limits"].update(day=-5),
        "pools[0].wallets[1].limits.day: -5 is not a non-negative amount",
        id="negative-amount",
    ),
    pytest.param(
        lambda p: p["account"]["limits"].update(month="0.0000001"),
        "account.limits.month: '0.0000001' has more than 6 decimal places",
        id="too-precise",
    ),
    pytest.param(
        lambda p: p["account"]["limits"].update(total="2,000,000,000"),
        "account.limits.total: '2,000,000,000' is above the largest amount spendgate accepts",
        id="too-large",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][1]["limits"].update(day="1,5"),
        "pools[0].wallets[1].limits.day: '1,5' is not an amount",
        id="decimal-comma",
    ),
    pytest.param(
        lambda p: p["account"]["limits"].update(month=True),
        "account.limits.month: True is not an amount",
        id="boolean-amount",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"].append({"id": "w1"}),
        "node id 'w1' appears more than once; ids are unique across a deployment",
        id="duplicate-wallet",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"].append({"id": "p"}),
        "node id 'p' appears more than once",
        id="wallet-named-like-its-pool",
    ),
    pytest.param(
        lambda p: p.update(wallets=[{"id": "acme"}]),
        "node id 'acme' appears more than once",
        id="wallet-named-like-the-account",
    ),
    pytest.param(
        lambda p: p["account"].update(time_zone="Mars/Olympus_Mons"),
        "account: unknown time zone 'Mars/Olympus_Mons': use an IANA name such as UTC or Europe/Paris",
        id="unknown-time-zone",
    ),
    pytest.param(
        lambda p: p["account"].update(time_zone="../../etc/passwd"),
        "account: unknown time zone '../../etc/passwd'",
        id="path-as-time-zone",
    ),
    pytest.param(
        lambda p: p["account"].update(time_zone=""),
        "account: unknown time zone ''",
        id="empty-time-zone",
    ),
    pytest.param(
        lambda p: p["account"].update(currency="usd"),
        "account: currency 'usd' is not an ISO 4217 code such as USD",
        id="lowercase-currency",
    ),
    pytest.param(lambda p: p["account"].pop("id"), "account.id: expected an id (a string)", id="no-account-id"),
    pytest.param(lambda p: p["pools"][0].update(id=7), "pools[0].id: expected an id (a string)", id="numeric-id"),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][0].update(id="agent 1"),
        "pools[0].wallets[0].id 'agent 1' may only hold letters, digits, '.', '_' and '-'",
        id="id-with-space",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][0].update(id="a:b"),
        "pools[0].wallets[0].id 'a:b' may only hold letters",
        id="id-with-colon",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][0].update(id="w" * 65),
        "pools[0].wallets[0].id is 65 characters long; the limit is 64",
        id="long-id",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][0].update(limits={"velocity_per_minute": 0}),
        "pools[0].wallets[0].limits.velocity_per_minute: expected a whole number from 1 to 1000000",
        id="zero-velocity",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][0].update(limits={"velocity_per_minute": 1.5}),
        "velocity_per_minute: expected a whole number from 1 to 1000000",
        id="fractional-velocity",
    ),
    pytest.param(
        lambda p: p["pools"][0]["wallets"][0].update(limits={"velocity_per_minute": True}),
        "velocity_per_minute: expected a whole number",
        id="boolean-velocity",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(limits={"allowed_services": "api"}),
        "pools[0].limits.allowed_services: expected a list, got str",
        id="services-not-a-list",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(limits={"allowed_services": ["ok", ""]}),
        "pools[0].limits.allowed_services[1]: expected a non-empty string",
        id="empty-service",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(limits={"allowed_services": ["a\nb"]}),
        "pools[0].limits.allowed_services[0]: service may not hold control characters",
        id="service-with-newline",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(limits={"allowed_services": [f"s{i}" for i in range(65)]}),
        "pools[0].limits.allowed_services: at most 64 services",
        id="too-many-services",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(frozen=5),
        "pools[0].frozen: expected a reason (a string) or true",
        id="frozen-number",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(shadow="yes"), "pools[0].shadow: expected true or false", id="shadow-string"
    ),
    pytest.param(
        lambda p: p["pools"][0].update(breaker={"multiplier": 0.5}),
        "pools[0].breaker.multiplier: expected a number from 1 to 1000",
        id="breaker-multiplier",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(breaker={"recent_minutes": 0}),
        "pools[0].breaker.recent_minutes: expected whole minutes from 1 to 1440",
        id="breaker-minutes",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(breaker={"min_spend": "lots"}),
        "pools[0].breaker.min_spend: 'lots' is not an amount",
        id="breaker-min-spend",
    ),
    pytest.param(lambda p: p.update(pools={"id": "p"}), "pools: expected a list, got dict", id="pools-not-a-list"),
    pytest.param(
        lambda p: p["pools"][0].update(wallets=["w1"]),
        "pools[0].wallets[0]: expected a mapping, got str",
        id="wallet-not-a-mapping",
    ),
    pytest.param(
        lambda p: p["pools"][0].update(limits=[50]),
        "pools[0].limits: expected a mapping, got list",
        id="limits-not-a-mapping",
    ),
]


@pytest.mark.parametrize(("change", "message"), PLAN_ERRORS)
def test_a_wrong_plan_is_refused_with_where_and_what(change: Any, message: str) -> None:
    parse_plan(copy.deepcopy(GOOD))  # The plan the change breaks is right.

    with pytest.raises(PlanError, match=re.escape(message)) as raised:
        parse_plan(broken(change))

    assert isinstance(raised.value, InvalidArgumentError)


def test_a_document_that_is_not_a_plan_is_refused() -> None:
    with pytest.raises(PlanError, match=re.escape("fleet.yaml: expected a mapping, got list")):
        parse_plan([1, 2], "fleet.yaml")
    with pytest.raises(PlanError, match=re.escape("account.id: expected an id (a string)")):
        parse_plan(None)


def test_plan_files_that_cannot_be_read_or_parsed_are_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(PlanError, match=r"cannot read plan .*missing\.yaml: No such file or directory"):
        load_plan(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("account: {id: acme\n  limits: [\n")
    with pytest.raises(PlanError, match=r"bad\.yaml is not valid YAML"):
        load_plan(bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("account: {id: acme, limits: {month: lots}}\n")
    with pytest.raises(PlanError, match=re.escape("account.limits.month: 'lots' is not an amount")):
        load_plan(wrong)
