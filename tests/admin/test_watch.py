"""WatchEvents: the live feed of decisions, captures, voids, alerts, freezes and configuration changes."""

from __future__ import annotations

import pytest

from spendgate.client import Event
from spendgate.domain import InvalidArgumentError, Limits, NotFoundError

from .support import USD, Fleet, OpenWatcher


def test_a_subtree_watch_filtered_by_kind_sees_only_those_events(any_fleet: Fleet, watch: OpenWatcher) -> None:
    fleet = any_fleet
    watcher = watch(fleet.address, "sales-agents", ("freeze", "unfreeze"))

    def is_marker(event: Event) -> bool:
        return event.kind == "unfreeze" and event.node_id == "sales-agents"

    # Unfreezing a node that is not frozen changes nothing but shows on the feed: a harmless marker.
    watcher.sync(lambda: fleet.admin.unfreeze("sales-agents"), is_marker)

    assert fleet.spend.authorize("sales-agent-01", 100_000).approved  # a decision: not a watched kind
    fleet.admin.freeze("research-agent-01", "elsewhere")  # outside the subtree
    fleet.admin.freeze("acme", "above")  # the account is above the subtree
    fleet.admin.unfreeze("acme")
    fleet.admin.freeze("sales-agent-02", "inside")
    fleet.admin.unfreeze("sales-agent-02")
    fleet.admin.set_limits("sales-agent-01", Limits(day_micros=30 * USD))  # a config change: not watched
    fleet.admin.unfreeze("sales-agents")

    events = watcher.until(is_marker)
    assert [(e.kind, e.node_id, e.message) for e in events] == [
        ("freeze", "sales-agent-02", "inside"),
        ("unfreeze", "sales-agent-02", ""),
        ("unfreeze", "sales-agents", ""),
    ]
    assert all(e.account_id == "acme" for e in events)


def test_a_wallet_watch_sees_its_decisions_captures_voids_and_changes(fleet: Fleet, watch: OpenWatcher) -> None:
    watcher = watch(fleet.address, "content-agent-01")

    def is_marker(event: Event) -> bool:
        return event.kind == "unfreeze" and event.node_id == "content-agent-01"

    watcher.sync(lambda: fleet.admin.unfreeze("content-agent-01"), is_marker)
    fleet.advance_minutes(1)

    settled = fleet.spend.authorize("content-agent-01", 400_000)
    fleet.spend.capture(settled.authorization_id, 300_000)
    voided = fleet.spend.authorize("content-agent-01", 200_000)
    fleet.spend.void(voided.authorization_id)
    assert fleet.spend.authorize("content-agent-02", 100_000).approved  # a sibling: outside the subtree
    denied = fleet.spend.authorize("content-agent-01", 5 * USD)
    fleet.admin.set_limits("content-agent-01", Limits(day_micros=25 * USD, per_transaction_micros=USD))
    fleet.admin.unfreeze("content-agent-01")

    events = watcher.until(is_marker)[:-1]
    assert [e.kind for e in events] == ["decision", "capture", "decision", "void", "decision", "config"]
    first, capture, second, void, refused, config = events
    assert (first.decision, first.amount_micros, first.authorization_id) == (
        "approved",
        400_000,
        settled.authorization_id,
    )
    assert first.chain == ("content-agent-01", "content-agents", "acme")
    assert first.at_ms == fleet.now_ms()
    assert (capture.authorization_id, capture.amount_micros) == (settled.authorization_id, 300_000)
    assert second.authorization_id == voided.authorization_id
    assert (void.authorization_id, void.amount_micros) == (voided.authorization_id, 200_000)
    assert (refused.decision, refused.deny_reason, refused.amount_micros) == (
        "denied",
        "per_transaction_limit",
        5 * USD,
    )
    assert refused.authorization_id == denied.authorization_id == ""
    assert config.node_id == "content-agent-01"
    assert "day $25.00" in config.message


def test_a_watch_of_everything_sees_every_account(fleet: Fleet, watch: OpenWatcher) -> None:
    globex = "account: {id: globex}\nwallets:\n  - {id: globex-bot, limits: {day: 5}}\n  - {id: globex-idle}\n"
    assert list(fleet.admin.apply_plan(globex))[-1].applied
    watcher = watch(fleet.address, "", ("alert", "freeze"))

    def is_marker(event: Event) -> bool:
        return event.kind == "freeze" and event.node_id == "globex-idle"

    watcher.sync(lambda: fleet.admin.freeze("globex-idle", "marker"), is_marker)
    for _ in range(10):
        assert fleet.spend.authorize("content-agent-01", USD, capture=True).approved
    assert fleet.spend.authorize("globex-bot", 3 * USD, capture=True).approved
    # The feed reads the accounts in order (acme, then globex): everything above comes before this marker.
    fleet.admin.freeze("globex-idle", "marker")

    events = watcher.until(is_marker)
    assert [(e.account_id, e.kind, e.node_id, e.window, e.threshold_percent) for e in events] == [
        ("acme", "alert", "content-agent-01", "day", 50),
        ("globex", "alert", "globex-bot", "day", 50),
        ("globex", "freeze", "globex-idle", "unspecified", 0),
    ]


@pytest.mark.parametrize(
    ("node_id", "error"),
    [("no-such-node", NotFoundError), ("bad id", InvalidArgumentError)],
)
def test_watching_an_unknown_or_malformed_node_is_refused(fleet: Fleet, node_id: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        next(iter(fleet.admin.watch(node_id)))
