"""The store interface the core depends on. The core never imports a Redis driver; it is handed a store."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Protocol

from spendgate.domain import (
    AccountPlan,
    AuthorizeCommand,
    AuthorizeResult,
    CaptureResult,
    NodeBudget,
    NodeSpec,
    VoidResult,
    Window,
)
from spendgate.windows import WindowIds


@dataclasses.dataclass(frozen=True, slots=True)
class Chain:
    """A wallet's chain up to its account, as resolved at tree version ``topo``."""

    account_id: str
    node_ids: tuple[str, ...]
    topo: str
    currency: str
    time_zone: str

    @property
    def wallet_id(self) -> str:
        """The wallet at the bottom of the chain."""
        return self.node_ids[0]

    @property
    def resolved(self) -> bool:
        """Whether the chain was walked up to its account (see :func:`unresolved_chain`)."""
        return bool(self.topo)


@dataclasses.dataclass(frozen=True, slots=True)
class AccountInfo:
    """What the core needs to know of an account to name its windows."""

    account_id: str
    currency: str
    time_zone: str


def unresolved_chain(account: AccountInfo, wallet_id: str) -> Chain:
    """A wallet's chain before it was walked: its account and the wallet alone, at no tree version.

    :meth:`SpendStore.authorize` takes it as it takes a resolved chain, walks the chain in the same step as the
    decision, and returns the chain it walked.
    """
    return Chain(
        account_id=account.account_id,
        node_ids=(wallet_id,),
        topo="",
        currency=account.currency,
        time_zone=account.time_zone,
    )


class AuthorizeOutcome(NamedTuple):
    """What :meth:`SpendStore.authorize` answers."""

    result: AuthorizeResult
    replayed: bool  # the answer of an earlier request with the same idempotency key
    chain: Chain | None  # the chain the decision walked, when the one given was unresolved or out of date


@dataclasses.dataclass(frozen=True, slots=True)
class Backlog:
    """What an account has outstanding: open holds, and settled transactions not yet in the ledger."""

    holds: int
    outbox_entries: int
    outbox_oldest_age_ms: int


@dataclasses.dataclass(frozen=True, slots=True)
class TokenRecord:
    """A token as stored: never the secret, only its SHA-256 hash.

    Roles: ``agent`` (one wallet), ``reader`` and ``admin`` (one account).
    """

    token_hash: str
    token_id: str
    role: str
    scope_node_id: str
    account_id: str
    name: str
    created_at_ms: int


class StaleChainError(Exception):
    """The account names its windows in another time zone than the chain's: look the account up and retry.

    A plan cannot change an account's time zone; the script checks it all the same, as the windows depend on it.
    """


class SpendStore(Protocol):
    """Hot state: node configuration, window counters, holds, idempotency records and the ledger outbox.

    Every method that decides or changes money is one atomic script call.
    """

    async def account_of(self, node_id: str) -> str:
        """Return the account a node belongs to; raise ``NotFoundError`` if there is no such node."""
        ...

    async def account_info(self, account_id: str) -> AccountInfo:
        """Return an account's currency and time zone."""
        ...

    async def resolve_wallet(self, wallet_id: str) -> Chain:
        """Return a wallet's chain; raise ``NotFoundError`` for an unknown wallet or a node that is not one."""
        ...

    async def node_ids(self, account_id: str) -> list[str]:
        """Return the ids of an account's nodes (every kind), in no order."""
        ...

    async def authorize(
        self,
        chain: Chain,
        command: AuthorizeCommand,
        *,
        authorization_id: str,
        fingerprint: str,
        windows: WindowIds,
        now_ms: int,
        token_mode: str = "",
    ) -> AuthorizeOutcome:
        """Decide and apply one authorization, in one round trip.

        A chain that is unresolved, or no longer the account's tree, is walked from its wallet in the same
        step, and returned with the result. Raises ``NotFoundError`` when the wallet is not in the chain's
        account, ``InvalidArgumentError`` when it is not a wallet or for a currency that is not the account's,
        :class:`StaleChainError` when the account's time zone is not the chain's, and ``AlreadyExistsError``
        when the idempotency key was used for another request.
        """
        ...

    async def capture(
        self,
        account_id: str,
        authorization_id: str,
        amount_micros: int,
        idempotency_key: str,
        now_ms: int,
        token_mode: str = "",
    ) -> CaptureResult:
        """Settle a hold fully or partially."""
        ...

    async def void(self, account_id: str, authorization_id: str, now_ms: int, token_mode: str = "") -> VoidResult:
        """Release a hold."""
        ...

    async def budget(self, account_id: str, node_id: str, windows: WindowIds, now_ms: int) -> NodeBudget:
        """Return a node's budget in the windows open at ``now_ms``."""
        ...

    async def expire_holds(self, account_id: str, now_ms: int) -> int:
        """Release one batch of an account's expired holds; return how many were released."""
        ...

    async def account_ids(self) -> list[str]:
        """Return every account id of the deployment."""
        ...

    async def put_plan(self, plan: AccountPlan) -> None:
        """Create or reconfigure every node of an account's plan, keeping their counters."""
        ...

    async def ping(self) -> None:
        """Raise ``UnavailableError`` when the store cannot be reached."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


class AdminStore(SpendStore, Protocol):
    """What the control plane needs on top of the hot path: reading and editing the tree, freezes, events."""

    async def put_plan(
        self,
        plan: AccountPlan,
        *,
        nodes: Sequence[NodeSpec] | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Create or reconfigure nodes of a plan (all by default), parents first, keeping counters."""
        ...

    async def read_plan(self, account_id: str) -> AccountPlan | None:
        """Return an account's tree as configured now, or ``None``."""
        ...

    async def delete_node(self, account_id: str, node_id: str, *, force: bool, windows: WindowIds) -> None:
        """Remove one childless node; refuse if it carries money, unless forced."""
        ...

    async def node_activity(self, account_id: str, node_id: str, windows: WindowIds) -> tuple[int, int]:
        """Return (held, spent in open day/week/month windows) in micro-units."""
        ...

    async def freeze(
        self, account_id: str, node_id: str, reason: str, *, void_holds: bool, now_ms: int
    ) -> tuple[bool, int, int]:
        """Freeze (reason) or unfreeze (empty reason); return (was frozen, holds voided, money released)."""
        ...

    async def append_events(self, account_id: str, events: Sequence[dict[str, str]]) -> None:
        """Append events to an account's live feed."""
        ...

    async def read_events(self, last_ids: dict[str, str], count_max: int) -> list[tuple[str, str, dict[str, str]]]:
        """Return events after the given ids, per account: (account id, event id, fields)."""
        ...

    async def last_event_id(self, account_id: str) -> str:
        """Return the newest event id of an account."""
        ...

    async def backlog(self, account_id: str) -> Backlog:
        """Return an account's open holds and ledger outbox backlog."""
        ...

    async def list_tokens(self) -> list[TokenRecord]:
        """Every token's record (without secrets)."""
        ...

    async def revoke_token(self, record: TokenRecord) -> None:
        """Delete a token everywhere."""
        ...

    async def restore_counters(
        self, account_id: str, windows: Mapping[Window, str], spent: Mapping[str, Mapping[Window, int]]
    ) -> int:
        """Set every node's spent counters in ``windows`` and recount held money from the open holds."""
        ...
